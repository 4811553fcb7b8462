"""The demo's training script keeps working (make demo runs it for DDP and local SGD)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, run_script

pytestmark = pytest.mark.multiprocess


def test_train_digits_reports_local_sgd_traffic(tmp_path):
    out = tmp_path / "result.json"
    run_script(
        [str(REPO_ROOT / "examples" / "train_digits.py"), "--strategy", "local_sgd", "--tau", "4",
         "--max-steps", "8", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["strategy"] == "local_sgd" and result["tau"] == 4 and result["steps"] == 8
    by_tag = result["ledger"]["by_tag"]
    assert by_tag["average"]["rounds"] == 2  # steps 4 and 8
    # params + momentum of the MLP in fp32, per round
    assert by_tag["average"]["bytes_sent"] == 2 * 2 * result["num_params"] * 4
    assert 0.0 <= result["final_val_acc"] <= 1.0


def test_train_digits_adacomm_trace(tmp_path):
    """The AdaComm benchmark's input: a per-step trace whose tau follows the schedule."""
    out = tmp_path / "result.json"
    run_script(
        [str(REPO_ROOT / "examples" / "train_digits.py"), "--strategy", "local_sgd", "--schedule", "adacomm",
         "--tau0", "4", "--interval-steps", "3", "--max-steps", "12", "--trace", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    trace = result["trace"]
    assert [row["step"] for row in trace] == list(range(1, 13))
    assert trace[0]["tau"] == 4 and result["final_tau"] == trace[-1]["tau"]
    assert all(row["loss"] > 0 for row in trace)
    rounds = [row["rounds"] for row in trace]
    assert rounds == sorted(rounds) and rounds[-1] == result["averaging_rounds"] >= 2


def test_train_digits_gossip_reports_its_traffic(tmp_path):
    """The decentralized benchmark's input: gossip bytes split from the final exact average."""
    out = tmp_path / "result.json"
    run_script(
        [str(REPO_ROOT / "examples" / "train_digits.py"), "--strategy", "gossip", "--topology", "ring",
         "--tau", "2", "--max-steps", "6", "--json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["topology"] == "ring" and result["round_tag"] == "gossip" and result["in_sync_after_fit"]
    gossip = result["ledger"]["by_tag"]["gossip"]
    # 2 processes: one neighbour; params + momentum per round, 3 rounds
    assert gossip["rounds"] == 3 and gossip["bytes_sent"] == 3 * 2 * result["num_params"] * 4
    assert result["final_bytes_sent_per_rank"] == result["ledger"]["by_tag"]["final"]["bytes_sent"] > 0


def test_train_digits_ri_sgd_non_iid_val_trace(tmp_path):
    """The redundancy benchmark's input: RI-SGD on label-skewed shards, validated every few steps."""
    out = tmp_path / "result.json"
    run_script(
        [str(REPO_ROOT / "examples" / "train_digits.py"), "--strategy", "local_sgd", "--tau", "2",
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
