"""Sparsification: random-k (scaled, unbiased), top-k (biased), and scaled sign (biased)."""

from __future__ import annotations

import math

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


def _largest_first_index_ties(magnitude: Tensor, k: int) -> Tensor:
    """Indices (increasing) of the ``k`` largest entries of ``magnitude``; among entries equal to the k-th
    largest, the lowest indices win. NaN ranks as an infinite magnitude. O(d): a top-k finds the threshold."""
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=magnitude.device)
    magnitude = torch.where(magnitude.isnan(), torch.full_like(magnitude, math.inf), magnitude)
    threshold = magnitude.topk(k, sorted=False).values.min()
    keep = magnitude > threshold
    tied = (magnitude == threshold).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return keep.nonzero().squeeze(1)


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
    by d / k so that E Q(x) = x; C = d / k - 1. Wire: 8k bytes.

    Args:
        ratio: fraction of the coordinates kept, in (0, 1].
    """

    unbiased = True

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flat = x.detach().reshape(-1).float()
        numel = flat.numel()
        k = _k(self.ratio, numel)
        indices = torch.randperm(numel, generator=generator, device=flat.device)[:k]
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
        positive = (blocks >= 0).to(torch.int32).reshape(-1)[:numel]  # s(0) = +1: one bit has no zero
        return torch.cat([float32_to_bytes(scales), pack_bits(positive, 1)])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        block = self._block(numel)
        nb = num_blocks(numel, block)
        scales = bytes_to_float32(payload[: 4 * nb])
        sign = unpack_bits(payload[4 * nb :], 1, numel).to(torch.float32) * 2 - 1
        return sign * scales.repeat_interleave(block)[:numel]

    def contraction(self, numel: int) -> float:
        return 1 / self._block(numel)
