"""Benchmark RI-SGD (redundancy-infused local SGD) on label-skewed (non-iid) data, at equal tau.

RI-SGD (Haddadpour, Kamani, Mahdavi, Cadambe, ICML 2019, "Trading redundancy for communication") is local
SGD with periodic averaging where each of the p workers also holds a fraction mu of the whole dataset from
its neighbours' shards; the paper claims that this redundancy lowers the residual error of local averaging
on non-iid data, so that fewer rounds reach the same accuracy. This benchmark trains the digits MLP on 4
CPU processes (default) with ``benchmarks.jobs.digits --strategy local_sgd --non-iid`` (each rank's own
shard is one contiguous block of the label-sorted training set, about 2.5 of the 10 digits) and the same
period tau and per-shard batch b for every mu in ``--mus`` (default 0, 0.25, 0.5). In stratified sampling
(the reference's) a worker's batch takes b samples from each shard it holds, so it grows to about
``b (1 + mu p)``; a *control* run at mu = 0 with that batch size for the largest mu (same samples per
step and rank, no redundancy) separates "bigger batch" from "redundant data", and an *iid* run at mu = 0
(no label skew) shows what the skew costs in the first place.

Every run is ``benchmarks.jobs.digits --trace --val-every-steps K`` in a fresh subprocess (through
``benchmarks/runner.py``): the consensus model (the average of the replicas) is validated every K steps.
The table gives the rounds, the bytes per rank, the samples per step and rank, the final and best
validation loss and accuracy of the consensus model, the mean validation loss of the last quarter of the
evaluations (the residual error the paper is about, less noisy than one evaluation), the rounds until the
validation accuracy first reached each of ``--targets`` and rank 0's smoothed training loss. With
``--seeds`` every configuration runs once per seed (the seed fixes the train/validation split, the initial
model and the shuffling), the main table gives medians over the seeds, a second table each seed's figures
and the comparisons say in how many seeds a run beat another. It is printed and written to
``benchmarks/results/redundancy_<date>.md``, with PNG plots next to it (validation loss and accuracy vs
rounds, first seed). Usage::

    python -m benchmarks.bench_redundancy                     # 4 processes, tau=8, mu in {0, 0.25, 0.5}
    python -m benchmarks.bench_redundancy --seeds 0 1 2       # the same, 3 seeds (about 12 min on 2 cores)
    python -m benchmarks.bench_redundancy --mus 0 0.5 --no-iid --max-steps 300
    python -m benchmarks.bench_redundancy --tau 16 --targets 0.9 0.95 0.97
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_adacomm import moving_average
from benchmarks.results import (
    format_bytes,
    machine_description,
    markdown_table,
    matplotlib_missing,
    plots_note,
)
from benchmarks.runner import REPO_ROOT, JobError, add_training_args, run_digits

__all__ = [
    "DEFAULT_MUS",
    "RunConfig",
    "build_configs",
    "main",
    "measure",
    "parse_args",
    "per_seed_table",
    "results_table",
    "rounds_to_accuracy",
    "stratified_batch_size",
    "summarize",
    "write_plots",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_MUS = (0.0, 0.25, 0.5)
# Kinds of runs: RI-SGD at some mu on skewed data, the bigger-batch control, the iid reference.
KINDS = ("ri_sgd", "control", "iid")
# The fraction of the validations, at the end of a run, whose mean loss is the "residual" column.
TAIL_FRACTION = 0.25


@dataclass(frozen=True)
class RunConfig:
    """One configuration: a label for tables and plots, its digits job arguments, its kind (one of
    :data:`KINDS`), its mu and its per-rank batch size in samples."""

    label: str
    args: tuple[str, ...]
    kind: str
    mu: float
    samples_per_step: int


def stratified_batch_size(batch_size: int, mu: float, devices: int) -> int:
    """A rank's samples per step in stratified RI-SGD: b from its own shard and from each of the
    ``floor(mu p)`` full redundant shards, ``int(b r)`` from the partial one (r the fractional part of
    ``mu p``); the rule of :class:`~lightning_commsgd.samplers.RedundantBatchSampler`, with its tolerance
    for ``mu p`` that floating point puts just below an integer."""
    q = mu * devices
    full = math.floor(q + 1e-9)
    remainder = q - full
    partial = int(batch_size * remainder + 1e-9) if remainder > 1e-9 else 0
    return batch_size * (1 + full) + partial


def build_configs(
    mus: Sequence[float], batch_size: int, devices: int, sampling: str, control: bool, iid: bool
) -> list[RunConfig]:
    """One skewed run per mu (in the given order), then the control (mu = 0, the largest mu's batch,
    only when that batch is larger than ``batch_size``), then the iid reference."""
    configs = []
    for mu in mus:
        samples = stratified_batch_size(batch_size, mu, devices) if sampling == "stratified" else batch_size
        configs.append(
            RunConfig(
                f"mu={mu:g}",
                (
                    "--non-iid",
                    "--redundancy",
                    str(mu),
                    "--sampling",
                    sampling,
                    "--batch-size",
                    str(batch_size),
                ),
                "ri_sgd",
                mu,
                samples,
            )
        )
    largest = max(configs, key=lambda config: config.samples_per_step)
    if control and largest.samples_per_step > batch_size:
        samples = largest.samples_per_step
        configs.append(
            RunConfig(
                f"control: mu=0, batch {samples}",
                ("--non-iid", "--redundancy", "0", "--batch-size", str(samples)),
                "control",
                0.0,
                samples,
            )
        )
    if iid:
        # no RI-SGD option at all: Lightning's globally reshuffled DistributedSampler (``--redundancy 0``
        # would select the fixed strided shards, the placement of the mu sweep)
        configs.append(RunConfig("iid: mu=0", ("--batch-size", str(batch_size)), "iid", 0.0, batch_size))
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mus",
        type=float,
        nargs="+",
        default=list(DEFAULT_MUS),
        help="redundancies to run on the skewed data, each in [0, 1 - 1/devices] (default: 0 0.25 0.5)",
    )
    parser.add_argument(
        "--tau", type=int, default=8, help="local steps between rounds, the same for all runs"
    )
    parser.add_argument(
        "--sampling",
        choices=("stratified", "union"),
        default="stratified",
        help="RI-SGD batches: stratified (--batch-size per shard held, the paper's) or union",
    )
    parser.add_argument(
        "--no-control", dest="control", action="store_false", help="leave out the bigger-batch control run"
    )
    parser.add_argument("--no-iid", dest="iid", action="store_false", help="leave out the iid reference run")
    add_training_args(parser, devices=4, max_steps=600)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every configuration once per seed, medians reported (default: just --seed)",
    )
    parser.add_argument(
        "--val-every", type=int, default=25, help="validate the consensus model every this many steps"
    )
    parser.add_argument(
        "--targets",
        type=float,
        nargs="*",
        default=[0.9, 0.95, 0.97],
        help="validation accuracies: rounds until each is first reached (the flag alone: none)",
    )
    parser.add_argument("--window", type=int, default=25, help="steps in the training loss moving average")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<date>)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.seeds is None:
        args.seeds = [args.seed]
    elif len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.tau < 1:
        parser.error(f"--tau must be >= 1, got {args.tau}")
    if args.devices < 2:
        parser.error(f"--devices must be >= 2 (redundancy needs neighbours), got {args.devices}")
    if not 1 <= args.val_every <= args.max_steps:
        parser.error(f"--val-every must be in [1, --max-steps={args.max_steps}], got {args.val_every}")
    if not 1 <= args.window <= args.max_steps:
        parser.error(f"--window must be in [1, --max-steps={args.max_steps}], got {args.window}")
    if any(not 0 < target <= 1 for target in args.targets):
        parser.error(f"--targets must be accuracies in (0, 1], got {args.targets}")
    # The sampler's own checks, here rather than after minutes of runs: mu's range depends on p, and a
    # stratified batch must take at least one sample from a partial shard.
    from lightning_commsgd.samplers import RedundantPlacement

    for mu in args.mus:
        try:
            placement = RedundantPlacement(args.devices, args.devices, mu)
        except ValueError as err:
            parser.error(f"--mus {mu} with --devices {args.devices}: {err}")
        if args.sampling == "stratified" and placement.remainder:
            if int(args.batch_size * placement.remainder + 1e-9) < 1:
                parser.error(
                    f"--mus {mu}: --batch-size {args.batch_size} takes no sample from the partial shard"
                    f" (mu p = {mu * args.devices:g}); use a larger batch or mu p an integer"
                )
    return args


def rounds_to_accuracy(val_trace: Sequence[dict[str, Any]], target: float) -> int | None:
    """Rounds done at the first validation whose accuracy is >= ``target``; ``None`` if none was."""
    return next((int(row["rounds"]) for row in val_trace if row["val_acc"] >= target), None)


def measure(run: dict[str, Any], window: int, targets: Sequence[float]) -> dict[str, Any]:
    """One run's figures for the table, from the JSON ``benchmarks.jobs.digits`` wrote.

    ``tail_val_loss`` is the mean validation loss over the last :data:`TAIL_FRACTION` of the
    evaluations (at least one); ``to_target`` maps each target accuracy to the rounds of
    :func:`rounds_to_accuracy` (``inf`` when never reached, so medians over repeats stay defined).

    Raises:
        ValueError: the run has no ``val_trace`` (``--val-every-steps`` missing) or it is empty.
    """
    val_trace = run.get("val_trace")
    if not val_trace:
        raise ValueError("the run has no val_trace; benchmarks.jobs.digits needs --val-every-steps")
    tail = val_trace[-max(1, round(TAIL_FRACTION * len(val_trace))) :]
    losses = [row["loss"] for row in run["trace"]]
    smoothed = moving_average(losses, window)
    to_target = {}
    for target in targets:
        rounds = rounds_to_accuracy(val_trace, target)
        to_target[target] = math.inf if rounds is None else float(rounds)
    return {
        "rounds": run["averaging_rounds"],
        "round_bytes": run["round_bytes_sent_per_rank"],
        "bytes": run["bytes_sent_per_rank"],
        "samples_per_step": run["samples_per_rank_batch"],
        "final_val_loss": run["final_val_loss"],
        "final_val_acc": run["final_val_acc"],
        "best_val_loss": min(row["val_loss"] for row in val_trace),
        "best_val_acc": max(row["val_acc"] for row in val_trace),
        "tail_val_loss": statistics.fmean(row["val_loss"] for row in tail),
        "tail_evals": len(tail),
        "final_smoothed_train_loss": smoothed[-1] if smoothed else math.nan,
        "train_loop_s": run["train_loop_s"],
        "to_target": to_target,
    }


def summarize(config: RunConfig, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the median over the runs (seeds and repeats) of every figure; repeats of one seed
    differ in their times only."""
    row: dict[str, Any] = {"label": config.label, "kind": config.kind, "mu": config.mu}
    for key, value in measured[0].items():
        if key == "to_target":
            row[key] = {t: statistics.median(m[key][t] for m in measured) for t in value}
        else:
            row[key] = statistics.median(m[key] for m in measured)
    return row


def _rounds_cell(rounds: float) -> str:
    return "not reached" if math.isinf(rounds) else f"{rounds:.0f}"


def results_table(rows: list[dict[str, Any]], targets: Sequence[float]) -> str:
    """Markdown table of the :func:`summarize` rows (``to_target`` keyed by the ``targets``)."""
    headers = [
        "run",
        "samples per step and rank",
        "rounds",
        "round bytes per rank",
        "bytes sent per rank (all)",
        *(f"rounds to val acc {target:g}" for target in targets),
        "final val loss",
        "final val acc",
        "best val loss",
        "best val acc",
        "residual val loss (mean, last quarter)",
        "smoothed train loss (rank 0)",
        "train loop (s)",
    ]
    cells = [
        [
            row["label"],
            f"{row['samples_per_step']:.0f}",
            f"{row['rounds']:.0f}",
            format_bytes(row["round_bytes"]),
            format_bytes(row["bytes"]),
            *(_rounds_cell(row["to_target"][target]) for target in targets),
            f"{row['final_val_loss']:.4f}",
            f"{row['final_val_acc']:.4f}",
            f"{row['best_val_loss']:.4f}",
            f"{row['best_val_acc']:.4f}",
            f"{row['tail_val_loss']:.4f}",
            f"{row['final_smoothed_train_loss']:.4f}",
            f"{row['train_loop_s']:.2f}",
        ]
        for row in rows
    ]
    return markdown_table(headers, cells)


def _wins(a: list[float], b: list[float]) -> str:
    """``"k/N"``: in how many of the paired values ``a`` is strictly below ``b`` (never-reached targets are
    ``inf``, so two misses are no win)."""
    return f"{sum(x < y for x, y in zip(a, b))}/{len(a)}"


def findings(
    rows: list[dict[str, Any]], targets: Sequence[float], per_seed: dict[str, dict[int, dict[str, Any]]]
) -> list[str]:
    """Plain statements comparing every mu > 0 run with mu = 0 and with the control of the same samples
    per step (if any): residual validation loss and rounds to each target (medians over the seeds), and
    in how many seeds the mu > 0 run was strictly lower. ``per_seed`` maps a row's label to its
    :func:`measure` dict for each seed. Measured comparisons only."""
    ri_sgd = [row for row in rows if row["kind"] == "ri_sgd"]
    baseline = next((row for row in ri_sgd if row["mu"] == 0), None)
    lines = []
    for row in ri_sgd:
        if row["mu"] == 0:
            continue
        # A control only answers "bigger batch or redundant data?" at the same samples per step.
        controls = [
            other
            for other in rows
            if other["kind"] == "control" and other["samples_per_step"] == row["samples_per_step"]
        ]
        for reference in [baseline, *controls]:
            if reference is None:
                continue
            mine, theirs = per_seed[row["label"]], per_seed[reference["label"]]
            seeds = sorted(set(mine) & set(theirs))
            residual, reference_residual = row["tail_val_loss"], reference["tail_val_loss"]
            residual_wins = _wins(
                [mine[seed]["tail_val_loss"] for seed in seeds],
                [theirs[seed]["tail_val_loss"] for seed in seeds],
            )
            rounds = "".join(
                f"; rounds to val acc {t:g}: {_rounds_cell(row['to_target'][t])} vs"
                f" {_rounds_cell(reference['to_target'][t])} (fewer in "
                + _wins(
                    [mine[seed]["to_target"][t] for seed in seeds],
                    [theirs[seed]["to_target"][t] for seed in seeds],
                )
                + " seeds)"
                for t in targets
            )
            lines.append(
                f"- {row['label']} vs {reference['label']}: residual val loss {residual:.4f} vs"
                f" {reference_residual:.4f} ({residual - reference_residual:+.4f}, lower in {residual_wins}"
                f" seeds){rounds}."
            )
    return lines


def per_seed_table(per_seed: dict[str, dict[int, dict[str, Any]]], targets: Sequence[float]) -> str:
    """One row per configuration, for each seed its residual validation loss and its rounds to each
    target (``-`` where never reached)."""
    seeds = sorted({seed for by_seed in per_seed.values() for seed in by_seed})
    targets_text = "/".join(f"{t:g}" for t in targets)
    headers = ["run"]
    for seed in seeds:
        headers.append(f"seed {seed}: residual val loss")
        if targets:
            headers.append(f"seed {seed}: rounds to {targets_text}")
    rows = []
    for label, by_seed in per_seed.items():
        cells = [label]
        for seed in seeds:
            measured = by_seed.get(seed)
            if measured is None:
                cells += ["n/a"] * (2 if targets else 1)
                continue
            cells.append(f"{measured['tail_val_loss']:.4f}")
            if targets:
                cells.append(
                    "/".join(
                        "-" if math.isinf(measured["to_target"][t]) else f"{measured['to_target'][t]:.0f}"
                        for t in targets
                    )
                )
        rows.append(cells)
    return markdown_table(headers, rows)


def plot_paths(out: Path) -> dict[str, Path]:
    """Where the plots of results file ``out`` go: next to it, named after it."""
    return {
        name: out.with_name(f"{out.stem}_{name}.png") for name in ("val_loss_vs_rounds", "val_acc_vs_rounds")
    }


def _first_seed_run(runs: list[dict[str, Any]], seeds: list[int], seed: int) -> dict[str, Any]:
    """Of the runs with ``seed``, the repeat with the median train loop time: the one a plot shows."""
    mine = sorted((run for run, s in zip(runs, seeds) if s == seed), key=lambda run: run["train_loop_s"])
    return mine[len(mine) // 2]


def write_plots(traces: dict[str, list[dict[str, Any]]], kinds: dict[str, str], out: Path) -> list[Path]:
    """Validation loss and accuracy of the consensus model vs rounds, one line per configuration (the
    control dashed, the iid reference dotted); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    styles = {"ri_sgd": "-", "control": "--", "iid": ":"}
    paths = plot_paths(out)
    for name, key, y_label, log in (
        ("val_loss_vs_rounds", "val_loss", "validation loss (consensus model)", True),
        ("val_acc_vs_rounds", "val_acc", "validation accuracy (consensus model)", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, trace in traces.items():
            ax.plot(
                [row["rounds"] for row in trace],
                [row[key] for row in trace],
                linestyle=styles[kinds[label]],
                marker=".",
                label=label,
            )
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(max(0.0, min(row[key] for t in traces.values() for row in t[1:]) - 0.02), 1.0)
        ax.set_xlabel("averaging rounds")
        ax.set_ylabel(y_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)
    return list(paths.values())


def _report(
    args: argparse.Namespace,
    argv: list[str],
    first_run: dict[str, Any],
    table: str,
    seed_table: str,
    notes: list[str],
    plots: list[Path],
    bench_s: float,
) -> str:
    """The results file: how it was produced (``argv``), on what, the table and how to read it."""
    command = " ".join(["python -m benchmarks.bench_redundancy", *argv])
    lines = [
        f"# RI-SGD: redundancy vs residual error on non-iid data, {datetime.date.today().isoformat()}",
        "",
        f"- command: `{command}` ({bench_s / 60:.1f} min in all)",
        f"- machine: {machine_description()}",
        f"- model: MLP, hidden {args.hidden}, depth {args.depth}, {first_run['num_params']:,} parameters;"
        f" SGD with momentum, constant lr {args.lr}; training set repeated {args.repeat_data} times per"
        " epoch",
        f"- {args.devices} CPU processes (gloo), LocalSGDStrategy (parameters and momentum averaged),"
        f" {first_run['steps']} optimizer steps per run, a round every tau={args.tau} steps for every run,"
        f" seed(s) {', '.join(map(str, args.seeds))} x {args.repeats} run(s) per configuration, medians"
        " over all of them",
        f"- non-iid: `jobs/digits.py --non-iid`: the training set sorted by label, rank j's own strided"
        f" shard is the j-th of {args.devices} contiguous blocks (about {10 / args.devices:g} digits each);"
        f" RI-SGD sampling `{args.sampling}` with b={args.batch_size} per shard held; the control is mu=0"
        " with the largest mu's samples per step; the iid run has no label skew (Lightning's"
        " DistributedSampler)",
        f"- validation: the consensus model (average of the replicas) on the held-out 20 % every"
        f" {args.val_every} steps; residual = mean val loss of the last {TAIL_FRACTION:.0%} of those"
        f" evaluations; train loss: rank 0's own batches, {args.window}-step trailing moving average",
        "",
        table,
        "",
        "Rounds and bytes are per rank over fit: rounds are the averaging rounds (the same for every run at"
        " equal tau and steps), round bytes the parameter-and-momentum averages, *all* bytes include the"
        " initial broadcast, the consensus evaluations every K steps and Lightning's reductions. Redundancy"
        " costs no communication here: its price is data stored per worker and samples computed per step"
        " (the second column). Rank 0's training loss is on its own batches, which on skewed data cover"
        " only its own few digits (plus, with mu > 0, its neighbours'), so it is not comparable across"
        " runs; the validation columns are. Rounds to a target are read at the validations, so they"
        f" come in steps of {args.val_every} / tau = {args.val_every / args.tau:g} rounds; a run that never"
        " got there counts as infinite in the medians (`not reached` when most seeds missed).",
    ]
    if len(args.seeds) > 1:
        lines += [
            "",
            "Per seed (the seed fixes the train/validation split, the initial model and the shuffling);"
            " rounds to each target accuracy, `-` where never reached:",
            "",
            seed_table,
        ]
    if notes:
        lines += [
            "",
            "Measured comparisons (medians over the seeds; in how many seeds the first run was lower):",
        ]
        lines += ["", *notes]
    lines += plots_note(plots)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table, write the results file and plots; returns the exit status."""
    args = parse_args(argv)
    if matplotlib_missing("bench_redundancy", args.plots):
        return 2
    started = time.perf_counter()
    common = ["--strategy", "local_sgd", "--tau", str(args.tau), "--devices", str(args.devices), "--trace"]
    common += ["--hidden", str(args.hidden), "--depth", str(args.depth), "--lr", str(args.lr)]
    common += ["--repeat", str(args.repeat_data)]
    common += ["--val-every-steps", str(args.val_every)]
    # A huge epoch limit makes --max-steps the budget that binds, identically for every configuration
    # (the stratified batch sampler and the bigger control batch have different epoch lengths).
    common += ["--max-steps", str(args.max_steps), "--epochs", "1000000"]
    configs = build_configs(args.mus, args.batch_size, args.devices, args.sampling, args.control, args.iid)

    # Repeats and seeds go round-robin over the configurations, so a slow spell of the machine hits all
    # of them rather than all the runs of one.
    runs: dict[str, list[dict[str, Any]]] = {config.label: [] for config in configs}
    seeds: dict[str, list[int]] = {config.label: [] for config in configs}
    for repeat in range(args.repeats):
        for seed in args.seeds:
            for config in configs:
                print(
                    f"[{config.label}] seed {seed}, run {repeat + 1}/{args.repeats} ...",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    run = run_digits([*config.args, *common, "--seed", str(seed)], timeout_s=args.timeout)
                except JobError as err:
                    print(f"bench: the {config.label} run failed: {err}", file=sys.stderr)
                    return 1
                runs[config.label].append(run)
                seeds[config.label].append(seed)

    measured = {label: [measure(run, args.window, args.targets) for run in runs[label]] for label in runs}
    # Repeats of one seed differ in their times only: the first stands for the seed.
    per_seed = {
        label: {seed: m for seed, m in reversed(list(zip(seeds[label], measured[label])))} for label in runs
    }
    rows = [summarize(config, measured[config.label]) for config in configs]
    for config, row in zip(configs, rows):
        # The sampler's batch rule and our reading of it must agree, or the control is not a control.
        if row["samples_per_step"] != config.samples_per_step:
            print(
                f"bench: {config.label} took {row['samples_per_step']:.0f} samples per step, expected"
                f" {config.samples_per_step}",
                file=sys.stderr,
            )
            return 1
    table = results_table(rows, args.targets)
    seed_table = per_seed_table(per_seed, args.targets)
    notes = findings(rows, args.targets, per_seed)

    out = args.out or RESULTS_DIR / f"redundancy_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if args.plots:
        # The first seed's runs (the median time among its repeats): curves of one seed belong together.
        first = args.seeds[0]
        shown = {label: _first_seed_run(runs[label], seeds[label], first)["val_trace"] for label in runs}
        plots = write_plots(shown, {config.label: config.kind for config in configs}, out)
    argv_used = sys.argv[1:] if argv is None else argv
    bench_s = time.perf_counter() - started
    out.write_text(
        _report(args, argv_used, runs[configs[0].label][0], table, seed_table, notes, plots, bench_s)
    )
    print(table)
    if len(args.seeds) > 1:
        print("\n" + seed_table)
    if notes:
        print("\n" + "\n".join(notes))
    print(f"\n{bench_s:.0f} s in all", file=sys.stderr)
    print(f"written to {out}" + "".join(f"\n           {path}" for path in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
