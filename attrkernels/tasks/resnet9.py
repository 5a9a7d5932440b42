"""ResNet-9 for 32x32 images (the fast CIFAR-10 network of D. Page's DAWNBench entry).

With w = ``width`` (64 in the standard network, 6.6 M parameters), every ``block`` is
Conv2d(3x3, padding 1, no bias) - BatchNorm2d - ReLU:

    block(3, w)
    block(w, 2w) - MaxPool(2)   + residual: x + block(2w, 2w)(block(2w, 2w)(x))
    block(2w, 4w) - MaxPool(2)
    block(4w, 8w) - MaxPool(2)  + residual: x + block(8w, 8w)(block(8w, 8w)(x))
    AdaptiveMaxPool(1) - Flatten - Linear(8w, classes, no bias) - multiply by ``scale`` (0.125)
"""
from __future__ import annotations

from torch import nn


def block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution without bias, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class Scale(nn.Module):
    """Multiply by a constant."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def resnet9(classes: int = 10, width: int = 64, scale: float = 0.125) -> nn.Sequential:
    """ResNet-9 with base width ``width`` and ``classes`` outputs (see the module docstring)."""
    w = width
    return nn.Sequential(
        block(3, w),
        block(w, 2 * w), nn.MaxPool2d(2),
        Residual(nn.Sequential(block(2 * w, 2 * w), block(2 * w, 2 * w))),
        block(2 * w, 4 * w), nn.MaxPool2d(2),
        block(4 * w, 8 * w), nn.MaxPool2d(2),
        Residual(nn.Sequential(block(8 * w, 8 * w), block(8 * w, 8 * w))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(8 * w, classes, bias=False), Scale(scale),
    )

