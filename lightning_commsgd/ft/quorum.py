"""Rounds between replica groups through a torchft ``Manager``: one quorum, one summed all-reduce and one
commit per attempt, counted in the ledger.

A replica group is one training job (one or more processes); the groups meet only in rounds. Each attempt
of a round is::

    membership = rounds.begin()       # a quorum of the live groups (torchft's Lighthouse); a group that
                                      # is behind (restarted) takes a live peer's state here (heals)
    rounds.sum_(buffer, tag=...)      # one all-reduce (sum) over the quorum's groups
    if rounds.commit(): ...           # every group of the quorum agrees the round succeeded

A group that died is simply absent from the next quorum; a failed all-reduce (a group died inside the round)
makes ``commit()`` false, and the caller retries with a new quorum from its unchanged state. What a round
sends and how it is averaged is the caller's (:mod:`.groups`): the manager's own averaging is not used,
because a group that heals inside a round must be left out of the mean, which torchft's participant count
does not do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import Tensor

from lightning_commsgd.ledger import CommLedger

__all__ = ["Membership", "QuorumEvent", "QuorumRounds", "QuorumUnavailableError", "ReplicaGroupError"]


class ReplicaGroupError(RuntimeError):
    """A replica group cannot go on (rounds failed too often, too few groups, a peer's state refused)."""


class QuorumUnavailableError(ReplicaGroupError):
    """No quorum formed in time: the Lighthouse is unreachable, or fewer live groups than the minimum."""


@dataclass(frozen=True)
class Membership:
    """One quorum as this group sees it.

    Attributes:
        quorum_id: the Lighthouse's id of the quorum (a new id: the membership changed).
        groups: live groups in the quorum (this one included).
        group_rank: this group's rank among them.
        healed: this group was behind and took a live peer's state while the quorum formed.
        changed: the quorum differs from this group's previous one.
    """

    quorum_id: int
    groups: int
    group_rank: int
    healed: bool
    changed: bool


@dataclass(frozen=True)
class QuorumEvent:
    """A quorum change, for the monitor: when (optimizer step), who, and what healing cost."""

    step: int
    quorum_id: int
    groups: int
    changed: bool
    healed: bool
    heal_seconds: float
    wall_time: float


class _QuorumIdListener(logging.Handler):
    """torchft logs each new quorum's id on the ``torchft_quorums`` logger (its public record of quorum
    changes); this handler keeps the latest."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.quorum_id = -1

    def emit(self, record: logging.LogRecord) -> None:
        quorum_id = getattr(record, "quorum_id", None)
        if quorum_id is not None:
            self.quorum_id = int(quorum_id)


@dataclass
class _Counters:
    attempts: int = 0
    failed_commits: int = 0
    heals: int = 0
    heal_seconds: float = 0.0
    events: list[QuorumEvent] = field(default_factory=list)


class QuorumRounds:
    """Quorum, all-reduce and commit through a torchft ``Manager`` (see the module docstring).

    Args:
        manager: the group's ``torchft.manager.Manager``, built with ``use_async_quorum=False`` (a round
            needs its quorum before it sends).
        ledger: where every round's bytes, collectives and seconds are recorded (the group's ledger).
        quorum_timeout: seconds a quorum may take to form before :class:`QuorumUnavailableError`.
        step: returns the current optimizer step, for the events (default: always 0).
    """

    def __init__(
        self,
        manager: Any,
        ledger: CommLedger,
        *,
        quorum_timeout: float = 60.0,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError(
                "Arg `manager` must be built with use_async_quorum=False: a round needs its quorum."
            )
        if not quorum_timeout > 0:
            raise ValueError(f"Arg `quorum_timeout` must be > 0 seconds, got {quorum_timeout!r}.")
        self.manager = manager
        self.ledger = ledger
        self.quorum_timeout = float(quorum_timeout)
        self._step = step
        self._counters = _Counters()
        self._listener = _QuorumIdListener()
        quorum_log = logging.getLogger("torchft_quorums")
        quorum_log.addHandler(self._listener)
        quorum_log.setLevel(min(quorum_log.level or logging.INFO, logging.INFO))
        self._quorum_id = -1
        self._healing = False  # set by note_healed() while begin() waits
        self.membership: Membership | None = None

    # -- what the group's state functions call --------------------------------------------------------
    def note_healed(self) -> None:
        """Called by the group's load function when the manager hands it a peer's state (inside begin)."""
        self._healing = True

    # -- a round's attempt ---------------------------------------------------------------------------
    def begin(self) -> Membership:
        """A new quorum (blocking); heals this group when it is behind. Raises
        :class:`QuorumUnavailableError` when none forms within ``quorum_timeout``."""
        self._healing = False
        start = time.perf_counter()
        try:
            self.manager.start_quorum(timeout=timedelta(seconds=self.quorum_timeout))
        except ReplicaGroupError:  # raised by this group's own load function (a peer's state refused)
            raise
        except Exception as err:  # torchft raises its transport's errors (timeouts, refused connections)
            raise QuorumUnavailableError(
                f"No quorum of replica groups formed within {self.quorum_timeout:g} s at step "
                f"{self._step()}: the Lighthouse is unreachable or fewer groups than the minimum are live"
                f" ({err})."
            ) from err
        seconds = time.perf_counter() - start
        healed = self._healing
        self._healing = False
        quorum_id = self._listener.quorum_id
        groups = int(self.manager.num_participants())
        rank = self.manager.participating_rank()
        previous = self.membership
        changed = previous is None or quorum_id != self._quorum_id or groups != previous.groups
        self._quorum_id = quorum_id
        self.membership = Membership(quorum_id, groups, -1 if rank is None else int(rank), healed, changed)
        counters = self._counters
        counters.attempts += 1
        if healed:
            counters.heals += 1
            counters.heal_seconds += seconds
        if changed or healed:
            counters.events.append(
                QuorumEvent(
                    self._step(), quorum_id, groups, changed, healed, seconds if healed else 0.0, time.time()
                )
            )
        return self.membership

    def sum_(self, buffer: Tensor, *, tag: str) -> Tensor:
        """Sum ``buffer`` over the quorum's groups in place (one all-reduce); recorded under ``tag``. After a
        failure the buffer's contents are undefined and :meth:`commit` returns False."""
        start = time.perf_counter()
        work = self.manager.allreduce(buffer, reduce_op=dist.ReduceOp.SUM)
        work.wait()
        nbytes = buffer.numel() * buffer.element_size()
        self.ledger.record(
            tag, sent=nbytes, received=nbytes, seconds=time.perf_counter() - start, kind="all_reduce"
        )
        return buffer

    def commit(self) -> bool:
        """Whether every group of the quorum completed the round (torchft's ``should_commit``)."""
        committed = bool(self.manager.should_commit(timeout=timedelta(seconds=self.quorum_timeout)))
        if not committed:
            self._counters.failed_commits += 1
        return committed

    # -- figures ------------------------------------------------------------------------------------
    @property
    def events(self) -> list[QuorumEvent]:
        """Every quorum change and heal seen by this group, in order."""
        return list(self._counters.events)

    def metrics(self) -> dict[str, float]:
        """Figures for the monitor: live groups, quorum changes, heals and their seconds, failed commits."""
        counters, membership = self._counters, self.membership
        return {
            "ft_groups": float(membership.groups if membership else 0),
            "ft_quorum_changes": float(sum(1 for e in counters.events if e.changed)),
            "ft_heals": float(counters.heals),
            "ft_heal_seconds": counters.heal_seconds,
            "ft_failed_commits": float(counters.failed_commits),
        }

    def close(self) -> None:
        """Stop listening for quorum ids and shut the manager down (its servers and threads)."""
        logging.getLogger("torchft_quorums").removeHandler(self._listener)
        self.manager.shutdown(wait=False)
