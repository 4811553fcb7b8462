"""The empirical entropy of a payload's codes: the size a memoryless entropy coder could reach.

For each compressor the payload splits into *side values* (fp32 block norms and scales, the sparsifiers'
kept values) counted at their 32 bits, and *codes* (ternary codes, QSGD signed-level codes, int8 / int4
codes, sign bits, the gaps between sorted indices, 16-bit cast values) whose zeroth-order empirical
entropy sum_i -log2(count_i / N) over the payload's own histogram is the bound. A coder that sees codes
jointly (four ternary codes per byte) can go below it where neighbouring codes are correlated; one that
codes each symbol alone cannot. ``benchmarks/bench_codecs.py`` puts each wire format beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_commsgd.compression.base import Compressor, Identity, num_blocks
from lightning_commsgd.compression.bitpack import unpack_bits
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.quantizers import QSGD, BlockInt4, BlockInt8, PNormQuantizer
from lightning_commsgd.compression.sparsifiers import ScaledSign, _Sparse

__all__ = ["PayloadEntropy", "empirical_entropy_bits", "payload_entropy"]


@dataclass(frozen=True)
class PayloadEntropy:
    """Sizes in bits of one payload of ``numel`` values: as packed, and its entropy bound."""

    numel: int
    packed_bits: int
    side_bits: int
    code_entropy_bits: float

    @property
    def entropy_bits(self) -> float:
        """The bound: side values at 32 bits plus the codes' empirical entropy."""
        return self.side_bits + self.code_entropy_bits

    @property
    def packed_bits_per_value(self) -> float:
        return self.packed_bits / self.numel

    @property
    def entropy_bits_per_value(self) -> float:
        return self.entropy_bits / self.numel


def empirical_entropy_bits(symbols: Tensor) -> float:
    """sum_i -log2(count_i / N): the zeroth-order empirical entropy of ``symbols`` (any integer tensor) in
    bits, over the whole tensor."""
    flat = symbols.reshape(-1)
    total = flat.numel()
    if total == 0:
        return 0.0
    counts = torch.unique(flat, return_counts=True)[1].double()
    return float(-(counts * torch.log2(counts / total)).sum())


def _codes_and_side(compressor: Compressor, payload: Tensor, numel: int) -> tuple[Tensor, int]:
    """The payload's code symbols and the bits of its side values."""
    if isinstance(compressor, _Sparse):
        k = payload.numel() // 8
        indices = payload[: 4 * k].view(torch.int32).long()
        gaps = torch.cat([indices[:1], indices[1:] - indices[:-1]])
        return gaps, 32 * k
    if isinstance(compressor, Cast):
        return payload.view(torch.int16), 0
    if isinstance(compressor, Identity):
        # fp32 values are side values: an empirical histogram of 2^32 symbols over fewer samples is no bound
        return payload[:0], 32 * numel
    if isinstance(compressor, ScaledSign):
        blocks = num_blocks(numel, compressor.block_size or max(numel, 1))
        return unpack_bits(payload[4 * blocks :], 1, numel), 32 * blocks
    widths = {PNormQuantizer: 2, BlockInt4: 4, BlockInt8: 8}
    if isinstance(compressor, QSGD):
        block, width = compressor.bucket_size, compressor._width
    elif type(compressor) in widths:
        block, width = compressor.block_size, widths[type(compressor)]  # type: ignore[attr-defined]
    else:
        raise TypeError(f"payload_entropy does not know the layout of {type(compressor).__name__} payloads.")
    blocks = num_blocks(numel, block)
    return unpack_bits(payload[4 * blocks :], width, numel), 32 * blocks


def payload_entropy(compressor: Compressor, payload: Tensor, numel: int) -> PayloadEntropy:
    """The packed size and the entropy bound of ``compressor``'s ``payload`` of ``numel`` values (see the
    module docstring)."""
    codes, side_bits = _codes_and_side(compressor, payload.detach().reshape(-1).cpu(), numel)
    entropy = empirical_entropy_bits(codes)
    assert math.isfinite(entropy)
    return PayloadEntropy(numel, 8 * payload.numel(), side_bits, entropy)
