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
import threading
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

    def decode_into(self, payload: Tensor, numel: int, out: Tensor) -> Tensor:
        """:meth:`decode` written into ``out`` (``numel`` fp32 values on the payload's device), which is
        returned. Callers that decode every step into one buffer use it: on CPU a fresh model-sized result
        costs its page faults. This default copies; the quantizers write in place."""
        return out.copy_(self.decode(payload, numel))

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


#: a CPU work buffer larger than this is allocated per call instead of kept (a model of 64 M values and
#: more would keep 256 MB per buffer and thread; at that size a call's own work dwarfs its page faults)
SCRATCH_MAX_BYTES = 256 * 2**20
_scratch = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer of ``numel`` values that this thread's encodes reuse under ``name`` (contents undefined).

    Why: on CPU a fresh model-sized buffer costs its page faults, about 1 ms per 5 MB, because glibc returns
    freed memory above its trim threshold to the kernel: an encode that allocates three or four such
    buffers spent a third of its time faulting pages in. The buffers are per thread (the averaging helper
    thread encodes while the training thread does) and must not outlive the call that took them; on CUDA
    (whose caching allocator already reuses memory) and above :data:`SCRATCH_MAX_BYTES` a fresh buffer is
    returned."""
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes > SCRATCH_MAX_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    buffers: dict[str, Tensor] = _scratch.__dict__.setdefault("buffers", {})
    held = buffers.get(name)
    if held is None or held.numel() < nbytes:
        held = buffers[name] = torch.empty(nbytes, dtype=torch.uint8)
    return held[:nbytes].view(dtype)


def blocks_of(x: Tensor, block_size: int) -> Tensor:
    """``x`` flattened to fp32 and zero-padded into ``(ceil(numel / block_size), block_size)`` (a view of
    ``x`` when no padding is needed, else a :func:`scratch` buffer: read it within the call)."""
    flat = x.detach().reshape(-1).float()
    num_blocks = max(1, math.ceil(flat.numel() / block_size))
    pad = num_blocks * block_size - flat.numel()
    if pad:
        padded = scratch("blocks_of", num_blocks * block_size, torch.float32, flat.device)
        padded[: flat.numel()].copy_(flat)
        padded[flat.numel() :].zero_()
        flat = padded
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

    ``offset`` is added for free (it folds into the affine map from the 16-bit lanes). The samples live in a
    :func:`scratch` buffer: the caller uses them up within its call.
    """
    numel = math.prod(shape)
    words = scratch("uniform_words", -(-numel // 4), torch.int64, like.device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits (the default range leaves the top bit 0)
    samples = scratch("uniform_samples", numel, torch.float32, like.device).view(shape)
    samples.view(-1).copy_(words.view(torch.int16)[:numel])  # k - 2^15
    return samples.mul_(2.0**-UNIFORM_BITS).add_(0.5 + 2.0 ** -(UNIFORM_BITS + 1) + offset)
