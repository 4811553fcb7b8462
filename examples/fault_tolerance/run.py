"""Fault tolerance on one machine: a torchft Lighthouse, three replica groups, one of them killed mid-run and
restarted. The others go on without it; the restarted group heals from a live peer and rejoins. Prints what
happens, then checks that every group ends on the same model.

Each group is a Lightning ``Trainer.fit`` with ``ReplicaGroupStrategy`` (``train_group_lightning.py``), or
with ``--loop plain`` a plain PyTorch loop (``train_group.py``).

    python examples/fault_tolerance/run.py            # kill group 1 at step 96, restart it 2 s later
    python examples/fault_tolerance/run.py --loop plain
    python examples/fault_tolerance/run.py --kill-at-step 200 --restart-after 5 --steps 600

Exit status 0 when every group finished on the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lightning_commsgd.ft import start_lighthouse  # noqa: E402


def _echo(process: subprocess.Popen, progress: dict[int, int], group: int) -> threading.Thread:
    """Print the group's lines as they come, and note the latest step it reported (one thread per group)."""

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            words = line.split()
            if len(words) > 3 and words[2] == "step" and words[3].isdigit():
                progress[group] = int(words[3])

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--kill-group", type=int, default=1)
    ap.add_argument("--kill-at-step", type=int, default=96, help="kill once the group reported this step")
    ap.add_argument("--restart-after", type=float, default=2.0, help="seconds after the kill")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--step-sleep", type=float, default=0.02, help="seconds added to each step")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before everything is stopped")
    ap.add_argument(
        "--loop",
        choices=["trainer", "plain"],
        default="trainer",
        help="Lightning Trainer or plain loop groups",
    )
    args = ap.parse_args(argv)
    if not 0 <= args.kill_group < args.groups:
        ap.error(f"--kill-group must be in [0, {args.groups - 1}]")
    if not 0 < args.kill_at_step < args.steps:
        ap.error(f"--kill-at-step must be in [1, {args.steps - 1}] (--steps {args.steps})")

    os.environ.setdefault("RUST_LOG", "warn")  # torchft's servers log every quorum at INFO
    lighthouse = start_lighthouse(min_groups=2, join_timeout_ms=20_000, heartbeat_timeout_ms=1000)
    address = lighthouse.address()
    print(f"[run] Lighthouse at {address}; starting {args.groups} replica groups", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="commsgd_ft_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHFT_USE_OTEL="false")

    script = "train_group_lightning.py" if args.loop == "trainer" else "train_group.py"

    def launch(group: int, tag: str) -> subprocess.Popen:
        command = [
            sys.executable, str(HERE / script), "--group", str(group), "--groups", str(args.groups),
            "--lighthouse", address, "--tau", str(args.tau), "--steps", str(args.steps),
            "--step-sleep", str(args.step_sleep), "--out", str(folder / f"group{group}{tag}.json"),
        ]  # fmt: skip
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        _echo(process, progress, group)
        return process

    progress: dict[int, int] = {}
    processes = {g: launch(g, "") for g in range(args.groups)}
    deadline = time.monotonic() + args.timeout
    try:
        victim = processes[args.kill_group]
        while progress.get(args.kill_group, 0) < args.kill_at_step:
            if victim.poll() is not None or time.monotonic() > deadline:
                print(f"[run] group {args.kill_group} ended before step {args.kill_at_step}", flush=True)
                return 1
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = time.time()
        print(f"[run] killed group {args.kill_group} (SIGKILL); the others go on without it", flush=True)
        time.sleep(args.restart_after)
        processes[args.kill_group] = launch(args.kill_group, "_restarted")
        print(f"[run] restarted group {args.kill_group}", flush=True)
        codes = {g: p.wait(timeout=max(1.0, deadline - time.monotonic())) for g, p in processes.items()}
    except subprocess.TimeoutExpired:
        print("[run] timed out", flush=True)
        return 1
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        lighthouse.shutdown()

    summaries = {}
    for g in processes:
        path = folder / (f"group{g}_restarted.json" if g == args.kill_group else f"group{g}.json")
        summaries[g] = json.loads(path.read_text()) if path.exists() else None
    restarted = summaries[args.kill_group]
    print("\n[run] summary")
    for g, summary in summaries.items():
        if summary is None:
            print(f"  group {g}: exit {codes[g]}, no summary")
            continue
        print(
            f"  group {g}: exit {codes[g]}, test accuracy {summary['test_accuracy']:.3f}, "
            f"model {summary['model']}, {summary['bytes_sent'] / 1e6:.2f} MB sent"
        )
    ok = all(c == 0 for c in codes.values()) and all(s is not None for s in summaries.values())
    if restarted is not None and not restarted["healed"]:
        print(f"  group {args.kill_group} did not rejoin: the others had finished (raise --steps)")
    if ok and restarted is not None and restarted["healed"]:
        heal = next(e for e in restarted["events"] if e["healed"])
        print(
            f"  group {args.kill_group} healed from group {restarted['healed_from']} and rejoined at step "
            f"{restarted['joined_at_step']}, {heal['wall_time'] - killed:.1f} s after it was killed "
            f"(the transfer took {heal['heal_seconds']:.2f} s)"
        )
    same = ok and len({s["model"] for s in summaries.values()}) == 1
    print(f"  every group ends on the same model: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
