"""Which layers EK-FAC / K-FAC factor: the tracked weights (and biases) whose handler is
Kronecker-factorable (``attrkernels.capture.handlers``, ``Handler.kronecker``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ...capture.handlers import HANDLERS, functional_owner, functional_owners, handler_for
from ...capture.hooks import resolve_params


@dataclass(frozen=True)
class Layer:
    """A tracked layer: G [d_out, d_in] per example (d_in includes the bias column); ``handler``
    is its handler class (a ``KroneckerHandler``), which does everything layer-specific."""

    name: str
    module: nn.Module
    handler: type
    bias: bool
    d_in: int
    d_out: int

    def describe(self) -> dict:
        return {"module": type(self.module).__name__, "d_out": self.d_out, "d_in": self.d_in, "bias": self.bias}


def _supported() -> str:
    """The module types whose handler is Kronecker-factorable (e.g. Linear, Conv1d, Conv2d, Embedding)."""
    return ", ".join(t.__name__ for t, cls in HANDLERS.items() if cls.kronecker)


def _unsupported(mname: str, module: nn.Module, functional: set) -> str | None:
    """Why a module's parameters cannot be Kronecker-factored, or None."""
    owner = functional_owner(mname, functional)
    if owner is not None:
        return f"used functionally inside the MultiheadAttention {owner!r}"
    cls = handler_for(module)
    if cls is None or not cls.kronecker:
        return type(module).__name__
    return cls.why_not_kronecker(module)


def select_layers(model: nn.Module, params=None) -> tuple[list, list]:
    """(layers, skipped parameter names) for ``params`` (None: every supported trainable weight)."""
    functional = functional_owners(model)
    owners: dict = {}  # id(param) -> [(param name, module name, module, role)]
    for mname, module in model.named_modules(remove_duplicate=False):
        for role, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{mname}.{role}" if mname else role, mname, module, role))
    chosen = resolve_params(model, params)
    explicit = params is not None
    by_name = dict(model.named_parameters())
    chosen_set = set(chosen)
    layers, skipped, bad = {}, [], []
    for name in chosen:
        entries = owners[id(by_name[name])]
        _, mname, module, role = entries[0]
        reason = _unsupported(mname, module, functional)
        if reason is None and len({id(m) for _, _, m, _ in entries}) > 1:
            reason = f"shared by the modules {sorted({n for _, n, _, _ in entries})}"
        if reason is None and role not in ("weight", "bias"):
            reason = f"parameter {role!r} of {type(module).__name__}"
        weight_name = f"{mname}.weight" if mname else "weight"
        if reason is None and role == "bias" and weight_name not in chosen_set:
            reason = "a bias without its weight"
        if reason is not None:
            (bad if explicit else skipped).append(name if not explicit else f"{name} ({reason})")
            continue
        if role == "weight":
            layers[mname] = module
    if bad:
        raise ValueError("EK-FAC/K-FAC cannot factor the parameters " + ", ".join(bad) +
                         f"; supported: {_supported()}. Leave them out of params=")
    out = []
    for mname, module in layers.items():
        cls = handler_for(module)
        cls.check(mname, module)
        bias_name = f"{mname}.bias" if mname else "bias"
        bias = getattr(module, "bias", None) is not None and bias_name in chosen_set
        d_in, d_out = cls.dims(module, bias)
        out.append(Layer(mname, module, cls, bias, d_in, d_out))
    if not out:
        raise ValueError(f"the model has no trainable weight EK-FAC/K-FAC can factor (supported: {_supported()})")
    return out, skipped


def tracked_names(layers: list) -> list:
    """The parameter names of the layers: each weight, then its bias when tracked."""
    names = []
    for layer in layers:
        prefix = f"{layer.name}." if layer.name else ""
        names.append(prefix + "weight")
        if layer.bias:
            names.append(prefix + "bias")
    return names
