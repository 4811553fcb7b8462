"""DiLoCo on the emulated cluster: DDP, local SGD, DiLoCo (H in {8, 32, 128}) and Streaming DiLoCo (int4)
side by side, on a small byte-level transformer language model (``benchmarks/jobs/lm.py``: the running
interpreter's standard-library sources, nothing downloaded) and on ``bench_cluster``'s digits MLP, over a
rate-limited link (``100mbit``) and over an unlimited one (``loopback``: the same namespaces and veth
links without a ``tc`` limit, i.e. kernel memory copies as on ``lo``). Needs root (see
``emulated_cluster.py``).

For each link and workload it runs the compute floor once per workload (both nodes train alone, no process
group; the same for every link, so the first link's is reused), then every configuration once per seed,
one process per node, one intra-op thread per process, and records:

- the training loop's wall-clock (rank 0, ``on_train_start`` to the end of ``fit``, final sync included)
  and the whole job's (both processes, start to exit);
- payload bytes sent per rank and rounds from the ledger;
- the consensus model's final loss on (a fixed part of) the training set and on the validation set (digits:
  and validation accuracy);
- the training-loop time and the bytes rank 0 had sent when the rank-mean training loss, averaged over
  the last ``--window`` steps, first reaches DDP's final value of that same average (the target);
- PNGs: that averaged loss against training-loop time and against bytes sent;

and writes ``benchmarks/results/diloco_<date>.md`` and ``.json`` (rewritten after each link x workload, so an
interrupted run keeps what it finished).

    sudo python -m benchmarks.bench_diloco                                   # everything (~20 min)
    sudo python -m benchmarks.bench_diloco --rates 100mbit --workloads lm --configs ddp diloco_32
    sudo python -m benchmarks.bench_diloco --steps lm=384 digits=270 --seeds 0 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_cluster import _calibrate, _run_nodes, loss_cells, merge_seeds, smoothed
from benchmarks.emulated_cluster import ClusterUnavailable, EmulatedCluster, check_available
from benchmarks.results import json_safe, machine_description, markdown_table, matplotlib_missing, plots_note
from benchmarks.runner import REPO_ROOT

__all__ = [
    "DEFAULT_CONFIGS",
    "DEFAULT_STEPS",
    "WORKLOADS",
    "link_rate",
    "main",
    "parse_steps",
    "reach_target",
    "target_loss",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
WORKER = "benchmarks.jobs.lm"  # run as python -m, REPO_ROOT on PYTHONPATH
WORKLOADS = ("lm", "digits")
DEFAULT_STEPS = {"lm": 768, "digits": 512}
DEFAULT_CONFIGS = ["ddp", "local_sgd", "diloco_8", "diloco_32", "diloco_128", "streaming_diloco_int4"]
DEFAULT_RATES = ["100mbit", "loopback"]


def link_rate(rate: str) -> str | None:
    """The ``tc`` rate of a ``--rates`` entry: ``None`` (no limit) for ``loopback``."""
    return None if rate == "loopback" else rate


def parse_steps(values: list[str] | None, workloads: tuple[str, ...] = WORKLOADS) -> dict[str, int]:
    """``--steps``: one count for every workload (``["500"]``) or per workload (``["lm=768",
    "digits=512"]``; the others keep :data:`DEFAULT_STEPS`). Raises ValueError on anything else."""
    steps = {w: DEFAULT_STEPS[w] for w in workloads}
    for value in values or []:
        name, sep, count = value.rpartition("=")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--steps: {value!r} is not N or WORKLOAD=N with N >= 1")
        if not sep:
            steps = dict.fromkeys(steps, int(count))
        elif name in steps:
            steps[name] = int(count)
        else:
            raise ValueError(f"--steps: unknown workload {name!r} (choose from {', '.join(workloads)})")
    return steps


def target_loss(ddp_steps: list[list[float]], window: int) -> float:
    """DDP's final training loss, averaged over its last ``window`` steps (the target of the others)."""
    return smoothed([row[1] for row in ddp_steps], window)[-1]


def reach_target(steps: list[list[float]], target: float, window: int) -> tuple[float, float, int] | None:
    """(training-loop seconds, rank 0's bytes sent, step number from 1) at the first step where the
    ``window``-step trailing mean of the loss is <= ``target``; ``None`` when it never is. ``steps`` rows
    are [seconds, loss, bytes sent so far]."""
    losses = smoothed([row[1] for row in steps], window)
    for i, (row, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            return row[0], row[2], i + 1
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", nargs="+", default=DEFAULT_RATES, help="link rates (tc syntax) or loopback (no limit)"
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="configurations to run")
    parser.add_argument(
        "--steps",
        nargs="+",
        default=None,
        help=f"steps per rank: N for all, or WORKLOAD=N (default: {DEFAULT_STEPS})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per configuration")
    parser.add_argument("--window", type=int, default=32, help="steps in the loss moving average")
    parser.add_argument("--no-floor", action="store_true", help="skip the compute-floor runs")
    parser.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="target of the to-loss columns (default: DDP's final averaged loss in the same run)",
    )
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--lm-d-model", type=int, default=128)
    parser.add_argument("--lm-context", type=int, default=64)
    parser.add_argument("--lm-batch-size", type=int, default=16, help="sequences per process")
    parser.add_argument("--lm-lr", type=float, default=2e-3, help="AdamW lr (after 20 warm-up steps)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: diloco_<date>.md)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, int]:
    from benchmarks.jobs.lm import CONFIGS

    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error("--seeds must be distinct integers >= 0")
    if args.window < 1:
        parser.error("--window must be >= 1")
    try:
        return parse_steps(args.steps, tuple(args.workloads))
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def _model_args(workload: str, args: argparse.Namespace, steps: int) -> list[str]:
    out = ["--workload", workload, "--max-steps", str(steps), "--num-nodes", "2"]
    if workload == "lm":
        out += ["--layers", str(args.lm_layers), "--d-model", str(args.lm_d_model)]
        out += ["--context", str(args.lm_context), "--batch-size", str(args.lm_batch_size)]
        out += ["--lr", str(args.lm_lr)]
    return out


def _run_config(
    cluster: EmulatedCluster,
    workload: str,
    config: str,
    seed: int,
    port: int,
    args: argparse.Namespace,
    steps: int,
    logdir: Path,
    rate: str,
) -> dict[str, Any]:
    """One run: rank 0's JSON plus the job's wall-clock and link bytes. Raises RuntimeError on failure."""
    label = f"{rate}_{workload}_{config}_s{seed}"
    out = logdir / f"{label}.json"
    extra = ["--no-communication"] if config == "compute_floor" else ["--config", config]
    extra += ["--seed", str(seed), *_model_args(workload, args, steps)]

    def argv_for(node: int, copy: int) -> list[str]:
        target = out if node == 0 else out.with_suffix(f".node{node}.json")
        return [sys.executable, "-m", WORKER, *extra, "--json", str(target)]

    before = [cluster.interface_bytes(n)[1] for n in range(cluster.nodes)]
    print(f"[{rate}] {workload} {config} seed {seed} ...", file=sys.stderr, flush=True)
    wall = _run_nodes(cluster, argv_for, port, args.timeout, logdir, label)
    after = [cluster.interface_bytes(n)[1] for n in range(cluster.nodes)]
    row = json.loads(out.read_text())
    if config == "compute_floor":  # each node alone: the slower sets the floor
        other = json.loads(out.with_suffix(".node1.json").read_text())
        row["train_seconds"] = max(row["train_seconds"], other["train_seconds"])
        row.update(bytes_sent=0, bytes_received=0, rounds=0)
    row.setdefault("val_acc", math.nan)
    # rounded: a smaller JSON
    row["steps"] = [[round(t, 4), round(loss, 5), int(sent)] for t, loss, sent in row["steps"]]
    row.update(job_seconds=wall, link_tx=max(a - b for a, b in zip(after, before)))
    print(
        f"[{rate}] {workload} {config} seed {seed}: job {wall:.1f} s,"
        f" train loop {row['train_seconds']:.1f} s, {row['bytes_sent'] / 1e6:.1f} MB,"
        f" loss {row['train_loss']:.4f} / val {row['val_loss']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged = merge_seeds(runs)
    merged["val_loss"] = statistics.mean(r["val_loss"] for r in runs)
    return merged


def _table(
    rows: list[dict[str, Any]], floor: dict[str, Any] | None, window: int, target: float | None = None
) -> tuple[str, float | None]:
    """The section's markdown table and its target loss (``target``, else DDP's final averaged loss;
    ``None`` without either)."""
    by_config = {row["config"]: row for row in rows}
    ddp = by_config.get("ddp")
    if target is None and ddp:
        target = target_loss(ddp["steps"], window)
    ddp_reach = reach_target(ddp["steps"], target, window) if ddp and target is not None else None
    digits = rows and rows[0]["workload"] == "digits"
    headers = ["configuration", "train loop s", "job s", "loop / floor", "MB sent per rank", "rounds"]
    headers += ["train loss", "loss - DDP's (paired)", "val loss"] + (["val acc"] if digits else [])
    goal = f"{target:.3f}" if target is not None else "?"
    headers += [f"s to loss {goal}", f"MB to loss {goal}", "speed-up to target vs DDP"]
    cells = []
    for row in ([floor] if floor else []) + rows:
        reached = reach_target(row["steps"], target, window) if target is not None else None
        ratio = "-"
        if reached and ddp_reach and row is not floor:
            ratio = f"{ddp_reach[0] / reached[0]:.1f}x" if reached[0] > 0 else "-"
        loss, paired = loss_cells(row, ddp)
        when = "-" if target is None else "not reached"
        if reached is not None:
            when = f"{reached[0]:.1f} (step {reached[2]})"
        cells.append(
            [
                "compute floor (no process group)" if row is floor else f"`{row['config']}`",
                f"{row['train_seconds']:.1f}",
                f"{row['job_seconds']:.1f}",
                f"{row['train_seconds'] / floor['train_seconds']:.2f}" if floor else "-",
                f"{row['bytes_sent'] / 1e6:.1f}" if row is not floor else "0",
                str(row["rounds"]) if row is not floor else "0",
                loss,
                paired,
                f"{row['val_loss']:.4f}",
                *([f"{row['val_acc']:.4f}"] if digits else []),
                when,
                "-" if reached is None or row is floor else f"{reached[1] / 1e6:.1f}",
                ratio,
            ]
        )
    return markdown_table(headers, cells), target


def _plots(
    stem: Path,
    workload: str,
    rate: str,
    rows: list[dict[str, Any]],
    floor: dict[str, Any] | None,
    window: int,
    target: float | None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, xlabel, suffix in (
        (0, "training-loop wall-clock (s)", "time"),
        (2, "MB sent by rank 0", "bytes"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, row in enumerate(rows + ([floor] if floor and axis == 0 else [])):
            xs = [s[axis] / (1e6 if axis == 2 else 1) for s in row["steps"]]
            style = {"label": row["config"], "color": f"C{i}"}  # the same colour in both plots
            if row is floor:
                style = {"label": "compute floor", "color": "black", "ls": "--"}
            ax.plot(xs, smoothed([s[1] for s in row["steps"]], window), lw=1.2, **style)
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label="DDP's final (target)")
        ax.set(xlabel=xlabel, ylabel=f"training loss (rank mean, {window}-step average)", yscale="log")
        if axis == 2:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
        ax.set_title(f"{workload}: 2 emulated nodes, {rate}")
        ax.legend(fontsize=8)
        path = Path(f"{stem}_{workload}_{rate}_loss_vs_{suffix}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = _check(parser, args)
    try:
        check_available()
    except ClusterUnavailable as err:
        print(f"bench_diloco: cannot emulate a cluster here: {err}", file=sys.stderr)
        return 2
    from benchmarks.jobs.lm import corpus_summary

    plots = not args.no_plots and not matplotlib_missing("bench_diloco", True)
    out = args.out or RESULTS_DIR / f"diloco_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    command = sys.argv[1:] if argv is None else argv
    corpus = corpus_summary() if "lm" in args.workloads else None
    sections: list[dict[str, Any]] = []
    floors: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    port = 29800
    logdir = Path(tempfile.mkdtemp(prefix="bench_diloco_"))
    for rate in args.rates:
        with EmulatedCluster(nodes=2, rate=link_rate(rate)) as cluster:
            port += 1
            bandwidth = _calibrate(cluster, port, logdir)
            print(f"[{rate}] link: {bandwidth / 1e6:.2f} MB/s of all-reduce payload", file=sys.stderr)
            for workload in args.workloads:
                if workload not in floors and not args.no_floor:
                    port += 1
                    floor = _try_run(cluster, workload, "compute_floor", args.seeds[0], port, args, steps,
                                     logdir, rate, failures)  # fmt: skip
                    if floor is not None:
                        floors[workload] = {
                            **floor,
                            "measured_on": rate,
                            "train_losses": [floor["train_loss"]],
                        }
                rows = []
                for config in args.configs:
                    runs = []
                    for seed in args.seeds:
                        port += 1
                        run = _try_run(
                            cluster, workload, config, seed, port, args, steps, logdir, rate, failures
                        )
                        if run is None:
                            break
                        runs.append(run)
                    else:
                        rows.append(_merge(runs))
                sections.append(
                    _section(stem, workload, rate, bandwidth, steps[workload], rows, floors, args, plots)
                )
                _write(out, args, command, steps, corpus, sections, failures)
    print(out.read_text())
    print(f"\nwritten to {out} and {out.with_suffix('.json')} (run logs in {logdir})", file=sys.stderr)
    return 1 if failures else 0


def _try_run(
    cluster: EmulatedCluster,
    workload: str,
    config: str,
    seed: int,
    port: int,
    args: argparse.Namespace,
    steps: dict[str, int],
    logdir: Path,
    rate: str,
    failures: list[str],
) -> dict[str, Any] | None:
    """:func:`_run_config`, or ``None`` with the failure noted in ``failures``."""
    try:
        return _run_config(cluster, workload, config, seed, port, args, steps[workload], logdir, rate)
    except RuntimeError as err:
        print(f"bench_diloco: {err}", file=sys.stderr)
        failures.append(f"{rate} {workload} {config} seed {seed}: {str(err).splitlines()[0]}")
        return None


def _section(
    stem: Path,
    workload: str,
    rate: str,
    bandwidth: float,
    steps: int,
    rows: list[dict[str, Any]],
    floors: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    plots: bool,
) -> dict[str, Any]:
    """One link x workload: its table, plots and rows."""
    floor = floors.get(workload)
    table, target = _table(rows, floor, args.window, args.target_loss)
    pngs = _plots(stem, workload, rate, rows, floor, args.window, target) if plots and rows else []
    return {
        "rate": rate,
        "workload": workload,
        "bandwidth": bandwidth,
        "steps": steps,
        "target": target,
        "table": table,
        "plots": [str(p) for p in pngs],
        "params": (rows or [floor or {}])[0].get("params"),
        "floor_measured_on": floor.get("measured_on") if floor else None,
        "rows": rows,
        "floor": floor,
    }


def _write(
    out: Path,
    args: argparse.Namespace,
    command: list[str],
    steps: dict[str, int],
    corpus: dict[str, Any] | None,
    sections: list[dict[str, Any]],
    failures: list[str],
) -> None:
    out.write_text(_report(args, command, steps, corpus, sections, failures))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"command": command, "settings": settings, "steps": steps, "corpus": corpus}
    payload.update(machine=machine_description(), sections=sections, failures=failures)
    out.with_suffix(".json").write_text(json.dumps(json_safe(payload)))


def _report(
    args: argparse.Namespace,
    command: list[str],
    steps: dict[str, int],
    corpus: dict[str, Any] | None,
    sections: list[dict[str, Any]],
    failures: list[str],
) -> str:
    from benchmarks.jobs.lm import CONFIGS, EVAL_WINDOWS

    lines = [
        f"# DiLoCo on the emulated cluster, {datetime.date.today().isoformat()}",
        "",
        f"- command: `python -m benchmarks.bench_diloco {' '.join(command)}`",
        f"- machine: {machine_description()}",
        "- 2 emulated nodes (network namespaces, veth + bridge; `tc tbf` on both ends for a rate,"
        " none for `loopback`), one process per node, one intra-op thread per process, gloo",
        f"- seeds: {' '.join(map(str, args.seeds))}; loss average over the last {args.window} steps",
    ]
    if "lm" in steps:
        lines.append(
            f"- lm: byte-level decoder-only transformer, {args.lm_layers} layers, d_model {args.lm_d_model},"
            f" 4 heads, context {args.lm_context}, vocabulary 256; batch {args.lm_batch_size} sequences per"
            f" process; inner AdamW lr {args.lm_lr} (20 warm-up steps, then constant), betas 0.9/0.95,"
            f" weight decay 0.1; {steps['lm']} steps per rank; train/val loss of the consensus model on"
            f" {EVAL_WINDOWS} evenly spaced windows of each split (nats per byte)"
        )
    if corpus:
        lines.append(
            f"- lm text: Python {corpus['python']}'s standard library (`{corpus['stdlib']}`), the first"
            f" {corpus['files']} `*.py` files in sorted path order (`{corpus['first_file']}` to"
            f" `{corpus['last_file']}`, no site-packages or test folders), every 10th file for validation:"
            f" {corpus['train_bytes']:,} training and {corpus['val_bytes']:,} validation bytes;"
            f" SHA-256 {corpus['sha256'][:16]}..."
        )
    if "digits" in steps:
        lines.append(
            "- digits: bench_cluster's MLP 2 x 1100 (1.29 M parameters) on scikit-learn digits (training set"
            f" x 6), batch 32 per process, inner SGD lr 0.05 momentum 0.9; {steps['digits']} steps per rank"
        )
    lines += ["", "Configurations:", "", *[f"- `{name}`: {CONFIGS[name]}" for name in args.configs], ""]
    for section in sections:
        floor_note = ""
        if section["floor_measured_on"] and section["floor_measured_on"] != section["rate"]:
            floor_note = f" (compute floor measured in the {section['floor_measured_on']} run: no link used)"
        params = f"{section['params']:,} parameters, " if section["params"] else ""
        lines += [
            f"## {section['workload']}, {section['rate']} ({params}{section['steps']} steps; measured link:"
            f" {section['bandwidth'] / 1e6:.2f} MB/s of all-reduce payload per direction){floor_note}",
            "",
            section["table"],
            *plots_note([Path(p) for p in section["plots"]]),
            "",
        ]
    goal = "DDP's final value of that average"
    if args.target_loss is not None:
        goal = f"{args.target_loss} (--target-loss)"
    lines += [
        "Columns: train loop s = rank 0 from `on_train_start` to the end of `fit` (final sync included);"
        " job s = both processes from start to exit; loop / floor = train loop over the compute floor's"
        " (both nodes training alone at once, no process group); MB sent per rank and rounds = rank 0's"
        " ledger; train / val loss = the consensus model after fit; s / MB to loss = training-loop time"
        f" and rank 0's bytes sent at the first step where the rank-mean training loss, averaged over the"
        f" last {args.window} steps, reaches {goal}; speed-up = DDP's time to"
        " that loss over the configuration's.",
        "",
    ]
    if failures:
        lines += ["Failed runs (no row):", "", *[f"- {line}" for line in failures], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
