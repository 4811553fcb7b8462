"""The byte and round ledger: what one rank sent, received and waited for, per purpose (tag)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CommLedger", "TagStats"]


@dataclass
class TagStats:
    """Counters for one purpose of communication (e.g. ``"average"`` or ``"checkpoint"``).

    Attributes:
        rounds: communicator calls (synchronisation points) made for this purpose.
        collectives: ``torch.distributed`` primitives issued (a round is usually exactly one).
        bytes_sent: payload bytes this rank put into those calls.
        bytes_received: payload bytes this rank got out of them.
        seconds: wall-clock time spent inside those calls.
        allreduce_bytes: the part of ``bytes_sent`` that went into all-reduces (for the wire estimate).
    """

    rounds: int = 0
    collectives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    allreduce_bytes: int = 0


@dataclass
class CommLedger:
    """Per-rank account of every call made through a :class:`~lightning_commsgd.comm.Communicator`.

    Bytes are *payload* bytes, the size of the tensors handed to the collective, by this convention:
    all-reduce of ``n`` bytes counts ``n`` sent and ``n`` received; broadcast counts ``n`` sent on the
    source and ``n`` received elsewhere; gather counts ``n`` sent by each rank but the destination and
    ``(p-1) n`` received by it (object gathers add 8 bytes per rank for the size exchange);
    all-gather counts ``n`` sent and ``(p-1) n`` received. What a ring all-reduce actually puts on the
    wire is ``2 (p-1)/p n``; :meth:`wire_bytes_estimate` reports that figure.
    """

    world_size: int = 1
    by_tag: dict[str, TagStats] = field(default_factory=dict)

    def record(
        self, tag: str, *, sent: int, received: int, seconds: float, collectives: int = 1, kind: str = ""
    ) -> None:
        """Add one communicator call to the account of ``tag``."""
        stats = self.by_tag.setdefault(tag, TagStats())
        stats.rounds += 1
        stats.collectives += collectives
        stats.bytes_sent += int(sent)
        stats.bytes_received += int(received)
        stats.seconds += float(seconds)
        if kind == "all_reduce":
            stats.allreduce_bytes += int(sent)

    def _total(self, attr: str) -> Any:
        return sum(getattr(stats, attr) for stats in self.by_tag.values())

    @property
    def rounds(self) -> int:
        """Synchronisation points (communicator calls) over all tags."""
        return self._total("rounds")

    @property
    def collectives(self) -> int:
        """``torch.distributed`` primitives issued over all tags."""
        return self._total("collectives")

    @property
    def bytes_sent(self) -> int:
        """Payload bytes sent by this rank over all tags."""
        return self._total("bytes_sent")

    @property
    def bytes_received(self) -> int:
        """Payload bytes received by this rank over all tags."""
        return self._total("bytes_received")

    @property
    def seconds(self) -> float:
        """Wall-clock seconds spent communicating over all tags."""
        return self._total("seconds")

    def wire_bytes_estimate(self) -> int:
        """Bytes a ring all-reduce would put on this rank's link: ``2 (p-1)/p`` of the all-reduce payload,
        plus every other payload as counted."""
        p = self.world_size
        allreduce = self._total("allreduce_bytes")
        ring = 2 * (p - 1) * allreduce // p if p > 1 else 0
        return ring + self.bytes_sent - allreduce

    def tag(self, name: str) -> TagStats:
        """Counters of one tag (zeros when the tag was never used)."""
        return self.by_tag.get(name, TagStats())

    def as_dict(self) -> dict[str, Any]:
        """Flat summary for logging and JSON reports."""
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "rounds": self.rounds,
            "collectives": self.collectives,
            "seconds": self.seconds,
            "wire_bytes_estimate": self.wire_bytes_estimate(),
            "by_tag": {name: asdict(stats) for name, stats in sorted(self.by_tag.items())},
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters to store in a checkpoint, so a resumed run keeps counting from where it stopped."""
        return {"by_tag": {name: asdict(stats) for name, stats in self.by_tag.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters written by :meth:`state_dict`."""
        self.by_tag = {name: TagStats(**stats) for name, stats in state["by_tag"].items()}
