"""Per-step overhead of this package's strategies on local (non-round) steps, against a plain
single-process Lightning step of the same model.

Local SGD promises that steps between rounds cost what a single-process step costs: no hidden per-step
collective or copy. This measures it: the same MLP and data, one thread per process, the median time of a
training batch (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step and
every strategy hook) over the steps after a warm-up, for

- ``plain``: ``Trainer(devices=1)``, Lightning's default single-device strategy;
- ``local_sgd_1``: ``LocalSGDStrategy`` on one process (all of the package's per-step hooks, no peer);
- ``local_sgd_2``: ``LocalSGDStrategy`` on two processes (each on its own core), tau larger than the run,
  so every measured step is a local step; rank 0's times;
- ``overlap_2``: ``OverlapLocalSGDStrategy`` on two processes, likewise.

Runs are interleaved and repeated (``--repeats``); the ratio to ``plain`` is the median over repeats.
Usage: ``python benchmarks/bench_overhead.py [--steps 600 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import BARE_TRAINER, REPO_ROOT, machine_description, markdown_table  # noqa: E402

MODES = ("plain", "local_sgd_1", "local_sgd_2", "overlap_2")
WARMUP = 50


def child(mode: str, steps: int, hidden: int, out: str) -> None:
    """One measured fit (runs in its own interpreter; the 2-process modes re-run it per rank)."""
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_commsgd import LocalSGDStrategy, OverlapLocalSGDStrategy
    from lightning_commsgd.data import DigitsDataModule
    from lightning_commsgd.models import MLPClassifier

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
        "local_sgd_1": (LocalSGDStrategy(tau=never), 1),
        "local_sgd_2": (LocalSGDStrategy(tau=never), 2),
        "overlap_2": (OverlapLocalSGDStrategy(tau=never), 2),
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
        Path(out).write_text(json.dumps(timer.times[WARMUP:]))


def measure(mode: str, steps: int, hidden: int) -> float:
    """Median seconds per training batch of one run of ``mode``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--hidden", str(hidden)]
        subprocess.run([*cmd, "--out", out], check=True, env=env, capture_output=True, timeout=900)
        return statistics.median(json.loads(Path(out).read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps <= WARMUP:
        ap.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if args.child:
        child(args.child, args.steps, args.hidden, args.out)
        return 0
    started = time.perf_counter()
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so drifts of the machine hit every mode alike
            per_mode[mode].append(measure(mode, args.steps, args.hidden))
    plain = statistics.median(per_mode["plain"])
    rows = []
    for mode in MODES:
        median = statistics.median(per_mode[mode])
        ratios = [t / p for t, p in zip(per_mode[mode], per_mode["plain"])]
        rows.append(
            [
                mode,
                f"{median * 1e3:.3f}",
                f"{median / plain:.3f}",
                f"{min(ratios):.3f} - {max(ratios):.3f}",
            ]
        )
    table = markdown_table(["mode", "median ms per step", "ratio to plain", "range over repeats"], rows)
    today = datetime.date.today().isoformat()
    text = "\n".join(
        [
            f"# Per-step overhead of local steps, {today}",
            "",
            f"- command: `python benchmarks/bench_overhead.py --steps {args.steps} --hidden {args.hidden}"
            f" --repeats {args.repeats}` ({(time.perf_counter() - started) / 60:.1f} min)",
            f"- machine: {machine_description()}",
            f"- model: MLP hidden {args.hidden}, depth 3 on digits, batch 32, SGD; one thread per process;"
            f" median over steps {WARMUP + 1}..{args.steps} of each run, median over {args.repeats} runs",
            "",
            table,
            "",
        ]
    )
    print(text)
    results = REPO_ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"overhead_{today}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
