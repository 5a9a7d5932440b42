"""Kernels: pure functions on tensors, one file per hot path, each dispatching to a backend."""
from .philox import derive_seed
from .projection import projection_rows, sketch_matrix
from .sketch import sketch

__all__ = ["sketch", "sketch_matrix", "projection_rows", "derive_seed"]
