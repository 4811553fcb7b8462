"""Compare DDP and local SGD on the digits data set and print a markdown table::

    python examples/demo.py            # make demo; needs the package and scikit-learn (.[examples])
    python examples/demo.py --tau 16 --epochs 5

Trains the digits MLP (``examples/digits/``) with the same seed and budget under Lightning's
``DDPStrategy`` (gradients all-reduced every step) and ``LocalSGDStrategy`` (parameters averaged every
``tau`` steps). Each run is this script with ``--run ddp|local_sgd`` in a fresh process, which launches its
own CPU ranks (Lightning re-runs that command line for rank 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning
import torch
from digits.data import DigitsDataModule  # examples/digits/, next to this script
from digits.model import MLPClassifier
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy

from lightning_commsgd import CommunicationMonitor, LocalSGDStrategy
from lightning_commsgd.comm import shutdown_process_group

torch.set_num_threads(1)  # one thread per rank: two ranks must not fight over the cores


def train(args: argparse.Namespace) -> int:
    """One run (every rank executes it); rank 0 writes its figures to ``--json``."""
    lightning.seed_everything(args.seed, verbose=False)  # the same weights and data on every rank
    data = DigitsDataModule(batch_size=32, seed=args.seed, repeat=args.repeat)
    model = MLPClassifier(hidden=args.hidden, depth=args.depth, lr=0.05)
    strategy = DDPStrategy() if args.run == "ddp" else LocalSGDStrategy(tau=args.tau)
    # the monitor counts DDP's buckets too; the timer, the training loop alone (fit without starting ranks)
    monitor, timer = CommunicationMonitor(), Timer()
    trainer = Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
        callbacks=[monitor, timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall_s = time.perf_counter() - start
    sent, rounds = monitor.ledger.bytes_sent, monitor.ledger.rounds  # fit's traffic, before validate's
    val_acc = trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]
    if trainer.is_global_zero:
        result = {"strategy": args.run, "tau": None if args.run == "ddp" else args.tau, "wall_s": wall_s}
        result.update(train_loop_s=timer.time_elapsed("train"), steps=trainer.global_step)
        result.update(bytes_sent_per_rank=int(sent), rounds=int(rounds), final_val_acc=float(val_acc))
        result["num_params"] = sum(p.numel() for p in model.parameters())
        Path(args.json).write_text(json.dumps(result))
    shutdown_process_group()  # every rank leaves together
    return 0


def launch(args: argparse.Namespace, run: str, workdir: str) -> dict:
    """Run ``--run run`` in a fresh process (a new session: a timeout kills every rank of it)."""
    out = Path(workdir) / f"{run}.json"
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("run", "json", "timeout")]
    cmd = [sys.executable, __file__, "--run", run, "--json", str(out), *flags]
    env = {"OMP_NUM_THREADS": "1", **os.environ}  # one OpenMP thread per rank, unless set otherwise
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise RuntimeError(f"timed out after {args.timeout:.0f} s") from None
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"exit status {proc.returncode}:\n" + "\n".join(stderr.splitlines()[-40:]))
    return json.loads(out.read_text())


def size(num_bytes: int) -> str:
    """In decimal units (1 MB = 10**6 B), e.g. ``"12.35 MB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def table(runs: list[dict]) -> str:
    """Markdown table of ``runs``; the first run (DDP) is the baseline of the ratios."""
    header = ["strategy", "wall time (s)", "train loop (s)", "time ratio vs DDP", "bytes sent per rank",
              "bytes ratio vs DDP", "rounds", "final val acc"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        name = run["strategy"] if run["tau"] is None else f"{run['strategy']} (tau={run['tau']})"
        sent, base = run["bytes_sent_per_rank"], runs[0]
        cells = [name, f"{run['wall_s']:.2f}", f"{run['train_loop_s']:.2f}"]
        cells += [f"{run['train_loop_s'] / base['train_loop_s']:.3f}", f"{size(sent)} ({sent:,} B)"]
        cells += [f"{sent / base['bytes_sent_per_rank']:.3f}", run["rounds"], f"{run['final_val_acc']:.4f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tau", type=int, default=8, help="local steps between averages for local SGD")
    parser.add_argument("--devices", type=int, default=2, help="CPU processes per run")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run")
    # ~0.56 M parameters: communication is a visible part of a step (a tiny model would show only noise)
    parser.add_argument("--hidden", type=int, default=512, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--repeat", type=int, default=2, help="repeat the training set per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by both runs")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    parser.add_argument("--run", choices=("ddp", "local_sgd"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one run, on every rank
        return train(args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="commsgd_demo_") as tmp:
        for run, label in (("ddp", "DDP"), ("local_sgd", f"local SGD, tau={args.tau}")):
            print(f"running {label} on {args.devices} CPU processes ...", file=sys.stderr, flush=True)
            try:
                runs.append(launch(args, run, tmp))
            except RuntimeError as err:
                print(f"demo: the {label} run failed: {err}", file=sys.stderr)
                return 1
    params, steps = runs[0]["num_params"], runs[0]["steps"]
    print(f"\n{params:,} parameters, {args.devices} processes, {steps} steps each\n\n{table(runs)}")
    print(
        "\nwall time: trainer.fit on rank 0, including starting the other ranks;"
        " train loop: the training loop alone (the time ratio uses this)."
        "\nbytes: payload bytes each rank put into collectives during fit; rounds: synchronisations."
        "\nOn one machine collectives go over loopback, so time ratios are small and noisy; the bytes"
        " ratio is what carries over to a real network."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
