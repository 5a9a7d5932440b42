"""``nn.MultiheadAttention``: its packed in-projection as a Kronecker-factored layer, its
out-projection as the Linear it is.

The module calls ``F.multi_head_attention_forward`` with its parameters and with
``out_proj.weight``, so no hook sees a projection. While a capture runs, ``intercept`` replaces
the module's forward by the same computation written out (``forward``): the in-projection as
``F.linear`` calls whose inputs and output-gradients it records, scaled dot-product attention with
the same masks, and a call of ``out_proj`` itself (hooked like any Linear). Outside a capture the
module is untouched (the torch.func fallback and the user's own calls run torch's forward).

In-projection. W [3E, E] (rows: query, key, value thirds), bias [3E]. Self-attention (query, key
and value the same tensor x [B, T, E]) is one linear map, q|k|v = x W^T + b, so per example
G_b = D_b^T A_b with A_b = x_b [T, E] and D_b [T, 3E] the output-gradients of q|k|v. With other
key / value inputs each third multiplies its own input; every use then joins the layer as more
positions (the K-FAC-expand treatment of a weight used several times, as for tied weights), its
output-gradient zero outside its rows: use u adds (a, delta) = (x_u, [0 .. d_u .. 0]), so
G_b = sum over uses and positions of delta a^T is still the whole per-example gradient. Key and
value from one tensor share a use (rows E:3E).

Captured: the packed weight (``_qkv_same_embed_dim``) without ``add_bias_kv`` / ``add_zero_attn``.
Other settings (``why_not_captured``) leave the module to the torch.func fallback and EK-FAC /
K-FAC skip it, as before.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import cat, positions, record_call
from .linear import LinearHandler


class _Restore:
    """Undo of ``intercept``: puts back the instance's own ``forward`` attribute, if it had one."""

    def __init__(self, module: nn.Module, previous):
        self.module, self.previous = module, previous

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as 0 / -inf, a float mask as is, in ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttentionHandler(LinearHandler):
    """The in-projection of an ``nn.MultiheadAttention`` (see the module docstring)."""

    weight_name = "in_proj_weight"
    bias_name = "in_proj_bias"
    intercepts = True

    @classmethod
    def why_not_captured(cls, module) -> str | None:
        if not module._qkv_same_embed_dim:
            return "separate query / key / value projection weights (kdim or vdim other than embed_dim)"
        if module.bias_k is not None:
            return "add_bias_kv=True"
        if module.add_zero_attn:
            return "add_zero_attn=True"
        return None

    @classmethod
    def intercept(cls, module, handler):
        previous = module.__dict__.get("forward")

        def patched(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            return forward(module, handler, query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal)

        module.__dict__["forward"] = patched
        return _Restore(module, previous)

    @classmethod
    def dims(cls, module, bias: bool) -> tuple[int, int]:
        return module.embed_dim + bias, 3 * module.embed_dim

    def own_positions(self) -> int:
        return sum(positions(r.grad_out) for r in self.records)

    def kron(self, examples: slice = slice(None)):
        width = 3 * self.module.embed_dim
        A = cat([r.inputs[examples] for r in self.records], 1)
        parts = []
        for r in self.records:
            d = r.grad_out[examples]
            if r.rows is not None and (r.rows.start, r.rows.stop) != (0, width):
                full = d.new_zeros(d.shape[:-1] + (width,))
                full[..., r.rows] = d
                d = full
            parts.append(d)
        return A, cat(parts, 1)


    def token_weights(self, examples: slice = slice(None)):
        # the task's mask describes the query's tokens; key / value positions of cross-attention
        # belong to another sequence, even when it has the same length
        mask = self.mask
        if mask is None:
            return None

        def on_query(r):
            return (r.rows is None or r.rows.start == 0) and r.inputs.shape[:-1] == mask.shape

        if not any(on_query(r) for r in self.records):
            return None
        return cat([mask[examples].to(torch.float32) if on_query(r)
                    else r.inputs.new_ones(r.inputs[examples].shape[:2], dtype=torch.float32)
                    for r in self.records], 1)


def forward(module: nn.MultiheadAttention, handler, query, key, value, key_padding_mask, need_weights,
            attn_mask, average_attn_weights, is_causal):
    """``nn.MultiheadAttention.forward`` written out (the same function as torch's), recording the
    in-projection's calls into ``handler`` (None: not tracked) and calling ``out_proj``."""
    if is_causal and attn_mask is None:
        raise RuntimeError("MultiheadAttention: is_causal is a hint that attn_mask is the causal mask; "
                           "pass attn_mask as well (as torch's own forward requires)")
    unbatched = query.dim() == 2

    def batch_major(x):  # -> [B, T, E]
        if unbatched:
            return x.unsqueeze(0)
        return x if module.batch_first else x.transpose(0, 1)

    moved = {}  # keeps which inputs are the same tensor
    xq, xk, xv = (moved.setdefault(id(x), batch_major(x)) for x in (query, key, value))
    E, H = module.embed_dim, module.num_heads
    W, b = module.in_proj_weight, module.in_proj_bias

    def project(x, rows):
        y = F.linear(x, W[rows], None if b is None else b[rows])
        if handler is not None:
            record_call(handler, x, y, rows)
        return y

    if xq is xk and xk is xv:
        q, k, v = project(xq, slice(0, 3 * E)).split(E, dim=-1)
    elif xk is xv:
        q = project(xq, slice(0, E))
        k, v = project(xk, slice(E, 3 * E)).split(E, dim=-1)
    else:
        q, k, v = project(xq, slice(0, E)), project(xk, slice(E, 2 * E)), project(xv, slice(2 * E, 3 * E))
    B, T, S, hd = xq.shape[0], xq.shape[1], xk.shape[1], E // H
    q, k, v = (t.reshape(B, -1, H, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, *, hd]

    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(1, 1, T, S) if mask.dim() == 2 else mask.view(B, H, T, S)
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(B, 1, 1, S)
        mask = padding if mask is None else mask + padding
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        attended = F.dropout(weights, p=dropout) if dropout > 0 else weights
        out = attended @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = module.out_proj(out.transpose(1, 2).reshape(B, T, E))
    if unbatched:
        return out.squeeze(0), (None if weights is None else weights.squeeze(0))
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out, weights
