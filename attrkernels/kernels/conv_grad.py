"""Per-example weight gradients of a convolution without unfolding its input.

For a Conv1d / Conv2d with groups 1, example b's weight gradient in the Kronecker layout is
G_b = sum_t delta_bt a_bt^T [C_out, C_in prod(kernel)] (a_bt the unfolded input patch at output
position t; with a bias, a last column sum_t delta_bt). That is the weight gradient of a
convolution whose batch is the single example b; for all B examples at once it is one grouped
weight-gradient convolution (``torch.nn.grad.conv2d_weight``) over the input reshaped to
[1, B C_in, H, W] with B groups. Same FLOPs as unfolding and one batched GEMM, 2 B T d_out d_in,
without writing and re-reading the T x d_in unfolded patches (prod(kernel) times the input).

Which of the two exact methods is cheaper depends on the layer (``direct_preferred``): both do
2 B T d_out d_in FLOPs, but the grouped convolution runs far below the GEMM rate when T is small
(measured on an Intel Xeon, B = 32, one thread: 3 GFLOP/s at T = 16 and 12 at T = 64 for
256 / 128 input channels, where unfold + batched GEMM reaches 30-45), while unfolding writes and
reads B T d_in floats, more than the B d_out d_in of the gradients themselves when T > d_out
(the wide, shallow layers, where the grouped convolution wins: 51 vs 19 GFLOP/s at T = 1024,
32 -> 64 channels). So: the grouped convolution when T > d_out, unfold + GEMM otherwise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.grad import conv1d_weight, conv2d_weight

from .kfac import Basis, rotation_plan


def supported(module: nn.Module) -> bool:
    """Conv1d / Conv2d with groups 1 and zero padding given as integers (any stride, dilation)."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def direct_preferred(module: nn.Module, positions: int) -> bool:
    """Whether the grouped weight-gradient convolution (rather than unfold + batched GEMM) forms
    this layer's per-example gradients: supported, and more output positions T than output
    channels (the unfolded input would outweigh the gradients; see the module docstring)."""
    return supported(module) and positions > module.out_channels // module.groups


def conv_example_gradients(x: torch.Tensor, delta: torch.Tensor, module: nn.Module, bias: bool = False) -> torch.Tensor:
    """[B, C_out', C_in prod(kernel) (+ 1)] per-example weight gradients from the input x [B, C_in, ...]
    and output-gradient delta [B, C_out', ...] (C_out' may be a block of output channels, e.g.
    rotated ones); ``bias`` appends the column sum_t delta_bt."""
    if not supported(module):
        raise ValueError(f"conv_example_gradients needs a groups-1, integer zero-padded convolution, got {module}")
    x, delta = x.to(torch.float32), delta.to(torch.float32)
    B, C = x.shape[:2]
    rows = delta.shape[1]
    grad = conv2d_weight if isinstance(module, nn.Conv2d) else conv1d_weight
    w = grad(x.reshape(1, B * C, *x.shape[2:]), (B * rows, C, *module.kernel_size),
             delta.reshape(1, B * rows, *delta.shape[2:]), stride=module.stride, padding=module.padding,
             dilation=module.dilation, groups=B)
    G = w.reshape(B, rows, -1)
    if bias:
        G = torch.cat([G, delta.flatten(2).sum(2, keepdim=True)], dim=2)
    return G


def conv_rotated_gradients(inputs: list, deltas: list, module: nn.Module, bias: bool = False,
                           basis_a: Basis | None = None, basis_s: Basis | None = None) -> torch.Tensor:
    """Q_S^T G_b Q_A [B, d_out, d_in] (or G_b without bases) summed over the module's calls
    (``inputs`` [B, C_in, ...] and ``deltas`` [B, C_out, ...] per call). The output side is rotated
    on the T output-gradient vectors before the product when ``kfac.rotation_plan`` says so (a
    channel rotation of delta), else on the formed gradients; the input side always on the formed
    gradients (use ``kfac.rotated_gradients`` on the unfolded input when it should go first)."""
    rotated = basis_a is not None and basis_s is not None
    T = sum(d[0].numel() for d in deltas) // deltas[0].shape[1]
    s_first = rotated and rotation_plan(T, basis_a, basis_s)[1]
    G = None
    for x, delta in zip(inputs, deltas):
        g = conv_example_gradients(x, basis_s.rotate(delta, dim=1) if s_first else delta, module, bias)
        G = g if G is None else G.add_(g)
    if rotated:
        G = basis_a.rotate(G, dim=2)
        if not s_first:
            G = basis_s.rotate(G, dim=1)
    return G
