"""Goodput of replica groups under failures, on the emulated cluster (needs root, like ``bench_cluster``).

One replica group per emulated node (``benchmarks/jobs/ft_group.py``: the fault-tolerance example's MLP with
an emulated compute time per step), a torchft Lighthouse on node 0, DiLoCo rounds between the groups. Every
``--kill-every`` seconds a random live group is killed (SIGKILL), in three modes:

- ``none``: no failures: the time per step of the failure-free job, the reference of the others;
- ``ft``: fault-tolerant groups: the killed group is restarted after ``--restart-delay`` seconds, the others
  go on without it; it heals from a live peer and rejoins;
- ``restart``: the stop-and-resume baseline (what a job without fault tolerance does, torchrun-style):
  every group is stopped and the whole job restarts from the newest checkpoint all groups have (written
  every ``--checkpoint-every`` rounds).

Goodput = useful group-steps / (groups x elapsed / failure-free step time): the share of the cluster's step
capacity that ended up in the model. Useful group-steps are, for ``ft``, the steps of the groups that
contributed to each committed round (a dead group's lost period and its downtime count as waste), and for
``restart`` the final trajectory's groups x steps (recomputed steps and restarts count as waste).

    sudo python -m benchmarks.bench_ft --groups 3 --rate 1gbit --steps 3000 --kill-every 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.emulated_cluster import ClusterUnavailable, EmulatedCluster, check_available
from benchmarks.results import machine_description, markdown_table, matplotlib_missing
from benchmarks.runner import REPO_ROOT

__all__ = ["goodput", "main", "read_events", "summarize"]

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MODES = ("none", "ft", "restart")
LIGHTHOUSE_PORT = 29510


def read_events(path: Path) -> list[dict[str, Any]]:
    """The groups' JSON lines, in time order."""
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(events, key=lambda e: e["t"])


def summarize(events: list[dict[str, Any]], groups: int, tau: int, mode: str) -> dict[str, Any]:
    """Elapsed time (first join to the last round), useful group-steps and the trajectory over time."""
    joins = [e for e in events if e["kind"] == "joined"]
    rounds = [e for e in events if e["kind"] == "round"]
    if not joins or not rounds:
        raise RuntimeError(f"{mode}: no rounds were recorded")
    start, end = joins[0]["t"], rounds[-1]["t"]
    first_of_step: dict[int, dict[str, Any]] = {}
    for event in rounds:  # every live group logs each round; its first record stands for it
        first_of_step.setdefault(event["step"], event)
    if mode == "restart":
        final_step = max(first_of_step)
        useful = groups * final_step  # the trajectory that survived; recomputed steps are waste
    else:
        useful = sum(e["contributors"] * tau for e in first_of_step.values())
    trajectory = [(e["t"] - start, e["step"]) for e in rounds]
    done = [e for e in events if e["kind"] == "done"]
    return {
        "elapsed": end - start,
        "useful": useful,
        "trajectory": trajectory,
        "rounds": len(first_of_step),
        "accuracy": statistics.mean(e["accuracy"] for e in done) if done else float("nan"),
        "start": start,
    }


def goodput(useful: float, groups: int, elapsed: float, step_seconds: float) -> float:
    """Useful group-steps over the group-steps the cluster could have run in ``elapsed``."""
    return useful / (groups * elapsed / step_seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=3, help="replica groups (one emulated node each)")
    parser.add_argument("--rate", default="1gbit", help="link rate (tc syntax)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--step-sleep", type=float, default=0.02, help="emulated compute seconds per step")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between failures")
    parser.add_argument("--restart-delay", type=float, default=0.0, help="ft: seconds before a restart")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="restart: rounds between checkpoints"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seed", type=int, default=0, help="which group fails when")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a mode is abandoned")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-plots", action="store_true")
    return parser


class _Run:
    """One mode's processes on the cluster, with the failure schedule."""

    def __init__(self, cluster: EmulatedCluster, args: argparse.Namespace, mode: str, folder: Path) -> None:
        self.cluster, self.args, self.mode = cluster, args, mode
        self.folder = folder / mode
        self.folder.mkdir(parents=True, exist_ok=True)
        self.events = self.folder / "events.jsonl"
        self.kills: list[tuple[float, int]] = []
        self.restarts = 0
        self.processes: dict[int, subprocess.Popen] = {}
        self._killed: set[int] = set()  # processes we killed (pid), not failures

    def launch(self, group: int, resume_step: int = 0) -> None:
        args, cluster = self.args, self.cluster
        argv = [
            sys.executable, "-m", "benchmarks.jobs.ft_group", "--group", str(group),
            "--groups", str(args.groups), "--lighthouse", f"http://{cluster.address(0)}:{LIGHTHOUSE_PORT}",
            "--hostname", cluster.address(group),
            "--tau", str(args.tau), "--steps", str(args.steps), "--hidden", str(args.hidden),
            "--step-sleep", str(args.step_sleep), "--events", str(self.events),
        ]  # fmt: skip
        if self.mode == "restart":
            argv += ["--checkpoint-dir", str(self.folder), "--checkpoint-every", str(args.checkpoint_every)]
            argv += ["--resume-step", str(resume_step)]
        env = dict(os.environ, OMP_NUM_THREADS="1", RUST_LOG="error", TORCHFT_USE_OTEL="false")
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["GLOO_SOCKET_IFNAME"] = cluster.node_links[group]
        log = open(self.folder / f"group{group}.log", "a")  # noqa: SIM115 (the process holds it)
        self.processes[group] = cluster.popen(group, argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)

    def kill(self, group: int) -> None:
        process = self.processes[group]
        if process.poll() is None:
            self._killed.add(process.pid)
            process.kill()
            process.wait()

    def common_checkpoint(self) -> int:
        """The newest step every group has a checkpoint of (0: none)."""
        steps = None
        for g in range(self.args.groups):
            mine = {int(p.stem.split("_step")[1]) for p in self.folder.glob(f"group{g}_step*.pt")}
            steps = mine if steps is None else steps & mine
        return max(steps) if steps else 0

    def finished(self) -> bool:
        return any(e["kind"] == "done" for e in read_events(self.events))

    def run(self) -> None:
        args = self.args
        rng = random.Random(args.seed)
        for g in range(args.groups):
            self.launch(g)
        start = time.monotonic()
        next_kill = start + args.kill_every
        pending_restart: tuple[float, int] | None = None
        while True:
            now = time.monotonic()
            if now - start > args.timeout:
                raise RuntimeError(f"{self.mode}: not done within {args.timeout:g} s (logs in {self.folder})")
            for g, process in self.processes.items():
                code = process.poll()
                if code not in (None, 0) and process.pid not in self._killed:
                    log = (self.folder / f"group{g}.log").read_text()[-2000:]
                    raise RuntimeError(f"{self.mode}: group {g} failed (exit {code}):\n{log}")
            if self.finished():
                break
            if pending_restart is not None and now >= pending_restart[0]:
                self.launch(pending_restart[1])
                self.restarts += 1
                pending_restart = None
            if self.mode != "none" and now >= next_kill and pending_restart is None:
                live = [g for g, p in self.processes.items() if p.poll() is None]
                victim = rng.choice(live)
                self.kill(victim)
                self.kills.append((time.time(), victim))
                if self.mode == "ft":
                    pending_restart = (now + args.restart_delay, victim)
                else:  # the whole job stops and restarts from the newest common checkpoint
                    for g in range(args.groups):
                        self.kill(g)
                    resume = self.common_checkpoint()
                    for g in range(args.groups):
                        self.launch(g, resume)
                    self.restarts += 1
                next_kill = now + args.kill_every
            time.sleep(0.05)
        deadline = time.monotonic() + 10  # the others finish the same step; a group still joining is stopped
        for g, process in self.processes.items():
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(g)


def _lighthouse(cluster: EmulatedCluster, folder: Path) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "lightning_commsgd.cli", "lighthouse", "--port", str(LIGHTHOUSE_PORT),
        "--min-groups", "1", "--join-timeout-ms", "5000", "--heartbeat-timeout-ms", "1000",
    ]  # fmt: skip
    env = dict(os.environ, RUST_LOG="error", PYTHONPATH=str(REPO_ROOT))
    log = open(folder / "lighthouse.log", "w")  # noqa: SIM115 (the process holds it)
    process = cluster.popen(0, argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(2.0)  # it prints its address once listening; the groups retry their connection anyway
    if process.poll() is not None:
        raise RuntimeError(f"the Lighthouse did not start: {(folder / 'lighthouse.log').read_text()}")
    return process


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.groups < 2 or args.steps < args.tau or args.kill_every <= 0:
        parser.error("--groups must be >= 2, --steps >= --tau, --kill-every > 0")
    try:
        check_available()
    except ClusterUnavailable as err:
        print(f"bench_ft: cannot emulate a cluster here: {err}", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="bench_ft_"))
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, _Run] = {}
    with EmulatedCluster(nodes=args.groups, rate=args.rate) as cluster:
        lighthouse = _lighthouse(cluster, folder)
        try:
            for mode in args.modes:
                print(f"[bench_ft] {mode} ...", file=sys.stderr, flush=True)
                run = runs[mode] = _Run(cluster, args, mode, folder)
                run.run()
                results[mode] = summarize(read_events(run.events), args.groups, args.tau, mode)
                print(
                    f"[bench_ft] {mode}: {results[mode]['elapsed']:.1f} s, {len(run.kills)} failures",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            lighthouse.terminate()
            lighthouse.wait(timeout=30)
    report = _report(args, argv if argv is not None else sys.argv[1:], results, runs, folder)
    out = args.out or RESULTS_DIR / f"ft_goodput_{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    if not args.no_plots and not matplotlib_missing("bench_ft", True):
        _plot(results, runs, out.with_suffix(".png"))
    print(report)
    print(f"written to {out} (logs in {folder})", file=sys.stderr)
    return 0


def _death_to_next_round(run: _Run) -> list[float]:
    """For each failure: seconds from the kill to the next round a survivor completed."""
    rounds = [e for e in read_events(run.events) if e["kind"] == "round"]
    gaps = []
    for when, victim in run.kills:
        after = next((e["t"] for e in rounds if e["t"] > when and e["group"] != victim), None)
        if after is not None:
            gaps.append(after - when)
    return gaps


def _rejoin_seconds(run: _Run) -> list[float]:
    """For each failure: seconds from the kill to the restarted group's join (it healed)."""
    joins = [e for e in read_events(run.events) if e["kind"] == "joined" and e["healed"]]
    gaps = []
    for when, victim in run.kills:
        after = next((e["t"] for e in joins if e["t"] > when and e["group"] == victim), None)
        if after is not None:
            gaps.append(after - when)
    return gaps


def _report(
    args: argparse.Namespace, argv: list[str], results: dict[str, Any], runs: dict[str, _Run], folder: Path
) -> str:
    reference = results.get("none")
    step_seconds = reference["elapsed"] / args.steps if reference else args.step_sleep
    rows = []
    for mode, result in results.items():
        run = runs[mode]
        gaps, rejoins = _death_to_next_round(run), _rejoin_seconds(run)
        rows.append(
            [
                mode,
                f"{result['elapsed']:.1f}",
                str(len(run.kills)),
                f"{result['useful']:,}",
                f"{goodput(result['useful'], args.groups, result['elapsed'], step_seconds):.3f}",
                f"{statistics.mean(gaps):.1f} (max {max(gaps):.1f})" if mode == "ft" and gaps else "-",
                f"{statistics.mean(rejoins):.1f}" if mode == "ft" and rejoins else "-",
                f"{result['accuracy']:.3f}",
            ]
        )
    headers = [
        "mode",
        "seconds (first join to last round)",
        "failures",
        "useful group-steps",
        "goodput",
        "death to the survivors' next round s",
        "death to rejoin s",
        "test accuracy",
    ]
    lines = [
        f"# Replica groups under failures, {datetime.date.today().isoformat()}",
        "",
        f"- command: `python -m benchmarks.bench_ft {' '.join(argv)}`",
        f"- machine: {machine_description()}",
        f"- {args.groups} emulated nodes at {args.rate}, one replica group (one process) each; torchft"
        " Lighthouse on node 0 (heartbeat timeout 1 s)",
        f"- job: MLP 64-{args.hidden}-10 on digits, inner AdamW, DiLoCo (outer Nesterov SGD 0.7/0.9), tau"
        f" {args.tau}, {args.steps} steps, {args.step_sleep * 1000:g} ms of emulated compute per step",
        f"- failures: a random live group killed every {args.kill_every:g} s (seed {args.seed}); ft:"
        f" restarted after {args.restart_delay:g} s; restart: every group restarts from the newest common"
        f" checkpoint (every {args.checkpoint_every} rounds)",
        f"- failure-free step time (mode none): {step_seconds * 1000:.1f} ms",
        "",
        markdown_table(headers, rows),
        "",
        "Goodput = useful group-steps / (groups x seconds / failure-free step time). Useful: for ft the steps"
        " of the groups that contributed to each committed round; for restart the final trajectory's"
        " groups x steps.",
        "",
    ]
    return "\n".join(lines)


def _plot(results: dict[str, Any], runs: dict[str, _Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, result in results.items():
        xs, ys = zip(*result["trajectory"])
        ax.plot(xs, ys, ".", markersize=2, label=mode)
        for when, _ in runs[mode].kills:
            ax.axvline(when - result["start"], color=ax.lines[-1].get_color(), alpha=0.25, linewidth=0.8)
    ax.set(xlabel="seconds since the groups joined", ylabel="step of the model (completed rounds)")
    ax.set_title("Replica groups under failures (vertical lines: a group killed)")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
