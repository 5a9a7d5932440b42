"""Hugging Face models for libraries that only know ``nn.Linear``: transformers' ``Conv1D`` layers
(GPT-2's attention and MLP projections) converted to ``nn.Linear``.

``Conv1D`` stores its weight transposed, W [d_in, d_out], and computes y = x W + b. The
converted layer is ``nn.Linear(d_in, d_out)`` with weight W^T [d_out, d_in] and the same bias,
so y = x (W^T)^T + b: the same function, and the copy's logits equal the original's (to the
rounding of the two GEMM layouts). Peers such as kronfluence track only ``nn.Linear`` /
``nn.Conv2d``; run them on the copy, with the same module names as the original.

Conv1D is recognised by class name (as the capture handler does): transformers is not imported.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..capture.handlers.hf_conv1d import CLASS_NAME


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == CLASS_NAME


def conv1d_names(model: nn.Module) -> list[str]:
    """Names of the model's ``Conv1D`` modules, in ``named_modules`` order."""
    return [name for name, m in model.named_modules() if is_conv1d(m)]


def conv1d_params(model: nn.Module) -> list[str]:
    """Names of the weights and biases of the model's ``Conv1D`` modules (``params=`` of our methods)."""
    return [f"{name}.{p}" for name, m in model.named_modules() if is_conv1d(m)
            for p in ("weight", "bias") if getattr(m, p, None) is not None]


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ``Conv1D`` modules are ``nn.Linear`` with the transposed
    weight, under the same names (every other module, tied weights included, copied as is).

    Raises ValueError if the model has no ``Conv1D`` module (nothing to convert: pass the model)."""
    names = conv1d_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no transformers Conv1D module to convert; "
                         "pass the model itself")
    out = copy.deepcopy(model)
    for name in names:
        conv = out.get_submodule(name)
        d_in, d_out = conv.weight.shape
        linear = nn.Linear(d_in, d_out, bias=conv.bias is not None, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, linear)
    return out


__all__ = ["conv1d_names", "conv1d_params", "conv1d_to_linear", "is_conv1d"]
