"""Attribution methods: each a small class over kernels + capture + store."""
from .datamodels import Datamodels
from .trak import TRAK

__all__ = ["Datamodels", "TRAK"]
from .ekfac import EKFAC, KFAC
from .influence import InfluenceCG, InfluenceExplicit, InfluenceLiSSA
from .tracin import TracIn
