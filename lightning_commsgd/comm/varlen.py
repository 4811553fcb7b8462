"""Collectives for byte messages whose length differs between ranks (entropy-coded payloads).

Each is two counted collectives of the :class:`~lightning_commsgd.comm.communicator.Communicator`: the
lengths (one int64 per rank), then the messages zero-padded to the longest. Padding keeps them ordinary
collectives (any backend, NCCL included, and the communicator's byte and round counts) at the price of
the difference between the longest and the others: entropy-coded payloads of the same compressor differ by
a few tenths of a percent between ranks. The ledger counts what travels, padding included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_commsgd.comm.communicator import Communicator

__all__ = ["all_gather_varlen", "broadcast_varlen", "gather_varlen"]


def _padded(comm: Communicator, data: Tensor, tag: str) -> tuple[Tensor, list[int]]:
    """``data`` zero-padded to the longest message of any rank, and every rank's length (rank order)."""
    mine = torch.tensor([data.numel()], dtype=torch.int64, device=data.device)
    lengths = [int(n) for n in torch.cat(comm.all_gather(mine, tag=tag)).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=data.device)
    padded[: data.numel()] = data
    return padded, lengths


def all_gather_varlen(comm: Communicator, data: Tensor, *, tag: str) -> list[Tensor]:
    """Every rank's ``uint8`` message (1-D, any length), in rank order, on every rank."""
    padded, lengths = _padded(comm, data.reshape(-1), tag)
    rows = comm.all_gather(padded, tag=tag)
    return [row[:n] for row, n in zip(rows, lengths)]


def gather_varlen(comm: Communicator, data: Tensor, dst: int = 0, *, tag: str) -> list[Tensor] | None:
    """Every rank's ``uint8`` message in rank order on ``dst``; ``None`` elsewhere."""
    padded, lengths = _padded(comm, data.reshape(-1), tag)
    rows = comm.gather(padded, dst=dst, tag=tag)
    return None if rows is None else [row[:n] for row, n in zip(rows, lengths)]


def broadcast_varlen(comm: Communicator, data: Tensor | None, src: int = 0, *, tag: str) -> Tensor:
    """``src``'s ``uint8`` message (``data`` there; ignored elsewhere) on every rank."""
    device = comm.device if data is None else data.device
    length = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    comm.broadcast_(length, src=src, tag=tag)
    if comm.rank == src:
        assert data is not None, "the source rank must pass its message"
        message = data.reshape(-1).contiguous()
    else:
        message = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    return comm.broadcast_(message, src=src, tag=tag)
