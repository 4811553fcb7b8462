"""Compressors with real wire formats (bit-packed byte payloads) for compressed-communication SGD, the
lossless wire formats they travel in (:mod:`~lightning_commsgd.compression.wire`) and the entropy bound those
are measured against (:mod:`~lightning_commsgd.compression.entropy`)."""

from lightning_commsgd.compression.base import Compressor, Identity
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.entropy import PayloadEntropy, payload_entropy
from lightning_commsgd.compression.names import CODEC_NAMES, as_compressor, codec_name
from lightning_commsgd.compression.quantizers import QSGD, BlockInt4, BlockInt8, PNormQuantizer
from lightning_commsgd.compression.sparsifiers import RandomK, ScaledSign, TopK
from lightning_commsgd.compression.wire import (
    WIRE_FORMATS,
    EntropyWire,
    PackedWire,
    WireFormat,
    as_wire_format,
)

__all__ = [
    "CODEC_NAMES",
    "WIRE_FORMATS",
    "QSGD",
    "BlockInt4",
    "BlockInt8",
    "Cast",
    "Compressor",
    "EntropyWire",
    "Identity",
    "PNormQuantizer",
    "PackedWire",
    "PayloadEntropy",
    "RandomK",
    "ScaledSign",
    "TopK",
    "WireFormat",
    "as_compressor",
    "as_wire_format",
    "codec_name",
    "payload_entropy",
]
