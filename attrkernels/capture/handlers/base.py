"""What every layer handler shares: records, gradient blocks, the handler base and the type table.

For a module called on input a with output y and d f_b / d y = delta (f_b one scalar per
example b, examples independent), the per-example gradient of its parameters is a contraction
of a and delta. A handler turns the records of one module (one record per call; calls add up)
into ``blocks``: the per-example gradient of each parameter in memory-bounded pieces
(param, start, block[B, n]) = entries [start, start + n) of the row-major flattened gradient,
for all B examples. Handlers whose weight gradient is a sum of outer products also give its
Kronecker factors and everything EK-FAC / K-FAC need (``kron.KroneckerHandler``).

Which handler captures a module is looked up in ``HANDLERS`` (module type -> handler class)
along the module type's MRO, so subclasses of a registered type are captured too;
``register_handler`` adds a type. Nothing outside the handlers branches on the layer type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn


@dataclass
class Record:
    """One call of a tracked module: its input (detached) and the gradient of sum_b f_b w.r.t. its
    output. ``output``: the output tensor itself and its ``_version`` at the call (what a pass asks
    autograd for; dropped after the backward pass). ``rows``: the rows of the weight's output
    dimension this call computed (None: all; a use of part of a packed weight, e.g. the query
    third of an attention's in-projection)."""

    inputs: torch.Tensor
    grad_out: torch.Tensor | None = None
    output: torch.Tensor | None = None
    version: int = 0
    rows: slice | None = None


def record_call(handler: "Handler", inputs: torch.Tensor, output: torch.Tensor, rows: slice | None = None) -> Record:
    """Append a ``Record`` of one call (input, output, ``rows``) to the handler and hook the
    output's gradient into it."""
    record = Record(inputs=inputs.detach(), output=output, version=output._version, rows=rows)
    handler.records.append(record)
    if output.requires_grad:
        # Registered before any in-place op on the output, so it sees d f / d output.
        output.register_hook(partial(_store_grad, record))
    return record


def _store_grad(record: Record, grad: torch.Tensor):
    record.grad_out = grad.detach()


@dataclass
class Block:
    """Entries [start, start + values.shape[1]) of ``param``'s flattened per-example gradient."""

    param: nn.Parameter
    start: int
    values: torch.Tensor  # [B, n]
    # [n] view of the parameter's running sum over examples, set by ``PerExample._blocks`` when
    # its consumer adds values.sum(0) there itself (the sketch kernel does, while reading values).
    sums: torch.Tensor | None = None


class Handler:
    """Base of the handlers: one instance per (module, capture) holds that module's records.

    A subclass implements ``blocks`` and may override ``check`` (settings it cannot capture).
    ``kronecker`` says whether EK-FAC / K-FAC can factor the module's weight (see
    ``kron.KroneckerHandler`` for what such a handler provides).
    """

    kronecker: ClassVar[bool] = False
    # The names of the weight (and bias) parameters a Kronecker handler factors.
    weight_name: ClassVar[str] = "weight"
    bias_name: ClassVar[str] = "bias"
    # Whether the module's own forward is replaced while a capture runs (``intercept``), instead
    # of hooking its calls: for modules that use their parameters functionally.
    intercepts: ClassVar[bool] = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.records: list[Record] = []
        # The task's token mask of the batch ([B, T], 1 = a token, 0 = padding; None: every
        # position counts): only the covariances read it, each handler applies it to the records
        # whose positions it describes (``token_weights``).
        self.mask: torch.Tensor | None = None
        # The handlers of the other modules that use this module's weight (a tied weight, e.g.
        # GPT-2's lm_head and wte): set by the capture, read by EK-FAC / K-FAC (``kron``).
        self.tied: list = []
        # Memory that ``blocks`` may form its blocks in (set by ``PerExample._blocks``; None:
        # fresh tensors).
        self.workspace: Workspace | None = None

    @classmethod
    def check(cls, name: str, module: nn.Module) -> None:
        """Raise ValueError (naming the module) for settings whose per-example gradients would mix examples."""

    @classmethod
    def why_not_kronecker(cls, module: nn.Module) -> str | None:
        """Why EK-FAC / K-FAC cannot factor this module's weight, or None when they can."""
        return type(module).__name__

    @classmethod
    def why_not_captured(cls, module: nn.Module) -> str | None:
        """Why this module's calls cannot be captured at all (its parameters then go to the
        torch.func fallback, and EK-FAC / K-FAC leave them out), or None."""
        return None

    @classmethod
    def weight_of(cls, module: nn.Module):
        return getattr(module, cls.weight_name, None)

    @classmethod
    def bias_of(cls, module: nn.Module):
        return getattr(module, cls.bias_name, None)

    @classmethod
    def intercept(cls, module: nn.Module, handler):
        """For ``intercepts`` handlers: replace the module's forward for the capture, recording
        into ``handler`` (None when only modules below it are tracked); returns an object whose
        ``remove()`` restores it."""
        raise NotImplementedError

    @classmethod
    def projectable(cls, module: nn.Module) -> bool:
        """Whether ``kron`` gives the weight gradient as dense factors (A, D), which the
        featurizer's factored mode projects separately."""
        return False

    def blocks(self, tracked: set, budget: int):
        """Yield the ``Block`` s of the tracked parameters of the module, at most ``budget`` bytes each."""
        raise NotImplementedError

    def kron(self, examples: slice = slice(None)):
        """(A [B, T, d_in], D [B, T, d_out]) such that grad W_b = sum_t D_bt A_bt^T, or None.

        ``examples`` selects a range of the batch (unfolding only those examples)."""
        return None

    def storage_pairs(self, examples: slice = slice(None)):
        """(U [B, T, rows], V [B, T, cols]) with this module's use of its weight giving
        grad weight_b.reshape(rows, cols) = sum_t U_bt V_bt^T (rows = weight.shape[0], the
        storage order), or None: how a tied weight's other uses join EK-FAC's factors."""
        return None

    def token_weights(self, examples: slice = slice(None)):
        """[B, T] float32: 1 where a position of ``kron`` / ``storage_pairs`` is a token of the
        task's mask, 0 at padding; None when every position counts."""
        return None


# ---------------------------------------------------------------------------------------------
# The type -> handler table

HANDLERS: dict[type, type] = {}


def register_handler(module_type: type, handler_cls: type) -> None:
    """Capture modules of ``module_type`` (and its subclasses without their own entry) with
    ``handler_cls``, a ``Handler`` subclass; replaces an earlier entry for that type."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(handler_cls, type) and issubclass(handler_cls, Handler)):
        raise TypeError(f"handler_cls must be a Handler subclass, got {handler_cls!r}")
    HANDLERS[module_type] = handler_cls


# Handlers of classes from optional packages, keyed by "module.QualName" so the package is not
# imported unless the user's model already uses it.
HANDLERS_BY_NAME: dict = {}


def handler_for(module: nn.Module) -> type | None:
    """The handler class of a module: the entry of the nearest type in its MRO (by type, or by
    qualified class name for optional packages), or None."""
    for t in type(module).__mro__:
        cls = HANDLERS.get(t) or HANDLERS_BY_NAME.get(f"{t.__module__}.{t.__qualname__}")
        if cls is not None:
            return cls
    return None


# Modules that use their children's parameters functionally (not by calling the children), so
# hooks on those children see nothing: MultiheadAttention calls F.multi_head_attention_forward
# with out_proj.weight. Their handler (``intercepts``) replaces that forward while a capture runs,
# where it can (``why_not_captured``); the others stay functional owners.
FUNCTIONAL_OWNERS = (nn.MultiheadAttention,)


def functional_owners(model: nn.Module) -> dict:
    """{name: why} of the modules of ``model`` that use their parameters and their children's
    functionally and that no handler intercepts."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, FUNCTIONAL_OWNERS):
            cls = handler_for(m)
            why = "no handler" if cls is None or not cls.intercepts else cls.why_not_captured(m)
            if why is not None:
                out[n] = why
    return out


def functional_owner(name: str, owners) -> str | None:
    """The owner (from ``functional_owners``) that module ``name`` is or lies under, or None."""
    for o in owners:
        if name == o or name.startswith(o + "."):
            return o
    return None


# ---------------------------------------------------------------------------------------------
# Helpers of the handlers


def cat(parts: list, dim: int) -> torch.Tensor:
    """torch.cat, except that a single part (one call: the common case) is returned as is, so a
    transposed view (the unfolded conv input) is not gathered into a contiguous copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def positions(x: torch.Tensor) -> int:
    """Positions per example of a [B, *, d] tensor (1 for [B, d])."""
    return x[0].numel() // x.shape[-1] if x.shape[0] else 1


def rows_per_block(B: int, row_len: int, budget: int) -> int:
    """Rows of a [rows, row_len] weight whose gradients for B examples fit in ``budget`` bytes."""
    return max(1, budget // max(1, 4 * B * row_len))


class Workspace:
    """One float32 buffer reused by consecutive gradient blocks of a pass, whose consumer holds
    one block at a time (``PerExample._blocks``). Fresh multi-megabyte tensors are mapped anew
    by the allocator and page-faulted in on first write: the batched GEMM forming a 38 MB block
    ran 1.8x slower into fresh memory than into reused memory on the Intel Xeon (one thread)."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def take(self, shape, device) -> torch.Tensor:
        """A contiguous float32 tensor of ``shape`` on ``device``, overwriting the previous one."""
        n = math.prod(shape)
        if self._buf is None or self._buf.numel() < n or self._buf.device != torch.device(device):
            self._buf = None
            self._buf = torch.empty(n, dtype=torch.float32, device=device)
        return self._buf[:n].view(shape)


def outer_blocks(param, A, D, budget, workspace: Workspace | None = None):
    """Blocks of grad W_b = D_b^T A_b ([B, d_out, d_in]) over ranges of output rows, all examples
    (formed in ``workspace`` when given: each block is then overwritten by the next)."""
    B, _, d_in = A.shape
    d_out = D.shape[2]
    step = rows_per_block(B, d_in, budget)
    At = A.to(torch.float32)
    for o0 in range(0, d_out, step):
        o1 = min(d_out, o0 + step)
        out = None if workspace is None else workspace.take((B, o1 - o0, d_in), A.device)
        G = torch.bmm(D[:, :, o0:o1].to(torch.float32).transpose(1, 2), At, out=out)  # [B, o1-o0, d_in]
        yield Block(param, o0 * d_in, G.reshape(B, -1))
        del G  # one block alive at a time: freed (or overwritten) before the next is formed
