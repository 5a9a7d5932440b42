"""One handler class per layer type, owning everything layer-specific (see ``base``).

Built-in table: Linear, Conv1d / Conv2d, transformers' Conv1D (by class name), Embedding,
MultiheadAttention's in-projection (Kronecker-factored, ``kron``) and the
elementwise affine of the norms. Add a layer type with ``register_handler(ModuleType, Handler)``;
every parameter no handler captures goes to the torch.func fallback.
"""
import torch.nn as nn

from .attention import MultiheadAttentionHandler
from .base import (FUNCTIONAL_OWNERS, HANDLERS, HANDLERS_BY_NAME, Block, Handler, Record, functional_owner, functional_owners,
                   handler_for, register_handler)
from .conv import ConvHandler
from .embedding import EmbeddingHandler
from .hf_conv1d import CLASS_NAME as _CONV1D, Conv1DHandler
from .kron import CovarianceSums, KroneckerHandler, Query
from .linear import LinearHandler
from .norm import NORMS, NormHandler

register_handler(nn.Linear, LinearHandler)
register_handler(nn.Conv1d, ConvHandler)
register_handler(nn.Conv2d, ConvHandler)
register_handler(nn.Embedding, EmbeddingHandler)
register_handler(nn.MultiheadAttention, MultiheadAttentionHandler)
for _norm in NORMS:
    register_handler(_norm, NormHandler)
HANDLERS_BY_NAME[_CONV1D] = Conv1DHandler

__all__ = ["HANDLERS", "FUNCTIONAL_OWNERS", "Block", "Conv1DHandler", "ConvHandler", "CovarianceSums", "EmbeddingHandler", "Handler",
           "KroneckerHandler", "LinearHandler", "MultiheadAttentionHandler", "NormHandler", "Query", "Record", "functional_owner",
           "functional_owners", "handler_for", "register_handler"]
