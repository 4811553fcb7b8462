"""Where a configuration's train loop goes on the emulated cluster: one run of ``jobs/cluster_worker.py``
per node, optionally under cProfile (both nodes), with the ledger's time inside each collective.

    sudo python -m benchmarks.profile_cluster --config local_sgd_int4 --rate 100mbit --max-steps 270

Prints, for rank 0: the train loop, the compute floor's (each node alone, in the same cluster), the
seconds inside collectives by ledger tag against their bytes / measured link rate, and the rest (per-step
work outside collectives: Lightning, the strategy's hooks). With ``--profile`` each rank's cProfile
statistics go to ``--out`` (``profile_<config>/rank<r>.txt``: the top functions by own and by cumulative
time; ``rank<r>.prof`` for pstats), and the floor's to ``profile_floor/`` for a side-by-side diff (one
node's: each node of the floor runs alone as rank 0, so the last to finish writes ``rank0``). cProfile
slows Python-heavy code, so a profiled run says where the time goes and an unprofiled one how much there
is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_cluster import WORKER, _calibrate, _run_nodes
from benchmarks.emulated_cluster import EmulatedCluster, check_available
from benchmarks.jobs.cluster_worker import CONFIGS, PROFILE_ENV

#: what counts as codec work in a profile: these functions of these modules (their cumulative time, each
#: call counted once where one calls another)
CODEC_MODULES = ("lightning_commsgd/compression/", "lightning_commsgd/payload.py")
CODEC_FUNCTIONS = frozenset({"encode", "decode", "decode_into", "pack", "unpack"})


def codec_seconds(profile: Path) -> float:
    """Seconds a profiled rank spent encoding, decoding and entropy-coding payloads on its training thread:
    the cumulative time of the codec functions from callers outside them (the helper thread that averages
    in the background is not profiled)."""
    import pstats

    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]

    def is_codec(key: tuple[str, int, str]) -> bool:
        filename, _line, name = key
        return name in CODEC_FUNCTIONS and any(module in filename for module in CODEC_MODULES)

    total = 0.0
    for key, (_cc, _nc, _tt, cumulative, callers) in stats.items():
        if is_codec(key):
            if not callers:  # called from the frame that started the profiler
                total += cumulative
            total += sum(timing[3] for caller, timing in callers.items() if not is_codec(caller))
    return total


def _run(
    cluster: EmulatedCluster, args: argparse.Namespace, config: str | None, folder: Path, port: int
) -> dict[str, Any]:
    """One run (``config`` None: the compute floor, every node alone); rank 0's results (the floor: the
    slowest node's train loop)."""
    label = config or "floor"
    extra = ["--no-communication"] if config is None else ["--config", config]
    common = [*extra, "--num-nodes", "2", "--tau", str(args.tau), "--max-steps", str(args.max_steps)]

    def argv_for(node: int, _copy: int) -> list[str]:
        return [sys.executable, "-m", WORKER, *common, "--json", str(folder / f"{label}_node{node}.json")]

    env = {PROFILE_ENV: str(folder / f"profile_{label}")} if args.profile else None
    _run_nodes(cluster, argv_for, port, 900, folder, label, extra_env=env)
    rows = [json.loads(path.read_text()) for path in sorted(folder.glob(f"{label}_node*.json"))]
    rows[0]["train_seconds"] = max(row["train_seconds"] for row in rows)
    return rows[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=270)
    parser.add_argument("--profile", action="store_true", help="run the configuration under cProfile")
    parser.add_argument("--out", type=Path, default=None, help="folder for the outputs (default: a temp dir)")
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="floor and configuration runs back to back, this many times: each pair's ratio is taken within"
        " minutes of one machine state (a shared VM drifts 10-30%% between blocks of runs)",
    )
    args = parser.parse_args(argv)
    if args.pairs < 1:
        raise ValueError(f"Arg `pairs` must be >= 1, got {args.pairs}.")
    check_available()
    folder = args.out or Path(tempfile.mkdtemp(prefix="commsgd_profile_"))
    folder.mkdir(parents=True, exist_ok=True)
    ratios: list[float] = []
    with EmulatedCluster(nodes=2, rate=args.rate) as cluster:
        rate = _calibrate(cluster, 29611, folder)
        for pair in range(args.pairs):
            floor = _run(cluster, args, None, folder, 29612 + 2 * pair)
            run = _run(cluster, args, args.config, folder, 29613 + 2 * pair)
            ratios.append(run["train_seconds"] / floor["train_seconds"])
            if args.pairs > 1:
                print(
                    f"  pair {pair}: train loop {run['train_seconds']:.2f} s,"
                    f" floor {floor['train_seconds']:.2f} s: {ratios[-1]:.3f}x",
                    flush=True,
                )
    if args.pairs > 1:
        print(
            f"  train loop / floor over {args.pairs} pairs: {statistics.mean(ratios):.3f}x"
            f" (sd {statistics.stdev(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f});"
            " the last pair:"
        )
    print(f"{args.config} at {args.rate} (link {rate / 1e6:.2f} MB/s per direction), {args.max_steps} steps:")
    print(
        f"  train loop {run['train_seconds']:.2f} s; compute floor {floor['train_seconds']:.2f} s"
        f" ({run['train_seconds'] / floor['train_seconds']:.2f}x);"
        f" final training loss {run['train_loss']:.4f}"
        f" (floor: {floor['train_loss']:.4f})"
    )
    inside = 0.0
    for tag, stats in sorted(run["by_tag"].items(), key=lambda kv: -kv[1]["seconds"]):
        moved = max(stats["bytes_sent"], stats["bytes_received"])
        inside += stats["seconds"]
        print(
            f"  {tag:24s} {stats['seconds']:7.2f} s in {stats['collectives']:5d} calls;"
            f" bytes / link rate {moved / rate:6.2f} s"
        )
    rest = run["train_seconds"] - floor["train_seconds"] - inside
    print(f"  outside collectives, beyond the floor: {rest:.2f} s")
    if args.profile:
        for rank in (0, 1):
            path = folder / f"profile_{args.config}" / f"rank{rank}.prof"
            if path.exists():
                seconds = codec_seconds(path)
                print(f"  rank {rank}: {seconds:.2f} s encoding and decoding on the training thread")
        print(f"  profiles: {folder}/profile_{args.config}/rank0.txt, rank1.txt (floor: profile_floor/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
