"""Exact resume for every strategy of the package (issue 9, item 2): from checkpoints before the first round,
at tau - 1, tau, tau + 1, mid-period and mid-epoch, at schedule switch points, at each phase of a time-varying
graph, with a round in flight, with compression residuals, with the RI-SGD sampler mid-epoch, right after a
DiLoCo outer step, and with a Streaming DiLoCo fragment in flight (sent, not landed) and right after one
landed. One launch of 3 processes under torchrun runs every configuration (``tests/resume_worker.py``); a
resumed fit must equal the uninterrupted one bitwise: parameters after every step, losses, final parameters,
optimizer state, algorithm state and rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TESTS_DIR
from resume_worker import CONFIGS


@pytest.mark.multiprocess
def test_every_strategy_resumes_bitwise_from_every_checkpoint(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
        str(TESTS_DIR / "resume_worker.py"), "--out", str(tmp_path), *CONFIGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    failures = {}
    for name, (_, resume_steps) in CONFIGS.items():
        for rank in range(3):
            report = json.loads((tmp_path / name / f"rank{rank}.json").read_text())
            assert sorted(map(int, report)) == sorted(resume_steps), (name, rank)
            failures.update({f"{name} rank {rank} from step {k}": p for k, p in report.items() if p})
    assert not failures, failures
