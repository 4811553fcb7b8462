"""The byte and round ledger: what one rank sent, received and waited for, per purpose (tag)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FRAMEWORK_TAGS", "CommLedger", "TagStats"]

#: Tags of the collectives that are not the algorithm's exchanges: Lightning's own collectives
#: (``self.log(..., sync_dist=True)``, ``self.all_gather``, barriers and broadcasts of its loops and
#: callbacks), the strategy's broadcast of x_0 at setup and its checkpoint gathers, validation on the
#: consensus model, and measurements and agreements (consensus distance, replica checks, a schedule's
#: decisions). :attr:`CommLedger.algorithm_rounds` counts every other tag.
FRAMEWORK_TAGS: frozenset[str] = frozenset(
    {
        "setup_broadcast",
        "lightning_reduce",
        "lightning_all_gather",
        "lightning_barrier",
        "lightning_broadcast",
        "checkpoint",
        "eval_consensus",
        "consensus",
        "replica_check",
        "schedule",
    }
)


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

    :attr:`rounds` counts every communicator call; :attr:`algorithm_rounds` only the algorithm's exchanges,
    :attr:`framework_collectives` the rest (tags in :data:`FRAMEWORK_TAGS`).

    Attributes:
        skipped_replicas: poisoned replicas left out of this rank's rounds under ``on_nonfinite="skip"``
            (one per poisoned rank per round; see :mod:`lightning_commsgd.algorithms.finite`).
    """

    world_size: int = 1
    by_tag: dict[str, TagStats] = field(default_factory=dict)
    skipped_replicas: int = 0

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

    def record_skipped(self, count: int) -> None:
        """Count ``count`` poisoned replicas left out of a round (``on_nonfinite="skip"``)."""
        self.skipped_replicas += int(count)

    def _total(self, attr: str, framework: bool | None = None) -> Any:
        """Sum of ``attr`` over all tags; over :data:`FRAMEWORK_TAGS` only (``framework=True``) or over the
        others (``False``)."""
        return sum(
            getattr(stats, attr)
            for tag, stats in self.by_tag.items()
            if framework is None or (tag in FRAMEWORK_TAGS) == framework
        )

    @property
    def rounds(self) -> int:
        """Synchronisation points (communicator calls) over all tags, framework collectives included."""
        return self._total("rounds")

    @property
    def algorithm_rounds(self) -> int:
        """The algorithm's rounds: communicator calls under every tag not in :data:`FRAMEWORK_TAGS`
        (averaging, gossip, compressed exchanges, the final round of fit, ...)."""
        return self._total("rounds", framework=False)

    @property
    def framework_collectives(self) -> int:
        """Communicator calls under :data:`FRAMEWORK_TAGS`: Lightning's own collectives, the setup
        broadcast, checkpoint gathers, consensus validation and measurements."""
        return self._total("rounds", framework=True)

    @property
    def framework_bytes_sent(self) -> int:
        """Payload bytes this rank sent in :attr:`framework_collectives`."""
        return self._total("bytes_sent", framework=True)

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
            "algorithm_rounds": self.algorithm_rounds,
            "framework_collectives": self.framework_collectives,
            "framework_bytes_sent": self.framework_bytes_sent,
            "collectives": self.collectives,
            "seconds": self.seconds,
            "wire_bytes_estimate": self.wire_bytes_estimate(),
            "skipped_replicas": self.skipped_replicas,
            "by_tag": {name: asdict(stats) for name, stats in sorted(self.by_tag.items())},
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters to store in a checkpoint, so a resumed run keeps counting from where it stopped."""
        return {
            "by_tag": {name: asdict(stats) for name, stats in self.by_tag.items()},
            "skipped_replicas": self.skipped_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters written by :meth:`state_dict` (checkpoints from before ``skipped_replicas``
        existed restore it as 0)."""
        self.by_tag = {name: TagStats(**stats) for name, stats in state["by_tag"].items()}
        self.skipped_replicas = int(state.get("skipped_replicas", 0))
