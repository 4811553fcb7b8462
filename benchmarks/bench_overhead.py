"""Per-step overhead of this package's strategies on local (non-round) steps, against a plain
single-process Lightning step of the same model.

Local SGD promises that steps between rounds cost what a single-process step costs: no hidden per-step
collective or copy. This measures it: the same MLP and data, one thread per process, the median time of a
training batch (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step and
every strategy hook) over the steps after a warm-up, for

- ``plain``: ``Trainer(devices=1)``, Lightning's default single-device strategy;
- ``local_sgd_1``: ``LocalSGDStrategy`` on one process (all of the package's per-step hooks, no peer);
- ``local_sgd_2``: ``LocalSGDStrategy`` on two processes (each on its own core), tau larger than the run,
  so every measured step is a local step; rank 0's times;
- ``overlap_2``: ``OverlapLocalSGDStrategy`` on two processes, likewise.

Runs are interleaved and repeated (``--repeats``); the ratio to ``plain`` is the median over repeats.
Usage: ``python -m benchmarks.bench_overhead [--steps 600 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

from benchmarks.jobs.overhead import MODES, WARMUP
from benchmarks.results import machine_description, markdown_table
from benchmarks.runner import REPO_ROOT, run_job


def measure(mode: str, steps: int, hidden: int) -> float:
    """Median seconds per training batch of one run of ``mode`` (the job ``benchmarks.jobs.overhead``)."""
    args = ["--mode", mode, "--steps", str(steps), "--hidden", str(hidden)]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return statistics.median(run_job("benchmarks.jobs.overhead", args, timeout_s=900, env=env))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.steps <= WARMUP:
        ap.error(f"--steps must exceed the {WARMUP} warm-up steps")
    started = time.perf_counter()
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so drifts of the machine hit every mode alike
            per_mode[mode].append(measure(mode, args.steps, args.hidden))
    plain = statistics.median(per_mode["plain"])
    rows = []
    for mode in MODES:
        median = statistics.median(per_mode[mode])
        ratios = [t / p for t, p in zip(per_mode[mode], per_mode["plain"])]
        rows.append(
            [
                mode,
                f"{median * 1e3:.3f}",
                f"{median / plain:.3f}",
                f"{min(ratios):.3f} - {max(ratios):.3f}",
            ]
        )
    table = markdown_table(["mode", "median ms per step", "ratio to plain", "range over repeats"], rows)
    today = datetime.date.today().isoformat()
    text = "\n".join(
        [
            f"# Per-step overhead of local steps, {today}",
            "",
            f"- command: `python -m benchmarks.bench_overhead --steps {args.steps} --hidden {args.hidden}"
            f" --repeats {args.repeats}` ({(time.perf_counter() - started) / 60:.1f} min)",
            f"- machine: {machine_description()}",
            f"- model: MLP hidden {args.hidden}, depth 3 on digits, batch 32, SGD; one thread per process;"
            f" median over steps {WARMUP + 1}..{args.steps} of each run, median over {args.repeats} runs",
            "",
            table,
            "",
        ]
    )
    print(text)
    results = REPO_ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"overhead_{today}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
