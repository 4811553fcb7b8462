"""Compressors with real wire formats (bit-packed byte payloads) for compressed-communication SGD."""

from lightning_commsgd.compression.base import Compressor, Identity
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.names import CODEC_NAMES, as_compressor, codec_name
from lightning_commsgd.compression.quantizers import QSGD, BlockInt4, BlockInt8, PNormQuantizer
from lightning_commsgd.compression.sparsifiers import RandomK, ScaledSign, TopK

__all__ = [
    "CODEC_NAMES",
    "QSGD",
    "BlockInt4",
    "BlockInt8",
    "Cast",
    "Compressor",
    "Identity",
    "PNormQuantizer",
    "RandomK",
    "ScaledSign",
    "TopK",
    "as_compressor",
    "codec_name",
]
