"""CommunicationMonitor: bytes, rounds, tau and consensus distance, on the progress bar and in the logger."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_commsgd.comm import Communicator
from lightning_commsgd.comm.ddp_baseline import counting_ddp_allreduce_hook
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.strategies.base import CommunicationStrategy
from lightning_commsgd.strategies.process import ProcessGroupStrategy

__all__ = ["CommunicationMonitor", "progress_bar_figures"]


class CommunicationMonitor(Callback):
    """Show this rank's communication on the progress bar and log its whole ledger to every attached logger.

    Progress bar (``prog_bar=True``, the default, when the Trainer has one; rank 0's values): ``MB_sent``
    (payload megabytes sent, all collectives), ``rounds`` (the algorithm's rounds, as ``comm/rounds``),
    ``tau`` when it varies (a schedule such as AdaComm) and ``skipped`` once a poisoned replica was skipped.

    Logged keys (rank 0's values, every ``logging_interval`` optimizer steps): ``comm/bytes_sent``,
    ``comm/bytes_received``, ``comm/rounds`` (the algorithm's rounds only: averaging, gossip, compressed
    exchanges, fit's final round), ``comm/framework_collectives`` and ``comm/framework_bytes_sent`` (the
    other collectives, counted apart: Lightning's own ``sync_dist`` reductions, barriers and broadcasts, the
    setup broadcast of x_0, checkpoint gathers, consensus validation, measurements; see
    :data:`~lightning_commsgd.ledger.FRAMEWORK_TAGS`), ``comm/seconds``, ``comm/tau`` (when the strategy
    has a period), the schedule's values (AdaComm: ``comm/adacomm_F0``, ``comm/adacomm_F``),
    ``comm/skipped_replicas`` (under ``on_nonfinite="skip"``: poisoned replicas left out of rounds) and
    ``comm/consensus_distance`` = (1/p) sum_i ||x_i - x_bar||^2, measured just before a
    round replaces x_i, every ``consensus_every_n_rounds`` rounds (it costs one scalar all-reduce).
    ``comm/bytes_per_step`` is the bytes this rank sent per optimizer step since training started; with a
    compressing strategy, ``comm/compression_ratio`` divides it by what the same exchange would send
    uncompressed (4 bytes per parameter per step, the fp32 gradient or model an all-reduce would carry).

    :attr:`ledger` is fit's ledger; it keeps fit's figures after a later ``trainer.test()`` or
    ``trainer.validate()`` (which count into ledgers of their own, ``strategy.ledgers``), while Lightning
    clears the logged ``comm/...`` values from ``trainer.callback_metrics`` when such a stage starts.

    With Lightning's own ``DDPStrategy`` the monitor registers a counting DDP communication hook that
    behaves like DDP's default (mean all-reduce per gradient bucket), so both can be compared side by
    side.

    Args:
        logging_interval: log every this many optimizer steps (>= 1); ``None`` (default): the Trainer's
            ``log_every_n_steps`` (Lightning's default 50), when its loggers write anyway. Each metric logged
            costs Lightning about a millisecond on a CPU host (its result collection walks every logged
            value), so logging the 6 to 9 metrics at every step would add about 8 ms to every step
            (measured: an 8.8 ms step of the cluster benchmark's MLP took 11.9 ms).
        consensus_every_n_rounds: measure the consensus distance every this many rounds; ``None`` never.
        prog_bar: show the key figures on the Trainer's progress bar (updated every ``logging_interval``
            steps, like the logger); ``False`` keeps them off it (they are logged either way).
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        consensus_every_n_rounds: int | None = None,
        prog_bar: bool = True,
    ) -> None:
        if logging_interval is not None and (
            isinstance(logging_interval, bool)
            or not isinstance(logging_interval, int)
            or logging_interval < 1
        ):
            raise ValueError(f"Arg `logging_interval` must be None or an int >= 1, got {logging_interval!r}.")
        if consensus_every_n_rounds is not None and (
            isinstance(consensus_every_n_rounds, bool)
            or not isinstance(consensus_every_n_rounds, int)
            or consensus_every_n_rounds < 1
        ):
            raise ValueError(
                "Arg `consensus_every_n_rounds` must be None or an int >= 1, "
                f"got {consensus_every_n_rounds!r}."
            )
        self.logging_interval = logging_interval
        self.consensus_every_n_rounds = consensus_every_n_rounds
        self.prog_bar = prog_bar
        self._ledger: CommLedger | None = None
        self._logged_consensus_step: int | None = None
        self._start: tuple[int, int] = (0, 0)  # (global step, bytes sent) when training started
        self._interval = logging_interval or 1  # resolved against the Trainer at fit start

    @property
    def ledger(self) -> CommLedger:
        """The ledger being monitored (this rank's); available from the start of fit."""
        if self._ledger is None:
            raise RuntimeError("CommunicationMonitor.ledger exists once fit has started.")
        return self._ledger

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interval = self.logging_interval or max(1, int(trainer.log_every_n_steps))
        strategy = trainer.strategy
        if isinstance(strategy, ProcessGroupStrategy):  # the package's strategies, parameter servers included
            self._ledger = strategy.communicator.ledger
            if isinstance(strategy, CommunicationStrategy) and strategy.algorithm is not None:
                strategy.algorithm.consensus_every = self.consensus_every_n_rounds
        elif isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            communicator = Communicator(device=strategy.root_device)
            strategy.model.register_comm_hook(None, counting_ddp_allreduce_hook(communicator))
            self._ledger = communicator.ledger
        else:
            if trainer.world_size > 1:
                rank_zero_warn(
                    "CommunicationMonitor cannot count the traffic of "
                    f"{type(strategy).__name__}; it logs zeros."
                )
            self._ledger = CommLedger(world_size=trainer.world_size)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after any checkpoint restore: per-step rates count this run's steps only
        sent = self._ledger.bytes_sent if self._ledger is not None else 0
        self._start = (trainer.global_step, sent)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._ledger is None or trainer.global_step % self._interval != 0:
            return
        ledger = self._ledger
        metrics = {
            "comm/bytes_sent": float(ledger.bytes_sent),
            "comm/bytes_received": float(ledger.bytes_received),
            "comm/rounds": float(ledger.algorithm_rounds),
            "comm/framework_collectives": float(ledger.framework_collectives),
            "comm/framework_bytes_sent": float(ledger.framework_bytes_sent),
            "comm/seconds": float(ledger.seconds),
        }
        steps = trainer.global_step - self._start[0]
        if steps > 0:
            metrics["comm/bytes_per_step"] = (ledger.bytes_sent - self._start[1]) / steps
        strategy = trainer.strategy
        algorithm = strategy.algorithm if isinstance(strategy, CommunicationStrategy) else None
        if algorithm is not None:
            uncompressed = algorithm.uncompressed_bytes_per_step
            if uncompressed and "comm/bytes_per_step" in metrics:
                metrics["comm/compression_ratio"] = metrics["comm/bytes_per_step"] / uncompressed
            metrics.update({f"comm/{key}": value for key, value in algorithm.metrics().items()})
            consensus = algorithm.last_consensus
            if consensus is not None and consensus[0] != self._logged_consensus_step:
                self._logged_consensus_step = consensus[0]
                metrics["comm/consensus_distance"] = consensus[1]
        if (algorithm is not None and algorithm.on_nonfinite == "skip") or ledger.skipped_replicas:
            metrics["comm/skipped_replicas"] = float(ledger.skipped_replicas)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        if self.prog_bar and trainer.progress_bar_callback is not None:
            pl_module.log_dict(
                progress_bar_figures(metrics, algorithm is not None and algorithm.adaptive_period),
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                logger=False,
                rank_zero_only=True,
            )


def progress_bar_figures(metrics: dict[str, float], adaptive_period: bool = False) -> dict[str, float]:
    """The few figures the progress bar shows, from the logged ``metrics``: megabytes sent, the algorithm's
    rounds, tau when a schedule varies it (``adaptive_period``), and skipped replicas once there are any."""
    figures = {"MB_sent": metrics["comm/bytes_sent"] / 1e6, "rounds": metrics["comm/rounds"]}
    if "comm/tau" in metrics and adaptive_period:
        figures["tau"] = metrics["comm/tau"]
    if metrics.get("comm/skipped_replicas"):
        figures["skipped"] = metrics["comm/skipped_replicas"]
    return figures
