"""The 16-bit casts as compressors: the ``"bf16"`` and ``"fp16"`` codecs of
:mod:`~lightning_commsgd.compression.names`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_commsgd.compression.base import Compressor

__all__ = ["Cast"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Cast(Compressor):
    """Each value rounded to nearest in a 16-bit float format: 2 bytes per value.

    Deterministic and (slightly) biased: a value's relative error is at most 2^-8 in bf16 (fp32's exponent
    range, so nothing overflows) and 2^-11 in fp16, where values above 65504 overflow to inf and values
    below 6e-8 flush to 0. Wire format: the 16-bit values, little-endian as the device stores them.

    Args:
        dtype: ``"bf16"`` or ``"fp16"`` (or ``torch.bfloat16`` / ``torch.float16``).
    """

    unbiased = False

    def __init__(self, dtype: Any = "bf16") -> None:
        by_dtype = {v: k for k, v in _DTYPES.items()}
        if isinstance(dtype, torch.dtype) and dtype in by_dtype:
            dtype = by_dtype[dtype]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"Arg `dtype` must be one of {tuple(_DTYPES)}, got {dtype!r}.")
        self.dtype = dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def payload_nbytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # through fp32 like every compressor: a float64 input rounds once to fp32, then to 16 bits
        return x.detach().reshape(-1).float().to(self.torch_dtype).view(torch.uint8)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return payload.view(self.torch_dtype).to(torch.float32)

    def contraction(self, numel: int) -> float | None:
        # bf16: |Q(x)_j - x_j| <= 2^-8 |x_j| (half a unit in the last of 8 significant bits; normal values),
        # so ||Q(x) - x||^2 <= 2^-16 ||x||^2; fp16 can overflow, so it guarantees nothing
        return 1.0 - 2.0**-16 if self.dtype == "bf16" else None
