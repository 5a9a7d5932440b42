"""attrkernels: compiled kernels for training-data attribution."""
__version__ = "0.1.0"

from . import backends, tasks
from .capture import Featurizer
from .eval import lds
from .integrations.trak import SketchProjector
from .kernels import derive_seed, sketch, sketch_matrix
from .methods import EKFAC, KFAC, TRAK, Datamodels, InfluenceCG, InfluenceExplicit, InfluenceLiSSA, SOURCE, TracIn

__all__ = ["sketch", "sketch_matrix", "derive_seed", "SketchProjector", "Featurizer", "backends", "tasks",
           "lds", "TRAK", "TracIn", "InfluenceExplicit", "InfluenceCG", "InfluenceLiSSA", "EKFAC", "KFAC", "SOURCE",
           "Datamodels"]
