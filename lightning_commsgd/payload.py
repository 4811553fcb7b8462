"""How the values of a low-precision mean travel: the ``payload_dtype`` option of the averaging strategies.

The averaging strategies send each rank's *change since the latest consensus* (never the model itself) in
a narrow format and accumulate the mean in fp32 (:meth:`Communicator.all_reduce_mean_lowp_`):

- ``"bf16"`` / ``"fp16"``: each value cast to 16 bits (round to nearest): 2 bytes per value, relative error
  about 2^-8 / 2^-11 per value;
- ``"int8"``: :class:`~lightning_commsgd.compression.BlockInt8`, one fp32 scale per 256 values and one byte
  per value with stochastic rounding: 1.016 bytes per value, unbiased, error below 1/127 of the block's
  largest change;
- ``"int4"``: :class:`~lightning_commsgd.compression.BlockInt4`, one fp32 scale per 64 values and 4 bits per
  value with stochastic rounding: 0.5625 bytes per value (7.1x fewer than fp32), unbiased, error below 1/7
  of the block's largest change.

Stochastic rounding draws from a generator seeded by :func:`rounding_seed` (the round's step, the rank and
the message phase): every run, resumed or not, rounds identically, and a single-process simulation can
replay it.

Non-negative state travels differently (:data:`NONNEGATIVE_PAYLOAD`). Adam's second moments
(``exp_avg_sq``, ``max_exp_avg_sq``) and BatchNorm's ``running_var`` must stay positive with *relative*
precision: Adam divides by sqrt(v) + eps, so a v rounded to 0 turns a step of about lr into one of
|g| lr / eps (a block quantizer sends every change below 1/14 of its block's largest as 0 or a sign flip:
about half of ``exp_avg_sq`` came back as exactly 0 in every int4 round, and training diverged to a loss of
5e12), and fp16 flushes every value below 6e-8 to 0. Under every ``payload_dtype`` these tensors therefore
travel as their *values* (not their changes) cast to bf16: fp32's exponent range, relative error at most
2^-9 per value, and a mean of positive values is positive. For Adam with ``momentum="average"`` that is a
third of the averaged values at 2 bytes each (int4: 1.04 bytes per value over the round instead of 0.56).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.compression.quantizers import BlockInt4, BlockInt8

__all__ = [
    "PAYLOAD_DTYPES",
    "NONNEGATIVE_PAYLOAD",
    "CastPayload",
    "CompressedPayload",
    "PayloadCodec",
    "payload_codec",
    "rounding_generator",
    "rounding_seed",
    "validate_payload_dtype",
]

PAYLOAD_DTYPES: tuple[str, ...] = ("bf16", "fp16", "int8", "int4")
#: the format of non-negative state (second moments, running variances) under every ``payload_dtype``:
#: their values cast to bf16 (see the module docstring)
NONNEGATIVE_PAYLOAD = "bf16"


def validate_payload_dtype(payload_dtype: Any) -> str | None:
    """``payload_dtype`` if it is ``None`` or one of :data:`PAYLOAD_DTYPES`, else a ValueError listing
    them."""
    if payload_dtype is None or (isinstance(payload_dtype, str) and payload_dtype in PAYLOAD_DTYPES):
        return payload_dtype
    raise ValueError(f"Arg `payload_dtype` must be None or one of {PAYLOAD_DTYPES}, got {payload_dtype!r}.")


class PayloadCodec(ABC):
    """fp32 values -> the tensor that travels -> fp32 values (the receiver's view)."""

    stochastic: bool = False
    #: values per unit the codec encodes on its own: pieces whose lengths are multiples of it, encoded in
    #: order with one generator, decode to exactly the values of the whole vector encoded at once (so a
    #: round may encode and send piece by piece); ``None``: the encoding looks at the whole vector.
    segment_align: int | None = None

    @abstractmethod
    def encode(self, values: Tensor, generator: torch.Generator | None) -> Tensor:
        """What travels for the 1-D fp32 ``values`` (``generator`` drives stochastic rounding)."""

    @abstractmethod
    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """The fp32 values a receiver reads from ``payload``."""

    @abstractmethod
    def empty(self, numel: int, device: torch.device) -> Tensor:
        """A receive buffer for the payload of ``numel`` values."""

    @abstractmethod
    def payload_nbytes(self, numel: int) -> int:
        """Bytes that travel for ``numel`` values."""

    @staticmethod
    def nbytes(payload: Tensor) -> int:
        return payload.numel() * payload.element_size()


class CastPayload(PayloadCodec):
    """Each value cast to ``dtype`` (round to nearest)."""

    segment_align = 1

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def payload_nbytes(self, numel: int) -> int:
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def encode(self, values: Tensor, generator: torch.Generator | None) -> Tensor:
        return values.to(self.dtype)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return payload.to(torch.float32)

    def empty(self, numel: int, device: torch.device) -> Tensor:
        return torch.empty(numel, dtype=self.dtype, device=device)


class CompressedPayload(PayloadCodec):
    """The byte payload of a :class:`~lightning_commsgd.compression.Compressor`."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.stochastic = compressor.unbiased
        # block quantizers encode block by block, drawing one uniform per value in order
        self.segment_align = compressor.block_size if isinstance(compressor, BlockInt8) else None

    def payload_nbytes(self, numel: int) -> int:
        return self.compressor.payload_nbytes(numel)

    def encode(self, values: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.compressor.encode(values, generator)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return self.compressor.decode(payload, numel)

    def empty(self, numel: int, device: torch.device) -> Tensor:
        return torch.empty(self.payload_nbytes(numel), dtype=torch.uint8, device=device)


def payload_codec(payload: str | torch.dtype | PayloadCodec) -> PayloadCodec:
    """The codec of a ``payload_dtype`` name (or of a torch dtype, cast; a codec is returned as is)."""
    if isinstance(payload, PayloadCodec):
        return payload
    if isinstance(payload, torch.dtype):
        return CastPayload(payload)
    name = validate_payload_dtype(payload)
    if name == "bf16":
        return CastPayload(torch.bfloat16)
    if name == "fp16":
        return CastPayload(torch.float16)
    if name == "int8":
        return CompressedPayload(BlockInt8(block_size=256))
    # Blocks of 64: 4 bits leave 7 levels each side, so a smaller block keeps one large value from
    # flattening its neighbours to 0 (tight worst-case variance constant 0.26 instead of 0.75 at 256).
    return CompressedPayload(BlockInt4(block_size=64))


def rounding_seed(seed: int, rank: int, phase: int) -> int:
    """The generator seed of rank ``rank``'s messages in ``phase`` (0: its values, whole on 2 ranks or its
    chunks for every rank on more; 1: its chunk's mean) of the round with ``seed`` (the strategies use the
    optimizer step of the round): distinct for every (seed, rank < 2^20, phase)."""
    return ((int(seed) << 21) | (int(rank) << 1) | int(phase)) & ((1 << 63) - 1)


def rounding_generator(codec: PayloadCodec, seed: int, rank: int, phase: int, device: torch.device) -> Any:
    """A generator seeded with :func:`rounding_seed` for stochastic codecs; ``None`` for deterministic
    ones."""
    if not codec.stochastic:
        return None
    return torch.Generator(device=device).manual_seed(rounding_seed(seed, rank, phase))
