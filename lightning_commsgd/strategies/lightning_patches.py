"""Remove the collectives Lightning issues on its own every training step.

Lightning 2.6 broadcasts a one-element "did rank 0 get SIGTERM?" tensor before *every* training batch
(``_TrainingEpochLoop._broadcast_sigterm_tensor``), and its SIGTERM handler broadcasts again from inside
the signal handler. Under local SGD that is a synchronisation point per step: it puts every step in
lock-step across ranks and costs one network latency each, exactly what the algorithms avoid. A
handler-side broadcast that the other ranks do not expect would also pair with the next averaging
all-reduce and corrupt it. Both are replaced by rank-local checks: a rank that receives SIGTERM stops at
its next batch with Lightning's ``SIGTERMException``.
"""

from __future__ import annotations

import logging
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["remove_per_step_collectives"]

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
            raise SIGTERMException()

    def local_sigterm_notifier(signum: int, _frame: FrameType | None) -> None:
        log.info("rank %d received SIGTERM (%d)", trainer.global_rank, signum)
        if not connector.received_sigterm and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)
        connector.received_sigterm = True

    epoch_loop._broadcast_sigterm_tensor = local_sigterm_check
    connector._sigterm_notifier_fn = local_sigterm_notifier
