"""Benchmark decentralized (gossip) SGD over several topologies against all-reduce averaging, at equal tau.

Trains the digits MLP on 4 CPU processes (default) with the same communication period tau for every
run: ``DecentralizedSGDStrategy`` gossiping over the ring, the 2-D torus (2x2 on 4 processes), the static
and the one-peer exponential graphs and the complete graph; ``LocalSGDStrategy`` (an exact all-reduce
average every tau steps) as the baseline; and ``ElasticAveragingStrategy`` (EASGD; ``--no-elastic`` leaves
it out). Every run is ``benchmarks.jobs.digits --trace`` in a fresh subprocess (through
``benchmarks/runner.py``). The table compares the rounds, the bytes each rank sent in training rounds
(as payload, and as an estimate of what goes on the wire, where a ring all-reduce of ``n`` bytes sends
``2 (p-1)/p n``), the final smoothed training loss and the validation accuracy of the consensus model. It
is printed and written to ``benchmarks/results/decentralized_<date>.md``, with PNG plots next to it (loss
vs rounds, loss vs bytes). Usage::

    python -m benchmarks.bench_decentralized                  # 4 processes, tau=4, all five topologies
    python -m benchmarks.bench_decentralized --tau 1 --topologies ring exponential --no-elastic
    python -m benchmarks.bench_decentralized --devices 9 --topologies ring torus --max-steps 300
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
from benchmarks.runner import REPO_ROOT, JobError, add_training_args, run_digits

__all__ = [
    "DEFAULT_TOPOLOGIES",
    "RunConfig",
    "SmoothedLoss",
    "build_configs",
    "ladder_table",
    "main",
    "parse_args",
    "results_table",
    "smoothed_loss",
    "summarize",
    "write_plots",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential", "complete")
BASELINE_LABEL = "all-reduce (local SGD)"
ELASTIC_LABEL = "elastic (EASGD)"


@dataclass(frozen=True)
class RunConfig:
    """One configuration: a label for tables and plots, its ``benchmarks.jobs.digits`` arguments, and its kind
    (``"gossip"``, ``"allreduce"`` for the baseline, or ``"elastic"``)."""

    label: str
    args: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class SmoothedLoss:
    """A run's trace smoothed by a trailing moving average: entry ``i`` is the mean loss of the
    ``window`` steps ending at ``steps[i]``, with the rounds and training-round bytes at that step."""

    steps: list[int]
    rounds: list[int]
    round_bytes: list[int]
    loss: list[float]

    def first_at_or_below(self, target: float) -> int | None:
        """Index of the first entry whose smoothed loss is <= ``target``, or ``None``."""
        return next((i for i, loss in enumerate(self.loss) if loss <= target), None)


def build_configs(
    topologies: Sequence[str], tau: int, gossip_momentum: str, elastic: bool, alpha: float | None
) -> list[RunConfig]:
    """The baseline first, then one gossip run per topology (in the given order), then EASGD."""
    period = ("--tau", str(tau))
    configs = [RunConfig(BASELINE_LABEL, ("--strategy", "local_sgd", *period), "allreduce")]
    configs += [
        RunConfig(
            f"gossip {topology}",
            ("--strategy", "gossip", "--topology", topology, "--gossip-momentum", gossip_momentum, *period),
            "gossip",
        )
        for topology in topologies
    ]
    if elastic:
        alpha_args = () if alpha is None else ("--alpha", str(alpha))
        configs.append(RunConfig(ELASTIC_LABEL, ("--strategy", "elastic", *alpha_args, *period), "elastic"))
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--topologies",
        nargs="+",
        default=list(DEFAULT_TOPOLOGIES),
        help=f"gossip graphs to run (default: {' '.join(DEFAULT_TOPOLOGIES)}; star works too)",
    )
    parser.add_argument(
        "--tau", type=int, default=4, help="local steps between rounds, the same for all runs"
    )
    parser.add_argument(
        "--gossip-momentum",
        choices=("average", "local"),
        default="average",
        help="gossip: mix the momentum buffers with the models (as the baseline averages them) or not",
    )
    parser.add_argument("--no-elastic", dest="elastic", action="store_false", help="leave EASGD out")
    parser.add_argument("--alpha", type=float, default=None, help="EASGD's moving rate (default 2/(m+2))")
    add_training_args(parser, devices=4, max_steps=600)
    parser.add_argument("--window", type=int, default=25, help="steps in the loss moving average")
    parser.add_argument(
        "--ladder",
        type=float,
        nargs="*",
        default=[0.3, 0.1, 0.03, 0.01],
        help="smoothed-loss targets for the second table: rounds and bytes until each is first reached"
        " (the flag alone: no second table)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<date>)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.tau < 1:
        parser.error(f"--tau must be >= 1, got {args.tau}")
    if args.devices < 2:
        parser.error(f"--devices must be >= 2 (one process has nobody to talk to), got {args.devices}")
    if not 1 <= args.window <= args.max_steps:
        parser.error(f"--window must be in [1, --max-steps={args.max_steps}], got {args.window}")
    # The package's own checks, here rather than after minutes of runs: a torus needs a square world
    # size, alpha a stable range that depends on it.
    from lightning_commsgd import make_topology
    from lightning_commsgd.algorithms.elastic import validate_alpha

    for topology in args.topologies:
        try:
            make_topology(topology, args.devices)
        except (TypeError, ValueError) as err:
            parser.error(f"--topologies {topology} with --devices {args.devices}: {err}")
    if args.elastic:
        try:
            validate_alpha(args.alpha, args.devices)
        except (TypeError, ValueError) as err:
            parser.error(f"--alpha: {err}")
    return args


def smoothed_loss(trace: Sequence[dict[str, Any]], window: int) -> SmoothedLoss:
    """The :class:`SmoothedLoss` of a ``benchmarks.jobs.digits --trace`` trace; each value sits at the *last*
    step of its window (causal), so the curve starts at step ``window``."""
    if any(row["loss"] is None for row in trace):
        raise ValueError("the trace has steps without a loss; training_step must return the loss")
    tail = trace[window - 1 :]
    return SmoothedLoss(
        steps=[row["step"] for row in tail],
        rounds=[row["rounds"] for row in tail],
        round_bytes=[row["round_bytes_sent"] for row in tail],
        loss=moving_average([row["loss"] for row in trace], window),
    )


def _zeta(run: dict[str, Any], kind: str) -> float:
    """How much one round contracts the models towards their average: the topology's zeta for gossip,
    0 for the exact average, and for EASGD that of its (m+1)x(m+1) matrix W_alpha,
    ``max(|1 - alpha|, |1 - (m + 1) alpha|)`` (``m / (m + 2)`` at the default alpha)."""
    if kind == "gossip":
        return float(run["zeta"])
    if kind == "elastic":
        alpha, m = run["alpha"], run["devices"]
        return max(abs(1 - alpha), abs(1 - (m + 1) * alpha))
    return 0.0


def _measure(run: dict[str, Any], curve: SmoothedLoss, kind: str) -> dict[str, Any]:
    """One run's figures for the table."""
    round_stats = run["ledger"]["by_tag"].get(run["round_tag"], {})
    return {
        "rounds": int(round_stats.get("rounds", 0)),
        "round_bytes": run["round_bytes_sent_per_rank"],
        "round_wire_bytes": run["round_wire_bytes_estimate_per_rank"],
        "final_bytes": run["final_bytes_sent_per_rank"],
        "final_smoothed_loss": curve.loss[-1],
        "final_val_acc": run["final_val_acc"],
        "train_loop_s": run["train_loop_s"],
        "zeta": _zeta(run, kind),
        "peers": run["max_degree"],
    }


def summarize(label: str, kind: str, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the median over the repeats of every figure (bytes, rounds and losses repeat
    exactly for a seeded run; times do not)."""
    row: dict[str, Any] = {"label": label, "kind": kind, "repeats": len(measured)}
    for key, value in measured[0].items():
        row[key] = None if value is None else statistics.median(m[key] for m in measured)
    return row


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}" if baseline else "n/a"


def _peers(row: dict[str, Any], devices: int) -> str:
    """Whom one rank talks to per round."""
    if row["kind"] == "gossip":
        return f"{row['peers']:.0f}"
    return f"all {devices} (all-reduce)"


def results_table(rows: list[dict[str, Any]], baseline: dict[str, Any], devices: int) -> str:
    """Markdown table of the ``summarize`` rows; ratios and the loss gap are relative to ``baseline``."""
    headers = [
        "run",
        "peers per round",
        "zeta",
        "rounds",
        "round bytes sent per rank (payload)",
        "payload ratio vs all-reduce",
        "round bytes per rank (wire est.)",
        "wire ratio vs all-reduce",
        "final average bytes per rank",
        "final smoothed loss",
        "gap vs all-reduce",
        "val acc",
        "train loop (s)",
    ]
    cells = []
    for row in rows:
        cells.append(
            [
                row["label"],
                _peers(row, devices),
                f"{row['zeta']:.3f}",
                f"{row['rounds']:.0f}",
                format_bytes(row["round_bytes"]),
                _ratio(row["round_bytes"], baseline["round_bytes"]),
                format_bytes(row["round_wire_bytes"]),
                _ratio(row["round_wire_bytes"], baseline["round_wire_bytes"]),
                format_bytes(row["final_bytes"]),
                f"{row['final_smoothed_loss']:.4f}",
                f"{row['final_smoothed_loss'] - baseline['final_smoothed_loss']:+.4f}",
                f"{row['final_val_acc']:.4f}",
                f"{row['train_loop_s']:.2f}",
            ]
        )
    return markdown_table(headers, cells)


def _to_target(run: dict[str, Any], curve: SmoothedLoss, target: float) -> tuple[float, float, float]:
    """Rounds, payload bytes and wire-estimate bytes (training rounds, per rank) when the smoothed loss
    first reached ``target``; ``inf`` each when it never did. The wire estimate scales the payload by
    the run's own wire/payload ratio over the whole run (1 for gossip, 2(p-1)/p for an all-reduce)."""
    hit = curve.first_at_or_below(target)
    if hit is None:
        return math.inf, math.inf, math.inf
    payload = run["round_bytes_sent_per_rank"]
    wire_factor = run["round_wire_bytes_estimate_per_rank"] / payload if payload else 1.0
    return float(curve.rounds[hit]), float(curve.round_bytes[hit]), curve.round_bytes[hit] * wire_factor


def ladder_table(
    runs: dict[str, list[dict[str, Any]]], curves: dict[str, list[SmoothedLoss]], targets: Sequence[float]
) -> str:
    """For every run and target: the rounds and the bytes per rank (payload, and the wire estimate where
    it differs) spent in training rounds until the smoothed loss first reached the target; the median
    over repeats, ``-`` where most repeats never got there."""
    rows = []
    for label in runs:
        cells = [label]
        for target in targets:
            hits = [_to_target(run, curve, target) for run, curve in zip(runs[label], curves[label])]
            rounds, payload, wire = (statistics.median(values) for values in zip(*hits))
            if math.isinf(rounds):
                cells.append("-")
                continue
            cell = f"{rounds:.0f} rounds, {format_bytes(payload)}"
            if wire != payload:
                cell += f" (wire {format_bytes(wire)})"
            cells.append(cell)
        rows.append(cells)
    return markdown_table(["run", *(f"to loss {target:g}" for target in targets)], rows)


def plot_paths(out: Path) -> dict[str, Path]:
    """Where the plots of results file ``out`` go: next to it, named after it."""
    return {name: out.with_name(f"{out.stem}_{name}.png") for name in ("loss_vs_rounds", "loss_vs_bytes")}


def _representative(runs: list[dict[str, Any]]) -> int:
    """Index of the repeat with the median train loop time: the one a plot shows."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["train_loop_s"])
    return order[len(order) // 2]


def write_plots(
    curves: dict[str, SmoothedLoss], kinds: dict[str, str], devices: int, window: int, out: Path
) -> list[Path]:
    """Smoothed loss vs rounds and vs training-round bytes per rank, one line per configuration (the
    baseline thicker; in the bytes plot a second, dashed baseline at its wire estimate); returns the
    files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    wire_factor = 2 * (devices - 1) / devices
    paths = plot_paths(out)
    panels: list[tuple[str, Callable[[SmoothedLoss], list[float]], str]] = [
        ("loss_vs_rounds", lambda c: [float(r) for r in c.rounds], "communication rounds"),
        ("loss_vs_bytes", lambda c: [b / 1e6 for b in c.round_bytes], "bytes sent per rank in rounds (MB)"),
    ]
    for name, xs_of, x_label in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, curve in curves.items():
            baseline = kinds[label] == "allreduce"
            # The baseline in black and on top: gossip over the complete graph is the same average and
            # would otherwise hide it.
            style = {"color": "black", "linewidth": 1.8, "zorder": 3} if baseline else {"linewidth": 1.2}
            ax.plot(
                xs_of(curve),
                curve.loss,
                label=label + (" (payload)" if baseline and name == "loss_vs_bytes" else ""),
                **style,
            )
            if baseline and name == "loss_vs_bytes":
                ax.plot(
                    [x * wire_factor for x in xs_of(curve)],
                    curve.loss,
                    linestyle="--",
                    label=f"{label} (ring wire est., x{wire_factor:.2f})",
                    **style,
                )
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"training loss (rank 0, {window}-step moving average)")
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
    ladder: str,
    plots: list[Path],
    bench_s: float,
) -> str:
    """The results file: how it was produced (``argv``), on what, the table and how to read it."""
    command = " ".join(["python -m benchmarks.bench_decentralized", *argv])
    p = args.devices
    lines = [
        f"# Decentralized SGD (gossip) vs all-reduce averaging, {datetime.date.today().isoformat()}",
        "",
        f"- command: `{command}` ({bench_s / 60:.1f} min in all)",
        f"- machine: {machine_description()}",
        f"- model: MLP, hidden {args.hidden}, depth {args.depth}, {first_run['num_params']:,} parameters;"
        f" batch {args.batch_size} per process, SGD with momentum, constant lr {args.lr}",
        f"- {p} CPU processes (gloo), {first_run['steps']} optimizer steps per run, a round every"
        f" tau={args.tau} steps for every run, median of {args.repeats} run(s) per configuration",
        f"- gossip: DecentralizedSGDStrategy, Metropolis weights, momentum `{args.gossip_momentum}`, one"
        " exact all-reduce average at the end of fit; all-reduce: LocalSGDStrategy (parameters and"
        " momentum averaged); elastic: ElasticAveragingStrategy (momentum local, alpha"
        f" {'2/(m+2)' if args.alpha is None else args.alpha})",
        f"- loss: rank 0's training loss of each step (its own replica and batch), trailing moving average"
        f" over {args.window} steps",
        "",
        table,
        "",
        "Bytes are per rank and count the training rounds only (ledger tag `average`, `gossip` or"
        " `elastic`); the end-of-fit average is its own column, the initial broadcast and Lightning's"
        " reductions are left out. *Payload* is the ledger's convention: an all-reduce of n bytes counts"
        f" n, a gossip round sends n to each peer. On the wire a ring all-reduce sends 2(p-1)/p n ="
        f" {2 * (p - 1) / p:.2f} n per rank, point-to-point messages exactly n: the *wire est.* columns"
        " compare on that footing. zeta: how much one round (one cycle of the time-varying one-peer"
        " graph) contracts the models towards their average; 0 is the exact average. Gap: final smoothed"
        " loss minus the all-reduce run's. Val acc: the consensus model after fit (every rank holds it)."
        " All processes share one machine and talk over loopback, so the times say little about a"
        " cluster; see benchmarks/README.md.",
    ]
    if ladder:
        lines += [
            "",
            "Rounds and bytes sent per rank in training rounds until the smoothed loss first reached each"
            " target (wire estimate in brackets where it differs from the payload):",
            "",
            ladder,
        ]
    lines += plots_note(plots)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table, write the results file and plots; returns the exit status."""
    args = parse_args(argv)
    if matplotlib_missing("bench_decentralized", args.plots):
        return 2
    started = time.perf_counter()
    common = ["--devices", str(args.devices), "--trace"]
    common += ["--hidden", str(args.hidden), "--depth", str(args.depth), "--batch-size", str(args.batch_size)]
    common += ["--lr", str(args.lr), "--seed", str(args.seed), "--repeat", str(args.repeat_data)]
    # A huge epoch limit makes --max-steps the budget that binds, identically for every configuration.
    common += ["--max-steps", str(args.max_steps), "--epochs", "1000000"]
    configs = build_configs(args.topologies, args.tau, args.gossip_momentum, args.elastic, args.alpha)

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

    kinds = {config.label: config.kind for config in configs}
    curves = {label: [smoothed_loss(run["trace"], args.window) for run in runs[label]] for label in runs}
    rows = [
        summarize(
            label,
            kinds[label],
            [_measure(run, curve, kinds[label]) for run, curve in zip(runs[label], curves[label])],
        )
        for label in runs
    ]
    baseline = rows[0]
    table = results_table(rows, baseline, args.devices)

    out = args.out or RESULTS_DIR / f"decentralized_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if args.plots:
        shown = {label: curves[label][_representative(runs[label])] for label in runs}
        plots = write_plots(shown, kinds, args.devices, args.window, out)
    argv_used = sys.argv[1:] if argv is None else argv
    bench_s = time.perf_counter() - started
    ladder = ladder_table(runs, curves, args.ladder) if args.ladder else ""
    out.write_text(_report(args, argv_used, runs[configs[0].label][0], table, ladder, plots, bench_s))
    print(table)
    if ladder:
        print("\n" + ladder)
    print(f"\n{bench_s:.0f} s in all", file=sys.stderr)
    print(f"written to {out}" + "".join(f"\n           {path}" for path in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
