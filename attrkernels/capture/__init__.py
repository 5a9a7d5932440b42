"""Capture: per-example gradients from layer inputs and output-gradients (one handler class per
layer type, ``handlers``), the Featurizer (sketched) and Gradients (materialised).

Checks every method gets through ``make_plan``: ``check_batch_independent(model)`` refuses
models whose examples interact in the forward pass; non-finite values raise
``NonFiniteExamples`` (an ``utils.errors.ExampleError`` with the batch's example indices)."""
from .featurizer import Featurizer
from .gradients import Gradients
from .handlers import Handler, KroneckerHandler, handler_for, register_handler
from .core import NonFiniteExamples
from .hooks import Capture, Plan, batch_dependence, check_batch_independent, make_plan

__all__ = ["Featurizer", "Gradients", "Capture", "Plan", "make_plan", "Handler", "KroneckerHandler",
           "handler_for", "register_handler", "check_batch_independent", "batch_dependence", "NonFiniteExamples"]
