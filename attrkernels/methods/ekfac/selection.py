"""Which layers EK-FAC / K-FAC factor: the tracked weights (and biases) whose handler is
Kronecker-factorable (``attrkernels.capture.handlers``, ``Handler.kronecker``).

A tied weight (one Parameter used by several modules, e.g. GPT-2's lm_head and wte) is one
layer, counted once: the layer is its first use whose handler is ``tie_primary`` (lm_head, not
the Embedding) and the other uses join its factors as more positions (``handlers.kron``). Every
use must be Kronecker-factorable and use the parameter as its weight; otherwise the parameter
is skipped (``params=None``) or refused (named in ``params``) with the reason.

Before the first pass, the first batch is probed (``probe_layers``): with ``params=None``,
layers called without the batch dimension (a position embedding looked up with arange(T) and
broadcast over the batch) are left out (named in ``params``, the passes refuse them), and a
weight also used where no hook sees it (functional use) is refused."""
from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch
import torch.nn as nn

from ...capture.core import InconsistentGradients, PerExample
from ...capture.handlers import HANDLERS, functional_owner, functional_owners, handler_for
from ...capture.hooks import Capture, make_plan, resolve_params, unbatched_modules
from ...utils.batches import one_example, to_device
from ..checkpoints import model_device


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
    params: tuple = ()  # the parameter names (weight, then bias when tracked), as named_parameters() has them
    tied: tuple = ()  # names of the other modules that use the weight

    def describe(self) -> dict:
        out = {"module": type(self.module).__name__, "d_out": self.d_out, "d_in": self.d_in, "bias": self.bias}
        if self.tied:
            out["tied"] = list(self.tied)
        return out


def _supported() -> str:
    """The module types whose handler is Kronecker-factorable (e.g. Linear, Conv1d, Conv2d, Embedding)."""
    return ", ".join(t.__name__ for t, cls in HANDLERS.items() if cls.kronecker)


def _unsupported(mname: str, module: nn.Module, functional: set) -> str | None:
    """Why a module's parameters cannot be Kronecker-factored, or None."""
    owner = functional_owner(mname, functional)
    if owner is not None:
        return f"used functionally inside the MultiheadAttention {owner!r}: {functional[owner]}"
    cls = handler_for(module)
    if cls is None or not cls.kronecker:
        return type(module).__name__
    return cls.why_not_kronecker(module)


def _tied(entries: list, functional: dict) -> tuple[tuple | None, str | None]:
    """For a parameter used by several modules (``entries``: (param name, module name, module,
    role)): ((primary module name, module), ...) ordered primary first, or (None, why not)."""
    uses = {id(m): (n, m, role) for _, n, m, role in entries}
    for n, m, role in uses.values():
        if role != "weight":
            return None, f"shared by the modules {sorted(u[0] for u in uses.values())}, as {role!r} of {n!r}"
        reason = _unsupported(n, m, functional)
        if reason is not None:
            return None, f"tied: its use by {n!r} cannot be factored ({reason})"
    ordered = sorted(uses.values(), key=lambda u: not handler_for(u[1]).tie_primary)
    if not handler_for(ordered[0][1]).tie_primary:
        return None, f"shared only by modules whose factors are sparse {sorted(u[0] for u in uses.values())}"
    return tuple((n, m) for n, m, _ in ordered), None


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
    name_of = {id(p): n for n, p in by_name.items()}
    chosen_set = set(chosen)
    layers, skipped, bad = {}, [], []
    for name in chosen:
        entries = owners[id(by_name[name])]
        _, mname, module, role = entries[0]
        tied = ()
        if len({id(m) for _, _, m, _ in entries}) > 1:
            uses, reason = _tied(entries, functional)
            if uses is not None:
                (mname, module), tied = uses[0], tuple(n for n, _ in uses[1:])
        else:
            reason = _unsupported(mname, module, functional)
        cls = handler_for(module)
        if reason is None and role not in (cls.weight_name, cls.bias_name):
            reason = f"parameter {role!r} of {type(module).__name__}"
        if reason is None and role == cls.bias_name and name_of.get(id(cls.weight_of(module))) not in chosen_set:
            reason = "a bias without its weight"
        if reason is not None:
            (bad if explicit else skipped).append(name if not explicit else f"{name} ({reason})")
            continue
        if role == cls.weight_name:
            layers[mname] = (module, name, tied)
    if bad:
        raise ValueError("EK-FAC/K-FAC cannot factor the parameters " + ", ".join(bad) +
                         f"; supported: {_supported()}. Leave them out of params=")
    out = []
    for mname, (module, weight_name, tied) in layers.items():
        cls = handler_for(module)
        cls.check(mname, module)
        bias_param = cls.bias_of(module)
        bias_name = name_of.get(id(bias_param)) if isinstance(bias_param, nn.Parameter) else None
        bias = bias_name in chosen_set
        d_in, d_out = cls.dims(module, bias)
        out.append(Layer(mname, module, cls, bias, d_in, d_out, (weight_name, bias_name) if bias else (weight_name,),
                         tied))
    if not out:
        raise ValueError(f"the model has no trainable weight EK-FAC/K-FAC can factor (supported: {_supported()})")
    return out, skipped


def tracked_names(layers: list) -> list:
    """The parameter names of the layers: each weight, then its bias when tracked."""
    return [n for layer in layers for n in layer.params]


def probe_layers(model: nn.Module, layers: list, skipped: list, task, loader, leave_out: bool) -> tuple[list, list]:
    """Run the first example of the loader's first batch (and, with ``leave_out``, the batch) before any pass:
    (layers, skipped), with ``leave_out`` (``params=None``) without the layers called without
    the batch dimension (or whose tied weight's other use is), their parameters added to
    ``skipped``; raises ValueError when a layer's weight is also used outside the modules the
    hooks see (a functional use such as ``h @ emb.weight.T``), whose gradient EK-FAC would miss.

    A layer is unbatched when its inputs, of a leading size other than the batch's, have the
    same shape for the batch and for one example (a position table looked up with arange(T));
    a layer whose input shape follows the batch elsewhere (sequence-first [T, B, d]) is kept,
    and the passes refuse it with the fix. Errors of the task or model are left to the passes,
    which raise them located in the loader.

    The weight-use check runs on one example: a use the hooks miss changes its gradient as much
    as a batch's, at 1/B of a batch's forward and backward pass (a two-block GPT-2 of width 768,
    batches of 8: 5.1 s -> 0.85 s)."""
    batch = next(iter(loader), None)
    if batch is None:
        return layers, skipped
    batch = to_device(batch, model_device(model))
    if leave_out:
        layers, skipped = _leave_out_unbatched(model, layers, skipped, task, batch)
    checker = PerExample(model, task.loss, params=tracked_names(layers))
    checker.sum_fix = "EK-FAC / K-FAC cannot factor it: leave it out of params= (or call the module instead)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unbatched layers named in params=: the passes refuse them
            checker.check(one_example(batch, 0))
    except InconsistentGradients as err:
        raise ValueError(str(err)) from None
    except Exception:  # noqa: BLE001  (the passes' checked call raises it, located, or the store's mismatch first)
        pass
    return layers, skipped


def _leave_out_unbatched(model, layers, skipped, task, batch):
    plan = make_plan(model, tracked_names(layers))
    flagged, shapes = set(), []
    was_training = model.training
    model.eval()
    try:
        for probe in (batch, one_example(batch, 0)):
            with Capture(plan) as cap, torch.no_grad():
                out = task.loss(model, probe)
            flagged.update(unbatched_modules(cap.handlers, out.shape[0]))
            shapes.append({n: [tuple(r.inputs.shape) for r in h.records] for n, h in cap.handlers.items()})
    except Exception:  # noqa: BLE001  (left to the passes, as above)
        return layers, skipped
    finally:
        model.train(was_training)
    unbatched = {n for n in flagged if shapes[0][n] == shapes[1][n]}
    out = [layer for layer in layers if not ({layer.name, *layer.tied} & unbatched)]
    return out, skipped + [n for layer in layers if layer not in out for n in layer.params]
