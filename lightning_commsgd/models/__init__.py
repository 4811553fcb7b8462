"""Small reference models for examples, tests and benchmarks."""

from lightning_commsgd.models.mlp import MLPClassifier

__all__ = ["MLPClassifier"]
