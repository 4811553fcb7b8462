"""The parameter-server strategies inside Lightning: sync SGD equals DDP, async runs end where they should."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import TESTS_DIR
from test_faults import _alive

from lightning_commsgd import AsyncSGDStrategy, KSyncSGDStrategy, StalenessAwareLR


@pytest.mark.multiprocess
def test_ksync_with_k_equal_p_follows_ddp_and_resumes_mid_epoch_bitwise(run_worker, tmp_path):
    """k = P: every update averages all P gradients of the current model: DDP's trajectory (momentum SGD,
    Nesterov, weight decay, a step scheduler and two parameter groups, all run on the server), to 1e-6 at
    every step on every rank. The checkpoint at update 6 (mid-epoch) holds the server's model, optimizer
    and version, and a run resumed from it continues the uninterrupted trajectory bitwise (the server
    sums gradients in worker order, whatever order they arrived in)."""
    import torch

    common = ["--max-steps", "12", "--scheduler", "--groups", "--devices", "3"]
    ps = run_worker("--strategy", "ksync_sgd", *common, "--ckpt-every", "6", out=tmp_path / "ps")
    ddp = run_worker("--strategy", "ddp", *common, out=tmp_path / "ddp")
    for rank, (rec_ps, rec_ddp) in enumerate(zip(ps, ddp)):
        assert rec_ps["steps"] == rec_ddp["steps"] == list(range(1, 13)), rank
        for step, (a, b) in enumerate(zip(rec_ps["params"], rec_ddp["params"]), start=1):
            assert float((a - b).abs().max()) <= 1e-6, (rank, step)
    # workers 1 and 2 push 12 gradients (a 32-byte header each) and a last "leave" header, and pull 12
    # models; rank 0's own pushes and pulls are in-process and cost nothing
    message = ps[0]["params"][0].numel() * 4 + 32
    for worker in (1, 2):
        traffic = ps[worker]["ledger"]["by_tag"]["ps"]
        assert traffic["bytes_sent"] == 12 * message + 32 and traffic["bytes_received"] == 12 * message
    server = ps[0]["ledger"]["by_tag"]["ps"]
    assert server["bytes_received"] == 2 * (12 * message + 32) and server["bytes_sent"] == 2 * 12 * message

    ckpt = tmp_path / "ps" / "ckpt" / "step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    state = saved["lightning_commsgd_ps"]["server"]
    assert state["version"] == 6 and saved["global_step"] == 6
    model = torch.cat([v.reshape(-1) for v in saved["state_dict"].values()]).double()
    assert torch.equal(model, ps[0]["params"][5])  # the server's model after update 6
    assert torch.equal(state["model"].double(), model)
    resumed = run_worker("--strategy", "ksync_sgd", *common, "--resume", str(ckpt), out=tmp_path / "resumed")
    for rec_full, rec_resumed in zip(ps, resumed):
        assert rec_resumed["steps"] == list(range(7, 13))
        for a, b in zip(rec_full["params"][6:], rec_resumed["params"]):
            assert torch.equal(a, b)


@pytest.mark.multiprocess
def test_a_dedicated_server_with_two_workers_follows_ddp_on_two_processes(run_worker, tmp_path):
    """server="dedicated" on 3 processes: rank 0 only serves, workers 1 and 2 read the shards DDP's ranks 0
    and 1 read; sync SGD then follows 2-process DDP step by step, and rank 0's loop steps with the
    server's updates and ends holding the final model. An epoch scheduler (lr halved after each 12-batch
    epoch) steps on the server where DDP steps it."""
    common = ["--max-steps", "16", "--epoch-scheduler"]
    ps = run_worker(
        "--strategy", "ksync_sgd", "--ps-server", "dedicated", "--devices", "3", *common, out=tmp_path / "ps"
    )
    ddp = run_worker("--strategy", "ddp", "--devices", "2", *common, out=tmp_path / "ddp")
    for worker, rec_ddp in zip(ps[1:], ddp):
        assert worker["steps"] == rec_ddp["steps"] == list(range(1, 17))
        for a, b in zip(worker["params"], rec_ddp["params"]):
            assert float((a - b).abs().max()) <= 1e-6
    assert ps[0]["steps"][-1] == 16
    assert float((ps[0]["final_params"] - ddp[0]["final_params"]).abs().max()) <= 1e-6
    assert ps[0]["batch_sizes"] and "ps" in ps[0]["ledger"]["by_tag"]


@pytest.mark.multiprocess
@pytest.mark.extended  # sync SGD against DDP runs in make test (above); this adds validation to it
def test_validation_inside_fit_is_rank_local_and_leaves_training_undisturbed(run_worker, tmp_path):
    """Validation every 5 steps under sync SGD: no collective (sync_dist logs each rank's own value), the
    trajectory stays DDP's, and the mean of the ranks' validation losses is DDP's synchronised one (every
    rank validated the server's model of that step)."""
    common = ["--max-steps", "10", "--validate", "--no-gather"]
    ps = run_worker("--strategy", "ksync_sgd", *common, out=tmp_path / "ps")
    ddp = run_worker("--strategy", "ddp", *common, out=tmp_path / "ddp")
    for rec_ps, rec_ddp in zip(ps, ddp):
        for a, b in zip(rec_ps["params"], rec_ddp["params"]):
            assert float((a - b).abs().max()) <= 1e-6
    ranks_mean = (ps[0]["metrics"]["val_loss"] + ps[1]["metrics"]["val_loss"]) / 2
    assert ranks_mean == pytest.approx(ddp[0]["metrics"]["val_loss"], abs=1e-6)
    assert ps[0]["metrics"]["val_loss"] != ps[1]["metrics"]["val_loss"]  # rank-local values
    # once training started (step >= 0), sync_dist reduced nothing: no all-reduce at all
    assert not [c for r in ps for c in r["calls"] if c["fn"] == "all_reduce" and c["step"] >= 0]
    assert [c for r in ddp for c in r["calls"] if c["fn"] == "all_reduce" and c["step"] >= 0]  # DDP's do


@pytest.mark.multiprocess
@pytest.mark.parametrize(("k", "variant", "mu"), [(2, "k-batch", 200.0)])
def test_async_variants_stop_every_rank_at_max_steps_with_rank0_holding_the_server_model(
    run_worker, tmp_path, k, variant, mu
):
    """The server's update count is the global step: with max_steps=12 every rank stops, and each worker's
    global_step is the version of the last model it received (12 for those told to stop at the end).
    The K-batch run also emulates stragglers (Exp(200/s) delays)."""
    straggler = ["--straggler-mu", str(mu)] if mu else []
    records = run_worker(
        "--strategy", "async_sgd", "--k", str(k), "--variant", variant, "--max-steps", "12", "--devices", "3",
        *straggler, out=tmp_path / variant,
    )  # fmt: skip
    # after update 12 every push is answered with "stop" and the model of version 12
    assert [rec["steps"][-1] for rec in records] == [12, 12, 12]
    assert all(rec["steps"] == sorted(set(rec["steps"])) for rec in records)  # the version never goes back
    # every byte a worker sent reached the server, and the server's answers reached the workers
    traffic = [rec["ledger"]["by_tag"]["ps"] for rec in records]
    assert traffic[0]["bytes_received"] == traffic[1]["bytes_sent"] + traffic[2]["bytes_sent"] > 0
    assert traffic[0]["bytes_sent"] == traffic[1]["bytes_received"] + traffic[2]["bytes_received"]


def test_bad_arguments_are_refused_before_any_process_group():
    with pytest.raises(ValueError, match="k must be in"):
        KSyncSGDStrategy(k=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        AsyncSGDStrategy(k=1.5)
    with pytest.raises(ValueError, match="variant"):
        AsyncSGDStrategy(variant="hogwild")
    with pytest.raises(TypeError, match="staleness_lr"):
        AsyncSGDStrategy(staleness_lr=0.1)
    with pytest.raises(ValueError, match="straggler_mu"):
        AsyncSGDStrategy(straggler_mu=0)
    # RI-SGD and the adapter's options are no parameter-server arguments: refused by name
    with pytest.raises(TypeError, match="KSyncSGDStrategy got an unexpected argument 'redundancy'"):
        KSyncSGDStrategy(redundancy=0.5)
    with pytest.raises(TypeError, match="AsyncSGDStrategy got an unexpected argument 'eval_on'"):
        AsyncSGDStrategy(eval_on="local")
    AsyncSGDStrategy(staleness_lr=StalenessAwareLR(C=1.0))


def test_k_above_the_number_of_workers_is_refused_when_the_trainer_is_built():
    import lightning as L

    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        L.Trainer(accelerator="cpu", devices=2, strategy=KSyncSGDStrategy(k=3), logger=False)


def _fault_run(tmp_path, strategy: str, k: int, fault: str) -> subprocess.CompletedProcess:
    """tests/fault_worker.py on 3 ranks under a parameter-server strategy, with ``FAULT``."""
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, str(TESTS_DIR / "fault_worker.py"), "--out", str(out), "--strategy", strategy,
        "--k", str(k), "--max-steps", "30", "--sync-timeout", "10",
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=env, start_new_session=True
    )


@pytest.mark.multiprocess
@pytest.mark.fault_matrix
@pytest.mark.lightning_smoke
def test_a_killed_worker_does_not_stop_async_sgd(tmp_path):
    """Rank 2 is SIGKILLed at step 5: the launcher reports it, the server drops it and ranks 0 and 1
    finish the 30 updates; the job exits 0."""
    proc = _fault_run(tmp_path, "async", 1, "2:5:kill:step")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FIT DONE" in output, output[-3000:]
    assert "rank 2's process ended with -9" in output
    assert "parameter server: lost worker 2 at update" in output and "workers left: [0, 1]" in output


@pytest.mark.multiprocess
@pytest.mark.fault_matrix
def test_ksync_with_too_few_workers_left_ends_every_rank_with_the_clear_error(tmp_path):
    """K-sync with k = 3 = P: rank 2's death leaves too few workers; rank 0 raises TooFewWorkersError
    naming rank 2, and the job ends (no rank waits for ever)."""
    proc = _fault_run(tmp_path, "ksync", 3, "2:5:kill:step")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "FIT DONE" not in output
    expected = "TooFewWorkersError: K-sync SGD (k=3) needs 3 live worker(s) per update but only 2 remain"
    assert expected in output
    assert "lost rank 2 (" in output
    pids = [int((tmp_path / "run" / f"pid{r}").read_text()) for r in range(3)]
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a rank outlived the failed job"
