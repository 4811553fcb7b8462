"""Small reference models for examples, tests and benchmarks."""

from lightning_commsgd.models.classification import ClassifierModule
from lightning_commsgd.models.mlp import MLPClassifier

__all__ = ["ClassifierModule", "MLPClassifier"]
