"""Failure detection across ranks: a heartbeat per rank and one abort notice in the rendezvous store, and a
watchdog thread that ends a rank the job has given up on.

Why this exists (measured with gloo, lightning 2.6.6): a peer that crashes or is killed is seen by the
others within about a second ("Connection closed by peer"), but nobody says *which* rank it was; a peer
that is alive and stuck is seen only when the process-group timeout expires; and when Lightning's popen
launcher's rank 0 exits, a stuck child rank keeps running as an orphan.

How it works:

- Every rank's :class:`FailureWatchdog` thread writes a heartbeat ``hb/<rank>`` into the store every
  ``interval`` seconds: a beat counter, the optimizer step, the number of the collective the rank is in (or
  last left) and whether it is computing (between collectives), waiting in that collective, or has seen it
  fail, with the step that state began at and its age, so a message says what a rank was really doing
  (:meth:`Heartbeat.describe`). The training thread only updates Python attributes (no per-step cost on the
  network).
- A collective that fails (a peer closed its connection, or ``sync_timeout`` expired) asks the watchdog
  for a diagnosis (:meth:`FailureWatchdog.failure`): the heartbeats are read twice, ``2 interval + 0.5``
  seconds apart. A rank whose beat counter did not move is gone (killed, or crashed without a word); a rank
  that is alive but still computing or in an earlier collective has not reached this one (stuck); a rank
  still waiting inside the collective after the others gave up is stuck in it. The result names the ranks
  and their steps; it is posted as the job's *abort notice* and raised as :class:`RankFailureError`.
- A rank that fails by itself (an exception in the user's code) posts the notice with the exception
  (:meth:`FailureWatchdog.abort`), so the others report the real cause.
- Every watchdog reads the notice at each beat. When another rank posted one, it prints it and, unless its
  own training thread has ended the run within ``grace`` seconds, ends its process with exit code 1. That
  is what ends a rank that is stuck (alive, not progressing): the others time out, post the notice with the
  ranks their diagnosis found stuck (key ``abort_stuck``), and a stuck rank's watchdog ends it at once
  (its training thread will not raise, so a grace would only keep it alive after the others have gone).
  A watchdog that cannot reach the store for ``store_grace`` seconds (the store lives in rank 0's process
  or the launcher's agent) ends its rank the same way.

The store client's operations are serialised by torch, so the thread and the training thread may share it.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from lightning_commsgd.internals import default_store

__all__ = ["FailureWatchdog", "Heartbeat", "RankFailureError"]

COMPUTING, WAITING, FAILED = "computing", "waiting", "failed"
# Every rank sets up its runs in the same order, so the n-th run of each process shares one namespace.
_RUNS = itertools.count()


class RankFailureError(RuntimeError):
    """A collective could not complete because a rank failed; the message names the rank(s) and step(s)."""


@dataclass(frozen=True)
class Heartbeat:
    """One rank's published state. ``sequence``: number of collectives it entered (the same count on every
    rank for the same point of the run); ``state``: computing (between collectives: collective ``sequence``,
    the latest, is finished), waiting (inside collective ``sequence``) or failed (collective ``sequence``
    failed there); ``tag``: that collective's tag; ``state_step``: the step at which the rank entered its
    state (for computing: the step its latest collective finished at); ``age``: seconds in that state at
    the beat."""

    beats: int
    step: int
    sequence: int
    state: str
    tag: str
    state_step: int = 0
    age: float = 0.0

    def encode(self) -> str:
        head = f"{self.beats} {self.step} {self.sequence} {self.state} {self.state_step} {self.age:.3f}"
        return f"{head} {self.tag}"  # the tag last: it may hold spaces

    @classmethod
    def decode(cls, text: bytes | str) -> Heartbeat:
        raw = text.decode() if isinstance(text, bytes) else text
        beats, step, sequence, state, state_step, age, tag = (raw.split(" ", 6) + [""])[:7]
        return cls(int(beats), int(step), int(sequence), state, tag, int(state_step), float(age))

    def describe(self) -> str:
        """What the rank was doing at this beat, for the messages: e.g. ``at step 40, computing (not in a
        collective) for 3.2 s; its latest collective, #11 ('average'), finished at step 40``."""
        last = f"#{self.sequence} ({self.tag!r})"
        if self.state == COMPUTING:
            if self.sequence == 0:
                return f"at step {self.step}, computing (not in a collective; none yet) for {self.age:.1f} s"
            return (
                f"at step {self.step}, computing (not in a collective) for {self.age:.1f} s; its latest "
                f"collective, {last}, finished at step {self.state_step}"
            )
        if self.state == WAITING:
            return f"at step {self.step}, waiting in collective {last} for {self.age:.1f} s"
        return f"at step {self.step}, failed in collective {last}"


class FailureWatchdog:
    """Heartbeat, diagnosis and abort notice for one rank (see the module docstring).

    Args:
        store: a ``torch.distributed.Store`` every rank reaches (the process group's rendezvous store),
            already namespaced for this run (e.g. a ``PrefixStore``).
        rank: this rank in the world group. world_size: number of ranks.
        interval: seconds between heartbeats and abort-notice checks.
        grace: seconds a rank keeps running after it learnt of an abort posted by another rank, so that
            its training thread can raise the error itself; then the watchdog ends the process.
        store_grace: seconds without reaching the store after which the watchdog ends this rank (the
            store's host, rank 0 or the launcher, is gone). Use at least the collective timeout, so a
            healthy rank that is still finishing while rank 0 has already exited is never ended.
        exit_fn: how the process is ended (``os._exit``; tests replace it).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        *,
        interval: float = 0.5,
        grace: float = 3.0,
        store_grace: float = 600.0,
        exit_fn: Callable[[int], Any] = os._exit,
    ) -> None:
        if interval <= 0 or grace < 0 or store_grace <= 0:
            raise ValueError("interval and store_grace must be > 0 and grace >= 0.")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval, self.grace, self.store_grace = interval, grace, store_grace
        self._exit_fn = exit_fn
        # Written by the training thread, read by the watchdog thread (plain attributes: the GIL makes
        # each assignment atomic; a heartbeat may mix two consecutive values, which is harmless).
        self.step = 0
        self.sequence = 0
        self.state = COMPUTING
        self.tag = ""
        self._state_step = 0  # the step at which the current state began
        self._state_since = time.monotonic()
        self._beats = 0
        self._abort_notice: str | None = None  # the job's abort notice, once seen or posted
        self._posted = False  # this rank posted the notice (its training thread is raising)
        self._stuck_ranks: list[int] = []  # the alive ranks this rank's diagnosis found stuck
        self._stop = threading.Event()
        self._wake = threading.Event()  # set on entering a collective: publish the new state soon
        self._thread: threading.Thread | None = None

    @classmethod
    def for_process_group(cls, **kwargs: Any) -> FailureWatchdog:
        """A watchdog for this rank of the initialised default process group, in a store namespace of its
        own: one per run of this process (and per elastic restart, whose store may keep an older run's
        keys). Collective in effect: every rank must create its n-th watchdog for the same run."""
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"lightning_commsgd/watchdog/{restart}/{next(_RUNS)}"
        store = dist.PrefixStore(prefix, default_store())
        return cls(store, dist.get_rank(), dist.get_world_size(), **kwargs)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Publish a first heartbeat and start the thread. The thread is stopped at interpreter exit too (a
        watchdog thread still running while the interpreter finalizes can abort the process with
        "terminate called without an active exception"; seen once in a few runs of a Fabric script that
        never tore down)."""
        self._publish()
        self._thread = threading.Thread(target=self._run, name="commsgd-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the thread (the run ended on this rank, normally or by an error it raised)."""
        atexit.unregister(self.stop)
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        self._thread = None

    @property
    def abort_notice(self) -> str | None:
        """The job's abort notice, if one was posted and seen."""
        return self._abort_notice

    # -- the training thread's side ---------------------------------------------------------------------
    def enter(self, tag: str) -> None:
        """This rank enters its next collective (``tag``: the ledger tag, for the messages)."""
        self.sequence += 1
        self.tag = tag
        self._set_state(WAITING)
        self._wake.set()

    def leave(self) -> None:
        """The collective completed on this rank."""
        self._set_state(COMPUTING)

    def _set_state(self, state: str) -> None:
        self._state_step, self._state_since = self.step, time.monotonic()
        self.state = state

    def heartbeat(self) -> Heartbeat:
        """This rank's state now, as published (without counting a beat)."""
        age = time.monotonic() - self._state_since
        return Heartbeat(self._beats, self.step, self.sequence, self.state, self.tag, self._state_step, age)

    def failure(self, error: BaseException) -> BaseException:
        """Post the abort notice for the current collective's ``error`` and return what to raise.

        A communication error (a peer closed its connection, the timeout expired) is diagnosed (see the
        module docstring; blocks for about ``2 interval + 0.5`` seconds) and returned as a
        :class:`RankFailureError` naming the failed ranks. Any other error is this rank's own (out of
        memory while packing a round, say): the notice names this rank and ``error`` itself is returned."""
        where = f"collective #{self.sequence} ({self.tag!r}) at step {self.step}"
        if not is_communication_error(error):
            self.abort(f"rank {self.rank} failed in {where}: {type(error).__name__}: {_first_line(error)}")
            return error
        self._set_state(FAILED)
        try:
            self._publish()
            cause = self._read_notice() or self._culprits()
        except Exception as store_error:  # the store went with its host
            cause = self._abort_notice or (
                f"the rendezvous store is unreachable ({_first_line(store_error)}): its host, rank 0 or the "
                f"launcher, is gone (killed or crashed; rank 0 was last heard of at step {self.step} or "
                "later)"
            )
        message = f"rank {self.rank}: {where} failed: {cause}. ({type(error).__name__}: {_first_line(error)})"
        # Said at once: a launcher may kill this process before the error is raised and printed.
        print(f"[lightning_commsgd] RankFailureError: {message}", file=sys.stderr, flush=True)
        self.abort(message)
        return RankFailureError(message)

    def abort(self, message: str) -> None:
        """This rank is failing: post ``message`` as the job's abort notice (a rank posts once; the first
        notice of the job stays) and wait one beat, so the other ranks' watchdogs read it before this rank's
        process (which may host the store) ends."""
        if self._posted:
            return
        self._posted = True
        if self._abort_notice is None:
            self._abort_notice = message
        if self.post_notice(message, stuck=self._stuck_ranks):
            time.sleep(self.interval + 0.25)

    def post_notice(self, message: str, stuck: Sequence[int] = ()) -> bool:
        """Post ``message`` as the job's abort notice unless one was posted before (by any rank), with the
        ranks it found ``stuck`` (alive but not progressing: their watchdogs end them at once, not after
        ``grace``); False when the store is unreachable."""
        try:
            if self.store.add("abort_claims", 1) == 1:
                if stuck:
                    self.store.set("abort_stuck", ",".join(str(r) for r in stuck))
                self.store.set("abort", message)
            return True
        except Exception:
            return False  # nobody left to tell

    def _read_stuck(self) -> list[int]:
        """The ranks the job's abort notice found stuck (empty when it named none)."""
        try:
            if not self.store.check(["abort_stuck"]):
                return []
            return [int(r) for r in self.store.get("abort_stuck").decode().split(",") if r]
        except Exception:
            return []

    def last_heartbeat(self, rank: int) -> Heartbeat | None:
        """``rank``'s latest heartbeat, ``None`` if it never published one or the store is unreachable."""
        try:
            key = f"hb/{rank}"
            return Heartbeat.decode(self.store.get(key)) if self.store.check([key]) else None
        except Exception:
            return None

    # -- the watchdog thread ------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._beats += 1
        self.store.set(f"hb/{self.rank}", self.heartbeat().encode())

    def _read_notice(self) -> str | None:
        if self._abort_notice is None and self.store.check(["abort"]):
            self._abort_notice = self.store.get("abort").decode()
        return self._abort_notice

    def _run(self) -> None:
        unreachable_since: float | None = None
        # A beat every interval, and at once after entering a collective (then a pause of a tenth of an
        # interval, so a burst of collectives costs at most 10 beats per interval): the step a killed rank
        # was last heard of at is then the one of its latest collective or newer.
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._publish()
                notice = self._read_notice()
                unreachable_since = None
            except Exception as error:
                notice = None
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.store_grace:
                    notice = self._abort_notice or (
                        f"the rendezvous store has been unreachable for {self.store_grace:g} s "
                        f"({_first_line(error)}): rank 0 or the launcher is gone"
                    )
            if notice is not None:
                self._end_rank(notice, at_once=self.rank in self._read_stuck())
                return
            self._stop.wait(self.interval / 10)

    def _end_rank(self, notice: str, at_once: bool = False) -> None:
        """End this process unless its training thread stops the watchdog first: after ``grace`` seconds
        when another rank aborted the job, after twice that when this rank did (its training thread is
        already raising; this only covers a teardown that hangs), and at once when the notice found this
        rank stuck (``at_once``: its training thread is not progressing, so waiting for it gains nothing)."""
        grace = 2 * self.grace if self._posted else (0.0 if at_once else self.grace)
        if not self._posted:
            when = "now: the other ranks found it stuck" if at_once else f"unless it stops within {grace:g} s"
            print(
                f"[lightning_commsgd] rank {self.rank}: the job was aborted: {notice}\n"
                f"[lightning_commsgd] rank {self.rank}: ending this rank (it is "
                f"{self.heartbeat().describe()}) {when}.",
                file=sys.stderr,
                flush=True,
            )
        if not self._stop.wait(grace):
            self._exit_fn(1)

    # -- diagnosis ----------------------------------------------------------------------------------------
    def _read_heartbeats(self) -> dict[int, Heartbeat | None]:
        """Every rank's heartbeat; raises when the store is unreachable."""
        beats: dict[int, Heartbeat | None] = {}
        for rank in range(self.world_size):
            key = f"hb/{rank}"
            beats[rank] = Heartbeat.decode(self.store.get(key)) if self.store.check([key]) else None
        return beats

    def _culprits(self) -> str:
        """Which ranks stopped this collective, from two heartbeat readings."""
        first = self._read_heartbeats()
        time.sleep(2 * self.interval + 0.5)
        notice = self._read_notice()
        if notice:
            return notice
        second = self._read_heartbeats()
        gone: list[str] = []
        behind: list[tuple[int, str]] = []  # alive, not in this collective yet
        stuck: list[tuple[int, str]] = []  # alive, inside it, neither completed nor failed
        for rank in range(self.world_size):
            before, now = first[rank], second[rank]
            if rank == self.rank:
                continue
            if now is None:
                gone.append(f"rank {rank} never reported (did its process start?)")
            elif before is not None and before.beats == now.beats:
                gone.append(
                    f"rank {rank} is gone: its heartbeat stopped (process killed or crashed without a word); "
                    f"last heard of {now.describe()}"
                )
            elif now.sequence < self.sequence or (now.sequence == self.sequence and now.state == COMPUTING):
                text = f"rank {rank} is alive but has not reached this collective: it is {now.describe()}"
                behind.append((rank, f"{text} (stuck)"))
            elif now.sequence == self.sequence and now.state == WAITING:
                text = f"rank {rank} is alive but stuck inside this collective at step {now.step}"
                stuck.append((rank, f"{text} (it neither completed nor failed it)"))
        if gone:
            return "; ".join(gone)
        alive = behind or stuck
        if alive:  # ranks that keep the others waiting: the notice asks their watchdogs to end them at once
            self._stuck_ranks = [rank for rank, _ in alive]
            return "; ".join(text for _, text in alive)
        return "no other rank reports a problem (a network failure between the ranks?)"


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` came from the network or a peer (torch's ``DistError`` family, or the
    ``RuntimeError`` that gloo and NCCL raise for a closed connection or an expired timeout)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error)
    return any(marker in text for marker in _COMMUNICATION_MARKERS)


_COMMUNICATION_MARKERS = (
    "gloo",
    "NCCL",
    "nccl",
    "Connection closed",
    "Connection reset",
    "Timed out",
    "timed out",
)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
