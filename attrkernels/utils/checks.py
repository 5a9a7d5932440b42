"""Argument checks shared by the kernels and methods; each error names the argument it rejects."""
from __future__ import annotations

import math


def check_positive_int(name: str, value, *, optional: bool = False):
    """``value`` if it is an int >= 1 (not a bool), or None when ``optional``; else ValueError."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a positive int, got {value!r}")
    return value


def check_damping(damping, *, name: str = "damping", optional: bool = False) -> float | None:
    """``damping`` as a float if it is a finite number >= 0 (None allowed when ``optional``)."""
    if optional and damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a finite number >= 0, got {damping!r}")
    if damping < 0:
        raise ValueError(f"{name} must be >= 0 (it is added to the curvature's diagonal), got {damping}")
    return float(damping)


def check_seed(seed, *, name: str = "seed") -> int:
    """``seed`` if it is an int in [0, 2**64) (not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed!r}")
    return seed


def check_memory_budget(memory_budget, *, name: str = "memory_budget") -> int:
    """``memory_budget`` if it is an int of at least 4096 bytes."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 4096:
        raise ValueError(f"{name} must be an int of at least 4096 bytes, got {memory_budget!r}")
    return memory_budget


def check_number(name: str, value, *, positive: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float if it is a finite number >= 0 (> 0 when ``positive``; not a bool), or
    None when ``optional``; else ValueError."""
    if optional and value is None:
        return None
    bound = "> 0" if positive else ">= 0"
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a finite number {bound}, got {value!r}")
    return float(value)


def check_eigh_dtype(eigh_dtype, *, name: str = "eigh_dtype"):
    """``eigh_dtype`` if it is torch.float64 or torch.float32."""
    import torch

    if eigh_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"{name} must be torch.float64 or torch.float32, got {eigh_dtype!r}")
    return eigh_dtype
