"""Per-example gradients of a layer's parameters from its inputs and output-gradients.

For a module called on input a with output y and d f_b / d y = delta (f_b one scalar per
example b, examples independent), the per-example gradient of its parameters is a contraction
of a and delta. Each handler below turns the records of one module (one record per call; calls
add up) into

* ``blocks``: the per-example gradient of each parameter in memory-bounded pieces
  (param, start, block[B, n]) = entries [start, start + n) of the row-major flattened gradient,
  for all B examples; and, where the weight gradient is a sum of outer products,
* ``kron``: the factors (A [B, T, d_in], D [B, T, d_out]) with grad W_b = sum_t D_bt A_bt^T.

Shapes (T = positions: sequence, pixels after unfolding):
  Linear    a [B, *, d_in], delta [B, *, d_out]:   W_b = sum_t delta_bt a_bt^T,  b_b = sum_t delta_bt
  Conv1d/2d a unfolded per group g to [B, L, C_in/G * prod(kernel)], delta to [B, L, C_out/G]:
            W_b[rows of g] = sum_l delta_blg a_blg^T (matches weight.flatten(1) row-major)
  Embedding idx [B, *], delta [B, *, d]: row v of W_b = sum_{t: idx_bt = v} delta_bt (sparse rows)
  LayerNorm / GroupNorm / BatchNorm (eval), normalised input xh:
            gamma_b = sum over non-channel positions of delta * xh,  beta_b = sum of delta
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import conv_grad


@dataclass
class Record:
    """One call of a tracked module: its input (detached) and the gradient of sum_b f_b w.r.t. its output."""

    inputs: torch.Tensor
    grad_out: torch.Tensor | None = None


@dataclass
class Block:
    """Entries [start, start + values.shape[1]) of ``param``'s flattened per-example gradient."""

    param: nn.Parameter
    start: int
    values: torch.Tensor  # [B, n]


@dataclass
class Handler:
    """Base: turns the records of one module into gradient blocks."""

    module: nn.Module
    records: list = field(default_factory=list)

    def blocks(self, tracked: set, budget: int):
        raise NotImplementedError

    def kron(self, examples: slice = slice(None)):
        """(A [B, T, d_in], D [B, T, d_out]) such that grad W_b = sum_t D_bt A_bt^T, or None.

        ``examples`` selects a range of the batch (unfolding only those examples)."""
        return None

    def delta(self) -> torch.Tensor:
        for r in self.records:
            if r.grad_out is None:
                raise RuntimeError("a tracked module's output received no gradient")
        return torch.cat([r.grad_out for r in self.records], dim=1)


def _cat(parts: list, dim: int) -> torch.Tensor:
    """torch.cat, except that a single part (one call: the common case) is returned as is, so a
    transposed view (the unfolded conv input) is not gathered into a contiguous copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _positions(x: torch.Tensor) -> int:
    """Positions per example of a [B, *, d] tensor (1 for [B, d])."""
    return x[0].numel() // x.shape[-1] if x.shape[0] else 1


def _rows_per_block(B: int, row_len: int, budget: int) -> int:
    """Rows of a [rows, row_len] weight whose gradients for B examples fit in ``budget`` bytes."""
    return max(1, budget // max(1, 4 * B * row_len))


def _outer_blocks(param, A, D, budget):
    """Blocks of grad W_b = D_b^T A_b ([B, d_out, d_in]) over ranges of output rows, all examples."""
    B, _, d_in = A.shape
    d_out = D.shape[2]
    step = _rows_per_block(B, d_in, budget)
    At = A.to(torch.float32)
    for o0 in range(0, d_out, step):
        o1 = min(d_out, o0 + step)
        G = torch.bmm(D[:, :, o0:o1].to(torch.float32).transpose(1, 2), At)  # [B, o1-o0, d_in]
        yield Block(param, o0 * d_in, G.reshape(B, -1))
        del G  # one block alive at a time: freed before the next is formed


class LinearHandler(Handler):
    def _a_d(self, examples: slice = slice(None)):
        A = _cat([r.inputs[examples].reshape(-1, _positions(r.inputs), r.inputs.shape[-1]) for r in self.records], 1)
        D = _cat([r.grad_out[examples].reshape(-1, _positions(r.grad_out), r.grad_out.shape[-1])
                  for r in self.records], 1)
        return A, D

    def kron(self, examples: slice = slice(None)):
        return self._a_d(examples)

    def blocks(self, tracked, budget):
        A, D = self._a_d()
        m = self.module
        if m.weight in tracked:
            yield from _outer_blocks(m.weight, A, D, budget)
        if m.bias is not None and m.bias in tracked:
            yield Block(m.bias, 0, D.to(torch.float32).sum(1))


class ConvHandler(Handler):
    """nn.Conv1d / nn.Conv2d (any stride, padding, dilation, groups, padding mode)."""

    def _unfold(self, x):
        m = self.module
        two_d = isinstance(m, nn.Conv2d)
        if not two_d:
            x = x.unsqueeze(2)
        kernel = m.kernel_size if two_d else (1, m.kernel_size[0])
        stride = m.stride if two_d else (1, m.stride[0])
        dilation = m.dilation if two_d else (1, m.dilation[0])
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            pad = m._reversed_padding_repeated_twice
            if not two_d:
                pad = list(pad) + [0, 0]
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
            padding = (0, 0)
        else:
            padding = m.padding if two_d else (0, m.padding[0])
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return cols.transpose(1, 2)  # [B, L, C_in * prod(kernel)]

    def _a_d_groups(self, examples: slice = slice(None)):
        m = self.module
        A = _cat([self._unfold(r.inputs[examples]) for r in self.records], dim=1)
        D = _cat([r.grad_out[examples].flatten(2).transpose(1, 2) for r in self.records], dim=1)
        g = m.groups
        cin, cout = A.shape[2] // g, D.shape[2] // g
        return [(A[:, :, i * cin:(i + 1) * cin], D[:, :, i * cout:(i + 1) * cout]) for i in range(g)]

    def kron(self, examples: slice = slice(None)):
        if self.module.groups != 1:
            return None
        return self._a_d_groups(examples)[0]

    def blocks(self, tracked, budget):
        m = self.module
        if conv_grad.supported(m):
            yield from self._direct_blocks(tracked, budget)
            return
        groups = self._a_d_groups()
        if m.weight in tracked:
            row_len = m.weight[0].numel()
            for i, (A, D) in enumerate(groups):
                base = i * D.shape[2] * row_len
                for blk in _outer_blocks(m.weight, A, D, budget):
                    blk.start += base
                    yield blk
        if m.bias is not None and m.bias in tracked:
            D = torch.cat([d for _, d in groups], dim=2)
            yield Block(m.bias, 0, D.to(torch.float32).sum(1))

    def _direct_blocks(self, tracked, budget):
        """groups = 1, zero padding: each block of output channels is one grouped weight-gradient
        convolution over the batch (kernels.conv_grad), without unfolding the input."""
        m = self.module
        B = self.records[0].inputs.shape[0]
        if m.weight in tracked:
            row_len = m.weight[0].numel()
            step = _rows_per_block(B, row_len, budget)
            for o0 in range(0, m.out_channels, step):
                o1 = min(m.out_channels, o0 + step)
                G = conv_grad.conv_rotated_gradients([r.inputs for r in self.records],
                                                     [r.grad_out[:, o0:o1] for r in self.records], m)
                yield Block(m.weight, o0 * row_len, G.reshape(B, -1))
        if m.bias is not None and m.bias in tracked:
            yield Block(m.bias, 0, sum(r.grad_out.to(torch.float32).flatten(2).sum(2) for r in self.records))


class EmbeddingHandler(Handler):
    """nn.Embedding: per-example gradients live on the rows of the looked-up indices."""

    def sparse_rows(self):
        """(rows [U] sorted unique indices, R [B, U, d]): row rows[u] of W_b is R[b, u]."""
        m = self.module
        idx = torch.cat([r.inputs.reshape(r.inputs.shape[0], -1) for r in self.records], 1)
        D = torch.cat([r.grad_out.reshape(r.grad_out.shape[0], -1, r.grad_out.shape[-1])
                       for r in self.records], 1).to(torch.float32)
        if m.padding_idx is not None:
            D = D * (idx != m.padding_idx).unsqueeze(-1)
        rows, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        B, T, d = D.shape
        R = torch.zeros(B, rows.numel(), d, dtype=D.dtype, device=D.device)
        R.scatter_add_(1, inverse.reshape(B, T, 1).expand(B, T, d), D)
        return rows, R

    def blocks(self, tracked, budget):
        m = self.module
        if m.weight not in tracked:
            return
        rows, R = self.sparse_rows()
        d = R.shape[2]
        runs = _runs(rows.tolist())
        step = _rows_per_block(R.shape[0], d, budget)
        for start_u, v0, n in runs:
            for j in range(0, n, step):
                m_ = min(step, n - j)
                yield Block(m.weight, (v0 + j) * d, R[:, start_u + j:start_u + j + m_].reshape(R.shape[0], -1))


def _runs(sorted_rows):
    """Maximal runs of consecutive integers: (position in the list, first value, length)."""
    runs = []
    for pos, v in enumerate(sorted_rows):
        if runs and runs[-1][1] + runs[-1][2] == v:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, v, 1))
    return runs


class NormHandler(Handler):
    """Elementwise affine of LayerNorm, GroupNorm, BatchNorm1d/2d/3d (eval, running stats)."""

    def _normalised(self, x):
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = m.running_mean.reshape(shape)
        var = m.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + m.eps)

    def _reduce_dims(self, x):
        """Dimensions summed per example: positions, never the batch or the channels."""
        if isinstance(self.module, nn.LayerNorm):
            n = len(self.module.normalized_shape)
            return tuple(range(1, x.ndim - n))  # channels are the last n dimensions
        return tuple(range(2, x.ndim))  # channels are dimension 1

    def blocks(self, tracked, budget):
        m = self.module
        gamma = beta = None
        for r in self.records:
            x = r.inputs.to(torch.float32)
            g = r.grad_out.to(torch.float32)
            dims = self._reduce_dims(x)
            gw = (g * self._normalised(x)).sum(dim=dims) if dims else g * self._normalised(x)
            gb = g.sum(dim=dims) if dims else g
            gamma = gw if gamma is None else gamma + gw
            beta = gb if beta is None else beta + gb
        B = gamma.shape[0]
        if m.weight is not None and m.weight in tracked:
            yield Block(m.weight, 0, gamma.reshape(B, -1))
        if m.bias is not None and m.bias in tracked:
            yield Block(m.bias, 0, beta.reshape(B, -1))


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def handler_for(module: nn.Module):
    """The handler class of a module type we capture, or None."""
    if isinstance(module, nn.Linear):
        return LinearHandler
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ConvHandler
    if isinstance(module, nn.Embedding):
        return EmbeddingHandler
    if isinstance(module, NORMS):
        return NormHandler
    return None


def check_capturable(name: str, module: nn.Module) -> None:
    """Raise for module settings whose per-example gradients would mix examples."""
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        raise ValueError(f"{name}: Embedding(scale_grad_by_freq=True) mixes examples in its gradient")
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and module.running_mean is None:
        raise ValueError(
            f"{name}: BatchNorm without running statistics normalises with batch statistics, "
            "which mixes examples; use track_running_stats=True"
        )
