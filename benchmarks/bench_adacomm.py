"""Benchmark AdaComm against constant communication periods: training loss vs wall-clock time and rounds.

Trains the digits MLP under ``LocalSGDStrategy`` with constant periods tau (default {1, 4, 16}) and with
AdaComm (Wang & Joshi 2019; default tau0=16, tau re-decided every 50 steps), every run in a fresh
subprocess with a per-step trace (``benchmarks.jobs.digits --trace``, run through ``benchmarks/runner.py``).
Each run's loss trace is smoothed by a trailing moving average; the *target* is the lowest smoothed loss
that any constant-tau run reached, and the table gives, for every run, the wall-clock time, rounds and
bytes at which its smoothed loss first got down to the target. The table and a verdict are printed and
written to ``benchmarks/results/adacomm_<date>.md``, with PNG plots next to it (loss vs time, loss vs
rounds, tau vs step). Usage::

    python -m benchmarks.bench_adacomm                        # tau in {1, 4, 16} and AdaComm(16, 50 steps)
    python -m benchmarks.bench_adacomm --repeats 3 --taus 1 8 \\
        --adacomm tau0=16,interval_steps=50 tau0=32,interval_s=2
    python -m benchmarks.bench_adacomm --adacomm              # constant periods only
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results import (
    format_bytes,
    machine_description,
    markdown_table,
    matplotlib_missing,
    plots_note,
)
from benchmarks.runner import REPO_ROOT, JobError, add_training_args, run_digits

__all__ = [
    "Curve",
    "RunConfig",
    "build_configs",
    "main",
    "measure",
    "moving_average",
    "parse_adacomm_spec",
    "parse_args",
    "results_table",
    "smooth_trace",
    "summarize",
    "verdict",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_ADACOMM = "tau0=16,interval_steps=50"
# The paper's headline (Wang & Joshi 2019): about 3x less wall-clock time than fully synchronous SGD
# for the same training loss. tau=1 local SGD (average every step) is our synchronous baseline.
PAPER_SPEEDUP = 3.0


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


# AdaComm options a --adacomm spec may set, and how to read each value; they map to benchmarks.jobs.digits
# flags in _adacomm_flags.
_ADACOMM_KEYS: dict[str, Callable[[str], Any]] = {
    "tau0": int,
    "interval_steps": int,
    "interval_s": float,
    "lr_aware": _parse_bool,
}


@dataclass(frozen=True)
class RunConfig:
    """One configuration: a label for tables and plots, the ``benchmarks.jobs.digits`` arguments of its
    period, and its constant ``tau`` (``None`` for an adaptive schedule)."""

    label: str
    args: tuple[str, ...]
    tau: int | None


@dataclass(frozen=True)
class Curve:
    """A run's smoothed trace: entry ``i`` is the step ``steps[i]``, at which the moving average of the
    loss over the ``window`` steps ending there is ``loss[i]``; time, rounds and bytes at that step."""

    steps: list[int]
    time_s: list[float]
    rounds: list[int]
    bytes_sent: list[int]
    loss: list[float]

    def first_at_or_below(self, target: float) -> int | None:
        """Index of the first entry whose smoothed loss is <= ``target``, or ``None``."""
        return next((i for i, loss in enumerate(self.loss) if loss <= target), None)


def parse_adacomm_spec(text: str) -> dict[str, Any]:
    """``"tau0=16,interval_steps=50"`` as a dict; keys: tau0, interval_steps, interval_s, lr_aware.

    Raises:
        argparse.ArgumentTypeError: unknown key, bad value, or both intervals given.
    """
    spec: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _ADACOMM_KEYS:
            raise argparse.ArgumentTypeError(
                f"bad AdaComm spec item {item!r}: expected KEY=VALUE with KEY in {sorted(_ADACOMM_KEYS)}"
            )
        try:
            spec[key] = _ADACOMM_KEYS[key](value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad value in AdaComm spec item {item!r}: {err}") from None
    if "interval_steps" in spec and "interval_s" in spec:
        raise argparse.ArgumentTypeError(
            f"AdaComm spec {text!r}: give interval_steps or interval_s, not both"
        )
    return spec


def _adacomm_flags(spec: dict[str, Any]) -> list[str]:
    """The digits job's arguments for one AdaComm spec (its defaults fill what the spec leaves out)."""
    flags = ["--schedule", "adacomm"]
    for key in ("tau0", "interval_steps", "interval_s"):
        if key in spec:
            flags += [f"--{key.replace('_', '-')}", str(spec[key])]
    if not spec.get("lr_aware", True):
        flags.append("--no-lr-aware")
    return flags


def _adacomm_label(spec: dict[str, Any]) -> str:
    return "AdaComm(" + ", ".join(f"{key}={value}" for key, value in spec.items()) + ")"


def build_configs(taus: Sequence[int], adacomm_specs: Sequence[dict[str, Any]]) -> list[RunConfig]:
    """Constant periods first (in the given order), then the AdaComm configurations."""
    configs = [RunConfig(f"tau={tau}", ("--tau", str(tau)), tau) for tau in taus]
    configs += [RunConfig(_adacomm_label(spec), tuple(_adacomm_flags(spec)), None) for spec in adacomm_specs]
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16], help="constant periods")
    parser.add_argument(
        "--adacomm",
        type=parse_adacomm_spec,
        nargs="*",
        default=[parse_adacomm_spec(DEFAULT_ADACOMM)],
        metavar="SPEC",
        help=f"AdaComm configurations, e.g. {DEFAULT_ADACOMM} or tau0=32,interval_s=2,lr_aware=0"
        f" (default: {DEFAULT_ADACOMM}; the flag alone: none)",
    )
    add_training_args(parser, devices=2, max_steps=600)
    parser.add_argument("--window", type=int, default=25, help="steps in the loss moving average")
    parser.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="smoothed loss to reach (default: the lowest smoothed loss of the constant-tau runs)",
    )
    parser.add_argument(
        "--ladder",
        type=float,
        nargs="*",
        default=[0.3, 0.1, 0.03, 0.01],
        help="more smoothed-loss targets for the time-to-loss table (the main one sits at the noise floor)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<date>)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if any(tau < 1 for tau in args.taus):
        parser.error(f"every --taus value must be >= 1, got {args.taus}")
    if not 1 <= args.window <= args.max_steps:
        parser.error(f"--window must be in [1, --max-steps={args.max_steps}], got {args.window}")
    return args


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over full windows: entry ``i`` is the mean of ``values[i : i + window]``,
    so the result has ``len(values) - window + 1`` entries (none when there are fewer values)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    running = math.fsum(values[: window - 1])
    for i in range(window - 1, len(values)):
        running += values[i]
        out.append(running / window)
        running -= values[i - window + 1]
    return out


def smooth_trace(trace: Sequence[dict[str, Any]], window: int) -> Curve:
    """The :class:`Curve` of a ``benchmarks.jobs.digits --trace`` trace. Each smoothed value is placed at the
    *last* step of its window, so "first reached at step s" only uses losses up to s (causal)."""
    if any(row["loss"] is None for row in trace):
        raise ValueError("the trace has steps without a loss; training_step must return the loss")
    tail = trace[window - 1 :]
    return Curve(
        steps=[row["step"] for row in tail],
        time_s=[row["time_s"] for row in tail],
        rounds=[row["rounds"] for row in tail],
        bytes_sent=[row["bytes_sent"] for row in tail],
        loss=moving_average([row["loss"] for row in trace], window),
    )


def measure(run: dict[str, Any], curve: Curve, target: float) -> dict[str, Any]:
    """One run's figures: where its smoothed loss first reached ``target`` (``inf`` if never) and its
    totals. Rounds are averaging rounds in the training loop; bytes are the ledger's (all of fit)."""
    hit = curve.first_at_or_below(target)
    last = run["trace"][-1]
    return {
        "reached": hit is not None,
        "steps_to_target": math.inf if hit is None else curve.steps[hit],
        "time_to_target": math.inf if hit is None else curve.time_s[hit],
        "rounds_to_target": math.inf if hit is None else curve.rounds[hit],
        "bytes_to_target": math.inf if hit is None else curve.bytes_sent[hit],
        "final_smoothed_loss": curve.loss[-1],
        "min_smoothed_loss": min(curve.loss),
        "train_loop_s": run["train_loop_s"],
        "rounds": last["rounds"],
        "bytes_sent": run["bytes_sent_per_rank"],
        "final_tau": last["tau"],
        "steps": run["steps"],
    }


def summarize(label: str, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every figure over the repeats of one configuration. A repeat that never reached the
    target counts as ``inf``, so a "to target" median is finite only when most repeats got there."""
    row: dict[str, Any] = {"label": label, "repeats": len(measured)}
    row["reached_count"] = sum(m["reached"] for m in measured)
    for key, value in measured[0].items():
        if key != "reached":
            row[key] = statistics.median(m[key] for m in measured) if value is not None else None
    return row


def _ratio(value: float, baseline: float) -> str:
    if math.isinf(value) or math.isinf(baseline) or not baseline:
        return "n/a"
    return f"{value / baseline:.3f}"


def _to_target(row: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    if math.isinf(row[key]):
        return "not reached"
    partial = row["reached_count"] < row["repeats"]
    return fmt(row[key]) + (f" ({row['reached_count']}/{row['repeats']} runs)" if partial else "")


def results_table(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """Markdown table of the ``summarize`` rows; time ratios are relative to ``baseline``'s row."""
    headers = [
        "run",
        "steps to target",
        "time to target (s)",
        f"time ratio vs {baseline['label']}",
        "rounds to target",
        "bytes to target",
        "final smoothed loss",
        "train loop (s)",
        "rounds",
        "bytes sent per rank",
        "final tau",
    ]
    cells = []
    for row in rows:
        cells.append(
            [
                row["label"],
                _to_target(row, "steps_to_target", lambda v: f"{v:.0f}"),
                _to_target(row, "time_to_target", lambda v: f"{v:.2f}"),
                _ratio(row["time_to_target"], baseline["time_to_target"]),
                _to_target(row, "rounds_to_target", lambda v: f"{v:.0f}"),
                _to_target(row, "bytes_to_target", format_bytes),
                f"{row['final_smoothed_loss']:.4f}",
                f"{row['train_loop_s']:.2f}",
                f"{row['rounds']:.0f}",
                format_bytes(row["bytes_sent"]),
                "-" if row["final_tau"] is None else f"{row['final_tau']:.0f}",
            ]
        )
    return markdown_table(headers, cells)


def verdict(row: dict[str, Any], constants: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """One sentence: did the adaptive run ``row`` reach the target in less time than every constant tau?"""
    fastest = min(constants, key=lambda r: r["time_to_target"])
    if math.isinf(row["time_to_target"]):
        return (
            f"{row['label']} did not reach the target within {row['steps']:.0f} steps"
            f" (its lowest smoothed loss: {row['min_smoothed_loss']:.4f})."
        )
    beats_all = all(row["time_to_target"] < r["time_to_target"] for r in constants)
    if math.isinf(fastest["time_to_target"]):  # only with --target-loss below every constant run
        head = (
            f"{row['label']} reached the target in {row['time_to_target']:.2f} s; no constant tau reached it"
        )
    elif beats_all:
        head = (
            f"{row['label']} reached the target in {row['time_to_target']:.2f} s, less time than every"
            f" constant tau (the fastest, {fastest['label']}, took {fastest['time_to_target']:.2f} s)"
        )
    else:
        head = (
            f"{row['label']} reached the target in {row['time_to_target']:.2f} s, not less than every"
            f" constant tau ({fastest['label']} took {fastest['time_to_target']:.2f} s)"
        )
    if math.isinf(baseline["time_to_target"]):
        return head + f"; {baseline['label']} never reached the target, so there is no ratio to it."
    ratio = row["time_to_target"] / baseline["time_to_target"]
    factor = f"{1 / ratio:.2f}x less time" if ratio < 1 else f"{ratio:.2f}x more time"
    if baseline["label"] == "tau=1":  # the paper's claim is against synchronous SGD only
        factor += (
            f"; the paper reports about {PAPER_SPEEDUP:.0f}x less than synchronous SGD for the same loss"
        )
    return head + f"; time ratio vs {baseline['label']}: {ratio:.3f} ({factor})."


def _representative(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median train loop time: the one a plot shows."""
    return sorted(runs, key=lambda run: run["train_loop_s"])[len(runs) // 2]


def plot_paths(out: Path) -> dict[str, Path]:
    """Where the plots of results file ``out`` go: next to it, named after it."""
    return {
        name: out.with_name(f"{out.stem}_{name}.png") for name in ("loss_vs_time", "loss_vs_rounds", "tau")
    }


# Plot styling: the adaptive runs stand out from the constant ones.
_LINE_WIDTH = {True: 2.2, False: 1.3}


def _plot_loss(
    ax: Any, curves: dict[str, Curve], adaptive: set[str], target: float, x_key: str, log_x: bool
) -> None:
    """Smoothed loss against ``x_key`` (a :class:`Curve` field) for every run, a dot where each first
    reached ``target``, and the target as a dashed line."""
    for label, curve in curves.items():
        xs = getattr(curve, x_key)
        # A log axis has no place for x = 0 (no round yet): those points are left out.
        keep = [i for i, x in enumerate(xs) if x > 0 or not log_x]
        (line,) = ax.plot(
            [xs[i] for i in keep],
            [curve.loss[i] for i in keep],
            label=label,
            linewidth=_LINE_WIDTH[label in adaptive],
        )
        hit = curve.first_at_or_below(target)
        if hit is not None and hit in keep:
            ax.plot(xs[hit], curve.loss[hit], "o", color=line.get_color())
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")


def _plot_tau(ax: Any, runs: dict[str, dict[str, Any]], adaptive: set[str]) -> None:
    """The period tau in force after every step, for every run."""
    from matplotlib.ticker import FuncFormatter

    for label, run in runs.items():
        trace = run["trace"]
        ax.plot(
            [row["step"] for row in trace],
            [row["tau"] for row in trace],
            label=label,
            drawstyle="steps-post",
            linewidth=_LINE_WIDTH[label in adaptive],
        )
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 16, not 2^4


def write_plots(
    runs: dict[str, dict[str, Any]],
    curves: dict[str, Curve],
    adaptive: set[str],
    target: float,
    window: int,
    out: Path,
) -> list[Path]:
    """Loss vs wall-clock time, loss vs rounds and tau vs step, one line per configuration (``runs``
    and ``curves``: its representative repeat; ``adaptive``: the labels drawn thicker); returns the
    files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    paths = plot_paths(out)
    loss_label = f"training loss (rank 0, {window}-step moving average)"
    panels: list[tuple[str, Callable[[Any], None], str, str]] = [
        (
            "loss_vs_time",
            lambda ax: _plot_loss(ax, curves, adaptive, target, "time_s", log_x=False),
            "wall-clock time in the training loop (s)",
            loss_label,
        ),
        (
            "loss_vs_rounds",
            lambda ax: _plot_loss(ax, curves, adaptive, target, "rounds", log_x=True),
            "averaging rounds",
            loss_label,
        ),
        ("tau", lambda ax: _plot_tau(ax, runs, adaptive), "optimizer step", "communication period tau"),
    ]
    for name, draw, x_label, y_label in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)
    return list(paths.values())


def ladder_table(
    runs: dict[str, list[dict[str, Any]]], curves: dict[str, list[Curve]], targets: list[float]
) -> str:
    """Median train-loop seconds until the smoothed loss first reaches each of ``targets``, per run
    ("-" where most repeats never got there), with the ratio to the first run (tau=1) in brackets."""
    times = {
        label: [
            statistics.median(
                measure(run, curve, t)["time_to_target"] for run, curve in zip(runs[label], curves[label])
            )
            for t in targets
        ]
        for label in runs
    }
    base = next(iter(times.values()))
    rows = [
        [label, *(("-" if math.isinf(v) else f"{v:.2f} ({_ratio(v, b)})") for v, b in zip(values, base))]
        for label, values in times.items()
    ]
    return markdown_table(["run", *(f"time to {t:g} (s)" for t in targets)], rows)


def _report(
    args: argparse.Namespace,
    argv: list[str],
    first_run: dict[str, Any],
    target_line: str,
    table: str,
    verdicts: list[str],
    plots: list[Path],
    ladder: str = "",
) -> str:
    """The results file: how it was produced (``argv``), on what, the target, the table and verdicts."""
    command = " ".join(["python -m benchmarks.bench_adacomm", *argv])
    lines = [
        f"# AdaComm vs constant communication periods, {datetime.date.today().isoformat()}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description()}",
        f"- model: MLP, hidden {args.hidden}, depth {args.depth}, {first_run['num_params']:,} parameters;"
        f" batch {args.batch_size} per process, SGD with momentum, constant lr {args.lr}",
        f"- {args.devices} CPU processes (gloo), local SGD with averaged momentum, {first_run['steps']}"
        f" optimizer steps per run, median of {args.repeats} run(s) per configuration",
        f"- loss: rank 0's training loss of each step, trailing moving average over {args.window} steps",
        f"- {target_line}",
        "",
        table,
        "",
        *verdicts,
        "",
        *(
            ["Time to intermediate losses (median s, ratio to the first run in brackets):", "", ladder, ""]
            if ladder
            else []
        ),
        "To target: the first step at which the smoothed loss is at or below the target, and the train"
        " loop time, averaging rounds and bytes sent per rank up to that step. All processes share one"
        " machine: collectives go over loopback, far faster than a real network, so the times say little"
        " about a cluster; see benchmarks/README.md.",
    ]
    lines += plots_note(plots)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table, write the results file and plots; returns the exit status."""
    args = parse_args(argv)
    # Checked before minutes of runs, not after them.
    if matplotlib_missing("bench_adacomm", args.plots):
        return 2
    common = ["--strategy", "local_sgd", "--devices", str(args.devices), "--trace"]
    common += ["--hidden", str(args.hidden), "--depth", str(args.depth), "--batch-size", str(args.batch_size)]
    common += ["--lr", str(args.lr), "--seed", str(args.seed), "--repeat", str(args.repeat_data)]
    # A huge epoch limit makes --max-steps the budget that binds, identically for every configuration.
    common += ["--max-steps", str(args.max_steps), "--epochs", "1000000"]
    configs = build_configs(args.taus, args.adacomm)

    # Repeats go round-robin over the configurations, so a slow spell of the machine hits all of them
    # rather than all the repeats of one.
    runs: dict[str, list[dict[str, Any]]] = {config.label: [] for config in configs}
    for repeat in range(args.repeats):
        for config in configs:
            print(f"[{config.label}] run {repeat + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            try:
                runs[config.label].append(run_digits([*config.args, *common], timeout_s=args.timeout))
            except JobError as err:
                print(f"bench: the {config.label} run failed: {err}", file=sys.stderr)
                return 1

    curves = {label: [smooth_trace(run["trace"], args.window) for run in runs[label]] for label in runs}
    constant_labels = [config.label for config in configs if config.tau is not None]
    if args.target_loss is not None:
        target = args.target_loss
        target_line = f"target: smoothed loss {target:.4f} (given with --target-loss)"
    else:
        # Per configuration the median over repeats of its lowest smoothed loss, so one lucky repeat
        # does not set a target its own configuration mostly misses.
        best = {label: statistics.median(min(c.loss) for c in curves[label]) for label in constant_labels}
        best_label = min(best, key=best.__getitem__)
        target = best[best_label]
        target_line = (
            f"target: smoothed loss {target:.4f}, the lowest that a constant-tau run reached ({best_label})"
        )

    rows = [
        summarize(label, [measure(run, curve, target) for run, curve in zip(runs[label], curves[label])])
        for label in runs
    ]
    constants = [row for row in rows if row["label"] in constant_labels]
    # The synchronous baseline: tau=1 (an average every step) when it ran, else the smallest tau.
    baseline = min(constants, key=lambda row: next(c.tau for c in configs if c.label == row["label"]))
    table = results_table(rows, baseline)
    verdicts = [verdict(row, constants, baseline) for row in rows if row["label"] not in constant_labels]

    out = args.out or RESULTS_DIR / f"adacomm_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if args.plots:
        representative = {label: _representative(runs[label]) for label in runs}
        plot_curves = {label: curves[label][runs[label].index(representative[label])] for label in runs}
        adaptive = {config.label for config in configs if config.tau is None}
        plots = write_plots(representative, plot_curves, adaptive, target, args.window, out)
    first_run = runs[configs[0].label][0]
    argv_used = sys.argv[1:] if argv is None else argv
    ladder = ladder_table(runs, curves, args.ladder) if args.ladder else ""
    out.write_text(_report(args, argv_used, first_run, target_line, table, verdicts, plots, ladder))
    print(target_line)
    print(table)
    print("\n" + ladder)
    print("\n".join(["", *verdicts]))
    print(f"\nwritten to {out}" + "".join(f"\n           {path}" for path in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
