"""The scaling model (``lightning_commsgd.planning``, ``commsgd plan``): its predicted curves, and a check of
it against emulated clusters.

Default mode (no root, seconds): plots the predicted time per epoch against the number of workers (2 to 1024,
log scale) of every strategy the planner knows, one panel per link rate, to
``benchmarks/results/scaling_<date>.png`` (and a copy in ``docs/img/scaling.png`` with ``--docs-copy``).

``--validate`` (root: network namespaces, as ``bench_cluster``): for 2, 3 and 4 emulated nodes (one process
per node, ``OMP_NUM_THREADS=1``; on a 2-core machine 3 and 4 processes share the cores) it

1. measures the link (a timed fp32 all-reduce of 8 MB: payload bytes per second per direction, B) and the
   latency (a timed all-reduce of one value: alpha = its time / 2 (n-1)),
2. measures the compute floor with the same number of processes (every node trains alone, at once, no
   process group): t_c = the slowest node's train loop / steps,
3. measures the int4 codec's CPU time per value, encoding and decoding one round's values in ``n``
   processes at once (no communication),
4. runs DDP, local SGD (fp32 and int4; tau, parameters + momentum) and gossip on a ring
   (``benchmarks/jobs/cluster_worker.py``, the runs of ``bench_cluster``), and
5. compares each run's training loop (``on_train_start`` to the end of ``fit``) with the model's prediction
   from B, alpha, t_c and the codec cost alone: nothing is fitted to the runs being predicted.

The table (error per row) goes to ``benchmarks/results/scaling_<date>.md``.

    python -m benchmarks.bench_scaling                                  # the plot
    sudo python -m benchmarks.bench_scaling --validate                  # 2, 3, 4 nodes at 100mbit
    sudo python -m benchmarks.bench_scaling --validate --nodes 3 --steps 48 --hidden 512
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import machine_description, markdown_table, matplotlib_missing
from benchmarks.runner import REPO_ROOT
from lightning_commsgd.planning import (
    DDP,
    FP32,
    INT4,
    Gossip,
    Link,
    ParameterServer,
    PayloadFormat,
    StrategyModel,
    Workload,
    dore,
    local_sgd,
    overlap_local_sgd,
    parse_count,
    parse_duration,
    parse_rate,
    ring_allreduce,
)

__all__ = ["VALIDATE_CONFIGS", "curve_strategies", "main", "predicted_train_loop", "worker_counts"]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DOCS_IMAGE = REPO_ROOT / "docs" / "img" / "scaling.png"
#: the configurations of ``jobs/cluster_worker.py`` that --validate runs
VALIDATE_CONFIGS = ("ddp", "local_sgd", "local_sgd_int4", "gossip")

# rank 0 prints "<payload bytes per second per direction> <alpha seconds>"
_CALIBRATE = """
import sys, time, torch, torch.distributed as dist
torch.set_num_threads(1)
rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://{sys.argv[3]}:{sys.argv[4]}", rank=rank, world_size=world)
x, one = torch.ones(2_000_000), torch.ones(1)
for _ in range(20):
    dist.all_reduce(one)
start = time.perf_counter()
for _ in range(200):
    dist.all_reduce(one)
alpha = (time.perf_counter() - start) / 200 / (2 * (world - 1))
dist.all_reduce(x)
start = time.perf_counter()
for _ in range(3):
    dist.all_reduce(x)
seconds = (time.perf_counter() - start) / 3
if rank == 0:
    print(x.numel() * 4 * 2 * (world - 1) / world / seconds, alpha)
dist.destroy_process_group()
"""

# prints "<encode seconds per value> <decode seconds per value>" of one process, one thread
_CODEC = """
import sys, time, torch
torch.set_num_threads(1)
from lightning_commsgd.payload import payload_codec, rounding_generator
codec, numel = payload_codec(sys.argv[1]), int(sys.argv[2])
x = torch.randn(numel)
generator = rounding_generator(codec, 0, 0, 0, x.device)
payload = codec.encode(x, generator)
codec.decode(payload, numel)
encode = decode = float("inf")
for _ in range(5):
    start = time.perf_counter()
    payload = codec.encode(x, generator)
    middle = time.perf_counter()
    codec.decode(payload, numel)
    end = time.perf_counter()
    encode, decode = min(encode, middle - start), min(decode, end - middle)
print(encode / numel, decode / numel)
"""


def worker_counts(low: int = 2, high: int = 1024) -> list[int]:
    """The plot's x axis: powers of 2 and the squares between (a torus needs a square)."""
    counts = {2**k for k in range(1, 31) if low <= 2**k <= high}
    counts |= {s * s for s in range(2, 1025) if low <= s * s <= high}
    return sorted(counts)


def curve_strategies(tau: int, server_update: float) -> list[StrategyModel]:
    """The plotted strategies: DDP, local SGD (fp32, int8, int4), Overlap Local-SGD (int4), gossip (ring,
    torus, exponential, complete), the parameter server (sync, async) and DORE."""
    from lightning_commsgd.planning import INT8

    return [
        DDP(),
        local_sgd(tau, FP32),
        local_sgd(tau, INT8),
        local_sgd(tau, INT4),
        overlap_local_sgd(tau, INT4),
        Gossip("ring", tau),
        Gossip("torus", tau),
        Gossip("exponential", tau),
        Gossip("complete", tau),
        ParameterServer("sync", update_seconds=server_update),
        ParameterServer("async", update_seconds=server_update),
        dore(update_seconds=server_update),
    ]


def predicted_train_loop(
    config: str,
    nodes: int,
    steps: int,
    tau: int,
    params: int,
    step_seconds: float,
    link: Link,
    int4: PayloadFormat = INT4,
) -> tuple[float, float]:
    """The model's (training-loop seconds, bytes one worker's link sends) for ``steps`` steps of ``config``
    (one of :data:`VALIDATE_CONFIGS`) on ``nodes`` workers, parameters and SGD momentum averaged; with the
    exact all-reduce at the end of fit where the strategy makes one (gossip always; local SGD when the last
    step was not a round)."""
    if config not in VALIDATE_CONFIGS:
        raise ValueError(f"no model for configuration {config!r}; choose from {VALIDATE_CONFIGS}")
    whole = steps // tau * tau  # a run's rounds fall at steps tau, 2 tau, ...: no fractional round
    workload = Workload(params=params, step_seconds=step_seconds, steps_per_epoch=steps)
    periodic = Workload(params=params, step_seconds=step_seconds, steps_per_epoch=max(whole, 1))
    compute = steps * step_seconds
    final = (0.0, 0.0)
    if config == "ddp":
        prediction = DDP().predict(workload, link, nodes)
        return prediction.epoch_seconds, prediction.bytes_per_worker
    strategy: StrategyModel
    if config == "gossip":
        strategy = Gossip("ring", tau)  # the final exact average: the mixer never counts a round as exact
        final = ring_allreduce(4.0 * 2 * params, nodes, link)
    else:
        averaging = local_sgd(tau, int4 if config == "local_sgd_int4" else FP32)
        strategy = averaging
        if steps % tau:
            final = averaging.round_seconds(workload, link, nodes)
    prediction = strategy.predict(periodic, link, nodes)
    assert prediction is not None
    comm, sent = (prediction.comm_seconds, prediction.bytes_per_worker) if whole else (0.0, 0.0)
    return compute + comm + final[0], sent + final[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--validate", action="store_true", help="run emulated clusters (root) instead of plotting"
    )
    plot = parser.add_argument_group("the plot")
    plot.add_argument(
        "--params", type=parse_count, default=1_292_110, help="P (default: bench_cluster's MLP)"
    )
    plot.add_argument("--links", nargs="+", default=["100mbit", "10gbit"], help="one panel per link rate")
    plot.add_argument("--latency", type=parse_duration, default=1e-4, help="alpha (default 0.1ms)")
    plot.add_argument("--step-time", type=parse_duration, default=9.6e-3, help="t_c (default 9.6ms)")
    plot.add_argument(
        "--samples-per-epoch", type=parse_count, default=1_281_167, help="samples per epoch (ImageNet-1k's)"
    )
    plot.add_argument("--batch-size", type=int, default=32, help="per worker")
    plot.add_argument("--server-update", type=parse_duration, default=2e-3, help="u per PS update (2ms)")
    plot.add_argument("--max-workers", type=int, default=1024)
    plot.add_argument("--docs-copy", action="store_true", help=f"also copy the plot to {DOCS_IMAGE}")
    both = parser.add_argument_group("both")
    both.add_argument("--tau", type=int, default=8, help="period of the periodic strategies")
    both.add_argument(
        "--out", type=Path, default=None, help="results file stem (default results/scaling_<date>)"
    )
    val = parser.add_argument_group("--validate")
    val.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4], help="emulated node counts")
    val.add_argument("--rate", default="100mbit", help="link rate (tc syntax)")
    val.add_argument("--configs", nargs="+", default=list(VALIDATE_CONFIGS), choices=VALIDATE_CONFIGS)
    val.add_argument("--steps", type=int, default=128, help="optimizer steps per rank (a multiple of --tau)")
    val.add_argument("--hidden", type=int, default=512, help="MLP width (512 x 2: 0.30 M parameters)")
    val.add_argument("--depth", type=int, default=2, help="MLP hidden layers")
    val.add_argument(
        "--floor-steps",
        type=int,
        default=512,
        help="steps of the compute floor run (t_c: its first --steps steps on the slowest node, / --steps)",
    )
    val.add_argument(
        "--append",
        action="store_true",
        help="add the sections to an existing results file (one node count a run)",
    )
    val.add_argument("--timeout", type=float, default=300.0, help="seconds before one run is killed")
    return parser


def _stem(args: argparse.Namespace) -> Path:
    return (
        args.out.with_suffix("") if args.out else RESULTS_DIR / f"scaling_{datetime.date.today().isoformat()}"
    )


# --- the plot ----------------------------------------------------------------------------------


def plot_curves(args: argparse.Namespace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workload = Workload(
        params=args.params,
        step_seconds=args.step_time,
        samples_per_epoch=args.samples_per_epoch,
        batch_size=args.batch_size,
    )
    counts = worker_counts(2, args.max_workers)
    strategies = curve_strategies(args.tau, args.server_update)
    fig, axes = plt.subplots(1, len(args.links), figsize=(7 * len(args.links), 6), squeeze=False, sharey=True)
    palette = plt.get_cmap("tab20").colors
    colours = palette[::2] + palette[1::2]  # the ten strong colours first, then their light tones
    styles = {
        "local": "-",
        "overlap": "-.",
        "gossip": "--",
        "sync": ":",
        "async": ":",
        "DORE": (0, (5, 1, 1, 1)),
    }
    for ax, rate in zip(axes[0], args.links):
        link = Link(parse_rate(rate), args.latency)
        floor = [workload.steps(n) * workload.step_seconds for n in counts]
        ax.plot(counts, floor, "k--", lw=2, label="compute floor (no communication)")
        for i, strategy in enumerate(strategies):
            points = [(n, strategy.predict(workload, link, n)) for n in counts]
            xs = [n for n, p in points if p is not None]
            ys = [p.epoch_seconds for _, p in points if p is not None]
            style = styles.get(strategy.label.split()[0], "-")
            marker = "o" if strategy.label.startswith("gossip torus") else None
            colour = colours[i % len(colours)]
            ax.plot(xs, ys, linestyle=style, marker=marker, color=colour, ms=3, lw=1.6, label=strategy.label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="workers n",
            title=f"{rate} per worker link, alpha {args.latency * 1e3:g} ms",
        )
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("predicted time per epoch (s)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        f"Scaling model: P = {args.params / 1e6:.2f} M parameters, t_c = {args.step_time * 1e3:g} ms a step, "
        f"{args.samples_per_epoch:,} samples per epoch, batch {args.batch_size} per worker, tau {args.tau}, "
        f"PS update {args.server_update * 1e3:g} ms",
        fontsize=9,
    )
    path = Path(f"{_stem(args)}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --- --validate --------------------------------------------------------------------------------


def _calibrate_link(cluster: Any, port: int, logdir: Path) -> tuple[float, float]:
    from benchmarks.bench_cluster import run_script_on_nodes

    fields = run_script_on_nodes(cluster, _CALIBRATE, port, logdir, f"link{cluster.nodes}").split()
    return float(fields[-2]), float(fields[-1])


def _calibrate_codec(name: str, numel: int, copies: int) -> tuple[float, float]:
    """(encode, decode) seconds per value, ``copies`` processes at once (the slowest), no communication."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CODEC, name, str(numel)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(copies)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"codec calibration failed (exit {proc.returncode})")
        results.append(tuple(float(v) for v in out.split()[-2:]))
    return max(r[0] for r in results), max(r[1] for r in results)


def _floor_seconds(node0_json: Path, nodes: int, steps: int) -> float:
    """The compute floor of ``steps`` steps: the slowest node's train-loop time at the end of step ``steps``
    of a longer no-communication run. The nodes train alone and each starts when its own imports finish, so
    a node's first steps may run while another is still starting (on a 2-core machine with 3 or 4 nodes:
    faster than with all of them training); running the floor for several times ``steps`` makes every node's
    first ``steps`` overlap the others' training, and the slowest node's is the one with all of them."""
    import json

    times = []
    for node in range(nodes):
        path = node0_json if node == 0 else node0_json.with_suffix(f".node{node}_0.json")
        times.append(json.loads(path.read_text())["steps"][steps - 1][0])
    return max(times)


def _model_args(args: argparse.Namespace, steps: int, nodes: int, repeat: int) -> list[str]:
    out = ["--hidden", str(args.hidden), "--depth", str(args.depth), "--batch-size", "32", "--lr", "0.05"]
    out += ["--repeat", str(repeat), "--max-steps", str(steps), "--tau", str(args.tau)]
    return out + ["--num-nodes", str(nodes), "--devices", "1"]


def _validate_nodes(
    args: argparse.Namespace, nodes: int, port: int, logdir: Path, repeat: int
) -> tuple[list[list[Any]], str]:
    """One cluster of ``nodes`` nodes: calibrate, then run and predict every configuration. Returns the
    table rows and the calibration line."""
    from benchmarks.bench_cluster import _run_config
    from benchmarks.emulated_cluster import EmulatedCluster

    run_args = argparse.Namespace(devices=1, timeout=args.timeout, nodes=nodes)
    rows = []
    with EmulatedCluster(nodes=nodes, rate=args.rate) as cluster:
        bandwidth, alpha = _calibrate_link(cluster, port, logdir)
        floor_steps = max(args.steps, args.floor_steps)
        floor_args = _model_args(args, floor_steps, nodes, repeat)
        floor = _run_config(cluster, "compute_floor", 0, port + 1, run_args, floor_args, logdir, args.rate)
        params = floor["params"]
        step_s = _floor_seconds(logdir / f"{args.rate}_compute_floor_s0.json", nodes, args.steps) / args.steps
        encode, decode = _calibrate_codec("int4", 2 * params + 1, nodes)
        link = Link(bits_per_second=8 * bandwidth, latency=alpha)
        int4 = INT4.with_codec_cost(encode, decode)
        note = (
            f"link {bandwidth / 1e6:.2f} MB/s, alpha {alpha * 1e3:.3f} ms, t_c"
            f" {step_s * 1e3:.2f} ms per step (the first {args.steps} steps of a {floor_steps}-step"
            f" floor run), int4 codec {encode * 1e9:.1f} ns encode + {decode * 1e9:.1f} ns decode per value"
        )
        print(f"{nodes} nodes: {note}", file=sys.stderr, flush=True)
        for i, config in enumerate(args.configs):
            run_argv = _model_args(args, args.steps, nodes, repeat)
            run = _run_config(cluster, config, 0, port + 2 + i, run_args, run_argv, logdir, args.rate)
            predicted, wire = predicted_train_loop(
                config, nodes, args.steps, args.tau, params, step_s, link, int4
            )
            measured, steps_part = run["train_seconds"], run["steps"][-1][0]
            rows.append(
                [
                    nodes,
                    config,
                    f"{step_s * args.steps:.2f}",
                    f"{measured:.2f}",
                    f"{steps_part:.2f}",
                    f"{predicted:.2f}",
                    f"{(predicted - measured) / measured:+.1%}",
                    f"{wire / 1e6:.1f}",
                    f"{run['link_tx'] / 1e6:.1f}",
                ]
            )
            print(f"  {config}: measured {measured:.2f} s, predicted {predicted:.2f} s", file=sys.stderr)
    return rows, note


VALIDATE_HEADERS = [
    "nodes",
    "configuration",
    "compute floor s (steps x t_c)",
    "measured train loop s",
    "of which steps s",
    "predicted s",
    "error",
    "predicted MB per link",
    "measured MB link tx (busiest node)",
]


def validate(args: argparse.Namespace) -> int:
    from benchmarks.bench_cluster import _train_samples
    from benchmarks.emulated_cluster import ClusterUnavailable, check_available

    try:
        check_available()
    except ClusterUnavailable as err:
        print(f"bench_scaling: cannot emulate a cluster here: {err}", file=sys.stderr)
        return 2
    if args.steps % args.tau:
        print("bench_scaling: --steps must be a multiple of --tau (no final average in the train loop)")
        return 2
    started = time.perf_counter()
    logdir = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    # copies of the digits training set so that no epoch ends inside a run
    repeat = max(1, -(-args.steps * 32 * max(args.nodes) // _train_samples(1)))
    sections = []
    for k, nodes in enumerate(args.nodes):
        rows, note = _validate_nodes(args, nodes, 29900 + 20 * k, logdir, repeat)
        worst = max(abs(float(r[6].rstrip("%"))) for r in rows)
        sections += [
            f"## {nodes} nodes",
            "",
            f"- command: `python -m benchmarks.bench_scaling {' '.join(sys.argv[1:])}`"
            f" (took {time.perf_counter() - started:.0f} s)",
            "- calibration (no-communication runs and micro-benchmarks, nothing from the runs below): "
            + note,
            "",
            markdown_table(VALIDATE_HEADERS, rows),
            "",
            f"Largest error: {worst:.1f}%.",
            "",
        ]
    header = [
        f"# Scaling model against emulated clusters, {datetime.date.today().isoformat()}",
        "",
        f"- machine: {machine_description()}",
        f"- {args.rate} links, one process per node (OMP_NUM_THREADS=1), gloo; MLP {args.depth} x"
        f" {args.hidden} on digits, batch 32, SGD lr 0.05 momentum 0.9, {args.steps} steps per rank,"
        f" tau = {args.tau}",
        "",
        "Predicted = the model (`lightning_commsgd.planning`) given the measured link rate B (timed fp32"
        " all-reduce of 8 MB), latency alpha (timed one-value all-reduce / 2(n-1)), step time t_c (the first"
        " steps of a longer compute-floor run with the same number of processes at once, slowest node, /"
        " steps) and the int4 codec's CPU time per value (the same number of processes at once); measured ="
        " rank 0's train loop, `on_train_start` to the end of `fit`; of which steps = to the end of the last"
        " step (the rest: the end of fit); predicted MB per link = the model's bytes one worker's link sends"
        " (ring all-reduce: 2(n-1)/n x payload); measured MB link tx = /proc/net/dev of the busiest node"
        " (payload + TCP/IP headers + rendezvous + the post-fit evaluation). Configurations"
        " (`benchmarks/jobs/cluster_worker.py`): "
        + "; ".join(f"`{c}`" for c in args.configs)
        + " (gossip on a ring, parameters and momentum mixed, with its final exact average, an fp32 ring"
        " all-reduce).",
        "",
    ]
    out = Path(f"{_stem(args)}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + "\n".join(sections))
    else:
        out.write_text("\n".join(header + sections))
    print("\n".join(sections))
    print(f"written to {out} (run logs in {logdir})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tau < 1 or args.steps < 1 or min(args.nodes) < 2:
        parser.error("--tau and --steps must be >= 1, --nodes >= 2")
    if args.validate:
        return validate(args)
    if matplotlib_missing("bench_scaling", True):
        return 2
    path = plot_curves(args)
    print(f"written to {path}")
    if args.docs_copy:
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGE)
        print(f"copied to {DOCS_IMAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
