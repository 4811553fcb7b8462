"""Small, download-free data modules for examples, tests and benchmarks."""

from lightning_commsgd.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
