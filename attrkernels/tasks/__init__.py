"""Tasks and benchmarks.

A ``Task`` (``base``) says how a model's per-example loss and measurement are computed on a
batch; every attribution method takes one. A ``Benchmark`` (``benchmark``) holds a ``Task`` and
adds data, a model and a training recipe, so the LDS evaluator can retrain it:
``get("digits-mlp")`` returns a built-in one (``get("digits-mlp").task`` is its ``Task``),
``available()`` lists them, ``register`` adds your own.
"""
from .base import Classification, Task, margin
from .benchmark import Benchmark, InMemoryBenchmark, available, config_hash, get, register
from .training import Checkpoint, Recipe
from .language import LanguageModeling
from . import cifar, digits, mnist1d_cnn, text_lm  # noqa: F401  (register the built-in benchmarks)

__all__ = ["Task", "Classification", "LanguageModeling", "margin", "Benchmark", "InMemoryBenchmark", "Recipe",
           "Checkpoint",
           "get", "available", "register", "config_hash"]
