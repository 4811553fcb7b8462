"""Fault handling of a Lightning run: the failure watchdog, what a failing rank tells the others, SIGTERM.

A collaborator of the strategies (:class:`FaultHandling`), not a base-class concern: the strategy calls it
at setup (:meth:`FaultHandling.start`), at every step (:attr:`FaultHandling.step`), when Lightning reports
an exception (:meth:`FaultHandling.on_exception`) and at teardown (:meth:`FaultHandling.stop`). See
:mod:`lightning_commsgd.watchdog` for the watchdog itself and :mod:`.launcher` for the popen launcher that
reports a dead child rank.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import Any

import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_commsgd.comm import skip_group_destruction_at_exit
from lightning_commsgd.internals import explain_sigterm
from lightning_commsgd.watchdog import FailureWatchdog, RankFailureError

__all__ = ["FaultHandling", "warn_if_torchrun_restarts_share_the_store"]

_heap_freeze_registered = False


def _freeze_heap_at_exit() -> None:
    """A failed rank ends sooner: at exit, ``gc.freeze()`` keeps the interpreter's final garbage collections
    off the heap built by torch and Lightning, the bulk of its shutdown time (measured on 2 loaded cores:
    2.6 - 4.5 s from the last exit handler to the process's end, 0.8 s frozen). The other ranks, blocked in
    a collective with this one, fail as soon as its connections close, so the whole job ends about that
    much sooner. Objects still alive are freed as usual; only cyclic garbage is left to the operating
    system, whose finalizers Python never promises to run at exit anyway. Registered once, on failure."""
    global _heap_freeze_registered
    if not _heap_freeze_registered:
        atexit.register(gc.freeze)
        _heap_freeze_registered = True


def warn_if_torchrun_restarts_share_the_store() -> None:
    """torchrun (torch >= 2.5) shares its rendezvous store with the workers' process group, and a restarted
    attempt can read the failed attempt's addresses from it and fail to connect (pytorch#135712; seen
    here with torch 2.13 and gloo). Its own switch turns the sharing off."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        rank_zero_warn(
            "torchrun --max-restarts > 0 with the rendezvous store shared by the workers: a restarted "
            "attempt can connect to the failed attempt's addresses and fail (pytorch#135712). Set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment."
        )


class FaultHandling:
    """This rank's failure watchdog between a strategy's setup and teardown, and its failure messages.

    Args:
        sync_timeout: seconds a collective may wait before the job is declared failed (the watchdog's grace
            on the store, see :class:`~lightning_commsgd.watchdog.FailureWatchdog`).
    """

    def __init__(self, sync_timeout: float) -> None:
        self.sync_timeout = sync_timeout
        self.watchdog: FailureWatchdog | None = None

    def start(self) -> FailureWatchdog | None:
        """Start a watchdog when a process group of more than one rank exists (collective: every rank)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.watchdog = FailureWatchdog.for_process_group(store_grace=self.sync_timeout)
            self.watchdog.start()
        return self.watchdog

    @property
    def step(self) -> int:
        return self.watchdog.step if self.watchdog is not None else 0

    @step.setter
    def step(self, value: int) -> None:
        """The step this rank is at, which the watchdog reports when the rank fails."""
        if self.watchdog is not None:
            self.watchdog.step = value

    def on_exception(self, exception: BaseException, trainer: Any) -> None:
        """This rank failed: keep the group's teardown from waiting on peers, and tell the others why."""
        skip_group_destruction_at_exit()
        _freeze_heap_at_exit()
        watchdog = self.watchdog
        if isinstance(exception, SIGTERMException) and trainer is not None:
            # Lightning raises it bare: say which rank got which signal, at which step (see internals)
            message = explain_sigterm(exception, trainer)
            print(f"[lightning_commsgd] SIGTERMException: {message}", file=sys.stderr, flush=True)
            if watchdog is not None:
                watchdog.abort(message)
        elif watchdog is not None and not isinstance(exception, RankFailureError):
            # This rank failed by itself: tell the others why, before its process ends.
            what = f"{type(exception).__name__}: {exception}".strip().splitlines()[0]
            watchdog.abort(f"rank {watchdog.rank} failed at step {watchdog.step}: {what}")

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
