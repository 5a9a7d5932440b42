"""Capture: per-example gradients from layer inputs and output-gradients, and the Featurizer."""
from .featurizer import Featurizer
from .hooks import Capture, Plan, make_plan

__all__ = ["Featurizer", "Capture", "Plan", "make_plan"]
