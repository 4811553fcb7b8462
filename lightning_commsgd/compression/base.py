"""What every compressor is: a fixed-size byte payload per tensor size, and what is known about its error.

A :class:`Compressor` turns a 1-D tensor of ``numel`` values into one ``uint8`` payload whose length
depends on ``numel`` only (:meth:`Compressor.payload_nbytes`), so every rank can all-gather or gather
payloads of the same shape, and the ledger counts exactly the bytes that cross. ``decode`` gives the
compressed vector Q(x) back in fp32. Inputs of any floating dtype are computed on in fp32.

Error constants, as the DORE/DIANA papers state them:

- unbiased compressors (``unbiased = True``): E Q(x) = x and E||Q(x) - x||^2 <= C ||x||^2, C from
  :meth:`Compressor.variance_bound`;
- biased (contractive) ones: ||Q(x) - x||^2 <= (1 - delta) ||x||^2, delta from :meth:`Compressor.contraction`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from lightning_commsgd.compression.bitpack import bytes_to_float32, float32_to_bytes

__all__ = ["Compressor", "Identity", "check_positive_int", "check_ratio"]


def check_positive_int(value: Any, name: str, meaning: str) -> int:
    """``value`` if it is an int >= 1 (bools refused), else a ValueError naming ``name``, what it means
    (``meaning``) and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Arg `{name}` must be an int >= 1 ({meaning}), got {value!r}.")
    return value


def check_ratio(value: Any, name: str = "ratio") -> float:
    """``value`` if it is a finite number in (0, 1], else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"Arg `{name}` must be a number in (0, 1], got {value!r}.")
    return float(value)


class Compressor(ABC):
    """Q: a 1-D tensor -> a byte payload of fixed size -> Q(x) in fp32.

    Subclasses set ``unbiased`` and implement :meth:`encode`, :meth:`decode`, :meth:`payload_nbytes`.
    """

    unbiased: bool = False

    @abstractmethod
    def payload_nbytes(self, numel: int) -> int:
        """Exact size in bytes of the payload for a tensor of ``numel`` values."""

    @abstractmethod
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The payload (``uint8``, 1-D, :meth:`payload_nbytes` long) of ``x`` (flattened).

        Args:
            x: the tensor to compress, any floating dtype and device (computed on in fp32).
            generator: the random stream of stochastic compressors (on ``x``'s device); ``None`` uses
                torch's default generator. Deterministic compressors ignore it.
        """

    @abstractmethod
    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """Q(x) as a 1-D fp32 tensor of ``numel`` values, on the payload's device."""

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``decode(encode(x))``: what the receiving side will see."""
        return self.decode(self.encode(x, generator), x.numel())

    def variance_bound(self, numel: int) -> float | None:
        """C with E||Q(x) - x||^2 <= C ||x||^2 for unbiased compressors; ``None`` when not unbiased."""
        return None

    def contraction(self, numel: int) -> float | None:
        """delta in (0, 1] with ||Q(x) - x||^2 <= (1 - delta) ||x||^2 (deterministic, biased compressors);
        ``None`` when the compressor gives no such guarantee."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Identity(Compressor):
    """No compression: the fp32 values themselves (4 bytes each). Q(x) = x, C = 0."""

    unbiased = True

    def payload_nbytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return float32_to_bytes(x.detach().reshape(-1).float())

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return bytes_to_float32(payload).clone()

    def variance_bound(self, numel: int) -> float:
        return 0.0

    def contraction(self, numel: int) -> float:
        return 1.0


def blocks_of(x: Tensor, block_size: int) -> Tensor:
    """``x`` flattened to fp32 and zero-padded into ``(ceil(numel / block_size), block_size)``."""
    flat = x.detach().reshape(-1).float()
    num_blocks = max(1, math.ceil(flat.numel() / block_size))
    pad = num_blocks * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(num_blocks, block_size)


def num_blocks(numel: int, block_size: int) -> int:
    return max(1, math.ceil(numel / block_size))


#: the grid of the stochastic rounding's uniforms: 2^16 points
UNIFORM_BITS = 16


def uniform(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None, offset: float = 0.0
) -> Tensor:
    """``offset`` + U(0, 1) samples on ``like``'s device from ``generator``, fp32.

    The samples are the midpoints of a grid of 2^16 cells, (k + 1/2) / 2^16, k uniform in [0, 2^16): four
    per 64-bit word of the generator (``random_`` over the full int64 range), so drawing them costs a
    quarter of ``torch.rand``'s generator calls (the draw is most of a stochastic codec's time). Rounding
    with them, ``floor(v + u)`` rounds up with probability round(2^16 frac(v)) / 2^16: the expected
    value misses v by at most 2^-17 of a quantization step (torch.rand's own grid is 2^-24; fp32 holds
    v / scale to 2^-24 relative), which no compressor's variance or any test can see.

    ``offset`` is added for free (it folds into the affine map from the 16-bit lanes).
    """
    numel = math.prod(shape)
    words = torch.empty(-(-numel // 4), dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits (the default range leaves the top bit 0)
    samples = torch.empty(shape, dtype=torch.float32, device=like.device)
    samples.view(-1).copy_(words.view(torch.int16)[:numel])  # k - 2^15
    return samples.mul_(2.0**-UNIFORM_BITS).add_(0.5 + 2.0 ** -(UNIFORM_BITS + 1) + offset)
