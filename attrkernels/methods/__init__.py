"""Attribution methods: each a small class over kernels + capture + store."""
from .datamodels import Datamodels

__all__ = ["Datamodels"]
