"""Shared test setup: one thread per process (CPU results are then bitwise reproducible)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def run_script(args: list[str], timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python *args`` with one thread per process; raise with the output tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or REPO_ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def run_worker(tmp_path):
    """Run tests/lightning_worker.py with extra args; return each rank's record, in rank order."""

    def run(*extra: str, out: Path | None = None) -> list[dict]:
        out = out or tmp_path / "run"
        out.mkdir(parents=True, exist_ok=True)
        run_script([str(TESTS_DIR / "lightning_worker.py"), "--out", str(out), *extra])
        files = sorted(out.glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
        return [torch.load(f, weights_only=False) for f in files]

    return run
