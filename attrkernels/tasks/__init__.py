"""Tasks: how a model's per-example loss and measurement are computed, and built-in tasks.

Built-in tasks (data + model + training recipe + measurement) are reached by name:
``get("digits-mlp")``; ``available()`` lists them. See ``builtin.BuiltinTask`` for the protocol a
user's own task follows.
"""
from .base import Classification, Task, margin
from .builtin import BuiltinTask, InMemoryTask, available, config_hash, get, register
from .training import Checkpoint, Recipe
from . import cifar, digits, mnist1d_cnn, text_lm  # noqa: F401  (register the built-in tasks)
from .language import LanguageModeling

__all__ = ["Task", "Classification", "LanguageModeling", "margin", "BuiltinTask", "InMemoryTask", "Recipe", "Checkpoint",
           "get", "available", "register", "config_hash"]
