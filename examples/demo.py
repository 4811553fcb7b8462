"""Compare DDP and local SGD on the digits data set and print a markdown table.

Runs ``examples/train_digits.py`` twice, each run launching its own CPU processes, with the same seed
and budget: once under Lightning's ``DDPStrategy`` (all-reduce of the gradients every step) and once
under ``LocalSGDStrategy`` (parameter average every ``tau`` steps). Usage::

    python examples/demo.py            # from a clone; no install of the package needed
    python examples/demo.py --tau 16 --epochs 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

# The harness lives in benchmarks/; put the repository root first on the path so that this works
# from a plain clone (``python examples/demo.py``), installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    TrainRunError,
    format_bytes,
    markdown_table,
    run_train_digits,
)

__all__ = ["main", "parse_args", "results_table"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tau", type=int, default=8, help="local steps between averages for local SGD")
    parser.add_argument("--devices", type=int, default=2, help="CPU processes per run")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run")
    # Wide enough (~0.56 M parameters) that communication is a visible part of a step; with a tiny
    # model the time comparison would be all process noise.
    parser.add_argument("--hidden", type=int, default=512, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--repeat", type=int, default=2, help="repeat the training set per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by both runs")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    return parser.parse_args(argv)


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or not baseline:
        return "n/a"
    return f"{value / baseline:.3f}"


def results_table(runs: list[dict[str, Any]]) -> str:
    """Markdown table of ``runs``; the first run is the baseline of the ratios."""
    base = runs[0]
    headers = [
        "strategy",
        "wall time (s)",
        "train loop (s)",
        "time ratio vs DDP",
        "bytes sent per rank",
        "bytes ratio vs DDP",
        "rounds",
        "final val acc",
    ]
    rows = []
    for run in runs:
        name = run["strategy"] if run["tau"] is None else f"{run['strategy']} (tau={run['tau']})"
        sent = run["bytes_sent_per_rank"]
        rows.append(
            [
                name,
                f"{run['wall_s']:.2f}",
                f"{run['train_loop_s']:.2f}",
                _ratio(run["train_loop_s"], base["train_loop_s"]),
                f"{format_bytes(sent)} ({sent:,} B)",
                _ratio(sent, base["bytes_sent_per_rank"]),
                run["rounds"],
                f"{run['final_val_acc']:.4f}",
            ]
        )
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    """Run both strategies and print the comparison; returns the process exit status."""
    args = parse_args(argv)
    common = ["--devices", str(args.devices), "--epochs", str(args.epochs)]
    common += ["--hidden", str(args.hidden), "--depth", str(args.depth)]
    common += ["--repeat", str(args.repeat), "--seed", str(args.seed)]
    configs = [
        ("DDP", ["--strategy", "ddp"]),
        (f"local SGD, tau={args.tau}", ["--strategy", "local_sgd", "--tau", str(args.tau)]),
    ]
    runs = []
    with tempfile.TemporaryDirectory(prefix="commsgd_demo_") as tmp:
        for label, extra in configs:
            print(f"running {label} on {args.devices} CPU processes ...", file=sys.stderr, flush=True)
            try:
                runs.append(run_train_digits([*extra, *common], timeout_s=args.timeout, workdir=Path(tmp)))
            except TrainRunError as err:
                print(f"demo: the {label} run failed: {err}", file=sys.stderr)
                return 1

    print(
        f"\n{runs[0]['num_params']:,} parameters, {args.devices} processes, {runs[0]['steps']} steps each\n"
    )
    print(results_table(runs))
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
