"""Payload formats of the scaling model: how many bytes ``v`` values take on the wire, and what encoding and
decoding them costs on the CPU.

A format is described by its bits per value (the codes) and, for the block quantizers, the values per fp32
scale: ``nbytes(v) = ceil(v * bits / 8) + 4 ceil(v / block)``, the exact size of the package's wire formats
(:class:`~lightning_commsgd.compression.BlockInt8`: 8 bits, a scale per 256 values, 1.016 bytes per value;
``BlockInt4``: 4 bits, a scale per 64, 0.5625; the inf-norm ternary quantizer of DORE: 2 bits, a scale per
256). Any other format, an entropy-coded one included, plugs in by its average bits per value
(:func:`custom_format`, ``block=None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "BF16",
    "FP16",
    "FP32",
    "INT2",
    "INT4",
    "INT8",
    "PAYLOAD_FORMATS",
    "PayloadFormat",
    "custom_format",
    "payload_format",
]


@dataclass(frozen=True)
class PayloadFormat:
    """One payload format.

    Args:
        name: the format's name in tables (``"int4"``).
        bits: bits per value of the codes (32 for fp32, 4 for int4; fractional for entropy-coded formats).
        block: values sharing one fp32 scale (``None``: no scales).
        loss_rank: 0 for exact fp32, larger for lossier formats; the recommendation prefers the lowest.
        exact: values travel as an fp32 all-reduce (ring: reduce-scatter + all-gather inside the collective)
            rather than through the package's low-precision message schedule
            (:mod:`lightning_commsgd.comm.lowp`).
        encode_seconds: CPU seconds to encode one value (0: not modelled).
        decode_seconds: CPU seconds to decode one value (0: not modelled).
    """

    name: str
    bits: float
    block: int | None = None
    loss_rank: int = 1
    exact: bool = False
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, (int, float)) and 0 < self.bits <= 64 and math.isfinite(self.bits)):
            raise ValueError(
                f"Arg `bits` of payload format {self.name!r} must be in (0, 64], got {self.bits!r}."
            )
        if self.block is not None and (not isinstance(self.block, int) or self.block < 1):
            raise ValueError(f"Arg `block` of payload format {self.name!r} must be an int >= 1 or None.")
        for name in ("encode_seconds", "decode_seconds"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Arg `{name}` of payload format {self.name!r} must be >= 0, got {value!r}.")

    def nbytes(self, values: float) -> float:
        """Bytes that ``values`` values take: codes plus one fp32 scale per block."""
        if values <= 0:
            return 0.0
        scales = 4 * math.ceil(values / self.block) if self.block else 0
        codes = math.ceil(values * self.bits / 8) if float(values).is_integer() else values * self.bits / 8
        return float(codes + scales)

    @property
    def bytes_per_value(self) -> float:
        """Average bytes per value, scales included (int8: 1.016, int4: 0.5625)."""
        return self.bits / 8 + (4 / self.block if self.block else 0.0)

    def with_codec_cost(self, encode_seconds: float, decode_seconds: float) -> PayloadFormat:
        """This format with the given CPU cost per value encoded and per value decoded."""
        return replace(self, encode_seconds=encode_seconds, decode_seconds=decode_seconds)


FP32 = PayloadFormat("fp32", 32, loss_rank=0, exact=True)
BF16 = PayloadFormat("bf16", 16, loss_rank=2)
FP16 = PayloadFormat("fp16", 16, loss_rank=1)
INT8 = PayloadFormat("int8", 8, block=256, loss_rank=3)
INT4 = PayloadFormat("int4", 4, block=64, loss_rank=4)
INT2 = PayloadFormat("int2", 2, block=256, loss_rank=5)  # DORE's inf-norm ternary quantizer

#: the named formats, least lossy first: fp32, fp16 (more mantissa than bf16), bf16, int8, int4, int2
PAYLOAD_FORMATS: dict[str, PayloadFormat] = {f.name: f for f in (FP32, FP16, BF16, INT8, INT4, INT2)}


def custom_format(name: str, bits: float, block: int | None = None, loss_rank: int = 6) -> PayloadFormat:
    """A format given by its average bits per value (an entropy-coded one: its measured average), with
    ``block`` values per fp32 scale if it has scales."""
    return PayloadFormat(name, bits, block=block, loss_rank=loss_rank)


def payload_format(spec: str | float | PayloadFormat) -> PayloadFormat:
    """A format from its name (``"int4"``), bits per value (``3.2`` or ``"3.2"``: a custom format without
    scales), or a :class:`PayloadFormat` (returned as it is).

    Raises:
        ValueError: an unknown name or a bit count outside (0, 64].
    """
    if isinstance(spec, PayloadFormat):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in PAYLOAD_FORMATS:
            return PAYLOAD_FORMATS[key]
        try:
            bits = float(key.removesuffix("bits").removesuffix("bit"))
        except ValueError:
            raise ValueError(
                f"Unknown payload format {spec!r}: use one of {sorted(PAYLOAD_FORMATS)} or bits per value "
                "(e.g. 3.2)."
            ) from None
        return custom_format(f"{bits:g}bit", bits)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return custom_format(f"{float(spec):g}bit", float(spec))
    raise ValueError(f"A payload format must be a name, bits per value or a PayloadFormat, got {spec!r}.")
