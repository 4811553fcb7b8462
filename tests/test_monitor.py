"""What a new user sees in the first hour (issue 18): the monitor's figures on the progress bar, the
algorithm's rounds counted apart from Lightning's collectives, a warning for a per-step ``sync_dist``, fit's
ledger after ``trainer.test()``, no false "not resumable" warning on a mid-epoch resume, and a warned and
counted skip of a poisoned replica.

One 2-rank run (LocalSGD, tau=8, 16 steps, ``self.log(..., sync_dist=True)`` in ``training_step``, rank 1
poisoned after step 13 with ``on_nonfinite="skip"``, checkpoints every 6 steps, ``trainer.test()`` after fit)
serves the tests of this module, and one resume of it from step 6 (mid-epoch: 12 batches per epoch).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TESTS_DIR, run_script

from lightning_commsgd.ledger import CommLedger

TAU, STEPS, POISON_STEP = 8, 16, 13


def _run(out, *extra: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    run_script([str(TESTS_DIR / "monitor_worker.py"), "--out", str(out), *extra])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[list[dict], object]:
    out = tmp_path_factory.mktemp("monitor") / "full"
    records = _run(
        out, "--tau", str(TAU), "--max-steps", str(STEPS), "--sync-dist", "--poison-step", str(POISON_STEP),
        "--ckpt-every", "6", "--test",
    )  # fmt: skip
    return records, out


@pytest.mark.multiprocess
def test_key_figures_are_on_the_progress_bar_by_default(full):
    records, _ = full
    bar, logged = records[0]["bar"], records[0]["logged"]
    for step in (4, STEPS):
        assert bar[step]["MB_sent"] == pytest.approx(logged[step]["comm/bytes_sent"] / 1e6)
        assert bar[step]["rounds"] == logged[step]["comm/rounds"]
    assert "tau" not in bar[STEPS]  # a constant tau is not news; a schedule's is (below)
    assert not any(key.startswith("comm/") for key in bar[STEPS])  # the rest goes to the logger only


def test_the_bar_shows_tau_only_when_a_schedule_varies_it():
    from lightning_commsgd.callbacks import progress_bar_figures

    metrics = {"comm/bytes_sent": 2e6, "comm/rounds": 3.0, "comm/tau": 8.0}
    assert progress_bar_figures(metrics, adaptive_period=False) == {"MB_sent": 2.0, "rounds": 3.0}
    assert progress_bar_figures(metrics, adaptive_period=True)["tau"] == 8.0
    assert progress_bar_figures({**metrics, "comm/skipped_replicas": 1.0})["skipped"] == 1.0


@pytest.mark.multiprocess
def test_rounds_count_the_algorithm_only_and_framework_collectives_apart(full):
    records, _ = full
    logged = records[0]["logged"]
    assert logged[4]["comm/rounds"] == 0  # tau = 8: no round yet, whatever Lightning did
    assert logged[8]["comm/rounds"] == 1 and logged[STEPS]["comm/rounds"] == 2
    # the setup broadcast, Lightning's barriers, one sync_dist reduction per step, the checkpoints
    assert logged[4]["comm/framework_collectives"] >= 4 + 1
    assert logged[5]["comm/framework_collectives"] > logged[4]["comm/framework_collectives"]
    assert logged[4]["comm/framework_bytes_sent"] == logged[4]["comm/bytes_sent"]  # all of it, so far
    ledger = records[0]["ledger_after_fit"]
    assert ledger["algorithm_rounds"] == 2  # steps 8 and 16 (fit's final round: none, the replicas are equal)
    assert ledger["algorithm_rounds"] + ledger["framework_collectives"] == ledger["rounds"]


def test_ledger_splits_rounds_by_tag():
    ledger = CommLedger(world_size=2)
    for tag in ("average", "average", "lightning_reduce", "setup_broadcast", "checkpoint"):
        ledger.record(tag, sent=8, received=8, seconds=0.0)
    assert (ledger.rounds, ledger.algorithm_rounds, ledger.framework_collectives) == (5, 2, 3)
    assert ledger.framework_bytes_sent == 24


@pytest.mark.multiprocess
def test_sync_dist_in_training_step_warns_once(full):
    records, _ = full
    mentions = [w for w in records[0]["fit_warnings"] if "inside `training_step`" in w]
    assert len(mentions) == 1, records[0]["fit_warnings"]
    assert "lock-step" in mentions[0] and "sync_dist" in mentions[0] and "on_epoch=True" in mentions[0]
    assert not [w for w in records[1]["fit_warnings"] if "inside `training_step`" in w]  # rank 0 only


@pytest.mark.multiprocess
def test_fit_ledger_survives_a_later_test(full):
    records, _ = full
    for rec in records:
        assert rec["ledger_after_test"] == rec["ledger_after_fit"]
        assert rec["ledgers"]["fit"] == rec["ledger_after_fit"]
        test = rec["ledgers"]["test"]  # the test stage counts into its own ledger
        assert test["by_tag"]["lightning_reduce"]["rounds"] > 0 and test["algorithm_rounds"] == 0


@pytest.mark.multiprocess
def test_skipped_replica_is_warned_and_counted(full):
    records, _ = full
    for rec in records:
        assert rec["ledger_after_fit"]["skipped_replicas"] == 1  # every rank of the round counts it
    logged, bar = records[0]["logged"], records[0]["bar"]
    assert logged[STEPS - 1]["comm/skipped_replicas"] == 0 and logged[STEPS]["comm/skipped_replicas"] == 1
    assert bar[STEPS]["skipped"] == 1
    # one warning per round, from the lowest finite rank, naming the rank and the step
    skipped = [w for w in records[0]["fit_warnings"] if "on_nonfinite='skip'" in w]
    assert len(skipped) == 1 and f"rank(s) [1] before the round at step {STEPS}" in skipped[0]
    assert not [w for w in records[1]["fit_warnings"] if "on_nonfinite='skip'" in w]


@pytest.mark.multiprocess
@pytest.mark.lightning_smoke
def test_mid_epoch_resume_gives_no_not_resumable_warning(full, tmp_path):
    _, out = full
    ckpt = out / "ckpt" / "step=6.ckpt"  # 12 batches per epoch: mid-epoch
    resumed = _run(tmp_path / "resumed", "--tau", str(TAU), "--max-steps", "8", "--resume", str(ckpt))
    for rec in resumed:
        assert not [w for w in rec["fit_warnings"] if "not resumable" in w], rec["fit_warnings"]
    assert sorted(resumed[0]["logged"]) == [7, 8]  # resumed after step 6, in the middle of epoch 0
    assert resumed[0]["logged"][8]["comm/rounds"] == 1  # the ledger kept counting across the resume
