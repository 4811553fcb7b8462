"""Packing a fixed list of tensors into one contiguous buffer, so a round is one collective."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FlatBuffer"]


class FlatBuffer:
    """One contiguous buffer laid out for a fixed, ordered list of tensors.

    The layout (shapes, order, total size) is fixed at construction, so every rank that builds a
    ``FlatBuffer`` from the same list issues the same collective. Tensors of lower floating precision
    are widened to the buffer dtype (exactly) and rounded back on :meth:`unpack`; mixing floating and
    integer tensors is refused because an average of integers is not what anyone wants.

    Args:
        tensors: the tensors whose values travel together, in a rank-independent order.
        dtype: buffer dtype; defaults to the promoted dtype of ``tensors`` (fp16 with bf16 gives fp32).
    """

    def __init__(self, tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> None:
        if not tensors:
            raise ValueError("FlatBuffer needs at least one tensor.")
        if any(not torch.is_floating_point(t) for t in tensors):
            raise TypeError("FlatBuffer packs floating-point tensors only.")
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"FlatBuffer tensors must share one device, got {sorted(map(str, devices))}.")
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.numel = sum(self.numels)
        # promote_types, not "most bits": fp16 and bf16 are both 16 bits and neither holds the other.
        widest = dtype or functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        self.buffer = torch.empty(self.numel, dtype=widest, device=tensors[0].device)

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes: what one collective over it moves as payload."""
        return self.numel * self.buffer.element_size()

    def matches(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` has the layout this buffer was built for."""
        return len(tensors) == len(self.shapes) and all(t.shape == s for t, s in zip(tensors, self.shapes))

    def pack(self, tensors: Sequence[Tensor]) -> Tensor:
        """Copy ``tensors`` into the buffer and return it."""
        offset = 0
        with torch.no_grad():  # parameters require grad; the wire copy must not join the graph
            for tensor, n in zip(tensors, self.numels):
                self.buffer[offset : offset + n].copy_(tensor.reshape(-1))
                offset += n
        return self.buffer

    def views(self, buffer: Tensor | None = None) -> list[Tensor]:
        """Views into ``buffer`` (default: the own buffer) shaped like the packed tensors."""
        source = self.buffer if buffer is None else buffer
        out, offset = [], 0
        for shape, n in zip(self.shapes, self.numels):
            out.append(source[offset : offset + n].view(shape))
            offset += n
        return out

    def unpack(self, tensors: Sequence[Tensor], buffer: Tensor | None = None) -> None:
        """Copy the buffer's contents back into ``tensors`` (in place, casting to each tensor's dtype)."""
        with torch.no_grad():
            for tensor, view in zip(tensors, self.views(buffer)):
                tensor.copy_(view)
