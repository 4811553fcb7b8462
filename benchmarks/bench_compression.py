"""Benchmark compressed communication (QSGD, MEM-SGD, DIANA, DORE, DoubleSqueeze) against uncompressed SGD.

Two workloads, each run under every method with the same step budget, learning rate, batch and seed:
the digits MLP (``benchmarks.jobs.digits``) and a small CNN on synthetic 32x32x3 images
(``benchmarks.jobs.synthetic_cnn``). The baseline is Lightning's own ``DDPStrategy`` (SGD with an fp32
gradient all-reduce every step, counted by ``CommunicationMonitor``'s DDP comm hook); the others are this
package's compressed strategies with their default compressors (``benchmarks.jobs.digits --strategy ...``).
DORE runs with its theory's rates (``--dore-rates theory``: alpha 1/(2(C+1)), beta 1/(C+1)) and DIANA with
its default (alpha 1/(2(C+1))); DORE once more with the DORE paper's experimental rates (alpha 0.1, beta 1,
eta 1; the strategy's default since they train faster), labelled as such (``--paper-rates``).

Every run is a fresh subprocess (``benchmarks/runner.py``) with ``--trace`` and a validation every
``--val-every`` steps. The tables compare, per workload: the bytes each rank sent in training rounds (the
mean over the ranks: with a parameter server on rank 0 the ranks send different amounts), per step and as
a ratio to DDP's; the busiest rank's ratio; the final smoothed training loss; the validation accuracy of
the final model; and the bytes (and steps) each method needed until its smoothed training loss first
reached DDP's final smoothed loss, and until a validation first reached DDP's final accuracy (within
``--acc-slack``). A second table gives the bytes to looser loss targets (``--loss-factors`` times SGD's
final smoothed loss), and a line per workload names the methods that sent at least 95% less than SGD to
reach SGD's final loss and accuracy (the DORE paper's claim). They are printed and written to
``benchmarks/results/compression_<date>.md``, with PNG plots next to it (training loss vs bytes, log x;
training loss vs steps). Usage::

    python -m benchmarks.bench_compression                         # both workloads, 2 processes
    python -m benchmarks.bench_compression --workloads digits --max-steps 600
    python -m benchmarks.bench_compression --methods sgd dore mem_sgd --paper-rates dore diana
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
from benchmarks.runner import REPO_ROOT, JobError, add_training_args, run_digits, run_synthetic_cnn

__all__ = [
    "METHODS",
    "PAPER_RATES",
    "WORKLOADS",
    "LossCurve",
    "Method",
    "build_methods",
    "first_reaching",
    "claim_check",
    "ladder_table",
    "loss_curve",
    "main",
    "measure",
    "parse_args",
    "results_table",
    "summarize",
    "write_plots",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
BASELINE = "sgd"


@dataclass(frozen=True)
class Method:
    """One configuration: a key (``--methods``), a label for tables and plots, and its script arguments."""

    key: str
    label: str
    args: tuple[str, ...]


# The methods in table order, the baseline first. Compressor settings are benchmarks.jobs.digits's defaults
# (written out so that the table says what ran): inf-norm ternary quantizer over blocks of 256 (DORE,
# DIANA), QSGD with 4 levels over buckets of 512, top 1% (MEM-SGD), scaled sign over blocks of 256.
_DORE_ARGS = ("--strategy", "dore", "--compressor-block", "256", "--server", "rank0")
METHODS: dict[str, Method] = {
    method.key: method
    for method in (
        Method("sgd", "SGD (DDP, fp32 all-reduce)", ("--strategy", "ddp")),
        Method(
            "qsgd",
            "QSGD (s=4, buckets of 512, all-gather)",
            ("--strategy", "qsgd", "--qsgd-levels", "4", "--qsgd-bucket", "512", "--server", "replicated"),
        ),
        Method(
            "mem_sgd",
            "MEM-SGD (top-1% + error feedback, all-gather)",
            ("--strategy", "mem_sgd", "--topk-ratio", "0.01", "--server", "replicated"),
        ),
        Method(
            "diana",
            "DIANA (inf-norm ternary/256 up, fp32 model down, rank 0)",
            ("--strategy", "diana", "--compressor-block", "256", "--server", "rank0"),
        ),
        Method(
            "dore",
            "DORE (inf-norm ternary/256 both ways, rank 0, theory rates)",
            (*_DORE_ARGS, "--dore-rates", "theory"),
        ),
        Method(
            "double_squeeze",
            "DoubleSqueeze (scaled sign/256 + EF both ways, rank 0)",
            ("--strategy", "double_squeeze", "--compressor-block", "256", "--server", "rank0"),
        ),
    )
}
# The extra rows of --paper-rates: the DORE paper's experiment settings (alpha 0.1, beta 1, eta 1; beta = 1
# is outside the theory's beta <= 1/(C+1)), DoubleResidualStrategy's defaults, spelled out, and DIANA with
# the same alpha. Not a per-method tuning: one fixed setting from the paper, labelled.
PAPER_RATES: dict[str, Method] = {
    "dore": Method(
        "dore_paper",
        "DORE (rank 0, paper rates alpha=0.1 beta=1 eta=1)",
        (*_DORE_ARGS, "--dore-alpha", "0.1", "--dore-beta", "1", "--dore-eta", "1"),
    ),
    "diana": Method(
        "diana_paper",
        "DIANA (rank 0, paper rate alpha=0.1)",
        (*METHODS["diana"].args, "--dore-alpha", "0.1"),
    ),
}


@dataclass(frozen=True)
class Workload:
    """One model and data set: a key (``--workloads``), a title, the runner of its script, and the
    script arguments of the model (besides the shared ones)."""

    key: str
    title: str
    runner: Callable[..., dict[str, Any]]


WORKLOADS: dict[str, Workload] = {
    "digits": Workload("digits", "digits MLP (jobs/digits.py)", run_digits),
    "cnn": Workload(
        "cnn", "small CNN on synthetic 32x32x3 images (jobs/synthetic_cnn.py)", run_synthetic_cnn
    ),
}


@dataclass(frozen=True)
class LossCurve:
    """A run's trace smoothed by a trailing moving average: entry ``i`` is the mean training loss of the
    ``window`` steps ending at ``steps[i]``, with the mean (over the ranks) training-round bytes sent per
    rank by then. ``diverged_at``: the first step whose loss was not finite (the curve stops before it),
    ``None`` when every loss was finite."""

    steps: list[int]
    mean_bytes: list[float]
    loss: list[float]
    diverged_at: int | None = None

    @property
    def final_loss(self) -> float:
        """The last smoothed loss; NaN for a diverged run (its last finite value is not where it ended)."""
        return math.nan if self.diverged_at is not None or not self.loss else self.loss[-1]

    def first_at_or_below(self, target: float) -> int | None:
        """Index of the first entry whose smoothed loss is <= ``target``, or ``None``."""
        return next((i for i, loss in enumerate(self.loss) if loss <= target), None)


def build_methods(keys: Sequence[str], paper_rates: Sequence[str]) -> list[Method]:
    """The methods of ``keys`` in :data:`METHODS` order (the baseline always first, added if missing),
    each followed by its :data:`PAPER_RATES` row when its key is in ``paper_rates``.

    Raises:
        ValueError: an unknown key, or a paper-rates key without its method.
    """
    unknown = [key for key in keys if key not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for key in paper_rates:
        if key not in PAPER_RATES:
            raise ValueError(f"no paper rates for {key!r}; choose from {list(PAPER_RATES)}")
        if key not in keys:
            raise ValueError(f"--paper-rates {key} needs method {key} in --methods")
    chosen = {BASELINE, *keys}
    methods: list[Method] = []
    for key, method in METHODS.items():
        if key in chosen:
            methods.append(method)
            if key in paper_rates:
                methods.append(PAPER_RATES[key])
    return methods


def loss_curve(trace: Sequence[dict[str, Any]], window: int) -> LossCurve:
    """The :class:`LossCurve` of a ``--trace`` trace; each value sits at the *last* step of its window
    (causal), so the curve starts at step ``window``. Bytes are the rows' ``mean_round_bytes_sent``
    (every rank's counts, gathered after fit), falling back to rank 0's ``round_bytes_sent``. A row
    without a loss (``benchmarks.jobs.digits`` writes a NaN or inf loss as ``null``) ends the curve there.

    Raises:
        ValueError: ``window`` < 1.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    bad = next((i for i, row in enumerate(trace) if row["loss"] is None), None)
    finite = trace if bad is None else trace[:bad]
    tail = finite[window - 1 :]
    return LossCurve(
        steps=[int(row["step"]) for row in tail],
        mean_bytes=[float(row.get("mean_round_bytes_sent", row["round_bytes_sent"])) for row in tail],
        loss=moving_average([float(row["loss"]) for row in finite], window) if tail else [],
        diverged_at=None if bad is None else int(trace[bad]["step"]),
    )


def first_reaching(
    val_trace: Sequence[dict[str, Any]], target_acc: float, trace: Sequence[dict[str, Any]]
) -> tuple[int, float] | None:
    """Step and mean bytes per rank of the first validation whose accuracy is >= ``target_acc``, looked up
    in ``trace`` (the step's row); ``None`` when no validation got there."""
    by_step = {int(row["step"]): row for row in trace}
    for row in val_trace:
        if row["val_acc"] is not None and row["val_acc"] >= target_acc:
            step = int(row["step"])
            traced = by_step[step]
            return step, float(traced.get("mean_round_bytes_sent", traced["round_bytes_sent"]))
    return None


def measure(
    run: dict[str, Any], curve: LossCurve, target_loss: float, target_acc: float | None
) -> dict[str, Any]:
    """One run's figures for the tables (``target_loss``/``target_acc``: DDP's final smoothed loss and
    final validation accuracy minus the slack; ``None`` figures where a target was never reached)."""
    steps = int(run["steps"])
    mean_bytes = float(run["mean_round_bytes_sent_per_rank"])
    hit = curve.first_at_or_below(target_loss)
    acc_hit = (
        None
        if target_acc is None or not run.get("val_trace")
        else first_reaching(run["val_trace"], target_acc, run["trace"])
    )
    return {
        "steps": steps,
        "mean_bytes": mean_bytes,
        "bytes_per_step": mean_bytes / steps if steps else math.nan,
        "max_bytes": float(run["max_round_bytes_sent_per_rank"]),
        "final_smoothed_loss": curve.final_loss,
        "diverged_at": curve.diverged_at,
        "final_val_acc": run["final_val_acc"],
        "steps_to_loss": None if hit is None else curve.steps[hit],
        "bytes_to_loss": None if hit is None else curve.mean_bytes[hit],
        "steps_to_acc": None if acc_hit is None else acc_hit[0],
        "bytes_to_acc": None if acc_hit is None else acc_hit[1],
        "train_loop_s": run["train_loop_s"],
    }


def summarize(label: str, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the median over the repeats of every figure; a target figure is ``None`` when most
    repeats never reached it (bytes and losses repeat exactly for a seeded run; times do not)."""
    row: dict[str, Any] = {"label": label, "repeats": len(measured), "error": None}
    for key in measured[0]:
        values = [m[key] for m in measured]
        reached = [v for v in values if v is not None]
        row[key] = statistics.median(reached) if len(reached) * 2 > len(values) else None
    return row


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or not baseline:
        return "-"
    return f"{value / baseline:.4f}"


def _saving(value: float | None, baseline: float | None) -> str:
    """``1 - value / baseline`` as a percentage: how much less than the baseline was sent."""
    if value is None or not baseline:
        return "-"
    return f"{100 * (1 - value / baseline):.1f}%"


def _to_target(steps: float | None, num_bytes: float | None) -> str:
    return (
        "not reached"
        if steps is None or num_bytes is None
        else f"{steps:.0f} steps, {format_bytes(num_bytes)}"
    )


def ladder_table(labels: Sequence[str], curves: dict[str, list[LossCurve]], targets: Sequence[float]) -> str:
    """For every method and loss target: the steps and bytes per rank until the smoothed loss first
    reached it, and the saving against the first method (SGD) at the same target; the median over the
    repeats, ``not reached`` where most repeats never got there (or the method has no curve)."""

    def hit(curve: LossCurve, target: float) -> tuple[float, float] | None:
        index = curve.first_at_or_below(target)
        return None if index is None else (float(curve.steps[index]), curve.mean_bytes[index])

    def median_hit(label: str, target: float) -> tuple[float, float] | None:
        hits = [hit(curve, target) for curve in curves.get(label, [])]
        reached = [h for h in hits if h is not None]
        if not hits or len(reached) * 2 <= len(hits):
            return None
        return statistics.median(h[0] for h in reached), statistics.median(h[1] for h in reached)

    baseline = labels[0]
    rows = []
    for label in labels:
        if not curves.get(label):  # every run of it failed (see the main table)
            rows.append([label, *("run failed" for _ in targets)])
            continue
        cells = [label]
        for target in targets:
            mine, base = median_hit(label, target), median_hit(baseline, target)
            if mine is None:
                cells.append("not reached")
                continue
            saving = "" if base is None or label == baseline else f" ({_saving(mine[1], base[1])} less)"
            cells.append(f"{mine[0]:.0f} steps, {format_bytes(mine[1])}{saving}")
        rows.append(cells)
    return markdown_table(["method", *(f"to loss {target:.4g}" for target in targets)], rows)


def claim_check(rows: list[dict[str, Any]], threshold: float = 0.95) -> str:
    """One sentence: which methods reached SGD's final loss, and SGD's accuracy, with at least
    ``threshold`` less communication than SGD needed to get there (``rows[0]`` is SGD)."""
    baseline = rows[0]

    def passing(bytes_key: str) -> list[str]:
        base = baseline.get(bytes_key)
        return [
            row["label"]
            for row in rows[1:]
            if not row.get("error")
            and row.get(bytes_key) is not None
            and base
            and row[bytes_key] <= (1 - threshold) * base
        ]

    def names(labels: list[str]) -> str:
        return "; ".join(labels) if labels else "none"

    percent = f"{100 * threshold:g}%"
    return (
        f"At least {percent} less communication than SGD to reach SGD's final training loss: "
        f"{names(passing('bytes_to_loss'))}. To reach SGD's final validation accuracy (minus the slack): "
        f"{names(passing('bytes_to_acc'))}."
    )


def results_table(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """Markdown table of the :func:`summarize` rows; ratios and savings are relative to ``baseline``."""
    headers = [
        "method",
        "bytes sent per rank (rounds, mean over ranks)",
        "per step",
        "ratio vs SGD",
        "busiest rank ratio",
        "final smoothed train loss",
        "val acc",
        "to SGD's final loss",
        "saving at SGD's final loss",
        "to SGD's final val acc",
        "saving at SGD's val acc",
        "train loop (s)",
    ]
    cells = []
    for row in rows:
        if row.get("error"):
            cells.append([row["label"], f"run failed: {row['error']}", *("-" for _ in headers[2:])])
            continue
        loss = f"{row['final_smoothed_loss']:.4f}"
        if row.get("diverged_at") is not None:
            loss = f"diverged (non-finite loss from step {row['diverged_at']:.0f})"
        cells.append(
            [
                row["label"],
                format_bytes(row["mean_bytes"]),
                format_bytes(row["bytes_per_step"]),
                _ratio(row["mean_bytes"], baseline["mean_bytes"]),
                _ratio(row["max_bytes"], baseline["max_bytes"]),
                loss,
                "-" if row["final_val_acc"] is None else f"{row['final_val_acc']:.4f}",
                _to_target(row["steps_to_loss"], row["bytes_to_loss"]),
                _saving(row["bytes_to_loss"], baseline["bytes_to_loss"]),
                _to_target(row["steps_to_acc"], row["bytes_to_acc"]),
                _saving(row["bytes_to_acc"], baseline["bytes_to_acc"]),
                f"{row['train_loop_s']:.1f}",
            ]
        )
    return markdown_table(headers, cells)


def plot_paths(out: Path, workload: str) -> dict[str, Path]:
    """Where the plots of ``workload`` for results file ``out`` go: next to it, named after both."""
    return {
        name: out.with_name(f"{out.stem}_{workload}_{name}.png")
        for name in ("loss_vs_bytes", "loss_vs_steps")
    }


def write_plots(
    curves: dict[str, LossCurve], title: str, window: int, out: Path, workload: str
) -> list[Path]:
    """Smoothed training loss vs bytes sent per rank (log x) and vs steps, one line per method (the
    baseline, the first entry, in black); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    paths = plot_paths(out, workload)
    panels: list[tuple[str, Callable[[LossCurve], list[float]], str, bool]] = [
        (
            "loss_vs_bytes",
            lambda c: c.mean_bytes,
            "bytes sent per rank in training rounds (mean over ranks)",
            True,
        ),
        ("loss_vs_steps", lambda c: [float(s) for s in c.steps], "optimizer steps", False),
    ]
    baseline = next(iter(curves))
    for name, xs_of, x_label, log_x in panels:
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, curve in curves.items():
            style = (
                {"color": "black", "linewidth": 2.0, "zorder": 3} if label == baseline else {"linewidth": 1.3}
            )
            ax.plot(xs_of(curve), curve.loss, label=label, **style)
        if log_x:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"training loss (rank 0, {window}-step moving average)")
        ax.set_title(title, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)
    return list(paths.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS), help="workloads to run"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"methods to run (default: all of {' '.join(METHODS)}; {BASELINE} always runs)",
    )
    parser.add_argument(
        "--paper-rates",
        nargs="*",
        default=["dore"],
        help="also run these methods with the DORE paper's experiment rates, as extra rows (default: dore;"
        " the flag alone: none)",
    )
    # Model, data and budget of the digits MLP; the CNN keeps its job's model and data defaults.
    add_training_args(parser, devices=2, max_steps=300)
    parser.add_argument(
        "--cnn-lr",
        type=float,
        default=0.02,
        help="learning rate of the CNN workload (its own default; lr 0.05 makes it blow up under plain SGD)",
    )
    parser.add_argument(
        "--wire",
        choices=("packed", "entropy"),
        default="packed",
        help="how the compressed methods' payloads travel: packed (fixed size) or entropy (entropy-coded;"
        " the same trajectories, fewer bytes)",
    )
    parser.add_argument("--window", type=int, default=25, help="steps in the loss moving average")
    parser.add_argument(
        "--val-every", type=int, default=50, help="validate every N steps (0: only at the end)"
    )
    parser.add_argument(
        "--acc-slack",
        type=float,
        default=0.01,
        help="a method reaches SGD's accuracy at SGD's final val acc minus this (default 0.01)",
    )
    parser.add_argument(
        "--loss-factors",
        type=float,
        nargs="*",
        default=[1.0, 2.0, 4.0],
        help="loss targets of the second table, as multiples of SGD's final smoothed loss (the flag alone:"
        " no second table)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<date>)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.devices < 2:
        parser.error(f"--devices must be >= 2 (one process has nobody to talk to), got {args.devices}")
    if not 1 <= args.window <= args.max_steps:
        parser.error(f"--window must be in [1, --max-steps={args.max_steps}], got {args.window}")
    if args.val_every < 0:
        parser.error(f"--val-every must be >= 0, got {args.val_every}")
    if any(not factor > 0 for factor in args.loss_factors):
        parser.error(f"--loss-factors must be > 0, got {args.loss_factors}")
    try:
        args.method_list = build_methods(args.methods, args.paper_rates)
    except ValueError as err:
        parser.error(str(err))
    return args


def _common_args(args: argparse.Namespace, workload: str) -> list[str]:
    """The arguments every run of ``workload`` shares: processes, budget, seed, trace, validation."""
    common = ["--devices", str(args.devices), "--trace", "--seed", str(args.seed)]
    common += ["--batch-size", str(args.batch_size), "--repeat", str(args.repeat_data)]
    # A huge epoch limit makes --max-steps the budget that binds, identically for every method.
    common += ["--max-steps", str(args.max_steps), "--epochs", "1000000"]
    if args.val_every:
        common += ["--val-every-steps", str(args.val_every)]
    if workload == "digits":
        common += ["--hidden", str(args.hidden), "--depth", str(args.depth), "--lr", str(args.lr)]
    else:
        common += ["--lr", str(args.cnn_lr)]
    return common


def _run_workload(args: argparse.Namespace, workload: Workload) -> dict[str, list[dict[str, Any]]]:
    """Every method's runs of one workload, by label (repeats round-robin over the methods, so a slow
    spell of the machine hits all of them rather than all the repeats of one). A failed run of a
    compressed method (they raise on a non-finite gradient) is kept as ``{"error": ...}`` so that the
    table says so; a failed baseline run raises :class:`JobError`."""
    methods: list[Method] = args.method_list
    runs: dict[str, list[dict[str, Any]]] = {method.label: [] for method in methods}
    common = _common_args(args, workload.key)
    for repeat in range(args.repeats):
        for method in methods:
            print(
                f"[{workload.key}: {method.label}] run {repeat + 1}/{args.repeats} ...",
                file=sys.stderr,
                flush=True,
            )
            try:
                wire = [] if method.key == BASELINE else ["--wire", args.wire]
                run_args = [*method.args, *wire, *common]
                runs[method.label].append(workload.runner(run_args, timeout_s=args.timeout))
            except JobError as err:
                if method.key == BASELINE:
                    raise
                print(f"bench: the {method.label} run failed: {err}", file=sys.stderr)
                runs[method.label].append({"error": _failure(str(err))})
    return runs


def _failure(message: str) -> str:
    """The gist of a failed run for a table cell: the last line of its stderr that names an error."""
    lines = [line.strip() for line in message.splitlines() if "Error" in line]
    return (lines[-1] if lines else message.splitlines()[0])[:200].replace("|", "/")


def _section(
    args: argparse.Namespace, workload: Workload, runs: dict[str, list[dict[str, Any]]], out: Path
) -> tuple[str, list[Path]]:
    """The results-file section of one workload (setup, table) and its plots."""
    done = {label: [run for run in runs[label] if "error" not in run] for label in runs}
    curves = {label: [loss_curve(run["trace"], args.window) for run in done[label]] for label in runs}
    baseline_label = next(iter(runs))
    base_runs, base_curves = done[baseline_label], curves[baseline_label]
    target_loss = statistics.median(curve.final_loss for curve in base_curves)
    if math.isnan(target_loss):
        raise ValueError("the SGD baseline diverged: no target loss; lower the learning rate")
    base_acc = statistics.median(run["final_val_acc"] for run in base_runs)
    target_acc = None if base_acc is None else base_acc - args.acc_slack
    rows = []
    for label in runs:
        if not done[label]:
            rows.append({"label": label, "error": runs[label][0]["error"]})
            continue
        measured = [
            measure(run, curve, target_loss, target_acc) for run, curve in zip(done[label], curves[label])
        ]
        rows.append(summarize(label, measured))
    table = results_table(rows, rows[0])
    first = base_runs[0]
    config = first["config"]
    if workload.key == "digits":
        model = f"MLP, hidden {config['hidden']}, depth {config['depth']}, on scikit-learn's 8x8 digits"
    else:
        model = (
            f"CNN, {config['depth']} conv blocks from width {config['width']}, hidden {config['hidden']}, on"
            f" {config['train_size']} synthetic 32x32x3 images (noise {config['noise']}, shifts up to"
            f" {config['max_shift']} px; {config['val_size']} for validation)"
        )
    lines = [
        f"## {workload.title}",
        "",
        f"- model: {model}; {first['num_params']:,} parameters (fp32: {format_bytes(4 * first['num_params'])}"
        " per gradient)",
        f"- {args.devices} CPU processes (gloo), {first['steps']} optimizer steps per run, batch"
        f" {config['batch_size']} per process, SGD with momentum 0.9, constant lr {config['lr']} for every"
        f" method; median of {args.repeats} run(s)",
        f"- targets: SGD's final smoothed training loss {target_loss:.4f}; SGD's final val acc"
        f" {'-' if base_acc is None else f'{base_acc:.4f}'} minus {args.acc_slack:g}"
        f" (validations every {args.val_every} steps)",
        "",
        table,
        "",
        claim_check(rows),
    ]
    if args.loss_factors:
        targets = [factor * target_loss for factor in args.loss_factors]
        lines += [
            "",
            "Steps and bytes per rank until the smoothed training loss first reached"
            f" {', '.join(f'{factor:g}x' for factor in args.loss_factors)} SGD's final smoothed loss"
            " (saving: against what SGD sent to reach the same loss):",
            "",
            ladder_table(list(runs), curves, targets),
        ]
    plots: list[Path] = []
    if args.plots:
        shown = {label: curves[label][0] for label in runs if curves[label] and curves[label][0].loss}
        plots = write_plots(shown, workload.title, args.window, out, workload.key)
    return "\n".join(lines), plots


def _report(
    args: argparse.Namespace,
    argv: list[str],
    sections: list[str],
    plots: list[Path],
    bench_s: float,
    date: datetime.date,
) -> str:
    """The results file: how it was produced (``argv``), when (``date``, the start: the file's name has
    it too), on what, the tables and how to read them."""
    command = " ".join(["python -m benchmarks.bench_compression", *argv])
    lines = [
        f"# Compressed communication vs SGD, {date.isoformat()}",
        "",
        f"- command: `{command}` ({bench_s / 60:.1f} min in all)",
        f"- machine: {machine_description()}",
        f"- wire format of the compressed methods: `{args.wire}`"
        + (
            " (entropy-coded messages: the trajectories are those of `packed`, bit for bit; the bytes are the"
            " coded messages', with their length headers)"
            if args.wire == "entropy"
            else " (the compressors' fixed-size payloads)"
        ),
        f"- loss: rank 0's training loss of each step (its own batch), trailing moving average over"
        f" {args.window} steps",
        "",
        *[section + "\n" for section in sections],
        "Bytes are payload bytes sent in training rounds (ledger tags `ddp_gradients` for SGD,"
        " `compressed_gradient`/`server_gradient` for QSGD, MEM-SGD and DoubleSqueeze, `dore_gradient`/"
        "`dore_model` for DIANA and DORE), exact, per rank, averaged over the ranks (every rank's counts are"
        " gathered after fit, outside the ledger): with `master=rank0` rank 0 only sends the model (DORE,"
        " DIANA) or the aggregate (DoubleSqueeze) down and the other ranks only their gradient payload up."
        " *Busiest rank*: the largest per-rank count, as a ratio to SGD's. Each compressed message carries"
        " one status byte (and rank 0's a verdict byte per rank), included. With 2 processes the ledger's"
        " payload convention is also what crosses each link: a ring all-reduce of n bytes sends"
        " 2(p-1)/p n = n, a gather or broadcast sends its payload to the one other rank; with more processes"
        " the all-reduce's wire bytes grow to 2(p-1)/p n and an all-gather forwards (p-1) payloads, which"
        " the payload counts do not show. *To SGD's final loss*: steps and bytes per rank until the"
        " method's smoothed training loss first reached SGD's final smoothed loss; *saving* compares those"
        " bytes with what SGD itself needed to first reach it. *To SGD's final val acc*: the first"
        " validation (every --val-every steps) at SGD's final accuracy minus the slack. Val acc: the model"
        " after fit (identical on every rank for all these methods). Times: one machine, loopback; they"
        " include the compressors' bit packing in Python and say nothing about a real network.",
        "",
        "How the methods use the optimizer, which matters for reading the rows: every compressed method"
        " hands the (decompressed) aggregate gradient to the user's SGD with momentum 0.9, so momentum acts"
        " *after* compression and error feedback (MEM-SGD's and DoubleSqueeze's memories hold gradients, not"
        " momentum-scaled updates). DORE moves its model estimate x_hat by beta times the compressed model"
        " step, so with beta < 1 (the theory rates' beta = 1/(C+1) = 2/(1+sqrt(256)) for blocks of 256) every"
        " step is shortened by about beta. The fixed-width wire formats bound the saving per step: 2 bits a"
        " value plus an fp32 norm per 256 values is 6.64% of fp32 (at most 93.4% less at equal steps), scaled"
        " sign 3.52%, top-1% 2.00% (index and value), QSGD with 4 levels 12.70%.",
    ]
    lines += plots_note(plots)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every workload and method, print the tables, write the results file and plots; returns the
    exit status."""
    args = parse_args(argv)
    if matplotlib_missing("bench_compression", args.plots):
        return 2
    started = time.perf_counter()
    # One date for the file's name and its title, even when the runs go past midnight.
    today = datetime.date.today()
    out = args.out or RESULTS_DIR / f"compression_{today.isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    plots: list[Path] = []
    for key in args.workloads:
        workload = WORKLOADS[key]
        try:
            runs = _run_workload(args, workload)
        except JobError as err:
            print(f"bench: a {key} run failed: {err}", file=sys.stderr)
            return 1
        try:
            section, workload_plots = _section(args, workload, runs, out)
        except ValueError as err:  # e.g. a diverged run: no finite loss to smooth
            print(f"bench: cannot summarise the {key} runs: {err}", file=sys.stderr)
            return 1
        sections.append(section)
        plots += workload_plots
        print(section + "\n")
    argv_used = sys.argv[1:] if argv is None else argv
    bench_s = time.perf_counter() - started
    out.write_text(_report(args, argv_used, sections, plots, bench_s, today))
    print(f"\n{bench_s:.0f} s in all", file=sys.stderr)
    print(f"written to {out}" + "".join(f"\n           {path}" for path in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
