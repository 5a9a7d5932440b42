"""Kernels: pure functions on tensors, one file per hot path.

Only ``sketch`` (the random projection, ``x @ P`` with P generated on the fly) has several
implementations and dispatches to a backend through ``attrkernels.backends``: "cpu" (the C++
extension), "triton", "cuda" (CuPy) or "torch" (the reference). README.md in this folder says how
to add a backend. The other kernels (block CG, LiSSA, Hessian-vector products, Kronecker factors
and their eigendecompositions, Kronecker scoring, Lanczos, per-example convolution gradients)
are torch code that runs on the device of its inputs; the packed solves use LAPACK through SciPy;
``columns.gather_columns`` (rows of chunks into contiguous columns) runs a C++ kernel on the CPU
and a torch copy elsewhere.
"""
from .philox import derive_seed
from .projection import projection_rows, sketch_matrix
from .sketch import sketch

__all__ = ["sketch", "sketch_matrix", "projection_rows", "derive_seed"]
