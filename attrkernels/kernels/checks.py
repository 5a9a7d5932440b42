"""Argument checks shared by the kernels and methods (each names the argument it rejects)."""
from __future__ import annotations


def check_positive_int(name: str, value, *, optional: bool = False):
    """``value`` if it is an int >= 1 (not a bool), or None when ``optional``; else ValueError."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a positive int, got {value!r}")
    return value
