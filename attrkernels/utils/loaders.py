"""Checks of a data loader made before a method passes over it.

Methods index training examples by the order a loader yields them, on every pass. What can be
checked before any pass is checked here; what only a pass can show (the data itself, its order,
random augmentation) is compared pass by pass with ``attrkernels.store.DataPass``.
"""
from __future__ import annotations

import itertools

_SAMPLE = 1 << 20  # sampler indices compared between two iterations (more: the first ones)


def check_loader(loader, what: str = "train") -> None:
    """Refuse loaders that cannot yield the same examples in the same order on every pass.

    * a generator or other one-shot iterator (``iter(loader) is loader``);
    * a DataLoader with ``drop_last=True`` (examples silently missing from the scores);
    * a sampler (of any class) whose order differs between two iterations (shuffling).
    """
    name = f"the {what} loader"
    try:
        one_shot = iter(loader) is loader
    except TypeError:
        raise TypeError(f"{name} must be iterable (a DataLoader or a list of batches), got "
                        f"{type(loader).__name__}") from None
    if one_shot:
        raise TypeError(f"{name} is a generator or iterator, which can be consumed only once, and methods "
                        "pass over the training data several times: pass a DataLoader or a list of batches")
    if getattr(loader, "drop_last", False):
        raise ValueError(f"{name} has drop_last=True, so its last incomplete batch would be missing from "
                         "the scores; use drop_last=False")
    sampler = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    if sampler is None or not hasattr(sampler, "__iter__"):
        return
    first = list(itertools.islice(iter(sampler), _SAMPLE))
    second = list(itertools.islice(iter(sampler), _SAMPLE))
    if first != second:
        raise ValueError(f"{name} shuffles: it draws its examples in a random order ({type(getattr(loader, 'sampler', sampler)).__name__}): "
                         "training example i must be the i-th example on every pass; use shuffle=False "
                         "and a sequential sampler")
