"""Remove the collectives Lightning issues on its own every training step.

Lightning 2.6 broadcasts a one-element "did rank 0 get SIGTERM?" tensor before *every* training batch
(``_TrainingEpochLoop._broadcast_sigterm_tensor``), and its SIGTERM handler broadcasts again from inside
the signal handler. Under local SGD that is a synchronisation point per step: it puts every step in
lock-step across ranks and costs one network latency each, exactly what the algorithms avoid. A
handler-side broadcast that the other ranks do not expect would also pair with the next averaging
all-reduce and corrupt it. Both are replaced by rank-local checks: a rank that receives SIGTERM stops at
its next batch with Lightning's ``SIGTERMException``. Its message (:func:`sigterm_message`, given by
:func:`explain_sigterm` also to the bare ones Lightning's loops raise) names the rank, the signal, the steps
and what the other ranks do; the strategy prints it and posts it as the job's abort notice, so the other
ranks' errors name it, and the rank exits with status 128 + 15 = 143 (Lightning's bare exception exits 0).

It also keeps Lightning's "your dataloader is not resumable" warning away from mid-epoch resumes that the
strategy restores exactly (:func:`quiet_exact_resume_warning`).
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning

__all__ = ["explain_sigterm", "quiet_exact_resume_warning", "remove_per_step_collectives", "sigterm_message"]

# the start of the warning _TrainingEpochLoop.reset gives on a mid-epoch resume (Lightning 2.6)
NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"

log = logging.getLogger(__name__)


def remove_per_step_collectives(trainer: pl.Trainer) -> None:
    """Make SIGTERM handling rank-local for ``trainer`` (see the module docstring).

    Raises:
        RuntimeError: if this Lightning version no longer has the hooks patched here, so a Lightning
            upgrade fails loudly instead of silently bringing a per-step collective back.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    connector = trainer._signal_connector
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor") or not hasattr(connector, "_sigterm_notifier_fn"):
        raise RuntimeError(
            "lightning_commsgd cannot find Lightning's per-step SIGTERM broadcast to remove; this Lightning "
            f"version ({pl.__version__}) is not supported."
        )

    def local_sigterm_check() -> None:
        if trainer.received_sigterm:
            raise SIGTERMException(sigterm_message(trainer))

    def local_sigterm_notifier(signum: int, _frame: FrameType | None) -> None:
        log.info("rank %d received SIGTERM (%d)", trainer.global_rank, signum)
        if not connector.received_sigterm:
            # what the message will say: the signal, the step, the ranks it is passed on to
            setattr(connector, _RECEIVED, (signum, trainer.global_step, _child_ranks(trainer)))
            if trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
        connector.received_sigterm = True

    epoch_loop._broadcast_sigterm_tensor = local_sigterm_check
    connector._sigterm_notifier_fn = local_sigterm_notifier


_RECEIVED = "_commsgd_sigterm"  # the signal connector's attribute the handler fills


def _child_ranks(trainer: pl.Trainer) -> list[int]:
    """The global ranks this process started itself (the popen launcher's children, which the SIGTERM
    handler passes the signal on to), still running; empty on a child rank or under torchrun / SLURM."""
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    first = trainer.node_rank * trainer.num_devices + 1
    return [first + i for i, proc in enumerate(procs) if proc.poll() is None]


def sigterm_message(trainer: pl.Trainer) -> str:
    """What a rank that got SIGTERM says when it stops: the rank, the signal, the step it arrived at and the
    step the rank stops at, and what the other ranks do."""
    signum, received_at, forwarded = getattr(
        trainer._signal_connector, _RECEIVED, (int(signal.SIGTERM), trainer.global_step, [])
    )
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown signal"
    rank = trainer.global_rank
    head = f"rank {rank} received signal {signum} ({name}) at step {received_at}, stopped at step "
    head += str(trainer.global_step)
    if forwarded:
        ranks = ", ".join(str(r) for r in forwarded)
        return f"{head}; it passed the signal on to rank(s) {ranks} (processes it launched): they stop too"
    return (
        f"{head}; a rank that did not receive the signal stops at its next collective with a "
        f"RankFailureError naming rank {rank} (its failure watchdog ends it if it does not)"
    )


def explain_sigterm(exception: SIGTERMException, trainer: pl.Trainer) -> str:
    """Give a ``SIGTERMException`` that Lightning raised bare (its loops raise it at several places) the
    message of :func:`sigterm_message`, and the exit status ``128 + signal`` (143 for SIGTERM), as a shell
    reports a process the signal ended: the bare exception would exit 0, so torchrun and schedulers would
    count the interrupted rank as finished. Returns the message."""
    if not str(exception):
        exception.args = (sigterm_message(trainer),)
    signum = getattr(trainer._signal_connector, _RECEIVED, (int(signal.SIGTERM),))[0]
    exception.code = 128 + int(signum)
    return str(exception)


def quiet_exact_resume_warning(trainer: pl.Trainer, exact: Callable[[Sequence[Any]], bool]) -> None:
    """Drop Lightning's "your dataloader is not resumable" warning when the resume is exact.

    On a mid-epoch resume Lightning 2.6 (``_TrainingEpochLoop.reset``) warns unless every training loader has
    ``state_dict``/``load_state_dict``. The strategies restore the loader's position from their per-rank
    checkpoint entries instead (:mod:`lightning_commsgd.resumable`): a loader with that interface would make
    Lightning also write rank 0's loader state into ``loops.fit_loop`` of every checkpoint, and such a
    checkpoint no longer resumes under a strategy whose loader lacks it (Lightning's ``DDPStrategy`` raises
    "The CombinedLoader has 0 stateful loaders, but found 1 states"). So the loop's reset runs with that one
    warning filtered out whenever ``exact(training_loaders)`` says the strategy restored their position; in
    every other case (a loader the strategy does not rebuild, a checkpoint without the position) Lightning's
    warning is accurate and stays.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    reset = epoch_loop.reset
    if getattr(reset, "_commsgd_quiet", False):  # a second fit on the same Trainer
        return

    def reset_quietly() -> None:
        combined = trainer.fit_loop._combined_loader
        if combined is None or not exact(combined.flattened):
            return reset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NOT_RESUMABLE_WARNING, category=PossibleUserWarning)
            return reset()

    reset_quietly._commsgd_quiet = True  # type: ignore[attr-defined]
    epoch_loop.reset = reset_quietly  # type: ignore[method-assign]
