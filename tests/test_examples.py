"""examples/demo.py (make demo): DDP and local SGD on the digits, side by side in one markdown table."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT, run_script

pytestmark = pytest.mark.multiprocess


def test_demo_prints_ddp_and_local_sgd_side_by_side():
    proc = run_script(
        [str(REPO_ROOT / "examples" / "demo.py"), "--epochs", "1", "--repeat", "1"], timeout=300
    )
    out = proc.stdout
    steps = int(re.search(r"^[\d,]+ parameters, 2 processes, (\d+) steps each$", out, re.M).group(1))
    assert steps == 23  # 1437 training samples, 719 per rank, batches of 32
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header, ddp, local = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    assert header == [
        "strategy", "wall time (s)", "train loop (s)", "time ratio vs DDP", "bytes sent per rank",
        "bytes ratio vs DDP", "rounds", "final val acc",
    ]  # fmt: skip
    assert (ddp[0], local[0]) == ("ddp", "local_sgd (tau=8)")
    assert ddp[3] == ddp[5] == "1.000"  # the baseline's ratios to itself
    assert int(ddp[6]) >= steps  # DDP all-reduces at least one gradient bucket per step
    # local SGD: parameters and momentum every 8 steps instead of the gradients every step
    assert int(local[6]) < int(ddp[6]) and 0 < float(local[5]) < 0.5
    sent = int(re.fullmatch(r"[\d.]+ [kMG]?B \(([\d,]+) B\)", local[4]).group(1).replace(",", ""))
    assert sent > 0 and all(0 < float(row[7]) <= 1 for row in (ddp, local))
