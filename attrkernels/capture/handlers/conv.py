"""nn.Conv1d / nn.Conv2d (any stride, padding, dilation, groups, padding mode).

The input is unfolded per group g to [B, L, C_in/G * prod(kernel)] and delta to [B, L, C_out/G]:
W_b[rows of g] = sum_l delta_blg a_blg^T (matches weight.flatten(1) row-major); b_b = sum_l delta_bl.
EK-FAC / K-FAC factor groups = 1 only. Where it applies, the convolution avoids unfolding:
per-example gradients from one grouped weight-gradient convolution (``kernels.conv_grad``: no
T x d_in copy of the input) when that is the faster exact method (``conv_grad.direct_preferred``:
more output positions than output channels; else unfold + one batched GEMM per block of output
channels), and the activation factor of a stride-1 convolution from shifted correlations
(``kernels.conv_covariance``: fewer FLOPs than the unfolded GEMM, see there).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import conv_grad
from ...kernels.conv_covariance import conv_covariance
from ...kernels.conv_covariance import preferred as conv_covariance_preferred
from ...kernels.kfac import covariance, example_chunk, rotation_plan
from .base import Block, cat, outer_blocks, rows_per_block
from .kron import KroneckerHandler


class ConvHandler(KroneckerHandler):
    @classmethod
    def why_not_kronecker(cls, module):
        return None if module.groups == 1 else f"{type(module).__name__} with groups={module.groups}"

    def _unfold(self, x):
        """[B, L, C_in * prod(kernel)] unfolded input (a transposed view: positions innermost)."""
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
        A = cat([self._unfold(r.inputs[examples]) for r in self.records], dim=1)
        D = cat([r.grad_out[examples].flatten(2).transpose(1, 2) for r in self.records], dim=1)
        g = m.groups
        cin, cout = A.shape[2] // g, D.shape[2] // g
        return [(A[:, :, i * cin:(i + 1) * cin], D[:, :, i * cout:(i + 1) * cout]) for i in range(g)]

    def kron(self, examples: slice = slice(None)):
        if self.module.groups != 1:
            return None
        return self._a_d_groups(examples)[0]

    # ----------------------------------------------------------------------------- featurizer
    def blocks(self, tracked, budget):
        m = self.module
        if conv_grad.direct_preferred(m, sum(r.grad_out[0, 0].numel() for r in self.records)):
            yield from self._direct_blocks(tracked, budget)
            return
        groups = self._a_d_groups()
        if m.weight in tracked:
            row_len = m.weight[0].numel()
            for i, (A, D) in enumerate(groups):
                base = i * D.shape[2] * row_len
                for blk in outer_blocks(m.weight, A, D, budget, self.workspace):
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
            step = rows_per_block(B, row_len, budget)
            for o0 in range(0, m.out_channels, step):
                o1 = min(m.out_channels, o0 + step)
                G = conv_grad.conv_rotated_gradients([r.inputs for r in self.records],
                                                     [r.grad_out[:, o0:o1] for r in self.records], m)
                yield Block(m.weight, o0 * row_len, G.reshape(B, -1))
        if m.bias is not None and m.bias in tracked:
            yield Block(m.bias, 0, sum(r.grad_out.to(torch.float32).flatten(2).sum(2) for r in self.records))

    # ----------------------------------------------------------------------------- EK-FAC
    def formed_chunks(self, bases, bias, budget):
        """Per-example (rotated) gradients from grouped weight-gradient convolutions, for a
        supported convolution whose input side is rotated after the product (or not at all)."""
        if self.tied or not conv_grad.supported(self.module):
            return None
        if bases is not None and rotation_plan(self.positions(), *bases)[0]:
            return None
        return self._gradient_chunks(bases, bias, budget)

    def _gradient_chunks(self, bases, bias, budget):
        size = self.batch()
        d_in, d_out = self.dims(self.module, bias)
        step = example_chunk(size, 4 * d_in * d_out, budget)
        for b0 in range(0, size, step):
            rows = slice(b0, b0 + step)
            yield b0, conv_grad.conv_rotated_gradients([r.inputs[rows] for r in self.records],
                                                       [r.grad_out[rows] for r in self.records],
                                                       self.module, bias, *(bases or (None, None)))

    def covariances(self, sums, bias, budget):
        if self.tied or not conv_covariance_preferred(self.module, self.records[0].inputs.shape):
            return super().covariances(sums, bias, budget)
        for r in self.records:  # stride-1 convolutions: the activation factor without unfolding
            sums.A = conv_covariance(r.inputs, self.module, bias, out=sums.A, memory_budget=budget)
        D = torch.cat([r.grad_out.flatten(2) for r in self.records], 2).transpose(1, 2)
        sums.positions += D.shape[0] * D.shape[1]
        sums.S = covariance(D, out=sums.S)
        return sums
