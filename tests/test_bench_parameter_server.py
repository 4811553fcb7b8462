"""``python -m benchmarks.bench_parameter_server``: the runtime theory it prints beside the measurements,
and a quick real run (2 workers + a server) that must print a row per variant."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from benchmarks import bench_parameter_server as bench


def test_expected_time_per_update_is_the_papers_order_statistics():
    """Exp(mu) compute times, P = 4, 1/mu = 1: sync E[Y_{4:4}] = H_4, K-sync E[Y_{K:4}] = H_4 - H_{4-K},
    async 1/(mu P), K-batch-async k/(mu P)."""
    h4 = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert bench.expected_time_per_update("sync", 4, 4, 1.0) == pytest.approx(h4)
    assert bench.expected_time_per_update("sync", 2, 4, 1.0) == pytest.approx(h4 - 1.5)
    assert bench.expected_time_per_update("sync", 1, 4, 1.0) == pytest.approx(0.25)  # the fastest of 4
    assert bench.expected_time_per_update("async", 1, 4, 0.05) == pytest.approx(0.0125)
    assert bench.expected_time_per_update("batch", 4, 4, 1.0) == pytest.approx(1.0)
    # ~ (1/mu) log P for large P, as the slides say
    assert bench.expected_time_per_update("sync", 1000, 1000, 1.0) == pytest.approx(
        math.log(1000) + 0.5772, abs=1e-3
    )


def test_loss_at_reads_the_latest_model_before_the_time():
    curve = [(0.0, 2.0), (1.0, 1.0), (2.0, 0.5)]
    assert [bench.loss_at(curve, t) for t in (0.0, 0.5, 1.0, 5.0)] == [2.0, 2.0, 1.0, 0.5]


@pytest.mark.multiprocess
def test_quick_run_prints_a_row_per_variant():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_parameter_server", "--quick"],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "SGD" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["sync SGD", "K-sync SGD (k=1)", "async SGD"]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}
    assert all(float(c[1]) > 0 and float(c[2]) > float(c[3]) > 0 for c in cells.values())  # ms figures
    # K-sync with k = 1 of 2 cancels the slower worker's computations; async never does, but its
    # gradients are stale
    cancelled, _ = map(int, cells["K-sync SGD (k=1)"][8].split(" / "))
    assert cancelled > 0 and cells["async SGD"][8] == "0 / 0" and float(cells["async SGD"][9]) > 0
