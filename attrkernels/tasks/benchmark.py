"""The benchmark protocol (data + model + training recipe + measurement) and its registry.

A ``Benchmark`` is everything the LDS evaluator and the frontier need to retrain a model from
scratch on any subset of its training set. It *holds* a ``Task`` (``tasks.base``: how a model's
per-example loss and measurement are computed on a batch) and adds the rest:

- ``task``: the ``Task`` (``Classification()`` = cross-entropy and correct-class margin);
- ``train_data()`` / ``test_data()``: deterministic ``TensorDataset``s (inputs, labels);
- ``make_model(seed)``: a freshly initialised ``nn.Module``;
- ``train(indices, seed, checkpoints=k)``: the training recipe on the subset ``indices``;
- ``config()``: a JSON-serialisable dict of everything that determines the retrained models'
  measurements (data, split, model, recipe, measurement). Ground-truth caches are keyed on its
  hash, so anything that changes the ground truth must appear here and nothing else should.

The built-in benchmarks (``digits-mlp``, ``mnist1d-cnn``, ``cifar10-resnet9``, ...) are reached
by name with ``get(name)``. A user's own benchmark plugs in by subclassing ``Benchmark`` (and, to
make it reachable by name, decorating the class with ``@register``). Subclasses with a
``recipe`` attribute get ``train`` for free; override ``train`` for anything else.
``lds_protocols`` maps protocol names to the number of subsets ``m``, seeds per subset ``r`` and
subset fraction ``alpha`` that the LDS evaluator uses by default for this benchmark.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .base import Classification, Task
from .training import Checkpoint, Recipe, seeded_module, split_seed, train_classifier

_REGISTRY: dict[str, type] = {}


class Benchmark:
    """A task the evaluator can retrain (data, model, recipe, measurement); subclass it for your own."""

    name: str = ""
    task: Task = Classification()
    recipe: Optional[Recipe] = None
    device: str = "cpu"
    lds_protocols: dict = {"default": {"m": 100, "r": 4, "alpha": 0.5},
                           "quick": {"m": 50, "r": 2, "alpha": 0.5}}

    def cached(self, key: str, load):
        """``load()`` computed once per instance (not pickled to worker processes)."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = load()
        return cache[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cache", None)
        return state

    def train_data(self) -> TensorDataset:
        """Training set as a TensorDataset (inputs, labels); index i is training example i."""
        raise NotImplementedError(f"{type(self).__name__} must define train_data()")

    def test_data(self) -> TensorDataset:
        """Test set as a TensorDataset (inputs, labels); its order fixes the test indices."""
        raise NotImplementedError(f"{type(self).__name__} must define test_data()")

    def loaders(self, batch_size: int = 256) -> tuple[DataLoader, DataLoader]:
        """(train, test) DataLoaders in index order, unshuffled, as attribution methods read them."""
        return (DataLoader(self.train_data(), batch_size=batch_size, shuffle=False),
                DataLoader(self.test_data(), batch_size=batch_size, shuffle=False))

    def build_model(self) -> torch.nn.Module:
        """A new, randomly initialised model (``make_model`` seeds the initialisation)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_model() or make_model()")

    def make_model(self, seed: int) -> torch.nn.Module:
        """``build_model()`` initialised from ``seed`` (the init half of ``split_seed(seed)``)."""
        return seeded_module(self.build_model, split_seed(seed)[0])

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time augmentation of a batch of inputs (identity unless overridden)."""
        return inputs

    def train(self, indices: Optional[np.ndarray] = None, seed: int = 0, *,
              checkpoints: int = 0) -> tuple[torch.nn.Module, list[Checkpoint]]:
        """Train a model on training examples ``indices`` (None = all) with ``self.recipe``.

        ``seed`` fixes the initialisation and the data order (``split_seed``). Returns the
        trained model (in eval mode) and ``checkpoints`` ``Checkpoint``s (state dict, epoch,
        learning rate of the last step) at evenly spaced epochs; the last one is the final model.
        """
        if self.recipe is None:
            raise NotImplementedError(f"{type(self).__name__} must define recipe or override train()")
        model = self.make_model(seed)
        generator = torch.Generator().manual_seed(split_seed(seed)[1])
        saved = train_classifier(
            model, self.task, self.train_data().tensors, indices, self.recipe, generator,
            checkpoints=checkpoints, augment=self.augment, device=self.device,
        )
        return model, saved

    def config(self) -> dict:
        """Everything that determines the ground truth, JSON-serialisable."""
        raise NotImplementedError(f"{type(self).__name__} must define config()")

    def config_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of ``config()``."""
        return config_hash(self.config())


class InMemoryBenchmark(Benchmark):
    """A benchmark whose data is four tensors generated or loaded at once: subclasses define
    ``arrays() -> (x_train, y_train, x_test, y_test)``, computed once per instance."""

    def arrays(self) -> tuple:
        raise NotImplementedError(f"{type(self).__name__} must define arrays()")

    def train_data(self) -> TensorDataset:
        x, y, _, _ = self.cached("arrays", self.arrays)
        return TensorDataset(x, y)

    def test_data(self) -> TensorDataset:
        _, _, x, y = self.cached("arrays", self.arrays)
        return TensorDataset(x, y)


def config_hash(config: dict) -> str:
    """SHA-256 (hex) of ``config`` serialised as sorted, compact JSON."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"task config must be JSON-serialisable: {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def register(cls: type) -> type:
    """Class decorator: make the Benchmark subclass ``cls`` reachable as ``get(cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
        raise TypeError(f"register expects a Benchmark subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string to register it")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str, **kwargs) -> Benchmark:
    """An instance of the registered benchmark ``name``; ``kwargs`` go to its constructor."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**kwargs)


def available() -> list[str]:
    """Names of the registered benchmarks, sorted."""
    return sorted(_REGISTRY)
