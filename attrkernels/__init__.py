"""attrkernels: compiled kernels for training-data attribution."""
__version__ = "0.1.0"

from . import backends, tasks
from .kernels import derive_seed, sketch, sketch_matrix
from .integrations.trak import SketchProjector
from .capture import Featurizer

__all__ = ["sketch", "sketch_matrix", "derive_seed", "SketchProjector", "Featurizer", "backends", "tasks"]
from .eval import lds
from .methods import Datamodels
from .methods.trak import TRAK
from .methods import EKFAC, KFAC
from .methods import InfluenceCG, InfluenceExplicit, InfluenceLiSSA, TracIn
