"""The failure watchdog's logic on an in-process store (no process group): heartbeats, the diagnosis of a
failed collective, the abort notice, ending a rank, and the ``sync_timeout`` argument."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from lightning_commsgd import LocalSGDStrategy
from lightning_commsgd.comm import Communicator
from lightning_commsgd.watchdog import (
    COMPUTING,
    FAILED,
    WAITING,
    FailureWatchdog,
    Heartbeat,
    RankFailureError,
    is_communication_error,
)

GLOO_TIMEOUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")
GLOO_CLOSED = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4321")


def make(store, rank, world_size=3, **kwargs) -> FailureWatchdog:
    kwargs.setdefault("interval", 0.05)
    return FailureWatchdog(store, rank, world_size, **kwargs)


def set_beat(store, rank, beats, step, sequence, state, tag="average") -> None:
    store.set(f"hb/{rank}", Heartbeat(beats, step, sequence, state, tag).encode())


class TickingPeer:
    """A peer whose heartbeat keeps beating (alive) with a fixed state, on a thread."""

    def __init__(self, store, rank, step, sequence, state) -> None:
        self.stop = threading.Event()
        self.args = (store, rank, step, sequence, state)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        beats = 0
        store, rank, step, sequence, state = self.args
        while not self.stop.wait(0.01):
            beats += 1
            set_beat(store, rank, beats, step, sequence, state)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_heartbeat_round_trips_and_tags_may_hold_spaces():
    beat = Heartbeat(7, 12, 3, WAITING, "eval consensus")
    assert Heartbeat.decode(beat.encode().encode()) == beat
    beat = Heartbeat(7, 12, 3, COMPUTING, "eval consensus", state_step=10, age=2.5)
    assert Heartbeat.decode(beat.encode().encode()) == beat


def test_a_rank_between_collectives_is_described_as_computing_not_in_a_collective():
    """Issue 18: "computing in collective #11" read as if the rank were inside #11; it is not."""
    assert Heartbeat(9, 44, 11, COMPUTING, "average", state_step=40, age=3.25).describe() == (
        "at step 44, computing (not in a collective) for 3.2 s; its latest collective, #11 ('average'), "
        "finished at step 40"
    )
    assert Heartbeat(2, 0, 0, COMPUTING, "", age=1.0).describe() == (
        "at step 0, computing (not in a collective; none yet) for 1.0 s"
    )
    assert Heartbeat(9, 44, 12, WAITING, "average", state_step=44, age=0.5).describe() == (
        "at step 44, waiting in collective #12 ('average') for 0.5 s"
    )
    failed = Heartbeat(9, 44, 12, FAILED, "average").describe()
    assert failed == "at step 44, failed in collective #12 ('average')"
    store = dist.HashStore()
    me = make(store, 0)
    me.step = 40
    comm = Communicator(monitor=me)
    with comm._collective("average"):
        pass
    me.step = 44
    beat = me.heartbeat()
    assert (beat.state, beat.sequence, beat.state_step, beat.tag) == (COMPUTING, 1, 40, "average")
    assert beat.describe().startswith("at step 44, computing (not in a collective) for ")


def test_communication_errors_are_told_from_a_ranks_own_errors():
    assert is_communication_error(GLOO_TIMEOUT) and is_communication_error(GLOO_CLOSED)
    assert not is_communication_error(MemoryError("out of memory"))
    assert not is_communication_error(ValueError("shape mismatch in my own code"))


def test_a_dead_rank_is_named_with_its_last_step():
    store = dist.HashStore()
    me = make(store, 0)
    me.step, me.sequence, me.tag = 8, 5, "average"
    set_beat(store, 1, 40, 6, 4, COMPUTING)  # never beats again: gone
    with TickingPeer(store, 2, 8, 5, FAILED):  # failed the same collective: a victim, not a culprit
        error = me.failure(GLOO_CLOSED)
    assert isinstance(error, RankFailureError)
    text = str(error)
    assert "rank 0: collective #5 ('average') at step 8 failed" in text
    assert "rank 1 is gone" in text and "last heard of at step 6, computing (not in a collective)" in text
    assert "computing in collective" not in text
    assert "rank 2" not in text.split("failed:", 1)[1].split("(RuntimeError")[0]
    assert store.get("abort").decode() == text  # posted for the other ranks


def test_a_stuck_rank_is_named_behind_or_inside_the_collective():
    for state, sequence, expected in (
        (COMPUTING, 4, "rank 1 is alive but has not reached this collective: it is at step 6, computing (not "
         "in a collective) for 0.0 s; its latest collective, #4 ('average'), finished at step 0 (stuck)"),
        (WAITING, 5, "rank 1 is alive but stuck inside this collective at step 6"),
    ):
        store = dist.HashStore()
        me = make(store, 0, world_size=2)
        me.step, me.sequence = 8, 5
        with TickingPeer(store, 1, 6, sequence, state):
            error = me.failure(GLOO_TIMEOUT)
        assert expected in str(error), str(error)
        assert store.get("abort_stuck").decode() == "1"  # its watchdog ends it at once (see below)


def test_a_rank_the_notice_found_stuck_is_ended_at_once_the_others_after_the_grace():
    """Issue 18: a stuck child outlived the others by the whole grace (about 2.5 s after rank 0 ended); it
    is not progressing, so its watchdog ends it as soon as it reads the notice that names it."""
    store = dist.HashStore()
    exits: dict[int, float] = {}
    started = time.monotonic()
    peers = [
        make(store, rank, grace=2.0, exit_fn=lambda code, rank=rank: exits.setdefault(rank, time.monotonic()))
        for rank in (1, 2)
    ]
    for peer in peers:
        peer.start()
    try:
        make(store, 0).post_notice("rank 0: collective #3 failed: rank 1 is alive but stuck", stuck=[1])
        deadline = time.monotonic() + 5
        while len(exits) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for peer in peers:
            peer.stop()
    assert exits[1] - started < 1.0  # at once (within a beat)
    assert exits[2] - started >= 2.0  # a rank not named stuck keeps its grace to raise by itself


def test_a_posted_reason_wins_over_the_diagnosis():
    store = dist.HashStore()
    crashed, me = make(store, 1), make(store, 0)
    crashed.step = 6
    crashed.abort("rank 1 failed at step 6: RuntimeError: boom")
    me.step, me.sequence = 8, 2
    started = time.monotonic()
    error = me.failure(GLOO_CLOSED)
    assert "rank 1 failed at step 6: RuntimeError: boom" in str(error)
    assert time.monotonic() - started < 0.5  # no heartbeat wait when the cause is known
    crashed.abort("a second notice")  # a rank posts once, and the first notice of the job stays
    assert store.get("abort").decode() == "rank 1 failed at step 6: RuntimeError: boom"


def test_a_ranks_own_error_inside_a_collective_is_raised_as_it_is_and_posted():
    store = dist.HashStore()
    me = make(store, 2)
    me.step, me.sequence, me.tag = 4, 3, "average"
    own = MemoryError("cannot allocate the round's buffer")
    assert me.failure(own) is own
    assert store.get("abort").decode().startswith("rank 2 failed in collective #3 ('average') at step 4")


def test_the_watchdog_ends_its_rank_when_another_rank_aborts():
    store = dist.HashStore()
    exits: list[int] = []
    stuck = make(store, 1, grace=0.1, exit_fn=exits.append)
    stuck.start()
    try:
        make(store, 0).post_notice("rank 0: collective #3 failed: rank 1 is alive but stuck")
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stuck.stop()
    assert exits == [1]
    assert stuck.abort_notice == "rank 0: collective #3 failed: rank 1 is alive but stuck"


def test_a_rank_that_stops_in_time_is_not_ended():
    store = dist.HashStore()
    exits: list[int] = []
    healthy = make(store, 1, grace=2.0, exit_fn=exits.append)
    healthy.start()
    make(store, 0).post_notice("rank 0 failed at step 3: RuntimeError: boom")
    time.sleep(0.3)  # the notice is seen; the training thread raises and tears down within the grace
    healthy.stop()
    time.sleep(0.1)
    assert exits == []


class UnreachableStore:
    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError("Connection refused")

        return fail


def test_an_unreachable_store_ends_the_rank_after_store_grace_only():
    exits: list[int] = []
    orphan = FailureWatchdog(
        UnreachableStore(), 1, 2, interval=0.02, grace=0.0, store_grace=0.3, exit_fn=exits.append
    )
    orphan._thread = threading.Thread(target=orphan._run, daemon=True)  # start() publishes first: skip it
    orphan._thread.start()
    time.sleep(0.15)
    assert exits == []
    orphan._thread.join(timeout=5)
    assert exits == [1]


def test_the_communicator_reports_entering_and_leaving_to_its_monitor():
    store = dist.HashStore()
    monitor = make(store, 0, world_size=1)
    comm = Communicator(monitor=monitor)  # world size 1: nothing is sent, but the guard is the same
    with comm._collective("average"):
        assert (monitor.sequence, monitor.state, monitor.tag) == (1, WAITING, "average")
    assert monitor.state == COMPUTING
    with pytest.raises(MemoryError):
        with comm._collective("average"):
            raise MemoryError("own")
    with pytest.raises(RankFailureError) as info:
        with comm._collective("average"):
            raise GLOO_TIMEOUT
    assert info.value.__cause__ is GLOO_TIMEOUT


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("60", TypeError),
    ],
)
def test_sync_timeout_is_checked_before_any_process_starts(value, error):
    with pytest.raises(error, match="sync_timeout"):
        LocalSGDStrategy(tau=4, sync_timeout=value)


def test_sync_timeout_default_and_value():
    assert LocalSGDStrategy().sync_timeout == 600.0
    assert LocalSGDStrategy(sync_timeout=30).sync_timeout == 30.0


def test_a_group_whose_timeout_cannot_be_set_keeps_its_own_with_a_warning(monkeypatch):
    import torch.distributed.distributed_c10d as c10d

    from lightning_commsgd.internals import set_group_timeout

    def refuse(timeout, group=None):
        raise RuntimeError("this backend has no settable timeout")

    monkeypatch.setattr(c10d, "_set_pg_timeout", refuse)
    with pytest.warns(UserWarning, match="collective timeout of 30 s could not be set"):
        set_group_timeout(None, 30.0)


def test_a_failed_rank_freezes_its_heap_at_exit(monkeypatch):
    """Issue 18: each failed process spent about 1.5 s in the interpreter's final garbage collection, keeping
    its connections (which the other ranks wait on) open; on failure the strategy registers ``gc.freeze``
    to run at exit, once."""
    import atexit
    import gc

    import lightning_commsgd.strategies.faults as faults

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(faults, "_heap_freeze_registered", False)
    # on_exception clears it
    monkeypatch.setattr("lightning_commsgd.comm.lifecycle._leave_group_at_exit", True)
    strategy = LocalSGDStrategy(tau=4)
    strategy.on_exception(RuntimeError("boom"))
    strategy.on_exception(RuntimeError("again"))
    assert registered == [gc.freeze]
