"""Finite flags in the round (issue 9, item 4), on 3 gloo processes with the plain-PyTorch averager: a
poisoned replica is seen by every rank in the same round, and "skip" averages the finite replicas only."""

from __future__ import annotations

import pytest
import torch
from mp import run_workers
from mp_workers import nonfinite_gossip_worker, nonfinite_round_worker, nonfinite_worker

N_PARAMS = 3 * 2 + 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("poison", ["params", "momentum"])
def test_every_rank_raises_in_the_same_round_naming_the_rank(tmp_path, poison):
    results = run_workers(nonfinite_worker, 3, tmp_path, "raise", "local", poison)
    for result in results:
        assert result["error"] is not None and result["error"].startswith("NonFiniteError")
        assert "rank(s) [1] before the round at step 1" in result["error"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("momentum", "poison"), [("average", "params"), ("local", "momentum")])
def test_skip_averages_the_finite_replicas_and_heals_the_poisoned_one(tmp_path, momentum, poison):
    results = run_workers(nonfinite_worker, 3, tmp_path, "skip", momentum, poison)
    expected = (results[0]["before"] + results[2]["before"]) / 2
    for rank, result in enumerate(results):
        assert result["error"] is None
        assert torch.allclose(result["after"], expected, atol=1e-7, rtol=0), rank
        assert all(m is None or torch.isfinite(m).all() for m in result["momentum"])
    if momentum == "local":  # rank 1's local state was not replaced by the round: it was reset
        assert all(m is None for m in results[1]["momentum"])
        assert all(m is not None for m in results[0]["momentum"])
    # the flags ride in the round: one all-reduce of the data plus 3 flags, nothing else
    state = N_PARAMS if momentum == "average" else 0
    for result in results:
        average = result["ledger"]["by_tag"]["average"]
        assert average["collectives"] == 1 and average["bytes_sent"] == (N_PARAMS + state + 3) * 4
    # not silent: every rank counts the skipped replica, the lowest finite rank warns once, naming it
    assert [result["ledger"]["skipped_replicas"] for result in results] == [1, 1, 1]
    (warning,) = results[0]["warnings"]
    assert "on_nonfinite='skip'" in warning and "rank(s) [1] before the round at step 1" in warning
    assert "averaged the 2 finite replica(s)" in warning
    assert ("optimizer state (reset)" in warning) == (momentum == "local")
    assert results[1]["warnings"] == [] and results[2]["warnings"] == []


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["elastic", "overlap_fp32", "overlap_bf16"])
def test_elastic_and_overlap_rounds_carry_the_flags_too(tmp_path, kind):
    payload = {"elastic": "elastic", "overlap_fp32": "", "overlap_bf16": "bf16"}[kind]
    results = run_workers(nonfinite_round_worker, 3, tmp_path, payload)
    if kind == "overlap_bf16":  # a rounded payload: rank 1 stops before sending; the others' next round fails
        assert results[1]["error"].startswith("NonFiniteError") and results[1]["rounds_ok"] == 1
        assert "rank(s) [1] before the round at step 2" in results[1]["error"]
        for rank in (0, 2):
            assert results[rank]["error"] is not None and "NonFinite" not in results[rank]["error"]
        return
    # EASGD's sum stops every rank in the first round; overlap's average stops them when it arrives
    expected_rounds = 1 if kind == "elastic" else 2
    for result in results:
        assert result["error"] is not None and result["error"].startswith("NonFiniteError"), result
        assert "rank(s) [1]" in result["error"] and result["rounds_ok"] == expected_rounds


@pytest.mark.multiprocess
def test_a_poisoned_gossip_message_stops_its_neighbours_before_they_mix(tmp_path):
    results = run_workers(nonfinite_gossip_worker, 4, tmp_path)
    for rank in (0, 1, 2):  # rank 1 and its ring neighbours
        assert results[rank]["error"] is not None and results[rank]["error"].startswith(
            "NonFiniteError"
        )
        assert "rank(s) [1] before the gossip round at step 1" in results[rank]["error"]
        assert not results[rank]["changed"]  # nothing was mixed
    assert results[3]["error"] is None and results[3]["finite"]  # not reached by rank 1's message
