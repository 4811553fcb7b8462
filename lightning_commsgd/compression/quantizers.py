"""Stochastic quantizers: blockwise p-norm ternary quantization (DIANA/DORE), QSGD with s levels and
blockwise 8-bit and 4-bit absmax quantization (the int8 / int4 payloads of the averaging strategies)."""

from __future__ import annotations

import math
from abc import abstractmethod

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

def _absmax(blocks: Tensor) -> Tensor:
    """max_j |x_j| of each row, without an |x| tensor (``amax`` and ``amin`` are each 3x faster on CPU than
    ``abs`` + ``amax``; ``aminmax`` and the inf-norm are 10x slower for short rows)."""
    return torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_())


def _scaled_by_block(
    codes: Tensor, scales: Tensor, block_size: int, numel: int, offset: float = 0.0, out: Tensor | None = None
) -> Tensor:
    """fp32 ``(codes - offset) * scale of the code's block`` for ``numel`` integer codes (into ``out``, a
    contiguous fp32 vector of ``numel`` values, when given).

    Speed: one conversion into a fresh buffer, then in-place broadcast multiplies over the zero-padded
    blocks (on CPU an in-place broadcast is 4x faster than one that allocates its result, and a
    repeat_interleave of the scales costs twice as much).
    """
    nb = scales.numel()
    full = numel // block_size
    if out is None or full == nb:  # no partial block, or a fresh result with room for the padding
        values = out if out is not None else torch.empty(nb * block_size, device=codes.device)
        values[:numel].copy_(codes)
        values[numel:].fill_(offset)
        per_block = values.view(nb, block_size)
        if offset:
            per_block.sub_(offset)
        return per_block.mul_(scales.unsqueeze(1)).view(-1)[:numel]
    # into ``out`` with a partial last block: the full blocks in place, the tail on its own
    out.copy_(codes)
    if offset:
        out.sub_(offset)
    out[: full * block_size].view(full, block_size).mul_(scales[:full].unsqueeze(1))
    out[full * block_size :].mul_(scales[full])
    return out


def _payload(side: Tensor, codes_nbytes: int) -> tuple[Tensor, Tensor]:
    """A payload holding the fp32 ``side`` values (norms or scales), and the view its codes go into."""
    head = 4 * side.numel()
    payload = torch.empty(head + codes_nbytes, dtype=torch.uint8, device=side.device)
    payload[:head] = float32_to_bytes(side)
    return payload, payload[head:]


class _BlockScaled(Compressor):
    """A quantizer whose decode is integer codes times their block's scale (:func:`_scaled_by_block`):
    :meth:`decode` and :meth:`decode_into` are both its ``_decode``, into a fresh vector or into ``out``."""

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return self._decode(payload, numel, None)

    def decode_into(self, payload: Tensor, numel: int, out: Tensor) -> Tensor:
        return self._decode(payload, numel, out)

    @abstractmethod
    def _decode(self, payload: Tensor, numel: int, out: Tensor | None) -> Tensor:
        """Q(x) from ``payload``, written into ``out`` when given."""


class PNormQuantizer(_BlockScaled):
    """Blockwise p-norm quantization (Mishchenko et al. 2019, used by DIANA and DORE): in each block,
    Q(x)_j = ||x||_p sign(x_j) xi_j with xi_j ~ Bernoulli(|x_j| / ||x||_p). Unbiased.

    Wire format per tensor of d values: one fp32 norm per block, then every value as a 2-bit code,
    sign(x_j) xi_j + 1 (0: -norm, 1: 0, 2: +norm): ``4 ceil(d / block_size) + ceil(d / 4)`` bytes (about 16x
    smaller than fp32 for block_size 256). Most codes are 1 (value 0; for Gaussian values in blocks of 256,
    about 70%): their entropy is about 1.2 bits, which the ``"entropy"`` wire format
    (:mod:`lightning_commsgd.compression.wire`) reaches.

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
        norms = _absmax(blocks) if math.isinf(self.p) else torch.linalg.vector_norm(blocks, ord=self.p, dim=1)
        inverse = 1 / torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero block keeps nothing
        # v = x_j / ||x||_p lies in [-1, 1], and floor(v + u) is sign(x_j) with probability |v|, else 0:
        # Mishchenko et al.'s xi_j. Computed as the truncation of v + u + 1 (> 0: u >= 2^-17), so the code
        # is that value + 1 in {0, 1, 2} (one addcmul and one conversion: a third of comparing |x_j| with
        # u ||x||_p and assembling sign and keep bits). The clamp (on bytes) guards fp32's v = 1 + ulp.
        shifted = uniform(tuple(blocks.shape), blocks, generator, offset=1.0)
        shifted.addcmul_(blocks, inverse.unsqueeze(1))
        codes = shifted.to(torch.int8).view(torch.uint8).clamp_(max=2).view(-1)[:numel]
        payload, body = _payload(norms, math.ceil(2 * numel / 8))
        pack_bits(codes, 2, out=body)
        return payload

    def _decode(self, payload: Tensor, numel: int, out: Tensor | None) -> Tensor:
        nb = num_blocks(numel, self.block_size)
        norms = bytes_to_float32(payload[: 4 * nb])
        codes = unpack_bits(payload[4 * nb :], 2, numel)
        return _scaled_by_block(codes, norms, self.block_size, numel, offset=1.0, out=out)  # (code - 1) norm

    def variance_bound(self, numel: int) -> float:
        b = min(self.block_size, max(numel, 1))
        if math.isinf(self.p):
            return (math.sqrt(b) - 1) / 2
        if self.p >= 2:
            return math.sqrt(b) - 1
        return b ** (1 / self.p) - 1


class QSGD(_BlockScaled):
    """QSGD (Alistarh et al. 2017) with s levels per bucket: Q(x)_j = ||x||_2 sign(x_j) l_j / s, l_j the
    stochastic rounding of s |x_j| / ||x||_2 to an integer in [0, s]. Unbiased.

    Wire format: one fp32 norm per bucket, then per value the signed level plus s, sign(x_j) l_j + s in
    [0, 2s], in ceil(log2(2 s + 1)) = 1 + ceil(log2(s + 1)) bits (the size of a sign bit and the level bits,
    without their two zeros): ``4 ceil(d / bucket_size) + ceil(d (1 + ceil(log2(s + 1))) / 8)`` bytes.
    sign(x_j) l_j is the stochastic rounding of s x_j / ||x||_2 itself (floor(v + u) rounds -n - f down with
    probability f, as rounding |v| up would), computed as the truncation of v + u + s, so the encoder needs
    neither |x| nor the signs.

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
        levels_per_unit = self.levels / torch.where(norms > 0, norms, torch.ones_like(norms))
        # floor(s x_j / ||x||_2 + u) + s, by truncation of a value >= 0 (u >= 2^-17 and s x_j / ||x||_2 >=
        # -s up to fp32 rounding); the clamp (on bytes, cheap) only guards 2s + u rounding up to 2s + 1
        shifted = uniform(tuple(blocks.shape), blocks, generator, offset=self.levels)
        shifted.addcmul_(blocks, levels_per_unit.unsqueeze(1))
        codes = shifted.to(torch.int16).to(torch.uint8).clamp_(max=2 * self.levels)
        payload, body = _payload(norms, math.ceil(numel * self._width / 8))
        pack_bits(codes.view(-1)[:numel], self._width, out=body)
        return payload

    def _decode(self, payload: Tensor, numel: int, out: Tensor | None) -> Tensor:
        nb = num_blocks(numel, self.bucket_size)
        norms = bytes_to_float32(payload[: 4 * nb])
        codes = unpack_bits(payload[4 * nb :], self._width, numel)
        # (sign(x_j) l_j + s - s) ||x||_2 / s
        scales = norms / self.levels
        return _scaled_by_block(codes, scales, self.bucket_size, numel, offset=self.levels, out=out)

    def variance_bound(self, numel: int) -> float:
        b = min(self.bucket_size, max(numel, 1))
        return min(b / self.levels**2, math.sqrt(b) / self.levels)


class BlockInt8(_BlockScaled):
    """Blockwise 8-bit quantization with stochastic rounding: in each block of b values, the scale is
    s = max_j |x_j| / L and Q(x)_j = s q_j, q_j the stochastic rounding of x_j / s to an integer in
    [-L, L] (floor(x_j / s + u), u ~ U[0, 1)), L = 127 levels each side. Unbiased, and each value's error
    is below s.

    This is QSGD's stochastic rounding with L levels scaled by the block's inf-norm instead of its
    2-norm, so small blocks of similar values keep their resolution. It is the ``compressor="int8"``
    of :class:`~lightning_commsgd.LocalSGDStrategy` and :class:`~lightning_commsgd.OverlapLocalSGDStrategy`.

    Wire format: one fp32 scale per block, then one byte per value, q + L in [0, 2L]:
    ``4 ceil(d / b) + d`` bytes (3.9x smaller than fp32 for b = 256).

    Stochastic rounding draws its uniforms on a grid of 2^-16
    (:func:`~lightning_commsgd.compression.base.uniform`): E Q(x) misses x by at most 2^-17 of a step s.

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
        scales = _absmax(blocks).div_(self.LEVELS)
        inverse = 1 / torch.where(scales > 0, scales, torch.ones_like(scales))
        # floor(v + u) rounds v = x_j / s up with probability frac(v): E = v. Computed as the truncation of
        # v + u + L (>= 0; the offset L folds into the uniforms), so the codes are q + L, unsigned. |v| <= L
        # up to fp32's rounding, so the clamp (on bytes, cheap) only guards against L + u rounding past L.
        shifted = uniform(tuple(blocks.shape), blocks, generator, offset=self.LEVELS)
        shifted.addcmul_(blocks, inverse.unsqueeze(1))
        payload, body = _payload(scales, self._codes_nbytes(numel))
        self._pack_into(shifted.view(-1)[:numel], body)
        return payload

    def _decode(self, payload: Tensor, numel: int, out: Tensor | None) -> Tensor:
        nb = num_blocks(numel, self.block_size)
        scales = bytes_to_float32(payload[: 4 * nb])
        codes = self._unpack(payload[4 * nb : 4 * nb + self._codes_nbytes(numel)], numel)
        # (q + L - L) s
        return _scaled_by_block(codes, scales, self.block_size, numel, offset=self.LEVELS, out=out)

    def variance_bound(self, numel: int) -> float:
        b = min(self.block_size, max(numel, 1))
        return (math.sqrt(self.LEVELS**2 + b - 1) - self.LEVELS) / (2 * self.LEVELS)

    # One byte per code (q + L in [0, 2L]).
    def _codes_nbytes(self, numel: int) -> int:
        return numel

    def _pack_into(self, shifted: Tensor, out: Tensor) -> None:
        """The codes q + L = trunc(``shifted``), clamped to 2L, written into the bytes ``out``
        (fp32 -> int16 -> uint8: on CPU 3x faster than fp32 -> uint8)."""
        out.copy_(shifted.to(torch.int16)).clamp_(max=2 * self.LEVELS)

    def _unpack(self, data: Tensor, numel: int) -> Tensor:
        """The ``numel`` codes q + L in ``data`` (``uint8``)."""
        return data


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

    def _pack_into(self, shifted: Tensor, out: Tensor) -> None:
        codes = shifted.to(torch.int8).view(torch.uint8).clamp_(max=2 * self.LEVELS)  # q + 7 fits int8
        pack_bits(codes, 4, out=out)  # the even-indexed value in the low nibble

    def _unpack(self, data: Tensor, numel: int) -> Tensor:
        return unpack_bits(data, 4, numel)
