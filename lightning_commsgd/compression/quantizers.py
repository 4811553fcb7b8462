"""Stochastic quantizers: blockwise p-norm ternary quantization (DIANA/DORE), QSGD with s levels and
blockwise 8-bit and 4-bit absmax quantization (the int8 / int4 payloads of the averaging strategies)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_commsgd.compression.base import (
    Compressor,
    blocks_of,
    check_positive_int,
    num_blocks,
    uniform,
)
from lightning_commsgd.compression.bitpack import bytes_to_float32, float32_to_bytes, pack_bits, unpack_bits

__all__ = ["BlockInt4", "BlockInt8", "PNormQuantizer", "QSGD"]


class PNormQuantizer(Compressor):
    """Blockwise p-norm quantization (Mishchenko et al. 2019, used by DIANA and DORE): in each block,
    Q(x)_j = ||x||_p sign(x_j) xi_j with xi_j ~ Bernoulli(|x_j| / ||x||_p). Unbiased.

    Wire format per tensor of d values: one fp32 norm per block, then every value as a 2-bit ternary
    code (-1, 0, +1): ``4 ceil(d / block_size) + ceil(d / 4)`` bytes (about 16x smaller than fp32
    for block_size 256).

    Variance constant over a block of b values (b = min(block_size, d)): C = (sqrt(b) - 1) / 2 for
    p = inf, sqrt(b) - 1 for 2 <= p < inf, b^(1/p) - 1 for 1 <= p < 2.

    Args:
        p: the norm, >= 1 or ``float("inf")`` (the DORE paper's choice).
        block_size: values per block sharing one norm, >= 1.
    """

    unbiased = True

    def __init__(self, p: float = float("inf"), block_size: int = 256) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 1:
            raise ValueError(f"Arg `p` must be a number >= 1 or float('inf'), got {p!r}.")
        self.p = float(p)
        self.block_size = check_positive_int(block_size, "block_size", "values per block sharing one norm")

    def payload_nbytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self.block_size) + math.ceil(2 * numel / 8)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        numel = x.numel()
        blocks = blocks_of(x, self.block_size)
        magnitude = blocks.abs()
        if math.isinf(self.p):
            norms = magnitude.amax(dim=1)
        else:
            norms = torch.linalg.vector_norm(blocks, ord=self.p, dim=1)
        # a zero block has probability 0 everywhere (and sends norm 0)
        prob = magnitude / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
        keep = uniform(tuple(blocks.shape), blocks, generator) < prob
        ternary = torch.where(keep, torch.sign(blocks), torch.zeros_like(blocks)).to(torch.int32) + 1
        return torch.cat([float32_to_bytes(norms), pack_bits(ternary.reshape(-1)[:numel], 2)])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        nb = num_blocks(numel, self.block_size)
        norms = bytes_to_float32(payload[: 4 * nb])
        ternary = unpack_bits(payload[4 * nb :], 2, numel).to(torch.float32) - 1
        scale = norms.repeat_interleave(self.block_size)[:numel]
        return ternary * scale

    def variance_bound(self, numel: int) -> float:
        b = min(self.block_size, max(numel, 1))
        if math.isinf(self.p):
            return (math.sqrt(b) - 1) / 2
        if self.p >= 2:
            return math.sqrt(b) - 1
        return b ** (1 / self.p) - 1


class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017) with s levels per bucket: Q(x)_j = ||x||_2 sign(x_j) l_j / s, l_j the
    stochastic rounding of s |x_j| / ||x||_2 to an integer in [0, s]. Unbiased.

    Wire format: one fp32 norm per bucket, then a sign bit and ceil(log2(s + 1)) level bits per value:
    ``4 ceil(d / bucket_size) + ceil(d (1 + ceil(log2(s + 1))) / 8)`` bytes.

    Variance constant (the QSGD paper's Lemma 3.1 over a bucket of b values): C = min(b / s^2, sqrt(b) / s).

    Args:
        levels: s, quantization levels, 1..127 (codes fit one byte).
        bucket_size: values per bucket sharing one norm (QSGD's "bucket", 512 in its experiments).
    """

    unbiased = True

    def __init__(self, levels: int = 4, bucket_size: int = 512) -> None:
        self.levels = check_positive_int(levels, "levels", "s, quantization levels per sign; at most 127")
        if levels > 127:
            raise ValueError(f"Arg `levels` must lie in [1, 127] (sign + level fit one byte), got {levels}.")
        self.bucket_size = check_positive_int(bucket_size, "bucket_size", "values per bucket sharing a norm")

    @property
    def _width(self) -> int:
        return 1 + math.ceil(math.log2(self.levels + 1))

    def payload_nbytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self.bucket_size) + math.ceil(numel * self._width / 8)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        numel = x.numel()
        blocks = blocks_of(x, self.bucket_size)
        norms = torch.linalg.vector_norm(blocks, dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
        scaled = (blocks.abs() / safe * self.levels).clamp(max=self.levels)
        lower = scaled.floor()
        level = lower + (uniform(tuple(blocks.shape), blocks, generator) < scaled - lower).float()
        negative = (blocks < 0).to(torch.int32)
        codes = (level.to(torch.int32) << 1) | negative
        return torch.cat([float32_to_bytes(norms), pack_bits(codes.reshape(-1)[:numel], self._width)])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        nb = num_blocks(numel, self.bucket_size)
        norms = bytes_to_float32(payload[: 4 * nb])
        codes = unpack_bits(payload[4 * nb :], self._width, numel)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float32)
        level = (codes >> 1).to(torch.float32)
        return sign * level / self.levels * norms.repeat_interleave(self.bucket_size)[:numel]

    def variance_bound(self, numel: int) -> float:
        b = min(self.bucket_size, max(numel, 1))
        return min(b / self.levels**2, math.sqrt(b) / self.levels)


class BlockInt8(Compressor):
    """Blockwise 8-bit quantization with stochastic rounding: in each block of b values, the scale is
    s = max_j |x_j| / L and Q(x)_j = s q_j, q_j the stochastic rounding of x_j / s to an integer in
    [-L, L] (floor(x_j / s + u), u ~ U[0, 1)), L = 127 levels each side. Unbiased, and each value's error
    is below s.

    This is QSGD's stochastic rounding with L levels scaled by the block's inf-norm instead of its
    2-norm, so small blocks of similar values keep their resolution. It is the ``compressor="int8"``
    of :class:`~lightning_commsgd.LocalSGDStrategy` and :class:`~lightning_commsgd.OverlapLocalSGDStrategy`.

    Wire format: one fp32 scale per block, then one signed byte per value: ``4 ceil(d / b) + d`` bytes
    (3.9x smaller than fp32 for b = 256).

    Variance constant over a block of b values: C = (sqrt(L^2 + b - 1) - L) / (2 L) (0.0039 for b = 256),
    tight. Why: the largest value sits on the grid (error 0); another with x_j / s = n_j + f_j has
    variance f_j (1 - f_j) s^2 and |x_j| >= f_j s, so the ratio to ||x||^2 is at most
    (b - 1) f (1 - f) / (L^2 + (b - 1) f^2), largest at f = L (sqrt(L^2 + b - 1) - L) / (b - 1), where it
    equals C. (About b / (4 L^2) when L^2 >> b.)

    Args:
        block_size: b, values per block sharing one scale, >= 1.
    """

    unbiased = True
    LEVELS = 127

    def __init__(self, block_size: int = 256) -> None:
        self.block_size = check_positive_int(block_size, "block_size", "values per block sharing one scale")

    def payload_nbytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self.block_size) + self._codes_nbytes(numel)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        numel = x.numel()
        blocks = blocks_of(x, self.block_size)
        scales = blocks.abs().amax(dim=1) / self.LEVELS
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        # floor(v + u) rounds v up with probability frac(v): E = v; |v| <= L, so the clamp only guards
        # against v + u landing on L + 1 through fp32 rounding
        codes = (blocks / safe).add_(uniform(tuple(blocks.shape), blocks, generator)).floor_()
        codes = codes.clamp_(-self.LEVELS, self.LEVELS).reshape(-1)[:numel]
        # written in place: a low-precision round encodes every value it sends, so copies count
        nb = scales.numel()
        payload = torch.empty(4 * nb + self._codes_nbytes(numel), dtype=torch.uint8, device=x.device)
        payload[: 4 * nb] = float32_to_bytes(scales)
        self._pack_into(codes, payload[4 * nb :])
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        nb = num_blocks(numel, self.block_size)
        scales = bytes_to_float32(payload[: 4 * nb])
        values = torch.empty(nb * self.block_size, dtype=torch.float32, device=payload.device)
        values[numel:].zero_()
        self._unpack_into(payload[4 * nb : 4 * nb + self._codes_nbytes(numel)], values[:numel])
        # a broadcast multiply per block: repeat_interleave of the scales costs twice as much
        return values.view(nb, self.block_size).mul_(scales.unsqueeze(1)).view(-1)[:numel]

    def variance_bound(self, numel: int) -> float:
        b = min(self.block_size, max(numel, 1))
        return (math.sqrt(self.LEVELS**2 + b - 1) - self.LEVELS) / (2 * self.LEVELS)

    # One signed byte per code.
    def _codes_nbytes(self, numel: int) -> int:
        return numel

    def _pack_into(self, codes: Tensor, out: Tensor) -> None:
        """Write the integer-valued float ``codes`` into the byte tensor ``out`` (``codes`` is scratch: a
        subclass may change it in place)."""
        out.view(torch.int8).copy_(codes)

    def _unpack_into(self, data: Tensor, out: Tensor) -> None:
        """Write the codes in the bytes ``data`` into the float tensor ``out`` (one per value)."""
        out.copy_(data.view(torch.int8))


class BlockInt4(BlockInt8):
    """:class:`BlockInt8` with L = 7 levels each side: 4 bits per value, two values per byte.

    Wire format: one fp32 scale per block, then the codes q + 7 in [0, 14], the even-indexed value in a
    byte's low nibble: ``4 ceil(d / b) + ceil(d / 2)`` bytes (7.1x smaller than fp32 for b = 64, the
    ``compressor="int4"`` block size).

    Variance constant C = (sqrt(49 + b - 1) - 7) / 14 (0.26 for b = 64; see :class:`BlockInt8`): a worst
    case (one value at the scale's 7 steps, the rest at 0.4 steps). A block of Gaussian values has max |x_j|
    about 2.5-3 standard deviations, so its error is about 2.3% of its squared norm.

    Args:
        block_size: b, values per block sharing one scale, >= 1.
    """

    LEVELS = 7

    def __init__(self, block_size: int = 64) -> None:
        super().__init__(block_size)

    def _codes_nbytes(self, numel: int) -> int:
        return (numel + 1) // 2

    def _pack_into(self, codes: Tensor, out: Tensor) -> None:
        nibbles = torch.empty(2 * out.numel(), dtype=torch.uint8, device=codes.device)
        nibbles[codes.numel() :] = 0  # the odd tail's pad nibble
        nibbles[: codes.numel()] = codes.add_(self.LEVELS)  # 0..14
        pairs = nibbles.view(-1, 2)
        torch.bitwise_left_shift(pairs[:, 1], 4, out=out)
        out.bitwise_or_(pairs[:, 0])

    def _unpack_into(self, data: Tensor, out: Tensor) -> None:
        numel = out.numel()
        out[0::2] = data & 0x0F  # ceil(numel / 2) even-indexed values
        out[1::2] = data[: numel // 2] >> 4
        out.sub_(self.LEVELS)
