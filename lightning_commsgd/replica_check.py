"""Debug check that replicas which must be equal are bitwise equal: each rank hashes its tensors and the
hashes are gathered (8 bytes per rank; tag ``"replica_check"`` in the ledger).

After an exact averaging round every replica must hold the same bits: every rank receives the same
reduced buffer (or decodes the same low-precision messages). A difference means a bug or a corrupted
rank, and training on would silently average different models. Every rank sees the same gathered hashes,
so every rank raises the same :class:`ReplicasDivergedError` in the same round (no rank is left waiting
in a later collective).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_commsgd.comm import Communicator

__all__ = ["ReplicasDivergedError", "check_replicas_equal", "replica_digest"]


class ReplicasDivergedError(RuntimeError):
    """Replicas that must be equal after a round are not bitwise equal."""


def replica_digest(tensors: Sequence[Tensor]) -> int:
    """A 63-bit hash of the exact bytes of ``tensors`` (in order; shape and dtype included)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        cpu = t.detach().contiguous().cpu()
        h.update(f"{cpu.dtype}{tuple(cpu.shape)}".encode())
        h.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_replicas_equal(
    tensors: Sequence[Tensor], communicator: Communicator, *, step: int, tag: str = "replica_check"
) -> None:
    """Gather every rank's :func:`replica_digest` of ``tensors`` and raise :class:`ReplicasDivergedError`
    on every rank, naming the ranks whose replica differs from rank 0's and ``step``, unless all are equal.
    One all-gather of one int64 per rank; nothing on a single process."""
    if not communicator.is_distributed:
        return
    mine = torch.tensor([replica_digest(tensors)], dtype=torch.int64, device=communicator.device)
    digests = [int(d.item()) for d in communicator.all_gather(mine, tag=tag)]
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise ReplicasDivergedError(
            f"Replicas differ after the round at step {step}: rank(s) {differing} hold a model that is not"
            f" bitwise equal to rank 0's (digests by rank: {[f'{d:016x}' for d in digests]})."
        )
