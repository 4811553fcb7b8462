"""What a benchmark job records while it trains: the training loop's wall-clock, a per-step trace (time,
loss, period, rounds, bytes) and a trace of the validations inside ``fit``, as Lightning callbacks.

Used by the jobs of :mod:`benchmarks.jobs` (``digits``, ``synthetic_cnn``); every figure is rank 0's unless
said otherwise, and bytes come from the run's :class:`~lightning_commsgd.CommunicationMonitor` ledger.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from lightning_commsgd import CommunicationMonitor
from lightning_commsgd.ledger import CommLedger

__all__ = [
    "BatchSizeProbe",
    "StepTrace",
    "TrainLoopTimer",
    "ValidationTrace",
    "metric",
    "period_of",
    "round_bytes",
    "rounds_done",
    "step_loss",
]


class TrainLoopTimer(Callback):
    """Wall-clock time of the training loop alone (``on_train_start`` to ``on_train_end``).

    On rank 0, the time of ``trainer.fit`` also includes starting the other ranks (a fresh Python
    interpreter importing torch) and joining the process group; this figure excludes that fixed cost.
    """

    def __init__(self) -> None:
        self.seconds = float("nan")
        self._start = float("nan")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def step_loss(outputs: Any) -> float | None:
    """The training loss in ``on_train_batch_end``'s ``outputs`` (a dict with ``"loss"`` or a tensor)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss) if isinstance(loss, torch.Tensor) else None


def round_bytes(ledger: CommLedger, round_tags: Sequence[str]) -> int:
    """Bytes this rank sent in the training rounds so far (the sum over the strategy's round tags)."""
    return sum(int(ledger.tag(tag).bytes_sent) for tag in round_tags)


def period_of(algorithm: Any) -> int | None:
    """The strategy's current period; ``None`` for DDP and the compressed strategies (no period)."""
    tau = getattr(algorithm, "tau", None)
    return None if tau is None else int(tau)


def rounds_done(algorithm: Any, step: int) -> int:
    """Communication rounds so far: the periodic algorithms count them (``rounds``); DDP (no algorithm)
    and the compressed algorithms (which count optimizer steps, ``step``) communicate at every step."""
    if algorithm is None:
        return step
    rounds = getattr(algorithm, "rounds", None)
    return int(algorithm.step if rounds is None else rounds)


class StepTrace(Callback):
    """Rank 0's record of every optimizer step: time, loss, period, rounds and bytes so far.

    One dict per step in :attr:`rows`: ``step``, ``time_s`` (since ``on_train_start``, the same origin
    as the train loop timer), ``loss`` (rank 0's loss on its own batch, not averaged over ranks: an
    average would cost an all-reduce per step and show up in the byte counts being compared), ``tau``
    (the strategy's current period after this step, ``None`` for DDP and the compressed strategies),
    ``rounds`` (communication rounds so far: averages, gossip or elastic rounds; for DDP and the
    compressed strategies, which communicate every step, the step count), ``bytes_sent`` (this rank's
    ledger so far, so it includes Lightning's own reductions routed through the communicator and any
    consensus evaluation) and ``round_bytes_sent`` (the part of it sent by the training rounds
    themselves, ledger tags ``round_tags``).

    Every rank also keeps its own byte counts per step (:attr:`local_bytes`): where ranks send different
    amounts (a parameter server on rank 0) :meth:`add_rank_means` adds, from every rank's counts
    gathered after fit, ``mean_bytes_sent``, ``mean_round_bytes_sent`` (means over the ranks) and
    ``max_round_bytes_sent`` (the busiest rank) to the rows.

    Args:
        monitor: the run's :class:`CommunicationMonitor`, whose ledger gives the bytes; it must come
            before this callback in the trainer's list so that its ``on_fit_start`` has run.
        round_tags: the ledger tag(s) of the strategy's rounds (see
            :data:`benchmarks.jobs.digits.ROUND_TAGS`).
    """

    def __init__(self, monitor: CommunicationMonitor, round_tags: str | Sequence[str]) -> None:
        self.monitor = monitor
        self.round_tags = (round_tags,) if isinstance(round_tags, str) else tuple(round_tags)
        self.rows: list[dict[str, Any]] = []
        # (step, bytes_sent, round_bytes_sent) on this rank, one entry per optimizer step
        self.local_bytes: list[tuple[int, int, int]] = []
        self._start = float("nan")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation this hook runs for every batch, but a row is one optimizer step.
        step = int(trainer.global_step)
        if self.local_bytes and self.local_bytes[-1][0] == step:
            return
        ledger = self.monitor.ledger
        sent, round_sent = int(ledger.bytes_sent), round_bytes(ledger, self.round_tags)
        self.local_bytes.append((step, sent, round_sent))
        if not trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._start
        algorithm = getattr(trainer.strategy, "algorithm", None)
        self.rows.append(
            {
                "step": step,
                "time_s": elapsed,
                "loss": step_loss(outputs),
                "tau": period_of(algorithm),
                "rounds": rounds_done(algorithm, step),
                "bytes_sent": sent,
                "round_bytes_sent": round_sent,
            }
        )

    def add_rank_means(self, per_rank: Sequence[Sequence[tuple[int, int, int]]]) -> None:
        """Add the ``mean_*``/``max_*`` byte columns to :attr:`rows` from every rank's
        :attr:`local_bytes` (in rank order; rank 0's own first). Every rank takes the same steps."""
        for i, row in enumerate(self.rows):
            entries = [series[i] for series in per_rank]
            if any(entry[0] != row["step"] for entry in entries):
                raise RuntimeError(f"the ranks' step traces disagree at step {row['step']}: {entries}")
            row["mean_bytes_sent"] = sum(entry[1] for entry in entries) / len(entries)
            row["mean_round_bytes_sent"] = sum(entry[2] for entry in entries) / len(entries)
            row["max_round_bytes_sent"] = max(entry[2] for entry in entries)


class ValidationTrace(Callback):
    """Rank 0's record of every validation inside ``fit`` (``--val-every-steps``).

    One dict per validation in :attr:`rows`: ``step`` (optimizer steps done), ``rounds`` (communication
    rounds so far; for DDP the step count), ``val_loss`` and ``val_acc`` (averaged over the ranks'
    parts of the validation set). Our strategies validate the consensus model (``eval_on="consensus"``,
    the average of the replicas) inside ``fit``, so the rows follow the model a round would produce
    now, not rank 0's replica. The sanity check and the ``trainer.validate`` after ``fit`` are left out.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        algorithm = getattr(trainer.strategy, "algorithm", None)
        step = int(trainer.global_step)
        metrics = trainer.callback_metrics
        self.rows.append(
            {
                "step": step,
                "rounds": rounds_done(algorithm, step),
                "val_loss": metric(metrics, "val_loss"),
                "val_acc": metric(metrics, "val_acc"),
            }
        )


class BatchSizeProbe(Callback):
    """The largest training batch rank 0 took: b (1 + floor(mu p)) + int(b r) in stratified RI-SGD,
    ``--batch-size`` otherwise (measured rather than recomputed from the sampler's rule)."""

    def __init__(self) -> None:
        self.samples = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The digits batches are (features, labels); the last batch of a DistributedSampler epoch
        # may be short, hence the max.
        self.samples = max(self.samples, len(batch[-1]))


def metric(metrics: dict[str, Any], key: str) -> float | None:
    """A logged metric as a plain float (``None`` when it was never logged)."""
    value = metrics.get(key)
    return None if value is None else float(value)
