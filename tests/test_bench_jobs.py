"""The benchmarks' digits job, run as the benchmarks run it (``python -m benchmarks.jobs.digits``, here on
2 CPU processes, which Lightning's launcher starts by re-running that ``-m`` command line), writes the
results each benchmark reads."""

from __future__ import annotations

import json

import pytest
from conftest import run_script

pytestmark = pytest.mark.multiprocess


def test_digits_job_reports_local_sgd_traffic(tmp_path):
    out = tmp_path / "result.json"
    run_script(
        ["-m", "benchmarks.jobs.digits", "--strategy", "local_sgd", "--tau", "4",
         "--max-steps", "8", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["strategy"] == "local_sgd" and result["tau"] == 4 and result["steps"] == 8
    by_tag = result["ledger"]["by_tag"]
    assert by_tag["average"]["rounds"] == 2  # steps 4 and 8
    # params + momentum of the MLP in fp32, and one finite flag per rank, per round
    assert by_tag["average"]["bytes_sent"] == 2 * (2 * result["num_params"] + result["devices"]) * 4
    assert 0.0 <= result["final_val_acc"] <= 1.0


@pytest.mark.extended
def test_digits_job_adacomm_trace(tmp_path):
    """The AdaComm benchmark's input: a per-step trace whose tau follows the schedule."""
    out = tmp_path / "result.json"
    run_script(
        ["-m", "benchmarks.jobs.digits", "--strategy", "local_sgd", "--schedule", "adacomm",
         "--tau0", "4", "--interval-steps", "3", "--max-steps", "12", "--trace", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    trace = result["trace"]
    assert [row["step"] for row in trace] == list(range(1, 13))
    assert trace[0]["tau"] == 4 and result["final_tau"] == trace[-1]["tau"]
    assert all(row["loss"] > 0 for row in trace)
    rounds = [row["rounds"] for row in trace]
    assert rounds == sorted(rounds) and rounds[-1] == result["averaging_rounds"] >= 2


@pytest.mark.extended
def test_digits_job_gossip_reports_its_traffic(tmp_path):
    """The decentralized benchmark's input: gossip bytes split from the final exact average."""
    out = tmp_path / "result.json"
    run_script(
        ["-m", "benchmarks.jobs.digits", "--strategy", "gossip", "--topology", "ring",
         "--tau", "2", "--max-steps", "6", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["topology"] == "ring" and result["round_tag"] == "gossip" and result["in_sync_after_fit"]
    gossip = result["ledger"]["by_tag"]["gossip"]
    # 2 processes: one neighbour; params + momentum and the finite flag per round, 3 rounds
    assert gossip["rounds"] == 3 and gossip["bytes_sent"] == 3 * (2 * result["num_params"] + 1) * 4
    assert result["final_bytes_sent_per_rank"] == result["ledger"]["by_tag"]["final"]["bytes_sent"] > 0


@pytest.mark.extended
def test_digits_job_ri_sgd_non_iid_val_trace(tmp_path):
    """The redundancy benchmark's input: RI-SGD on label-skewed shards, validated every few steps."""
    out = tmp_path / "result.json"
    run_script(
        ["-m", "benchmarks.jobs.digits", "--strategy", "local_sgd", "--tau", "2",
         "--redundancy", "0.5", "--non-iid", "--batch-size", "8", "--max-steps", "6",
         "--val-every-steps", "3", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    config = result["config"]
    assert (config["redundancy"], config["sampling"], config["non_iid"]) == (0.5, "stratified", True)
    # 2 processes, mu = 0.5: each holds its own shard and its neighbour's, b = 8 from each per batch.
    assert result["samples_per_rank_batch"] == 16
    trace = result["val_trace"]
    assert [(row["step"], row["rounds"]) for row in trace] == [(3, 1), (6, 3)]
    assert all(row["val_loss"] > 0 and 0 <= row["val_acc"] <= 1 for row in trace)
    # The last validation inside fit saw the consensus model that the final validate() sees.
    assert trace[-1]["val_acc"] == pytest.approx(result["final_val_acc"])


def test_digits_job_dore_sends_a_fraction_of_ddps_bytes(tmp_path):
    """The compression benchmark's input: DORE's exact payloads on every rank, far below DDP's fp32
    gradients for the same steps, and a trace with the mean over the ranks."""
    results = {}
    for strategy in ("ddp", "dore"):
        out = tmp_path / f"{strategy}.json"
        run_script(
            ["-m", "benchmarks.jobs.digits", "--strategy", strategy, "--hidden", "64",
             "--depth", "1", "--max-steps", "4", "--trace", "--json", str(out)]
        )  # fmt: skip
        results[strategy] = json.loads(out.read_text())
    ddp, dore = results["ddp"], results["dore"]
    numel, steps = dore["num_params"], 4
    assert ddp["num_params"] == numel and ddp["steps"] == dore["steps"] == steps
    assert ddp["round_bytes_sent_by_rank"] == [4 * numel * steps] * 2  # fp32 gradients, every step
    assert dore["round_tags"] == ["dore_gradient", "dore_model"] and dore["compression"]["server"] == "rank0"
    # rank 0 (the master) broadcasts q_hat plus a verdict byte per rank and one for itself; rank 1 gathers
    # its Delta_hat plus a status byte up. Inf-norm ternary: 2 bits a value and an fp32 norm per 256.
    payload = 4 * -(-numel // 256) + -(-2 * numel // 8)
    assert dore["compression"]["up_payload_bytes_per_step"] == payload
    assert dore["round_bytes_sent_by_rank"] == [(payload + 3) * steps, (payload + 1) * steps]
    assert max(dore["round_bytes_sent_by_rank"]) < 0.07 * min(ddp["round_bytes_sent_by_rank"])
    assert dore["averaging_rounds"] == steps and dore["tau"] is None and dore["in_sync_after_fit"]
    trace = dore["trace"]
    assert [row["rounds"] for row in trace] == [1, 2, 3, 4] and all(row["tau"] is None for row in trace)
    assert (
        trace[-1]["mean_round_bytes_sent"] == dore["mean_round_bytes_sent_per_rank"] == (payload + 2) * steps
    )
    assert trace[-1]["max_round_bytes_sent"] == (payload + 3) * steps


def test_every_registered_strategy_is_timed_by_bench_overhead_or_has_no_local_step():
    """A newly registered strategy must get an overhead mode, or be listed with why it has no local step."""
    from benchmarks.jobs.overhead import MODES, NO_LOCAL_STEPS, unclassified

    assert unclassified() == []
    assert "plain" in MODES and "local_sgd_2" in MODES and NO_LOCAL_STEPS
