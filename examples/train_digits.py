"""Train an MLP on scikit-learn's digits with several CPU processes under DDP or local SGD.

Examples::

    python examples/train_digits.py --strategy ddp --epochs 3
    python examples/train_digits.py --strategy local_sgd --tau 8 --epochs 3 --json /tmp/local_sgd.json
    python examples/train_digits.py --strategy local_sgd --schedule adacomm --tau0 16 --interval-steps 50 \
        --max-steps 600 --trace --json /tmp/adacomm.json

Lightning's default launcher for ``devices > 1`` on CPU re-runs *this script* once per extra rank (with
``LOCAL_RANK`` etc. set), so everything at module level and in :func:`main` runs on every rank. Only
global rank 0 prints the summary and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, Strategy

from lightning_commsgd import CommunicationMonitor, LocalSGDStrategy
from lightning_commsgd.data import DigitsDataModule
from lightning_commsgd.models import MLPClassifier

if TYPE_CHECKING:
    from lightning_commsgd.schedules import PeriodSchedule

__all__ = [
    "SCHEDULES",
    "STRATEGIES",
    "StepTrace",
    "build_period",
    "build_strategy",
    "main",
    "parse_args",
    "run",
]

# Every rank is its own process on a small machine: one intra-op thread each avoids oversubscribing the
# cores (N ranks x N threads), which would make wall-clock comparisons between strategies meaningless.
# Done at import time because every rank re-executes this file.
torch.set_num_threads(1)

STRATEGIES = ("ddp", "local_sgd")
SCHEDULES = ("constant", "adacomm")
# AdaComm's interval when neither --interval-steps nor --interval-s is given.
DEFAULT_INTERVAL_STEPS = 50


class _TrainLoopTimer(Callback):
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


def _step_loss(outputs: Any) -> float | None:
    """The training loss in ``on_train_batch_end``'s ``outputs`` (a dict with ``"loss"`` or a tensor)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss) if isinstance(loss, torch.Tensor) else None


class StepTrace(Callback):
    """Rank 0's record of every optimizer step: time, loss, period, rounds and bytes so far.

    One dict per step in :attr:`rows`: ``step``, ``time_s`` (since ``on_train_start``, the same origin
    as the train loop timer), ``loss`` (rank 0's loss on its own batch, not averaged over ranks: an
    average would cost an all-reduce per step and show up in the byte counts being compared), ``tau``
    (the strategy's current period after this step, ``None`` for DDP), ``rounds`` (averaging rounds so
    far; for DDP, which all-reduces gradients every step, the step count) and ``bytes_sent`` (this
    rank's ledger so far, so it includes Lightning's own reductions routed through the communicator).

    Args:
        monitor: the run's :class:`CommunicationMonitor`, whose ledger gives the bytes; it must come
            before this callback in the trainer's list so that its ``on_fit_start`` has run.
    """

    def __init__(self, monitor: CommunicationMonitor) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, Any]] = []
        self._start = float("nan")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation this hook runs for every batch, but a row is one optimizer step.
        step = int(trainer.global_step)
        if not trainer.is_global_zero or (self.rows and self.rows[-1]["step"] == step):
            return
        elapsed = time.perf_counter() - self._start
        algorithm = getattr(trainer.strategy, "algorithm", None)
        self.rows.append(
            {
                "step": step,
                "time_s": elapsed,
                "loss": _step_loss(outputs),
                "tau": None if algorithm is None else int(algorithm.tau),
                "rounds": step if algorithm is None else int(algorithm.rounds),
                "bytes_sent": int(self.monitor.ledger.bytes_sent),
            }
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="distributed strategy")
    parser.add_argument("--tau", type=int, default=8, help="local steps between averages (local_sgd only)")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="local_sgd period: constant (--tau) or AdaComm (--tau0 and an interval)",
    )
    parser.add_argument("--tau0", type=int, default=16, help="AdaComm's initial period")
    interval = parser.add_mutually_exclusive_group()
    interval.add_argument(
        "--interval-steps",
        type=int,
        default=None,
        help=f"AdaComm re-decides tau every this many steps (default {DEFAULT_INTERVAL_STEPS})",
    )
    interval.add_argument(
        "--interval-s", type=float, default=None, help="AdaComm re-decides tau every this many seconds"
    )
    parser.add_argument(
        "--no-lr-aware",
        dest="lr_aware",
        action="store_false",
        help="AdaComm without the eta_0/eta_l factor (the learning rate is constant here anyway)",
    )
    parser.add_argument("--devices", type=int, default=2, help="number of CPU processes")
    parser.add_argument("--epochs", type=int, default=3, help="maximum number of epochs")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer step budget (-1: epochs only)")
    parser.add_argument("--hidden", type=int, default=128, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=2, help="number of hidden layers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the training set this many times")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the split and the sampler")
    parser.add_argument("--json", type=Path, default=None, help="rank 0 writes the results here")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="add a per-step trace (time, loss, tau, rounds, bytes) to the JSON",
    )
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    if args.tau < 1:
        parser.error(f"--tau must be >= 1, got {args.tau}")
    if args.schedule == "adacomm":
        if args.strategy != "local_sgd":
            parser.error("--schedule adacomm needs --strategy local_sgd")
        if args.tau0 < 1:
            parser.error(f"--tau0 must be >= 1, got {args.tau0}")
        if args.interval_steps is not None and args.interval_steps < 1:
            parser.error(f"--interval-steps must be >= 1, got {args.interval_steps}")
        if args.interval_s is not None and not args.interval_s > 0:
            parser.error(f"--interval-s must be > 0, got {args.interval_s}")
        if args.interval_steps is None and args.interval_s is None:
            args.interval_steps = DEFAULT_INTERVAL_STEPS
    return args


def build_period(args: argparse.Namespace) -> int | PeriodSchedule:
    """The ``tau`` argument of ``LocalSGDStrategy``: ``--tau``, or an ``AdaComm`` schedule."""
    if args.schedule == "constant":
        return args.tau
    if args.schedule == "adacomm":
        # Imported here, not at the top: the constant-period runs must not depend on the schedules module.
        from lightning_commsgd.schedules import AdaComm

        return AdaComm(
            tau0=args.tau0,
            interval_steps=args.interval_steps,
            interval_s=args.interval_s,
            lr_aware=args.lr_aware,
        )
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {args.schedule!r}")


def build_strategy(name: str, tau: int | PeriodSchedule) -> Strategy:
    """Lightning's own ``DDPStrategy`` (the baseline) or our ``LocalSGDStrategy`` with period ``tau``."""
    if name == "ddp":
        return DDPStrategy()
    if name == "local_sgd":
        return LocalSGDStrategy(tau=tau)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _schedule_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The period options of the run, for the results (``None`` for DDP, which has no period)."""
    if args.strategy != "local_sgd":
        return None
    if args.schedule == "constant":
        return {"name": "constant", "tau": args.tau}
    return {
        "name": "adacomm",
        "tau0": args.tau0,
        "interval_steps": args.interval_steps,
        "interval_s": args.interval_s,
        "lr_aware": args.lr_aware,
    }


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    """A logged metric as a plain float (``None`` when it was never logged)."""
    value = metrics.get(key)
    return None if value is None else float(value)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and validate; return the results on global rank 0 and ``None`` on the other ranks."""
    # Same seed on every rank: identical initial weights, and Lightning's DistributedSampler takes its
    # shuffling seed from here too.
    lightning.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=args.batch_size, seed=args.seed, repeat=args.repeat)
    model = MLPClassifier(hidden=args.hidden, depth=args.depth, lr=args.lr)
    # Works for our strategies (reads their communicator's ledger) and for plain DDPStrategy (installs a
    # counting DDP comm hook), so both sides of the comparison are measured the same way.
    monitor = CommunicationMonitor()
    loop_timer = _TrainLoopTimer()
    callbacks: list[Callback] = [monitor, loop_timer]
    trace = StepTrace(monitor) if args.trace else None
    if trace is not None:
        callbacks.append(trace)  # after the monitor, whose ledger it reads
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=build_strategy(args.strategy, build_period(args)),
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        callbacks=callbacks,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall_s = time.perf_counter() - start
    # Read before validate(): it resets trainer.callback_metrics, and validation traffic (sync_dist)
    # is not part of the training communication we compare.
    train_loss = _metric(trainer.callback_metrics, "train_loss")
    ledger = monitor.ledger
    comm = {
        "bytes_sent_per_rank": int(ledger.bytes_sent),
        "bytes_received_per_rank": int(ledger.bytes_received),
        "rounds": int(ledger.rounds),
        "comm_s": float(ledger.seconds),
        "ledger": ledger.as_dict(),
    }
    # Read after fit, so they include the final round; validate() below does not change them.
    algorithm = getattr(trainer.strategy, "algorithm", None)
    period = {
        "final_tau": None if algorithm is None else int(algorithm.tau),
        "averaging_rounds": None if algorithm is None else int(algorithm.rounds),
    }

    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return None
    results = {
        "strategy": args.strategy,
        # The constant period; None for DDP and for adaptive schedules (see "schedule" and "final_tau").
        "tau": args.tau if args.strategy == "local_sgd" and args.schedule == "constant" else None,
        "schedule": _schedule_config(args),
        "devices": args.devices,
        "wall_s": wall_s,
        "train_loop_s": loop_timer.seconds,
        **comm,
        **period,
        "final_val_acc": _metric(val, "val_acc"),
        "final_val_loss": _metric(val, "val_loss"),
        "final_train_loss": train_loss,
        "steps": int(trainer.global_step),
        "num_params": sum(p.numel() for p in model.parameters()),
        "config": {
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "hidden": args.hidden,
            "depth": args.depth,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "repeat": args.repeat,
            "seed": args.seed,
        },
    }
    if trace is not None:
        results["trace"] = trace.rows
    return results


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) with ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    results = run(args)
    if results is None:  # not global rank 0
        return 0
    results = _json_safe(results)
    summary = {key: value for key, value in results.items() if key not in ("ledger", "config", "trace")}
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
