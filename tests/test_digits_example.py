"""examples/digits/train.py runs end to end on 2 CPU processes and reports accuracy and bytes."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT, run_script

from examples.digits.model import MLPClassifier

pytestmark = pytest.mark.multiprocess


def test_digits_example_reports_consensus_accuracy_and_bytes():
    proc = run_script(
        [str(REPO_ROOT / "examples" / "digits" / "train.py"), "--strategy", "local_sgd", "--epochs", "2"],
        timeout=120,
    )
    out = proc.stdout
    # Printed once, by rank 0 only.
    assert out.count("val_acc ") == 1 and out.count("bytes_sent ") == 1, out
    steps = int(re.search(r"^strategy local_sgd: 2 processes, (\d+) optimizer steps", out, re.M).group(1))
    assert steps == 2 * 23  # 1437 training samples, 719 per rank, batches of 32
    assert 0.5 < float(re.search(r"^val_acc (\S+)", out, re.M).group(1)) <= 1.0
    sent = int(re.search(r"^bytes_sent (\d+)", out, re.M).group(1))
    # At least the averaging rounds (every 8 steps: parameters + momentum in fp32) went through the ledger.
    num_params = sum(p.numel() for p in MLPClassifier(hidden=128, depth=2).parameters())
    assert sent >= (steps // 8) * 2 * num_params * 4
