"""Compressors with real wire formats (bit-packed byte payloads) for compressed-communication SGD."""

from lightning_commsgd.compression.base import Compressor, Identity
from lightning_commsgd.compression.quantizers import QSGD, BlockInt4, BlockInt8, PNormQuantizer
from lightning_commsgd.compression.sparsifiers import RandomK, ScaledSign, TopK

__all__ = [
    "QSGD",
    "BlockInt4",
    "BlockInt8",
    "Compressor",
    "Identity",
    "PNormQuantizer",
    "RandomK",
    "ScaledSign",
    "TopK",
]
