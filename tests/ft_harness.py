"""What the replica-group tests share: launching a group's process against a Lighthouse, waiting for the
groups (their logs in the failure message), and comparing models with a simulation's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def group_env() -> dict[str, str]:
    """One thread per process, quiet torchft, the tests folder importable, and no inherited MASTER_PORT (each
    group is its own job with its own free port)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RUST_LOG="error", TORCHFT_USE_OTEL="false")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.pop("MASTER_PORT", None)
    return env


def launch_group(script: Path, out: Path, *args: str) -> subprocess.Popen:
    """``python script *args``, its output in ``out`` with the suffix ``.log``."""
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    command = [sys.executable, str(script), *args]
    return subprocess.Popen(command, env=group_env(), stdout=log, stderr=subprocess.STDOUT)


def wait_groups(
    processes: dict[str, subprocess.Popen], outs: dict[str, Path], seconds: float
) -> dict[str, int]:
    """Every process's exit status; past ``seconds`` all are killed and the test fails with their logs."""
    deadline, codes = time.monotonic() + seconds, {}
    for name, process in processes.items():
        try:
            codes[name] = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes.values():
                other.kill()
            logs = {n: outs[n].with_suffix(".log").read_text()[-3000:] for n in processes}
            pytest.fail(f"replica group {name} did not finish; logs: {logs}")
    return codes


def assert_models_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Sums over groups go through gloo in its own order: float32 rounding (a wrong membership is ~1e-2)."""
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def assert_healed_bitwise(records: dict[str, dict], healer: str, join_step: int) -> int:
    """After its first round the healed group's state (step, rounds, parameters, inner momentum, outer
    optimizer state, anchor) equals its source's bit for bit. The source is the group the record names, or
    else the one whose state equals it. Returns the source's group index."""
    mine = records[healer]["after_round"][0]

    def state_of(name: str) -> dict:
        return next(s for s in records[name]["after_round"] if s["step"] == join_step)

    peers = [name for name in records if name != healer]
    source = records[healer]["healed_from"]
    name = (
        str(source)
        if source is not None
        else next(
            (
                p
                for p in peers
                if all(torch.equal(a, b) for a, b in zip(mine["momentum"], state_of(p)["momentum"]))
            ),
            None,
        )
    )
    assert name in peers, f"no live group's state equals the healed group's (healed from {source})"
    theirs = state_of(name)
    assert (mine["step"], mine["rounds"]) == (theirs["step"], theirs["rounds"])
    for key in ("params", "momentum", "outer"):
        assert all(torch.equal(a, b) for a, b in zip(mine[key], theirs[key])), key
    assert torch.equal(mine["anchor"], theirs["anchor"])
    return int(name)
