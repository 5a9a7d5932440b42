"""attrkernels: compiled kernels for training-data attribution."""
__version__ = "0.1.0"

from . import backends, tasks
from .kernels import derive_seed, sketch, sketch_matrix
from .integrations.trak import SketchProjector

__all__ = ["sketch", "sketch_matrix", "derive_seed", "SketchProjector", "backends", "tasks"]
