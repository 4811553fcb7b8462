"""Sparsification: random-k (scaled, unbiased), top-k (biased), and scaled sign (biased)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_commsgd.compression.base import (
    Compressor,
    blocks_of,
    check_positive_int,
    check_ratio,
    num_blocks,
)
from lightning_commsgd.compression.bitpack import (
    bytes_to_float32,
    bytes_to_int32,
    float32_to_bytes,
    int32_to_bytes,
    pack_bits,
    unpack_bits,
)

__all__ = ["RandomK", "ScaledSign", "TopK"]


def _k(ratio: float, numel: int) -> int:
    """Entries kept: ceil(ratio d), at least 1 and at most d."""
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


def _exact_largest(magnitude: Tensor, k: int) -> Tensor:
    """Indices (increasing) of the ``k`` largest of ``magnitude`` (no NaN); the lowest indices win ties."""
    threshold = magnitude.topk(k, sorted=False).values.min()
    keep = magnitude > threshold
    tied = (magnitude == threshold).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return keep.nonzero().squeeze(1)


# below this many entries, or when more than this fraction is kept, the plain top-k is as fast
_SAMPLED_MIN_NUMEL = 1 << 14
_SAMPLED_MAX_RATIO = 1 / 8


def _largest_first_index_ties(magnitude: Tensor, k: int) -> Tensor:
    """Indices (increasing) of the ``k`` largest entries of ``magnitude``; among entries equal to the k-th
    largest, the lowest indices win. NaN ranks as an infinite magnitude.

    Fast path: every 64th entry estimates a magnitude t that a little more than k entries reach; the exact
    selection then runs on the entries >= t only. Whenever at least k entries reach t, those contain the k
    largest and every entry tied with the k-th, so the result is exactly the full selection's (in index
    order, so the tie rule holds); otherwise (an unrepresentative sample) the full selection runs.
    """
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=magnitude.device)
    magnitude = torch.nan_to_num(magnitude, nan=math.inf, posinf=math.inf)
    numel = magnitude.numel()
    if numel >= _SAMPLED_MIN_NUMEL and k <= numel * _SAMPLED_MAX_RATIO:
        sample = magnitude[::64]
        # the sample's share of k, with room for its error (about sqrt of the count)
        expected = k * sample.numel() / numel
        rank = min(sample.numel(), math.ceil(expected + 3 * math.sqrt(expected) + 8))
        reach = sample.topk(rank, sorted=False).values.min()
        candidates = (magnitude >= reach).nonzero().squeeze(1)
        if candidates.numel() >= k:
            return candidates[_exact_largest(magnitude[candidates], k)]
    return _exact_largest(magnitude, k)


def _sample_without_replacement(numel: int, k: int, generator: torch.Generator | None, device: Any) -> Tensor:
    """``k`` distinct indices of ``[0, numel)``, every k-subset equally likely, in increasing order.

    Sparse case (k <= numel / 4): k + a few indices drawn with replacement; their distinct values are a
    uniformly random subset of their size (the draw is exchangeable), and a uniformly random k of them a
    uniformly random k-subset; a draw with fewer than k distinct values is redrawn. O(k log k) instead of a
    permutation of all numel indices.
    """
    if 4 * k > numel:
        return torch.randperm(numel, generator=generator, device=device)[:k].sort().values
    while True:
        extra = 2 * k * k // numel + 32  # about k^2 / (2 numel) repeats are expected
        distinct = torch.unique(torch.randint(0, numel, (k + extra,), generator=generator, device=device))
        if distinct.numel() >= k:
            break
    chosen = torch.randperm(distinct.numel(), generator=generator, device=device)[:k]
    return distinct[chosen.sort().values]


class _Sparse(Compressor):
    """Wire format shared by the k-sparsifiers: k int32 indices, then k fp32 values (8k bytes)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = check_ratio(ratio)

    def payload_nbytes(self, numel: int) -> int:
        return 8 * _k(self.ratio, numel)

    def _pack(self, indices: Tensor, values: Tensor) -> Tensor:
        return torch.cat([int32_to_bytes(indices), float32_to_bytes(values)])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        k = _k(self.ratio, numel)
        indices = bytes_to_int32(payload[: 4 * k]).long()
        values = bytes_to_float32(payload[4 * k :])
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        out[indices] = values
        return out


class RandomK(_Sparse):
    """Random-k sparsification: k = ceil(ratio d) coordinates chosen uniformly without replacement, scaled
    by d / k so that E Q(x) = x; C = d / k - 1. Wire: 8k bytes, the indices in increasing order.

    Args:
        ratio: fraction of the coordinates kept, in (0, 1].
    """

    unbiased = True

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flat = x.detach().reshape(-1).float()
        numel = flat.numel()
        k = _k(self.ratio, numel)
        indices = _sample_without_replacement(numel, k, generator, flat.device)
        return self._pack(indices, flat[indices] * (numel / k))

    def variance_bound(self, numel: int) -> float:
        return numel / _k(self.ratio, numel) - 1


class TopK(_Sparse):
    """Top-k sparsification: the k = ceil(ratio d) entries of largest magnitude, unscaled. Biased, with
    ||Q(x) - x||^2 <= (1 - k/d) ||x||^2 (delta = k / d); use it with error feedback (MEM-SGD). Wire: 8k bytes,
    the indices in increasing order.

    Ties: when several entries share the k-th largest magnitude, the ones with the lowest indices are kept,
    so the result is deterministic and the same on every device (``+0.0`` and ``-0.0`` tie; NaN ranks as an
    infinite magnitude). In a vector with fewer than k non-zeros, the zeros kept are the first ones.

    Args:
        ratio: fraction of the coordinates kept, in (0, 1].
    """

    unbiased = False

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flat = x.detach().reshape(-1).float()
        indices = _largest_first_index_ties(flat.abs(), _k(self.ratio, flat.numel()))
        return self._pack(indices, flat[indices])

    def contraction(self, numel: int) -> float:
        return _k(self.ratio, numel) / numel


class ScaledSign(Compressor):
    """Scaled sign (EF-signSGD, Karimireddy et al. 2019): in each block B of n_B values,
    Q(x)_j = (||x_B||_1 / n_B) s(x_j), where n_B is the number of real values in the block (``block_size``,
    fewer in a partial last block: the mean |x| over the values that exist, never over padding) and s is
    the sign on one bit: s(x) = +1 for x >= 0, -1 for x < 0. An exact zero (+0.0 or -0.0) is sent as +1,
    so it decodes to +scale, not 0 (a block of zeros has scale 0 and decodes to zeros).

    Biased: per block ||Q(x_B) - x_B||^2 = ||x_B||^2 - ||x_B||_1^2 / n_B (s(x_j) x_j = |x_j|, zeros too),
    so delta_B = ||x_B||_1^2 / (n_B ||x_B||^2) >= 1 / n_B >= 1 / block_size. Wire: one fp32 scale per block
    and one bit per value, ``4 ceil(d / block_size) + ceil(d / 8)`` bytes.

    Args:
        block_size: values sharing one scale; ``None`` (default) for one scale over the whole tensor.
    """

    unbiased = False

    def __init__(self, block_size: int | None = None) -> None:
        if block_size is not None:
            check_positive_int(block_size, "block_size", "values sharing one scale, or None for one block")
        self.block_size = block_size

    def _block(self, numel: int) -> int:
        return self.block_size or max(numel, 1)

    def payload_nbytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self._block(numel)) + math.ceil(numel / 8)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        numel = x.numel()
        block = self._block(numel)
        blocks = blocks_of(x, block)
        # mean |x| over the block's real entries (the zero padding of the last block excluded)
        counts = torch.full((blocks.shape[0],), float(block), device=blocks.device)
        counts[-1] = numel - block * (blocks.shape[0] - 1)
        scales = blocks.abs().sum(dim=1) / counts
        positive = torch.ge(blocks, 0).view(-1)[:numel]  # s(0) = +1: one bit has no zero
        payload = torch.empty(self.payload_nbytes(numel), dtype=torch.uint8, device=blocks.device)
        payload[: 4 * scales.numel()] = float32_to_bytes(scales)
        pack_bits(positive, 1, out=payload[4 * scales.numel() :])
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        block = self._block(numel)
        nb = num_blocks(numel, block)
        scales = bytes_to_float32(payload[: 4 * nb])
        bits = unpack_bits(payload[4 * nb :], 1, numel)
        values = torch.empty(nb * block, dtype=torch.float32, device=payload.device)
        values[:numel].copy_(bits)
        # (2 bit - 1) s = +-s, in place per block
        scale = scales.unsqueeze(1)
        return values.view(nb, block).mul_(2 * scale).sub_(scale).view(-1)[:numel]

    def contraction(self, numel: int) -> float:
        return 1 / self._block(numel)
