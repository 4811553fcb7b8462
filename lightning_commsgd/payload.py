"""How the values of a low-precision mean travel: the ``compressor`` of the averaging strategies.

The averaging strategies (local SGD, Overlap Local-SGD) send each rank's *change since the latest
consensus* (never the model itself) through a codec and accumulate the mean in fp32
(:meth:`Communicator.all_reduce_mean_lowp_`). The codec is a compressor, by name
(:mod:`lightning_commsgd.compression.names`) or as an object:

- ``"bf16"`` / ``"fp16"`` (:class:`~lightning_commsgd.compression.Cast`): each value cast to 16 bits (round
  to nearest): 2 bytes per value, relative error about 2^-8 / 2^-11 per value;
- ``"int8"``: :class:`~lightning_commsgd.compression.BlockInt8`, one fp32 scale per 256 values and one byte
  per value with stochastic rounding: 1.016 bytes per value, unbiased, error below 1/127 of the block's
  largest change;
- ``"int4"``: :class:`~lightning_commsgd.compression.BlockInt4`, one fp32 scale per 64 values and 4 bits per
  value with stochastic rounding: 0.5625 bytes per value (7.1x fewer than fp32), unbiased, error below 1/7
  of the block's largest change;
- any other *unbiased* compressor (``QSGD``, ``PNormQuantizer``, ``RandomK``, other block sizes). A biased
  one (``TopK``, ``ScaledSign``) would bias the average by its error at every round, with nothing to feed it
  back: it is refused here and belongs to the compressed-SGD strategies, which have error feedback.

Stochastic rounding draws from a generator seeded by :func:`rounding_seed` (the round's step, the rank and
the message phase): every run, resumed or not, rounds identically, and a single-process simulation can
replay it.

Non-negative state travels differently (:data:`NONNEGATIVE_PAYLOAD`). Adam's second moments
(``exp_avg_sq``, ``max_exp_avg_sq``) and BatchNorm's ``running_var`` must stay positive with *relative*
precision: Adam divides by sqrt(v) + eps, so a v rounded to 0 turns a step of about lr into one of
|g| lr / eps (a block quantizer sends every change below 1/14 of its block's largest as 0 or a sign flip:
about half of ``exp_avg_sq`` came back as exactly 0 in every int4 round, and training diverged to a loss of
5e12), and fp16 flushes every value below 6e-8 to 0. Under every codec these tensors therefore
travel as their *values* (not their changes) cast to bf16: fp32's exponent range, relative error at most
2^-9 per value, and a mean of positive values is positive. For Adam with ``momentum="average"`` that is a
third of the averaged values at 2 bytes each (int4: 1.04 bytes per value over the round instead of 0.56).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.names import as_compressor
from lightning_commsgd.compression.quantizers import BlockInt8

__all__ = [
    "NONNEGATIVE_PAYLOAD",
    "CastPayload",
    "CompressedPayload",
    "PayloadCodec",
    "payload_codec",
    "rounding_generator",
    "rounding_seed",
    "averaging_compressor",
]

#: the format of non-negative state (second moments, running variances) under every codec: their values
#: cast to bf16 (see the module docstring)
NONNEGATIVE_PAYLOAD = "bf16"


def averaging_compressor(value: Any, name: str = "compressor") -> Compressor | None:
    """The codec of an averaging round: ``None`` (exact), a codec name, a 16-bit :class:`Cast` or an unbiased
    compressor; a biased compressor raises a ValueError naming ``name`` (see the module docstring)."""
    compressor = as_compressor(value, name, allow_none=True)
    if compressor is None or isinstance(compressor, Cast) or compressor.unbiased:
        return compressor
    raise ValueError(
        f"Arg `{name}` of an averaging round must be unbiased (or a 16-bit cast): {compressor!r} is biased, "
        "and a round has no error feedback to correct it. Use an unbiased compressor (QSGD, BlockInt8, "
        "PNormQuantizer, RandomK) or a compressed-SGD strategy (CompressedSGD, DORE), which feed the error "
        "back."
    )


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
        # block quantizers encode block by block, drawing one uniform per value in order, four per word of
        # the generator (compression.base.uniform): pieces of whole blocks and whole words
        self.segment_align = math.lcm(compressor.block_size, 4) if isinstance(compressor, BlockInt8) else None

    def payload_nbytes(self, numel: int) -> int:
        return self.compressor.payload_nbytes(numel)

    def encode(self, values: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.compressor.encode(values, generator)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return self.compressor.decode(payload, numel)

    def empty(self, numel: int, device: torch.device) -> Tensor:
        return torch.empty(self.payload_nbytes(numel), dtype=torch.uint8, device=device)


def payload_codec(payload: str | torch.dtype | Compressor | PayloadCodec) -> PayloadCodec:
    """The codec of a codec name or compressor (a 16-bit :class:`Cast` or torch dtype is sent as the cast
    values themselves; a codec is returned as is)."""
    if isinstance(payload, PayloadCodec):
        return payload
    if isinstance(payload, torch.dtype):
        return CastPayload(payload)
    compressor = as_compressor(payload, "payload")
    if isinstance(compressor, Cast):
        return CastPayload(compressor.torch_dtype)
    return CompressedPayload(compressor)


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
