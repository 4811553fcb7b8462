"""The overhead benchmark's job: one timed fit of the digits MLP, the time of every training batch.

``bench_overhead`` runs it (through :mod:`benchmarks.runner`) once per mode and repeat::

    python -m benchmarks.jobs.overhead --mode local_sgd_2 --steps 600 --hidden 512 --json /tmp/times.json

Rank 0 writes the seconds of every batch after the first :data:`WARMUP` (``on_train_batch_start`` to
``on_train_batch_end``: forward, backward, optimizer step and every strategy hook) and the share of a CPU
its process got over those batches (CPU seconds per wall second: below 1 when other processes took turns on
its core) as JSON, ``{"times": [...], "cpu_share": ...}``. The
2-process modes are re-run per rank by Lightning (``python -m benchmarks.jobs.overhead ...``); the
``plain_pair`` control starts a second, unmeasured plain fit of this job and begins its own when both are
ready.

A *mode* is one registered strategy with its period set beyond the run (every measured step is a local
step: no round, no collective), on one or two processes: :data:`MODES`. The registered strategies that
communicate at every step by definition have no local step to measure: :data:`NO_LOCAL_STEPS` says why.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODES", "NO_LOCAL_STEPS", "WARMUP", "Mode", "main", "run", "unclassified"]

WARMUP = 50


@dataclass(frozen=True)
class Mode:
    """One measured configuration.

    Attributes:
        strategy: the registered name (``create_strategy(strategy, **kwargs)``), or ``"auto"`` for plain.
        devices: processes of the run.
        local_step: what a local step of it is, for the report.
        kwargs: builds the strategy's arguments from ``never``, a period beyond the run.
        paired: run a second, unmeasured plain fit alongside (a control: what sharing the machine with a
            second busy process costs, which every 2-process mode pays too).
    """

    strategy: str
    devices: int
    local_step: str
    kwargs: Callable[[int], dict[str, Any]] = lambda never: {}
    paired: bool = False


def _tau(never: int) -> dict[str, Any]:
    return {"tau": never}


def _adacomm(never: int) -> dict[str, Any]:
    from lightning_commsgd.schedules import AdaComm

    # tau0 beyond the run: AdaComm decides only after a round, so every step records its loss and is local
    return {"tau": AdaComm(tau0=never, interval_steps=100)}


def _ri_sgd(never: int) -> dict[str, Any]:
    from lightning_commsgd.redundancy import RedundancyInfusion

    # union sampling keeps b = 32 samples per batch (stratified would take b (1 + mu p)): the same step as
    # plain's; replica_weights="samples" counts each batch's samples (RI-SGD's heterogeneous extension)
    return {
        "tau": never,
        "redundancy": RedundancyInfusion(mu=0.5, sampling="union"),
        "replica_weights": "samples",
    }


#: every measured mode, in the order of the report (each repeat runs them all in this order)
MODES: dict[str, Mode] = {
    "plain": Mode("auto", 1, "Lightning's single-device step (the baseline)"),
    "plain_pair": Mode(
        "auto",
        1,
        "control: plain's step while a second plain fit runs alongside (no process group, no strategy)",
        paired=True,
    ),
    "local_sgd_1": Mode("local_sgd", 1, "tau beyond the run, one process", _tau),
    "local_sgd_2": Mode("local_sgd", 2, "tau beyond the run", _tau),
    "adacomm_2": Mode("local_sgd", 2, "AdaComm(tau0 beyond the run): each step records its loss", _adacomm),
    "ri_sgd_2": Mode(
        "local_sgd",
        2,
        "redundancy mu=0.5 (union), replica_weights='samples', tau beyond the run",
        _ri_sgd,
    ),
    "overlap_2": Mode("overlap_local_sgd", 2, "tau beyond the run (no average in flight)", _tau),
    "decentralized_2": Mode(
        "decentralized_sgd", 2, "gossip period tau beyond the run (D-PSGD is tau=1)", _tau
    ),
    "elastic_2": Mode("elastic_averaging", 2, "tau beyond the run", _tau),
    "diloco_2": Mode("diloco", 2, "H (tau) beyond the run: inner steps only", _tau),
    "streaming_diloco_2": Mode(
        "streaming_diloco",
        2,
        "H beyond the run (2 fragments, sync_delay 1): no fragment sent",
        lambda n: {"tau": 2 * n},
    ),
    "slowmo_2": Mode("slowmo", 2, "tau beyond the run: inner steps only", _tau),
}

#: registered strategies with no local step, by the patterns of their registry names: every step
#: communicates, by definition
NO_LOCAL_STEPS: dict[tuple[str, ...], str] = {
    (
        "compressed_sgd",
        "qsgd",
        "mem_sgd",
        "double_squeeze",
    ): "compressed gradients are exchanged at every step",
    (
        "dore",
    ): "compressed gradient residuals go to the master and the compressed model comes back every step",
    ("diana",): "compressed gradient residuals go to the master and the model comes back every step",
    ("ksync_sgd", "async_sgd"): "every step is a gradient push to the parameter server and a model pull",
    ("gossip_*",): "presets of D-PSGD, tau=1: a gossip round at every step (with a period, their class is "
    "`decentralized_2`)",
}


def unclassified() -> list[str]:
    """Registered strategy names that no mode measures and :data:`NO_LOCAL_STEPS` does not list (a new
    strategy: add a mode for it, or say why it has no local step)."""
    from lightning_commsgd.registry import ENTRIES

    measured = {mode.strategy for mode in MODES.values()}
    patterns = [pattern for names in NO_LOCAL_STEPS for pattern in names]
    return [
        name
        for name in ENTRIES
        if name not in measured and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def _start_together(rendezvous: Path, parties: int = 2) -> None:
    """Wait until ``parties`` processes called this with the same ``rendezvous`` directory."""
    rendezvous.mkdir(parents=True, exist_ok=True)
    (rendezvous / str(os.getpid())).touch()
    deadline = time.monotonic() + 300
    while len(list(rendezvous.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the partner fit never reached {rendezvous}")
        time.sleep(0.005)


def _partner(steps: int, hidden: int, rendezvous: Path) -> subprocess.Popen:
    """An unmeasured plain fit of the same model, longer than the measured one so that it covers it."""
    command = [sys.executable, "-m", "benchmarks.jobs.overhead", "--mode", "plain", "--hidden", str(hidden)]
    command += ["--steps", str(steps + steps // 2), "--json", os.devnull, "--start-together", str(rendezvous)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(mode: str, steps: int, hidden: int, out: Path, start_together: Path | None = None) -> None:
    """One measured fit of ``mode`` (the 2-process modes re-run this job per rank); ``start_together``: wait
    for a partner process there before the fit (``plain_pair``)."""
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from benchmarks.jobs import BARE_TRAINER
    from examples.digits.data import DigitsDataModule
    from examples.digits.model import MLPClassifier
    from lightning_commsgd import create_strategy

    class StepTimer(Callback):
        """Each batch's seconds, and the CPU this process got over the measured batches (their span)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.span: list[float] = []  # wall and CPU seconds at the first measured batch's start, then end

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if len(self.times) == WARMUP:
                self.span = [time.perf_counter(), time.process_time()]
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            end = time.perf_counter()
            self.times.append(end - self._start)
            if self.span:
                self.span[2:] = [end, time.process_time()]

        def cpu_share(self) -> float:
            wall0, cpu0, wall1, cpu1 = self.span
            return (cpu1 - cpu0) / (wall1 - wall0)

    L.seed_everything(0, verbose=False)
    spec = MODES[mode]
    never = 10 * steps  # a period beyond the run: every measured step is a local step
    strategy = "auto" if spec.strategy == "auto" else create_strategy(spec.strategy, **spec.kwargs(never))
    timer = StepTimer()
    partner = None
    if spec.paired:
        start_together = out.parent / f"{out.name}.start"
        partner = _partner(steps, hidden, start_together)
    try:
        if start_together is not None:
            _start_together(start_together)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=spec.devices,
            strategy=strategy,
            max_steps=steps,
            callbacks=[timer],
            **BARE_TRAINER,
        )
        trainer.fit(MLPClassifier(hidden=hidden, depth=3), DigitsDataModule(batch_size=32, repeat=16))
    finally:
        if partner is not None:
            partner.kill()  # it has covered the measured steps; its own end does not matter
            partner.wait()
    if trainer.global_rank == 0:
        out.write_text(json.dumps({"times": timer.times[WARMUP:], "cpu_share": timer.cpu_share()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODES), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True, help="rank 0 writes the batch times here")
    parser.add_argument("--start-together", type=Path, help=argparse.SUPPRESS)  # plain_pair's partner
    args = parser.parse_args(argv)
    run(args.mode, args.steps, args.hidden, args.json, args.start_together)
    return 0


if __name__ == "__main__":
    sys.exit(main())
