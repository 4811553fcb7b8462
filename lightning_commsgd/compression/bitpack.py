"""Packing small unsigned integers into bytes, and raw fp32/int32 values into byte payloads.

A compressor's payload is one ``uint8`` tensor: what crosses the network is exactly its bytes. Codes of
``width`` bits (1..8) are packed densely, least significant bit first; ``ceil(count * width / 8)``
bytes. Everything is plain tensor arithmetic, so it runs on CPU and CUDA alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bytes_to_float32",
    "bytes_to_int32",
    "float32_to_bytes",
    "int32_to_bytes",
    "pack_bits",
    "unpack_bits",
]


def _check_width(width: int) -> None:
    if not 1 <= width <= 8:
        raise ValueError(f"Arg `width` must be 1..8 bits, got {width}.")


def pack_bits(codes: Tensor, width: int) -> Tensor:
    """``codes`` (integers in ``[0, 2**width)``) packed into ``ceil(len * width / 8)`` bytes."""
    _check_width(width)
    codes = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(width, device=codes.device, dtype=torch.int32)
    bits = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    # at most 255 per byte: sum in int32, then narrow
    return (bits.reshape(-1, 8).to(torch.int32) * weights.to(torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(data: Tensor, width: int, count: int) -> Tensor:
    """The first ``count`` codes of ``width`` bits from ``data`` (as int64)."""
    _check_width(width)
    shifts = torch.arange(8, device=data.device, dtype=torch.int32)
    bits = ((data.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * width]
    weights = 1 << torch.arange(width, device=data.device, dtype=torch.int64)
    return (bits.reshape(count, width).to(torch.int64) * weights).sum(1)


def float32_to_bytes(values: Tensor) -> Tensor:
    """The fp32 values' raw bytes (4 per value, native byte order: every rank runs the same code)."""
    return values.reshape(-1).to(torch.float32).contiguous().view(torch.uint8)


def bytes_to_float32(data: Tensor) -> Tensor:
    return data.contiguous().view(torch.float32)


def int32_to_bytes(values: Tensor) -> Tensor:
    return values.reshape(-1).to(torch.int32).contiguous().view(torch.uint8)


def bytes_to_int32(data: Tensor) -> Tensor:
    return data.contiguous().view(torch.int32)
