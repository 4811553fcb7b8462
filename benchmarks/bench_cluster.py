"""Emulated-cluster benchmark: the same model, data and step budget under Lightning's DDPStrategy, Lightning's
post-local SGD, and this package's strategies, with one process per emulated node and every byte between
nodes crossing a rate-limited link (see ``emulated_cluster.py``; needs root).

For each link rate it first measures the link (a timed fp32 all-reduce between the namespaces: payload
bytes per second per direction, B) and the compute floor (each node trains alone, same steps, no process
group), then runs each configuration once per seed (``--seeds``; the table shows means over the seeds) and
records:

- wall-clock of the whole job (process start to exit, both nodes) and of the training loop (rank 0,
  ``on_train_start`` to the end of ``fit``);
- the analytic prediction floor + bytes / B (blocking) beside the measured training-loop time, and for the
  overlap strategies floor + rounds x max(0, bytes per round / B - tau x step time);
- payload bytes per rank from the ledger and, as a cross-check, bytes each node's link transmitted
  (``/proc/net/dev``: payload plus TCP/IP headers, rendezvous and the post-fit evaluation);
- training loss of the consensus model on the training set (with several seeds: mean +- standard
  deviation, and the mean +- standard error of its difference to DDP's loss with the same seed, since
  the seed moves every configuration's loss alike), its validation accuracy, and the training-loop time
  at which the smoothed (rank-mean) training loss first reaches the target (first seed);
- PNGs: training loss against wall-clock and against bytes sent.

    sudo python -m benchmarks.bench_cluster                        # 100mbit and 1gbit, every config
    sudo python -m benchmarks.bench_cluster --rates 100mbit --configs ddp local_sgd overlap_bf16
    sudo python -m benchmarks.bench_cluster --rates 1gbit --seeds 0 1 2 3 4   # final loss over 5 seeds
    sudo python -m benchmarks.bench_cluster --rates none 1gbit --configs dore   # + the link-free work
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.emulated_cluster import ClusterUnavailable, EmulatedCluster, check_available
from benchmarks.results import machine_description, markdown_table, matplotlib_missing, plots_note
from benchmarks.runner import REPO_ROOT

__all__ = [
    "DEFAULT_CONFIGS",
    "loss_cells",
    "main",
    "merge_seeds",
    "bound_seconds",
    "is_serial_chain",
    "predicted_seconds",
    "smoothed",
    "steps_per_epoch",
    "time_to_target",
]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
WORKER = "benchmarks.jobs.cluster_worker"  # run as python -m, REPO_ROOT on PYTHONPATH
DEFAULT_CONFIGS = [
    "ddp",
    "post_local_sgd",
    "local_sgd",
    "local_sgd_params",
    "local_sgd_bf16",
    "local_sgd_int8",
    "local_sgd_int4",
    "local_sgd_params_int4",
    "overlap",
    "overlap_bf16",
    "overlap_int8",
    "overlap_momentum_bf16",
    "overlap_momentum_int8",
    "overlap_momentum_int4",
    "overlap_cocod_bf16",
    "gossip",
    "elastic",
    "dore",
    "diana",
    "qsgd",
    "mem_sgd",
    "double_squeeze",
]
OVERLAP_CONFIGS = (
    "overlap",
    "overlap_bf16",
    "overlap_int8",
    "overlap_int4",
    "overlap_momentum_bf16",
    "overlap_momentum_int8",
    "overlap_momentum_int4",
    "overlap_cocod",
    "overlap_cocod_bf16",
)
# gather up to rank 0, then broadcast down: the two directions follow each other on the link
SERIAL_CHAIN_CONFIGS = ("dore", "diana", "double_squeeze")
FREE_LINK = "none"  # --rates none: no tbf (the bare veth), to measure what the link does not cost


def is_serial_chain(config: str) -> bool:
    """Whether ``config`` sends its bytes up and down one after the other every step (a master on rank 0:
    gather, then broadcast), so that both directions' wire time adds, instead of the full-duplex
    all-reduce / all-gather whose directions overlap."""
    return config.removesuffix("_entropy") in SERIAL_CHAIN_CONFIGS


# a timed all-reduce between the namespaces: bytes per second of payload per direction
_CALIBRATE = """
import sys, time, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{sys.argv[3]}:{sys.argv[4]}", rank=int(sys.argv[1]),
                        world_size=int(sys.argv[2]))
x = torch.ones(2_000_000)
dist.all_reduce(torch.ones(10))
start = time.perf_counter()
for _ in range(3):
    dist.all_reduce(x)
seconds = (time.perf_counter() - start) / 3
if int(sys.argv[1]) == 0:
    print(x.numel() * 4 * 2 * (int(sys.argv[2]) - 1) / int(sys.argv[2]) / seconds)
dist.destroy_process_group()
"""


def steps_per_epoch(train_samples: int, nodes: int, batch_size: int) -> int:
    """Batches per rank per epoch under Lightning's DistributedSampler (padded, no drop_last)."""
    return math.ceil(math.ceil(train_samples / nodes) / batch_size)


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def time_to_target(steps: list[list[float]], target: float, window: int) -> float | None:
    """First training-loop time at which the smoothed loss is <= ``target`` (``None``: never)."""
    losses = smoothed([row[1] for row in steps], window)
    return next((row[0] for row, loss in zip(steps, losses) if loss <= target), None)


def predicted_seconds(
    floor_s: float, row: dict[str, Any], bandwidth: float, tau: int, steps: int
) -> tuple[float, float | None]:
    """(blocking, overlapped) predictions: floor + bytes / B, and for the overlap strategies floor +
    rounds x max(0, bytes per round / B - tau x step time). Bytes: rank 0's larger direction, or both
    directions for a serial chain (:func:`is_serial_chain`)."""
    if is_serial_chain(row["config"]):
        moved = row["bytes_sent"] + row["bytes_received"]
    else:
        moved = max(row["bytes_sent"], row["bytes_received"])
    blocking = floor_s + moved / bandwidth
    if row["config"] not in OVERLAP_CONFIGS:
        return blocking, None
    stats = row["by_tag"].get("overlap_average")
    if not stats or not stats["rounds"]:
        return blocking, floor_s
    per_round = max(stats["bytes_sent"], stats["bytes_received"]) / stats["rounds"] / bandwidth
    hidden = tau * floor_s / steps
    rest = moved - max(stats["bytes_sent"], stats["bytes_received"])  # setup, final average
    return blocking, floor_s + stats["rounds"] * max(0.0, per_round - hidden) + rest / bandwidth


def bound_seconds(floor_s: float, row: dict[str, Any], bandwidth: float, tau: int, steps: int) -> float:
    """A configuration's bound: the compute floor plus the wire time it does not hide (the overlapped
    prediction where there is one, else the blocking one; see :func:`predicted_seconds`)."""
    blocking, overlapped = predicted_seconds(floor_s, row, bandwidth, tau, steps)
    return blocking if overlapped is None else overlapped


def cpu_breakdown(sections: list[dict[str, Any]], tau: int, steps: int) -> str | None:
    """A table of where each configuration's time beyond its bound goes, when ``--rates`` had
    :data:`FREE_LINK`: on the bare link a configuration's train loop minus its bound there is the work the
    link does not explain (codecs, residual arithmetic, copies, thread hand-offs, Lightning's per-step
    work, on the one core of a node); adding it to the bound at each shaped rate gives the CPU-inclusive
    bound the measured loop is compared with."""
    free = next((s for s in sections if s["rate"] == FREE_LINK), None)
    if free is None or len(sections) < 2:
        return None
    free_rows = {row["config"]: row for row in free["rows"]}
    free_floor = free_rows["compute_floor"]["train_seconds"]
    cells = []
    for section in sections:
        if section is free:
            continue
        floor = section["rows"][0]["train_seconds"]
        for row in section["rows"][1:]:
            free_row = free_rows.get(row["config"])
            if free_row is None:
                continue
            free_bound = bound_seconds(free_floor, free_row, free["bandwidth"], tau, steps)
            cpu = free_row["train_seconds"] - free_bound
            bound = bound_seconds(floor, row, section["bandwidth"], tau, steps)
            loop = row["train_seconds"]
            cells.append(
                [
                    row["config"],
                    section["rate"],
                    f"{loop:.1f}",
                    f"{bound:.1f}",
                    f"{loop / bound:.2f}",
                    f"{cpu:.1f}",
                    f"{bound + cpu:.1f}",
                    f"{loop / (bound + cpu):.2f}",
                ]
            )
    headers = [
        "configuration",
        "rate",
        "train loop s",
        "bound s (floor + unhidden wire)",
        "loop / bound",
        "beyond the bound on the bare link s",
        "bound + that s",
        "loop / (bound + that)",
    ]
    return markdown_table(headers, cells)


def merge_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's runs (one per seed, same order for every configuration) as one row: the first
    seed's row (its step trace, bytes, plots) with the mean times, loss and accuracy, and ``train_losses``,
    every seed's final training loss."""
    merged = dict(rows[0])
    for key in ("job_seconds", "train_seconds", "train_loss", "val_acc", "link_tx"):
        merged[key] = sum(row[key] for row in rows) / len(rows)
    merged["train_losses"] = [row["train_loss"] for row in rows]
    return merged


def loss_cells(row: dict[str, Any], ddp: dict[str, Any] | None) -> tuple[str, str]:
    """(final training loss, its paired difference to DDP's) as table cells: mean +- sd over the seeds, and
    mean +- standard error of (loss - DDP's loss) seed by seed ("-" with one seed or no DDP row)."""
    losses = row["train_losses"]
    if len(losses) == 1:
        return f"{losses[0]:.4f}", "-"
    loss = f"{statistics.mean(losses):.4f} +- {statistics.stdev(losses):.4f}"
    if ddp is None or row is ddp:
        return loss, "-"
    diffs = [a - b for a, b in zip(losses, ddp["train_losses"])]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return loss, f"{statistics.mean(diffs):+.4f} +- {stderr:.4f}"


def _worker_env(cluster: EmulatedCluster, node: int, port: int, devices: int) -> dict[str, str]:
    env = cluster.node_env(node, port=port)
    if devices > 1:  # Lightning starts the node's other ranks itself (and sets their ranks)
        env.pop("LOCAL_RANK")
        env.pop("WORLD_SIZE")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_nodes(
    cluster: EmulatedCluster,
    argv_for: Any,
    port: int,
    timeout: float,
    logdir: Path,
    label: str,
    devices: int = 1,
    copies: int = 1,
    extra_env: dict[str, str] | None = None,
) -> float:
    """Start ``copies`` processes per node (``argv_for(node, copy)``; Lightning adds the node's other
    ``devices - 1`` ranks itself; ``extra_env`` added to their environment), wait for all; returns the job's
    wall-clock. Raises on failure."""
    start = time.perf_counter()
    procs, logs = [], []
    for node in range(cluster.nodes):
        for copy in range(copies):
            log = open(logdir / f"{label}_node{node}_{copy}.log", "w")  # noqa: SIM115  (closed below)
            logs.append(log)
            env = {**_worker_env(cluster, node, port, devices), **(extra_env or {})}
            argv = argv_for(node, copy)
            procs.append(cluster.popen(node, argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = start + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"{label}: timed out after {timeout:.0f} s (logs in {logdir})") from None
    finally:
        for log in logs:
            log.close()
    wall = time.perf_counter() - start
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        node, copy = divmod(failed[0], copies)
        tail = (logdir / f"{label}_node{node}_{copy}.log").read_text().splitlines()[-25:]
        raise RuntimeError(
            f"{label}: process(es) {failed} failed; node {node}'s log ends:\n" + "\n".join(tail)
        )
    return wall


def run_script_on_nodes(cluster: EmulatedCluster, script: str, port: int, logdir: Path, label: str) -> str:
    """Run the Python ``script`` on every node (``argv``: node, nodes, node 0's address, port); node 0's
    output."""
    _run_nodes(
        cluster,
        lambda node, _copy: [
            sys.executable,
            "-c",
            script,
            str(node),
            str(cluster.nodes),
            cluster.address(0),
            str(port),
        ],
        port,
        120,
        logdir,
        label,
    )
    return (logdir / f"{label}_node0_0.log").read_text()


def _calibrate(cluster: EmulatedCluster, port: int, logdir: Path) -> float:
    return float(run_script_on_nodes(cluster, _CALIBRATE, port, logdir, "calibrate").strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["100mbit", "1gbit"],
        help="link rates (tc syntax); 'none': the bare link (no tbf), which adds a table of the work"
        " beyond each bound",
    )
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="configurations to run")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes")
    parser.add_argument("--devices", type=int, default=1, help="processes per node (hierarchical needs > 1)")
    parser.add_argument("--tau", type=int, default=8, help="period of the periodic strategies")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the step budget)")
    parser.add_argument("--repeat", type=int, default=6, help="copies of the digits training set per epoch")
    parser.add_argument("--hidden", type=int, default=1100, help="MLP width (1100 x 2: 1.29 M parameters)")
    parser.add_argument("--depth", type=int, default=2, help="MLP hidden layers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument(
        "--target-loss", type=float, default=None, help="loss for time-to-target (default: 1.1 x DDP's final)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds per configuration (model init and data order); several: mean times, loss mean +- sd"
        " and its paired difference to DDP",
    )
    parser.add_argument("--window", type=int, default=16, help="steps in the loss moving average")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument(
        "--out", type=Path, default=None, help="results file (default: results/cluster_<date>.md)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from benchmarks.jobs.cluster_worker import CONFIGS

    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    for name in ("nodes", "devices", "tau", "epochs", "repeat", "hidden", "batch_size", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.nodes < 2:
        parser.error("--nodes must be >= 2")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error("--seeds must be distinct integers >= 0")


def _train_samples(repeat: int) -> int:
    from examples.digits.data import DigitsDataModule

    data = DigitsDataModule(repeat=repeat)
    data.setup("fit")
    return len(data.train_dataset)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        check_available()
    except ClusterUnavailable as err:
        print(f"bench_cluster: cannot emulate a cluster here: {err}", file=sys.stderr)
        return 2
    plots = not args.no_plots and not matplotlib_missing("bench_cluster", True)
    world = args.nodes * args.devices
    steps = args.epochs * steps_per_epoch(_train_samples(args.repeat), world, args.batch_size)
    model_args = [
        "--hidden",
        str(args.hidden),
        "--depth",
        str(args.depth),
        "--batch-size",
        str(args.batch_size),
    ]
    model_args += ["--lr", str(args.lr), "--repeat", str(args.repeat), "--max-steps", str(steps)]
    model_args += ["--tau", str(args.tau), "--num-nodes", str(args.nodes), "--devices", str(args.devices)]
    sections, port, failures = [], 29700, []
    logdir = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    for rate in args.rates:
        with EmulatedCluster(nodes=args.nodes, rate=None if rate == FREE_LINK else rate) as cluster:
            port += 1
            bandwidth = _calibrate(cluster, port, logdir)
            print(
                f"[{rate}] link: {bandwidth / 1e6:.2f} MB/s of all-reduce payload",
                file=sys.stderr,
                flush=True,
            )
            rows = []
            for config in ["compute_floor", *args.configs]:
                runs = []
                for seed in args.seeds:
                    port += 1
                    try:
                        runs.append(_run_config(cluster, config, seed, port, args, model_args, logdir, rate))
                    except RuntimeError as err:
                        print(f"bench_cluster: {err}", file=sys.stderr)
                        if config == "compute_floor":  # every row is measured against it
                            return 1
                        failures.append(f"{rate} {config} seed {seed}: {str(err).splitlines()[0]}")
                        break
                else:
                    rows.append(merge_seeds(runs))
            sections.append(_section(args, rate, bandwidth, steps, rows, plots, logdir))
    report = _report(args, sys.argv[1:] if argv is None else argv, steps, sections)
    if failures:  # the others' rows stand; the failed runs are named with their logs
        report += "\nFailed runs (no row):\n\n" + "\n".join(f"- {line}" for line in failures) + "\n"
    out = args.out or RESULTS_DIR / f"cluster_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"\nwritten to {out} (run logs in {logdir})", file=sys.stderr)
    return 1 if failures else 0


def _run_config(
    cluster: EmulatedCluster,
    config: str,
    seed: int,
    port: int,
    args: argparse.Namespace,
    model_args: list[str],
    logdir: Path,
    rate: str,
) -> dict[str, Any]:
    """One run of ``config`` with ``seed`` on the cluster: rank 0's JSON plus job wall-clock and link bytes.
    Raises RuntimeError when a process fails or times out."""
    label = f"{rate}_{config}_s{seed}"
    out = logdir / f"{label}.json"
    extra = ["--no-communication"] if config == "compute_floor" else ["--config", config]
    extra += ["--seed", str(seed)]

    def argv_for(node: int, copy: int) -> list[str]:
        target = out if node == copy == 0 else out.with_suffix(f".node{node}_{copy}.json")
        return [sys.executable, "-m", WORKER, *extra, *model_args, "--json", str(target)]

    # the floor: every rank trains alone, so start all of them; otherwise Lightning does
    copies = args.devices if config == "compute_floor" else 1
    before = [cluster.interface_bytes(n)[1] for n in range(args.nodes)]
    print(f"[{rate}] {config} seed {seed} ...", file=sys.stderr, flush=True)
    wall = _run_nodes(cluster, argv_for, port, args.timeout, logdir, label, args.devices, copies)
    after = [cluster.interface_bytes(n)[1] for n in range(args.nodes)]
    row = json.loads(out.read_text())
    if config == "compute_floor":  # each rank alone: the slowest one sets the floor
        others = [
            json.loads(out.with_suffix(f".node{n}_{c}.json").read_text())
            for n in range(args.nodes)
            for c in range(args.devices)
            if n or c
        ]
        row["train_seconds"] = max(r["train_seconds"] for r in [row, *others])
    row.update(job_seconds=wall, link_tx=max(a - b for a, b in zip(after, before)))
    print(
        f"[{rate}] {config} seed {seed}: job {wall:.1f} s, train loop {row['train_seconds']:.1f} s,"
        f" loss {row['train_loss']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def _section(
    args: argparse.Namespace,
    rate: str,
    bandwidth: float,
    steps: int,
    rows: list[dict[str, Any]],
    plots: bool,
    logdir: Path,
) -> dict[str, Any]:
    """One rate's table (and plots)."""
    floor = rows[0]
    by_config = {row["config"]: row for row in rows}
    ddp = by_config.get("ddp")
    target = args.target_loss
    if target is None and ddp is not None:
        target = 1.1 * smoothed([s[1] for s in ddp["steps"]], args.window)[-1]
    headers = [
        "configuration",
        "job s",
        "train loop s",
        "predicted s (blocking / overlap)",
        "job speed-up vs DDP",
        "train loop / floor",
        "MB sent per rank (ledger)",
        "MB link tx per node",
        "train loss",
        "loss - DDP's (paired)",
        "val acc",
        f"s to loss {target:.3f}" if target is not None else "s to target",
    ]
    cells = []
    for row in rows:
        predicted, sent = "-", "0"
        if row["config"] != "compute_floor":
            sent = f"{row['bytes_sent'] / 1e6:.1f}"
        # the model holds for one process per node: with more, ledger bytes mix the node's fast internal
        # traffic with the link's
        if row["config"] != "compute_floor" and args.devices == 1:
            blocking, overlapped = predicted_seconds(floor["train_seconds"], row, bandwidth, args.tau, steps)
            predicted = f"{blocking:.1f}" + (f" / {overlapped:.1f}" if overlapped is not None else "")
        reached = time_to_target(row["steps"], target, args.window) if target is not None else None
        cells.append(
            [
                row["config"],
                f"{row['job_seconds']:.1f}",
                f"{row['train_seconds']:.1f}",
                predicted,
                f"{ddp['job_seconds'] / row['job_seconds']:.1f}x" if ddp else "-",
                f"{row['train_seconds'] / floor['train_seconds']:.2f}",
                sent,
                f"{row['link_tx'] / 1e6:.1f}",
                *loss_cells(row, ddp),
                f"{row['val_acc']:.4f}",
                "-" if reached is None else f"{reached:.1f}",
            ]
        )
    pngs = _plots(rate, rows, args, logdir) if plots else []
    table = markdown_table(headers, cells)
    return {
        "rate": rate,
        "bandwidth": bandwidth,
        "table": table,
        "plots": pngs,
        "params": floor["params"],
        "rows": rows,
    }


def _plots(rate: str, rows: list[dict[str, Any]], args: argparse.Namespace, logdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = (
        args.out.with_suffix("") if args.out else RESULTS_DIR / f"cluster_{datetime.date.today().isoformat()}"
    )
    paths = []
    for axis, xlabel, suffix in (
        (0, "training-loop wall-clock (s)", "time"),
        (2, "MB sent by rank 0", "bytes"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for row in rows:
            if axis == 2 and row["config"] == "compute_floor":
                continue
            xs = [s[axis] / (1e6 if axis == 2 else 1) for s in row["steps"]]
            ax.plot(xs, smoothed([s[1] for s in row["steps"]], args.window), label=row["config"])
        ax.set(
            xlabel=xlabel, ylabel=f"training loss (mean over ranks, {args.window}-step average)", yscale="log"
        )
        if axis == 2:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(f"{args.nodes} emulated nodes x {args.devices} process(es), {rate} link")
        ax.legend(fontsize=7, ncol=2)
        path = Path(f"{stem}_{rate}_loss_vs_{suffix}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _report(args: argparse.Namespace, argv: list[str], steps: int, sections: list[dict[str, Any]]) -> str:
    from benchmarks.jobs.cluster_worker import CONFIGS

    params = sections[0]["params"]  # counted by the worker, not re-derived here
    lines = [
        f"# Emulated cluster, {datetime.date.today().isoformat()}",
        "",
        f"- command: `python -m benchmarks.bench_cluster {' '.join(argv)}`",
        f"- machine: {machine_description()}",
        f"- {args.nodes} emulated nodes (network namespaces, veth + bridge, tc tbf on both ends),"
        f" {args.devices} process(es) per node, gloo",
        f"- model: MLP {args.depth} x {args.hidden} ({params:,} parameters) on scikit-learn digits"
        f" (training set x {args.repeat}), batch {args.batch_size} per process,"
        f" SGD lr {args.lr} momentum 0.9,"
        f" {args.epochs} epochs = {steps} steps per rank; tau = {args.tau}",
        f"- seeds: {' '.join(map(str, args.seeds))} (times, loss and accuracy are means over them)",
        "",
        "Configurations:",
        "",
        *[f"- `{name}`: {CONFIGS[name]}" for name in args.configs],
        "",
    ]
    for section in sections:
        lines += [
            f"## {section['rate']} (measured link: {section['bandwidth'] / 1e6:.2f} MB/s of all-reduce"
            " payload per direction)",
            "",
            section["table"],
            *plots_note(section["plots"]),
            "",
        ]
    breakdown = cpu_breakdown(sections, args.tau, steps) if args.devices == 1 else None
    if breakdown is not None:
        lines += [
            "## Beyond the bound: the work the link does not explain",
            "",
            f"On the bare link (`{FREE_LINK}`: no tbf) a configuration's train loop minus its bound there"
            " is its work on the node's one core that no wire time explains (codecs, residual arithmetic,"
            " copies, thread hand-offs, Lightning's per-step work); the bound + that is the CPU-inclusive"
            " bound at each shaped rate.",
            "",
            breakdown,
            "",
        ]
    lines += [
        "Columns: job s = both processes from start to exit (imports, rendezvous, fit, evaluation);"
        " train loop s = rank 0 from `on_train_start` to the end of `fit` (final average included);"
        " predicted = the"
        " compute floor's train loop + rank 0's bytes (larger direction; both directions for a master on"
        " rank 0, whose gather and broadcast follow each other) / measured link rate (one process"
        " per node only), and for the"
        " overlap strategies floor + rounds x max(0, round bytes / rate - tau x step time); MB link tx ="
        " bytes the busier node's link sent (/proc/net/dev: payload + TCP/IP headers + rendezvous + the"
        " post-fit evaluation); train loss / val acc = the consensus model (replicas averaged after fit"
        " where the strategy leaves them apart) on the whole training / validation set (several seeds:"
        " mean +- sd; loss - DDP's = mean +- standard error of the difference to DDP's loss, seed by"
        " seed); s to loss = first"
        " train-loop time at which the rank-mean training loss, averaged over the last"
        f" {args.window} steps, reaches the target (1.1 x DDP's final unless --target-loss).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
