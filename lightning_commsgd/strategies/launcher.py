"""Lightning's popen launcher, with a child observer that says which rank died and at which step.

Lightning's ``_SubprocessScriptLauncher`` (``python train.py`` with ``devices=N``) starts ranks 1..N-1 as
children of rank 0 and watches them from a thread that, every 5 seconds, SIGKILLs every process as soon as
one child has exited with an error. That ends the job, but a child killed by the OOM killer is then only
"terminated with code -9", and the other ranks are usually killed before they can say more. This launcher
starts the same children and watches them every half second instead; when one exits with an error it

1. prints which rank it was, its exit code or signal, and the step its failure watchdog last reported;
2. posts that as the job's abort notice (:mod:`lightning_commsgd.watchdog`), so every other rank's error
   names it too;
3. gives the other processes ``grace`` seconds to raise and exit by themselves, then SIGKILLs whatever is
   left, rank 0 included, as Lightning does.

Its base class, Lightning's private ``_SubprocessScriptLauncher``, and the private helpers ``launch`` uses
come from :mod:`lightning_commsgd.internals`, which checks they exist (a RuntimeError naming the Lightning
version otherwise).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from typing_extensions import override

from lightning_commsgd.internals import (
    popen_launcher_class,
    report_selected_ckpt_path,
    set_num_threads_if_needed,
    start_child_scripts,
)
from lightning_commsgd.watchdog import FailureWatchdog

__all__ = ["ReportingScriptLauncher"]


class ReportingScriptLauncher(popen_launcher_class()):  # type: ignore[misc]
    """``_SubprocessScriptLauncher`` whose child observer reports a dead rank (see the module docstring).

    Args:
        watchdog: returns this process's failure watchdog once the strategy has set it up (``None``
            before), for the dead rank's last step and the abort notice.
        grace: seconds the surviving processes get to end by themselves after a child failed.
        end_job: whether a failed child ends the job (default); ``False`` only reports it, for strategies
            that survive a lost worker (the parameter-server family decides by itself). Kept as the public
            attribute :attr:`end_job`, which a strategy may change until the Trainer launches.
        on_ckpt_path: called with the checkpoint path the Trainer resolves for this run (``None`` when it
            starts fresh), before any process group exists: Lightning keeps that path to itself until it
            loads the checkpoint, after the strategy's setup and its first collectives.
        cluster_environment, num_processes, num_nodes: as for Lightning's launcher.
    """

    def __init__(
        self,
        cluster_environment: Any,
        num_processes: int,
        num_nodes: int,
        *,
        watchdog: Callable[[], FailureWatchdog | None],
        grace: float = 5.0,
        end_job: bool = True,
        on_ckpt_path: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._watchdog, self._grace, self.end_job = watchdog, grace, end_job
        self._on_ckpt_path = on_ckpt_path

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if trainer is not None and self._on_ckpt_path is not None:
            report_selected_ckpt_path(trainer, self._on_ckpt_path)
        # Lightning's launch, with this module's observer instead of _launch_process_observer.
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            start_child_scripts(self)
            first_rank = self.cluster_environment.node_rank() * self.num_processes + 1
            observer = _ChildObserver(self.procs, first_rank, self._watchdog, self._grace, self.end_job)
            observer.start()
            if not self.end_job:
                # The observer polls every half second and dies with rank 0: a child that died after its
                # last poll (a short run) would go unreported without this last look.
                atexit.register(observer.report_failed_children)
        set_num_threads_if_needed(self.num_processes)
        return function(*args, **kwargs)


class _ChildObserver(threading.Thread):
    """Watches the children (global ranks ``first_rank``, ``first_rank + 1``, ...) of this rank-0 process."""

    def __init__(
        self,
        procs: list[subprocess.Popen],
        first_rank: int,
        watchdog: Callable[[], FailureWatchdog | None],
        grace: float,
        end_job: bool = True,
        poll: float = 0.5,
    ) -> None:
        super().__init__(daemon=True, name="commsgd-child-observer")  # ends with the main process
        self._procs, self._first_rank, self._watchdog = procs, first_rank, watchdog
        self._grace, self._poll, self._end_job = grace, poll, end_job
        self._reported: set[int] = set()
        self._report_lock = threading.Lock()  # the atexit look and the thread may report at once

    def report_failed_children(self) -> None:
        """Report-only mode: print each child that ended with an error, once."""
        with self._report_lock:
            for i, proc in enumerate(self._procs):
                code, rank = proc.poll(), self._first_rank + i
                if code not in (None, 0) and rank not in self._reported:
                    self._reported.add(rank)
                    print(
                        f"[lightning_commsgd] rank {rank}'s process ended with {code}.",
                        file=sys.stderr,
                        flush=True,
                    )

    def run(self) -> None:
        while True:
            time.sleep(self._poll)
            codes = [proc.poll() for proc in self._procs]
            if all(code == 0 for code in codes):
                return
            failed = [(self._first_rank + i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if not self._end_job:  # report each failed child once; the job decides by itself
                self.report_failed_children()
                if all(code is not None for code in codes):
                    return
                continue
            if failed:
                self._report(failed)
                self._end_all()
                return

    def _report(self, failed: list[tuple[int, int]]) -> None:
        watchdog = self._watchdog()
        parts = []
        for rank, code in failed:
            how = (
                f"exited with {code}" if code > 0 else f"was killed by signal {-code} ({_signal_name(-code)})"
            )
            beat = watchdog.last_heartbeat(rank) if watchdog is not None else None
            seen = f"; last heard of at step {beat.step}" if beat is not None else ""
            parts.append(f"rank {rank}'s process {how}{seen}")
        notice = "; ".join(parts)
        print(f"[lightning_commsgd] {notice}. Ending the job.", file=sys.stderr, flush=True)
        if watchdog is not None:
            watchdog.post_notice(notice)

    def _end_all(self) -> None:
        deadline = time.monotonic() + self._grace
        while time.monotonic() < deadline and any(proc.poll() is None for proc in self._procs):
            time.sleep(0.1)
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
