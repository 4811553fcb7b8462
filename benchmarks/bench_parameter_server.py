"""Benchmark the parameter-server family under the runtime model of Dutta, Joshi et al. (AISTATS 2018).

P workers and one dedicated server process (P + 1 CPU processes, gloo on localhost). After computing each
mini-batch gradient a worker waits an extra Y ~ Exp(mu) seconds (``ExponentialDelay``): the paper's model
of a worker's compute time, made the dominant cost on purpose (the real compute is about a millisecond).
Every variant trains the same MLP on the shipped digits data (scikit-learn's ``load_digits``, 1438
training samples after a fixed 80/20 split), with plain SGD and the same learning rate, each worker
drawing its own random mini-batches of ``--batch`` samples:

- sync SGD (k = P), K-sync SGD (k = 2, 3 by default): the first k gradients of the current model;
- async SGD (k = 1), K-async (k = 2), K-batch-async (k = P).

Each variant runs for about ``--seconds`` of wall-clock (its number of updates is chosen from the theory
below), and again with no delay to measure the overhead per update (compute and messages). The server
keeps its model every few updates with the time; afterwards the training loss and error of every kept
model are computed on the whole training set.

Theory (expected time per update, Exp(mu) compute, no overhead): sync E[Y_{P:P}] = H_P / mu; K-sync
E[Y_{K:P}] = (H_P - H_{P-K}) / mu; async 1 / (mu P); K-async with k = P/2: about k / (mu P) once the
pipeline is full; K-batch-async: k / (mu P). The table puts the measured time per update beside the
theory plus the measured overhead, and the training loss each variant reached at the time the slowest
variant stopped (equal wall-clock). Printed and written to
``benchmarks/results/parameter_server_<date>.md`` with a PNG (training loss vs wall-clock). Usage::

    python -m benchmarks.bench_parameter_server                      # P=4, 1/mu = 50 ms, ~8 s per variant
    python -m benchmarks.bench_parameter_server --workers 8 --mean-delay-ms 20 --seconds 15
    python -m benchmarks.bench_parameter_server --lr 0.8 --staleness-c 0.05   # where staleness hurts
    python -m benchmarks.bench_parameter_server --quick              # a few seconds (the tests use it)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as torch_mp

from benchmarks.results import machine_description, markdown_table, matplotlib_missing, plots_note

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = 64


# -- theory ------------------------------------------------------------------------------------------------
def harmonic(n: int) -> float:
    """H_n = 1 + 1/2 + ... + 1/n (H_0 = 0)."""
    return sum(1.0 / i for i in range(1, n + 1))


def expected_time_per_update(mode: str, k: int, workers: int, mean_delay: float) -> float:
    """The paper's expected time per update with Exp(mu) compute times (mean_delay = 1/mu), no overhead:
    K-sync (H_P - H_{P-K}) / mu (sync: K = P); K-async and K-batch-async k / (mu P) (async: k = 1)."""
    if mode == "sync":
        return (harmonic(workers) - harmonic(workers - k)) * mean_delay
    return k * mean_delay / workers


def variant_name(mode: str, k: int, workers: int) -> str:
    if mode == "sync":
        return "sync SGD" if k == workers else f"K-sync SGD (k={k})"
    if mode == "async":
        return "async SGD" if k == 1 else f"K-async SGD (k={k})"
    return f"K-batch-async SGD (k={k})"


# -- the measured runs ---------------------------------------------------------------------------------------
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train = order[: int(0.8 * len(x))]
    return x[train], y[train]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def _run_variant(
    rank: int,
    world: int,
    mode: str,
    k: int,
    updates: int,
    args: argparse.Namespace,
    delay_on: bool,
    c: float | None,
):
    from lightning_commsgd.algorithms.parameter_server import StalenessAwareLR
    from lightning_commsgd.algorithms.ps_runtime import connect
    from lightning_commsgd.comm import Communicator

    x, y = _data()
    model = _model(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    params = list(model.parameters())
    comm = Communicator()
    colocated = args.server == "colocated"
    runtime, client = connect(
        comm, params, optimizer, k=k, mode=mode, server_rank=0, server_trains=colocated, max_updates=updates,
        timeout=120.0, staleness_lr=StalenessAwareLR(C=c) if c is not None else None, start=False,
    )  # fmt: skip
    record: dict = {}
    if runtime is not None:
        snapshots: list[tuple[float, int, torch.Tensor]] = []
        every = max(1, updates // 40)
        start = time.perf_counter()
        snapshots.append((0.0, 0, runtime.server.flat_model()))

        def keep(reply) -> None:
            if reply.version % every == 0 or reply.version == updates:
                snapshots.append((time.perf_counter() - start, reply.version, runtime.server.flat_model()))

        runtime.on_update = keep
        if colocated:  # rank 0 serves from a thread and trains
            runtime.start()
            record.update(_train(rank, client, model, params, x, y, args, delay_on))
            runtime.join()
        else:
            runtime.run()
        record.update(
            seconds=snapshots[-1][0],
            updates=runtime.server.version,
            snapshots=snapshots,
            dropped=runtime.server.dropped,
            busy=runtime.busy_seconds,
            staleness=[s for u in runtime.server.log for s in u.staleness],
        )
        return record
    return _train(rank, client, model, params, x, y, args, delay_on)


def _train(rank, client, model, params, x, y, args: argparse.Namespace, delay_on: bool) -> dict:
    """A worker's loop: random mini-batches of the training set, an Exp delay after each gradient."""
    from lightning_commsgd.algorithms.parameter_server import copy_flat_into
    from lightning_commsgd.algorithms.straggler import ExponentialDelay

    assert client is not None
    generator = torch.Generator().manual_seed(1000 * args.seed + rank)
    delay = ExponentialDelay(1000.0 / args.mean_delay_ms, args.seed, rank) if delay_on else None

    def load(flat: torch.Tensor) -> None:
        copy_flat_into(params, flat)

    while not client.stopped:
        index = torch.randint(len(x), (args.batch,), generator=generator)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        client.step(grad, load, delay=delay.next() if delay is not None else 0.0)
    client.leave()
    return {"pushes": client.pushes, "cancelled": client.cancelled}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, plan: list, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for mode, k, updates, delay_on, c in plan:
        dist.barrier()  # every variant starts together
        results.append(_run_variant(rank, world, mode, k, updates, args, delay_on, c))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _evaluate(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    from lightning_commsgd.algorithms.parameter_server import copy_flat_into

    model = _model(0)
    copy_flat_into(list(model.parameters()), flat)
    with torch.no_grad():
        logits = model(x)
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) != y).float().mean())


def loss_at(curve: list[tuple[float, float]], t: float) -> float:
    """The training loss of the latest kept model at or before time ``t`` (a step function)."""
    best = curve[0][1]
    for time_s, loss in curve:
        if time_s <= t:
            best = loss
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="P, learners (one more process serves)")
    parser.add_argument("--mean-delay-ms", type=float, default=50.0, help="1/mu, mean of the Exp delay")
    parser.add_argument("--seconds", type=float, default=8.0, help="wall-clock per variant (about)")
    parser.add_argument("--ksync", type=int, nargs="*", default=[2, 3], help="k of the K-sync runs")
    parser.add_argument("--batch", type=int, default=16, help="m, samples per gradient")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server", choices=["dedicated", "colocated"], default="dedicated",
        help="a server process beside the P workers, or a thread on worker 0",
    )  # fmt: skip
    parser.add_argument(
        "--staleness-c", type=float, default=None, help="also run async SGD with StalenessAwareLR(C=this)"
    )
    parser.add_argument("--quick", action="store_true", help="2 workers, 1 s per variant, no file written")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument("--out", type=Path, default=None, help="results file (default results/...md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.seconds, args.ksync, args.mean_delay_ms = 2, 1.0, [1], 20.0
    if args.workers < 2 or args.mean_delay_ms <= 0 or args.seconds <= 0:
        parser.error("--workers must be >= 2, --mean-delay-ms and --seconds > 0")
    if any(not 1 <= k <= args.workers for k in args.ksync):
        parser.error(f"--ksync values must be in [1, {args.workers}]")
    if matplotlib_missing("bench_parameter_server.py", args.plots and not args.quick):
        return 2

    p, delay = args.workers, args.mean_delay_ms / 1000.0
    variants: list[tuple[str, int, float | None]] = [("sync", p, None)]
    variants += [("sync", k, None) for k in args.ksync if k != p] + [("async", 1, None)]
    if args.staleness_c is not None:
        variants.append(("async", 1, args.staleness_c))
    if not args.quick:
        variants += [("async", max(2, p // 2), None), ("batch", p, None)]
    plan = []
    for mode, k, c in variants:
        theory = expected_time_per_update(mode, k, p, delay)
        updates = max(5, math.ceil(args.seconds / theory))
        plan.append((mode, k, updates, True, c))
        plan.append((mode, k, updates, False, c))  # the overhead: the same updates with no delay
    world = p + 1 if args.server == "dedicated" else p
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        torch_mp.spawn(_entry, args=(world, free_port(), out, plan, args), nprocs=world, join=True)
        total = time.perf_counter() - started
        per_rank = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]

    x, y = _data()
    rows, curves = [], {}
    for index, (mode, k, _, _, c) in enumerate(plan[::2]):
        timed, bare = per_rank[0][2 * index], per_rank[0][2 * index + 1]
        name = variant_name(mode, k, p) + (f" + staleness lr (C={c:g})" if c is not None else "")
        per_update = timed["seconds"] / timed["updates"]
        overhead = bare["seconds"] / bare["updates"]
        theory = expected_time_per_update(mode, k, p, delay)
        curve = [(t, _evaluate(flat, x, y)[0]) for t, _, flat in timed["snapshots"]]
        curves[name] = curve
        final_loss, final_error = _evaluate(timed["snapshots"][-1][2], x, y)
        cancelled = sum(per_rank[r][2 * index].get("cancelled", 0) for r in range(world))
        staleness = timed["staleness"]
        rows.append(
            {
                "name": name, "updates": timed["updates"], "seconds": timed["seconds"],
                "per_update_ms": 1000 * per_update, "theory_ms": 1000 * theory,
                "overhead_ms": 1000 * overhead,
                "final_loss": final_loss, "final_error": final_error, "cancelled": cancelled,
                "dropped": timed["dropped"], "mean_staleness": sum(staleness) / max(1, len(staleness)),
                "server_busy_ms": 1000 * timed["busy"] / timed["updates"],
            }
        )  # fmt: skip
    horizon = min(row["seconds"] for row in rows)
    for row in rows:
        row["loss_at_horizon"] = loss_at(curves[row["name"]], horizon)

    table = markdown_table(
        ["variant", "updates", "time per update (ms)", "theory + overhead (ms)", "theory (ms)",
         "overhead (ms)", f"train loss at {horizon:.1f} s", "final train loss", "final train error",
         "cancelled / dropped", "mean staleness", "server busy per update (ms)"],
        [
            [r["name"], r["updates"], f"{r['per_update_ms']:.1f}", f"{r['theory_ms'] + r['overhead_ms']:.1f}",
             f"{r['theory_ms']:.1f}", f"{r['overhead_ms']:.2f}", f"{r['loss_at_horizon']:.3f}",
             f"{r['final_loss']:.3f}", f"{100 * r['final_error']:.1f}%", f"{r['cancelled']} / {r['dropped']}",
             f"{r['mean_staleness']:.2f}", f"{r['server_busy_ms']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    order_time = [r["name"] for r in sorted(rows, key=lambda r: r["per_update_ms"])]
    order_loss = [r["name"] for r in sorted(rows, key=lambda r: r["loss_at_horizon"])]
    lines = [
        f"# Parameter-server family, P = {p} workers, {args.server} server, Exp(mu) delays with 1/mu = "
        f"{args.mean_delay_ms:g} ms ({datetime.date.today()})",
        "",
        f"Machine: {machine_description()}. Digits MLP ({HIDDEN} hidden), plain SGD lr {args.lr}, "
        f"m = {args.batch} per gradient, seed {args.seed}; the whole benchmark took {total:.0f} s.",
        "",
        table,
        "",
        f"Fastest per update first: {', '.join(order_time)}.",
        f"Lowest training loss at equal wall-clock ({horizon:.1f} s) first: {', '.join(order_loss)}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.quick:
        return 0
    RESULTS.mkdir(exist_ok=True)
    out_file = args.out or RESULTS / f"parameter_server_{datetime.date.today()}.md"
    plots: list[Path] = []
    if args.plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, curve in curves.items():
            ax.plot([t for t, _ in curve], [loss for _, loss in curve], label=name)
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("training loss (whole training set)")
        ax.set_yscale("log")
        ax.set_title(f"P = {p}, Exp delays, 1/mu = {args.mean_delay_ms:g} ms")
        ax.legend()
        fig.tight_layout()
        plot = out_file.with_suffix(".png")
        fig.savefig(plot, dpi=120)
        plots.append(plot)
    out_file.write_text(report + "\n" + "\n".join(plots_note(plots)) + "\n")
    print(f"\nwritten to {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
