"""Benchmark Lightning's DDPStrategy against LocalSGDStrategy for several averaging periods tau.

Every configuration trains the same model for the same number of optimizer steps, each run in a fresh
subprocess (see ``benchmarks/runner.py``). The markdown table is printed and written to
``benchmarks/results/local_sgd_<date>.md``. Usage::

    python -m benchmarks.bench_local_sgd                       # DDP and tau in {1, 4, 8, 16}
    python -m benchmarks.bench_local_sgd --taus 8 32 --repeats 3 --max-steps 600
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.results import format_bytes, machine_description, markdown_table
from benchmarks.runner import REPO_ROOT, JobError, add_training_args, run_digits

__all__ = ["main", "parse_args", "results_table", "summarize"]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Fields that vary from repeat to repeat (timings) and are reported as the median over repeats; the
# rest (bytes, rounds, steps, losses) is deterministic for a fixed seed and taken from the first repeat.
_TIMED_FIELDS = ("wall_s", "train_loop_s", "comm_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taus", type=int, nargs="+", default=[1, 4, 8, 16], help="local SGD periods")
    add_training_args(parser, devices=2, max_steps=300)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<date>)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if any(tau < 1 for tau in args.taus):
        parser.error(f"every --taus value must be >= 1, got {args.taus}")
    return args


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's data from the repeats of one configuration: median timings, first run's counts."""
    summary = dict(runs[0])
    for key in _TIMED_FIELDS:
        summary[key] = statistics.median(run[key] for run in runs)
    summary["repeats"] = len(runs)
    return summary


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.3f}" if baseline else "n/a"


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; ``rows[0]`` must be the DDP baseline."""
    base = rows[0]
    headers = [
        "strategy",
        "tau",
        "wall s",
        "train loop s",
        "time ratio vs DDP",
        "bytes sent per rank",
        "bytes ratio vs DDP",
        "rounds",
        "final train loss",
        "val acc",
    ]
    cells = []
    for row in rows:
        sent = row["bytes_sent_per_rank"]
        cells.append(
            [
                row["strategy"],
                "-" if row["tau"] is None else row["tau"],
                f"{row['wall_s']:.2f}",
                f"{row['train_loop_s']:.2f}",
                _ratio(row["train_loop_s"], base["train_loop_s"]),
                f"{format_bytes(sent)} ({sent:,} B)",
                _ratio(sent, base["bytes_sent_per_rank"]),
                row["rounds"],
                "n/a" if row["final_train_loss"] is None else f"{row['final_train_loss']:.4f}",
                f"{row['final_val_acc']:.4f}",
            ]
        )
    return markdown_table(headers, cells)


def _report(args: argparse.Namespace, argv: list[str], rows: list[dict[str, Any]], table: str) -> str:
    """The results file: how it was produced (``argv``), on what, and the table."""
    base = rows[0]
    command = " ".join(["python -m benchmarks.bench_local_sgd", *argv])
    return "\n".join(
        [
            f"# Local SGD vs DDP, {datetime.date.today().isoformat()}",
            "",
            f"- command: `{command}`",
            f"- machine: {machine_description()}",
            f"- model: MLP, hidden {args.hidden}, depth {args.depth}, {base['num_params']:,} parameters;"
            f" batch {args.batch_size} per process, lr {args.lr}",
            f"- {args.devices} CPU processes (gloo), {base['steps']} optimizer steps per run,"
            f" median of {args.repeats} run(s) for the timings",
            "",
            table,
            "",
            "Time ratio: train loop time relative to DDP (wall s also includes starting the processes)."
            " Bytes: payload bytes per rank from the communicator ledger (DDP: counting comm hook)."
            " See benchmarks/README.md.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table and write the results file; returns the exit status."""
    args = parse_args(argv)
    common = ["--devices", str(args.devices), "--hidden", str(args.hidden), "--depth", str(args.depth)]
    common += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed)]
    # A huge epoch limit makes --max-steps the budget that binds, identically for every strategy.
    common += ["--max-steps", str(args.max_steps), "--epochs", "1000000", "--repeat", str(args.repeat_data)]
    configs: list[tuple[str, list[str]]] = [("ddp", ["--strategy", "ddp"])]
    configs += [(f"local_sgd tau={tau}", ["--strategy", "local_sgd", "--tau", str(tau)]) for tau in args.taus]

    rows = []
    for label, extra in configs:
        runs = []
        for repeat in range(args.repeats):
            print(f"[{label}] run {repeat + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            try:
                runs.append(run_digits([*extra, *common], timeout_s=args.timeout))
            except JobError as err:
                print(f"bench: the {label} run failed: {err}", file=sys.stderr)
                return 1
        rows.append(summarize(runs))

    table = results_table(rows)
    out = args.out or RESULTS_DIR / f"local_sgd_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_report(args, sys.argv[1:] if argv is None else argv, rows, table))
    print(table)
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
