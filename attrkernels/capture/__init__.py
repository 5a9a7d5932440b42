"""Capture: per-example gradients from layer inputs and output-gradients (one handler class per
layer type, ``handlers``), the Featurizer (sketched) and Gradients (materialised)."""
from .featurizer import Featurizer
from .gradients import Gradients
from .handlers import Handler, KroneckerHandler, handler_for, register_handler
from .hooks import Capture, Plan, make_plan

__all__ = ["Featurizer", "Gradients", "Capture", "Plan", "make_plan", "Handler", "KroneckerHandler",
           "handler_for", "register_handler"]
