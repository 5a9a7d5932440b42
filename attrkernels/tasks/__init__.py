"""Tasks: how a model's per-example loss and measurement are computed (and built-in tasks)."""
from .base import Classification, Task, margin

__all__ = ["Task", "Classification", "margin"]
