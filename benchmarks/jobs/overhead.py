"""The overhead benchmark's job: one timed fit of the digits MLP, the time of every training batch.

``bench_overhead`` runs it (through :mod:`benchmarks.runner`) once per mode and repeat::

    python -m benchmarks.jobs.overhead --mode local_sgd_2 --steps 600 --hidden 512 --json /tmp/times.json

Rank 0 writes the seconds of every batch after the first :data:`WARMUP` (``on_train_batch_start`` to
``on_train_batch_end``: forward, backward, optimizer step and every strategy hook) as a JSON list. The
2-process modes are re-run per rank by Lightning (``python -m benchmarks.jobs.overhead ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["MODES", "WARMUP", "main", "run"]

MODES = ("plain", "local_sgd_1", "local_sgd_2", "overlap_2")
WARMUP = 50


def run(mode: str, steps: int, hidden: int, out: Path) -> None:
    """One measured fit of ``mode`` (the 2-process modes re-run this job per rank)."""
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from benchmarks.jobs import BARE_TRAINER
    from examples.digits.data import DigitsDataModule
    from examples.digits.model import MLPClassifier
    from lightning_commsgd import create_strategy

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            self.times.append(time.perf_counter() - self._start)

    L.seed_everything(0, verbose=False)
    never = 10 * steps  # tau beyond the run: every measured step is a local step
    strategy, devices = {
        "plain": ("auto", 1),
        "local_sgd_1": (create_strategy("local_sgd", tau=never), 1),
        "local_sgd_2": (create_strategy("local_sgd", tau=never), 2),
        "overlap_2": (create_strategy("overlap_local_sgd", tau=never), 2),
    }[mode]
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        callbacks=[timer],
        **BARE_TRAINER,
    )
    trainer.fit(MLPClassifier(hidden=hidden, depth=3), DigitsDataModule(batch_size=32, repeat=16))
    if trainer.global_rank == 0:
        out.write_text(json.dumps(timer.times[WARMUP:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True, help="rank 0 writes the batch times here")
    args = parser.parse_args(argv)
    run(args.mode, args.steps, args.hidden, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
