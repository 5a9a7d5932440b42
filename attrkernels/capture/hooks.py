"""Which parameters are tracked, where they sit in the flattened gradient, and how each is captured.

The per-example gradient g_b of the tracked parameters is their gradients concatenated in
``model.named_parameters()`` order, each flattened row-major. Parameters owned by a module a
handler captures (``handlers``: the type -> handler table) come from forward hooks (inputs) and
tensor hooks on the module outputs (d sum_b f_b / d output); every other tracked parameter comes
from torch.func per-example gradients of that parameter alone (fallback.py).

Examples must not interact in the forward pass (eval-mode BatchNorm, no batch statistics), so
d f_b / d output_b is the gradient of sum_b f_b.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from .handlers import Handler, functional_owner, functional_owners, handler_for
from .handlers.base import record_call


@dataclass
class Plan:
    """Tracked parameters, their offsets in the flattened gradient, and who computes them."""

    names: list  # tracked parameter names, named_parameters() order
    params: list  # the same parameters
    offsets: dict  # id(param) -> first row of the param in the flattened gradient
    total: int  # p: length of the flattened gradient
    hooked: dict  # module name -> (module, handler class) for modules whose params we capture
    fallback: list  # [(name, param)] computed with torch.func
    # module name -> (module, handler class) of the modules whose forward the capture replaces
    # (``Handler.intercepts``): those hooked and those with a hooked module below them
    patched: dict = field(default_factory=dict)

    def name_of(self, param) -> str:
        return self.names[[id(p) for p in self.params].index(id(param))]

    def hooked_params(self) -> list:
        """The tracked parameters the hooks capture: those of the hooked modules that are not
        computed with torch.func (``fallback=`` takes a parameter away from its module's hook,
        so it is never counted twice)."""
        fallback = {id(p) for _, p in self.fallback}
        out = {}
        for module, _ in self.hooked.values():
            for p in module.parameters(recurse=False):
                if id(p) in self.offsets and id(p) not in fallback:
                    out[id(p)] = p
        return list(out.values())


def resolve_params(model: nn.Module, params=None) -> list:
    """Names of the parameters ``params`` selects (names or one name; None: every trainable one),
    in ``model.named_parameters()`` order; a clear error for unknown, frozen or no parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("model has no trainable parameters (none has requires_grad=True)")
        return chosen
    chosen = [params] if isinstance(params, str) else list(params)
    if not chosen:
        raise ValueError("params selects no parameter")
    by_name = dict(named)
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        raise ValueError(f"params names unknown parameters {unknown}; the model has e.g. "
                         f"{[n for n, _ in named[:5]]}")
    frozen = [n for n in chosen if not by_name[n].requires_grad]
    if frozen:
        raise ValueError(f"params names parameters with requires_grad=False: {frozen}")
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(set(chosen), key=order.__getitem__)


def batch_dependence(module: nn.Module) -> str | None:
    """Why ``module``'s output for one example depends on the other examples of its batch (in
    eval mode, where every capture runs), or None. Built in: BatchNorm without running
    statistics (``track_running_stats=False`` normalises with the batch's statistics even in
    eval mode)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        return (f"{type(module).__name__} with track_running_stats=False normalises with the statistics "
                "of the batch, even in eval mode")
    return None


def check_batch_independent(model: nn.Module) -> None:
    """Refuse a model in which examples of a batch interact in the forward pass (every module,
    tracked or not; see ``batch_dependence``): per-example gradients, factors and scores would
    then change with the batch size and with which examples share a batch. Called by
    ``make_plan``, so by every method that captures gradients."""
    for name, module in model.named_modules():
        reason = batch_dependence(module)
        if reason is not None:
            raise ValueError(
                f"module {name or type(module).__name__!r}: {reason}, so each example's output depends on "
                "the other examples of its batch and per-example gradients and scores would change with "
                "the batching; use track_running_stats=True (normalisation by running statistics) or a "
                "per-example normalisation (LayerNorm, GroupNorm)")


def make_plan(model: nn.Module, params=None, fallback=()) -> Plan:
    """Resolve ``params`` (names, default: all trainable) into a capture plan; refuses models
    whose examples interact (``check_batch_independent``)."""
    chosen = resolve_params(model, params)
    check_batch_independent(model)
    by_name = dict(model.named_parameters())
    forced = set(fallback)
    unknown = forced - set(by_name)
    if unknown:
        raise ValueError(f"fallback names unknown parameters {sorted(unknown)}")

    offsets, total = {}, 0
    for n in chosen:
        offsets[id(by_name[n])] = total
        total += by_name[n].numel()
    tracked_ids = set(offsets)
    forced_ids = {id(by_name[n]) for n in forced}

    # Modules that use their children's parameters functionally are not hooked below them.
    functional = functional_owners(model)
    hooked, owned = {}, set()
    for mname, module in model.named_modules():
        cls = handler_for(module)
        if cls is None or functional_owner(mname, functional) is not None:
            continue
        direct = [p for p in module.parameters(recurse=False)
                  if id(p) in tracked_ids and id(p) not in forced_ids]
        if not direct:
            continue
        cls.check(mname, module)
        hooked[mname] = (module, cls)
        owned.update(id(p) for p in direct)
    fb = [(n, by_name[n]) for n in chosen if id(by_name[n]) not in owned]
    patched = {}
    for mname, module in model.named_modules():
        cls = handler_for(module)
        if cls is not None and cls.intercepts and functional_owner(mname, functional) is None and any(
                h == mname or h.startswith(mname + ".") for h in hooked):
            patched[mname] = (module, cls)
    return Plan(chosen, [by_name[n] for n in chosen], offsets, total, hooked, fb, patched)


def unbatched_modules(handlers: dict, batch_size: int) -> list:
    """Names of hooked modules called on inputs without the batch dimension (leading size other
    than ``batch_size``, e.g. a position embedding looked up with arange(T) and broadcast over the
    batch): their output-gradients arrive summed over the examples, so hooks cannot separate them."""
    return [name for name, h in handlers.items()
            if any(r.inputs.ndim == 0 or r.inputs.shape[0] != batch_size for r in h.records)]


@dataclass
class Capture:
    """Context that records inputs and output-gradients of the plan's hooked modules.

    ``mask``: the task's token mask of the batch ([B, T] or None), given to every handler
    (``Handler.mask``). Handlers of modules that use the same weight (tied) are linked
    (``Handler.tied``)."""

    plan: Plan
    handlers: dict = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    mask: torch.Tensor | None = None

    def __enter__(self):
        users = {}
        for mname, (module, cls) in self.plan.hooked.items():
            handler: Handler = cls(module)
            handler.mask = self.mask
            self.handlers[mname] = handler
            weight = cls.weight_of(module)
            if isinstance(weight, nn.Parameter):
                users.setdefault(id(weight), []).append(handler)
            if not cls.intercepts:
                self._handles.append(module.register_forward_hook(partial(self._on_forward, mname, handler)))
        for mname, (module, cls) in self.plan.patched.items():
            self._handles.append(cls.intercept(module, self.handlers.get(mname)))
        for tied in users.values():
            for h in tied:
                h.tied = [o for o in tied if o is not h]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    @staticmethod
    def _on_forward(mname, handler, module, args, output):
        if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(output):
            raise TypeError(f"{mname}: cannot capture a call without a positional tensor input "
                            "and a tensor output")
        record_call(handler, args[0], output)


def release_outputs(handlers: dict) -> None:
    """Drop the output tensors the records hold (after the backward passes that needed them)."""
    for handler in handlers.values():
        for r in handler.records:
            r.output = None
