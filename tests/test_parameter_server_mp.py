"""The parameter server over gloo against a one-process replay of its events, and worker deaths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mp import free_port, run_workers
from ps_workers import SCENARIOS, replay, run_all

WORLD = 4  # rank 0 is the server (dedicated, or also a worker in the *_colocated scenarios)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ps")
    per_rank = run_workers(run_all, WORLD, out, list(SCENARIOS))
    return {name: [r[name] for r in per_rank] for name in SCENARIOS}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_server_updates_equal_a_one_process_replay_of_its_events(records, name):
    runs = records[name]
    models, server = replay(name, runs)
    distributed = runs[0]["models"]
    assert len(distributed) == len(models) == SCENARIOS[name][5]
    for j, (ours, theirs) in enumerate(zip(distributed, models)):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), f"update {j + 1} differs"
    log = runs[0]["log"]
    assert [(v, c, s) for v, c, s, _ in log] == [(u.version, u.contributors, u.staleness) for u in server.log]


def _cancelled(runs):
    return sum(r.get("cancelled", 0) for r in runs[1:]) + (runs[0].get("cancelled", 0) or 0)


@pytest.mark.multiprocess
def test_each_scenario_exercises_its_variant(records):
    """The scripts produce what each variant is about (else the replay test proves little)."""
    for _, contributors, staleness, _ in records["sync_all"][0]["log"]:
        assert sorted(w for w, _ in contributors) == [1, 2, 3] and staleness == [0, 0, 0]
    ksync = records["ksync_2of3"]
    assert all(len(c) == 2 and s == [0, 0] for _, c, s, _ in ksync[0]["log"])
    # the slow worker 3 is cancelled (it drops its gradient when the new model arrives first)
    assert ksync[3]["cancelled"] > 0 and not any(3 in [w for w, _ in c] for _, c, _, _ in ksync[0]["log"][:3])
    kasync = records["kasync_2"][0]["log"]
    assert all(len(c) == 2 for _, c, _, _ in kasync) and max(max(s) for _, _, s, _ in kasync) > 0
    kbatch = records["kbatch_3"][0]["log"]
    assert any(len({w for w, _ in c}) < len(c) for _, c, _, _ in kbatch)  # one worker, two mini-batches
    async_lr = records["async_staleness"][0]["log"]
    factors = [f for _, _, _, per in async_lr for group in per for f in group]
    assert min(factors) < 1.0 and max(factors) == 1.0  # stale gradients damped, fresh ones not
    colocated = records["ksync_colocated"]
    assert any(0 in [w for w, _ in c] for _, c, _, _ in colocated[0]["log"])  # rank 0 also trains
    # rank 0's own pushes cost no bytes; every byte a worker sends, the server receives
    for name in ("ksync_2of3", "kbatch_colocated"):
        runs = records[name]
        sent = sum(r["ledger"]["by_tag"]["ps"]["bytes_sent"] for r in runs[1:])
        assert sent == runs[0]["ledger"]["by_tag"]["ps"]["bytes_received"] > 0


def run_with_a_dead_worker(tmp_path, mode: str, k: int) -> list[dict]:
    """4 processes (rank 0 the dedicated server, workers 1-3); worker 2 exits abruptly after 3 steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PS_PORT": str(free_port())}
    script = os.path.join(os.path.dirname(__file__), "ps_workers.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, mode, str(k), "2", str(tmp_path), str(rank), str(WORLD)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.wait(timeout=120)
    assert procs[2].returncode == 17
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) if r != 2 else {} for r in range(WORLD)]


@pytest.mark.multiprocess
@pytest.mark.fault_matrix
def test_a_dead_worker_does_not_stop_async_sgd(tmp_path):
    """K-async with k = 2 of 3 workers: worker 2 dies, workers 1 and 3 carry the run to its 15 updates."""
    server, one, _, three = run_with_a_dead_worker(tmp_path, "async", 2)
    assert server["outcome"] == "finished" and server["version"] == 15
    assert list(server["lost"]) == ["2"] and "Connection closed by peer" in server["lost"]["2"]
    assert one["outcome"] == three["outcome"] == "finished"


@pytest.mark.multiprocess
@pytest.mark.fault_matrix
def test_ksync_with_fewer_live_workers_than_k_fails_with_a_clear_error(tmp_path):
    """K-sync with k = 3 of 3: worker 2's death leaves 2 < k; the server fails naming it, and the other
    workers stop with the server's loss instead of waiting for ever."""
    server, one, _, three = run_with_a_dead_worker(tmp_path, "sync", 3)
    assert server["outcome"].startswith("TooFewWorkersError: K-sync SGD (k=3) needs 3 live worker(s)")
    assert "lost rank 2 (" in server["outcome"] and server["version"] < 15
    for worker in (one, three):
        assert worker["outcome"].startswith("ServerLostError: worker"), worker["outcome"]
