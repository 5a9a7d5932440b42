"""Capture: per-example gradients from layer inputs and output-gradients, and the Featurizer."""
from .featurizer import Featurizer
from .gradients import Gradients
from .hooks import Capture, Plan, make_plan

__all__ = ["Featurizer", "Gradients", "Capture", "Plan", "make_plan"]
