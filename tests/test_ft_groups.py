"""Replica groups on torchft: groups die, the others go on; a restarted group heals and rejoins.

Each group is one process running ``ft_group_worker.py`` (a plain loop under ``GroupOuterStep``) against a
torchft Lighthouse started in the test process. Every run is compared with ``ft_simulation.py`` replaying the
same membership history. Sums over three groups go through gloo in its own order, so models are compared to
float32 rounding (rtol 1e-5; a wrong membership differs by 1e-2); states a group copies from a peer are
compared bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ft_harness import assert_healed_bitwise, assert_models_close, group_env, launch_group, wait_groups
from ft_simulation import simulate, simulate_streaming

from lightning_commsgd import AdaComm
from lightning_commsgd.schedules import RoundInfo

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ft_group_worker.py"
TAU, STEPS = 4, 24

pytestmark = pytest.mark.timeout(240)


def _launch(address: str, group: int, out: Path, *extra: str, steps: int = STEPS) -> subprocess.Popen:
    args = ["--group", str(group), "--lighthouse", address, "--min-groups", "2", "--tau", str(TAU)]
    return launch_group(WORKER, out, *args, "--steps", str(steps), "--out", str(out), *extra)


def _launch_groups(
    address: str,
    outs: dict[str, Path],
    groups: int,
    special: dict[int, list[str]],
    *common: str,
    steps: int = STEPS,
) -> dict[str, subprocess.Popen]:
    """Groups 0 .. groups - 1 starting together, group g with ``special.get(g)`` arguments besides
    ``common``."""
    common = ("--start-groups", str(groups), *common)
    return {
        str(g): _launch(address, g, outs[str(g)], *common, *special.get(g, []), steps=steps)
        for g in range(groups)
    }


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_three_groups_without_failures_match_the_simulation(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    procs = _launch_groups(lighthouse, outs, 3, {})
    codes = wait_groups(procs, outs, 120)
    assert codes == {"0": 0, "1": 0, "2": 0}
    records = {g: _load(outs[str(g)]) for g in range(3)}
    expected = simulate(groups=3, steps=STEPS, tau=TAU, contributors=lambda step: [0, 1, 2])
    for g, record in records.items():
        assert [h[:2] for h in record["history"]] == [(t, 3) for t in range(TAU, STEPS + 1, TAU)]
        assert_models_close(record["final"], expected[g])
        # bytes and rounds are in the ledger: one fingerprint check, STEPS / TAU outer steps
        assert record["ledger"]["outer_step"][0] == STEPS // TAU
        assert record["ledger"]["ft_fingerprint"][0] >= 1  # again while groups were still arriving
    assert all(torch.equal(a, b) for a, b in zip(records[0]["final"], records[2]["final"]))


def test_a_group_killed_mid_period_is_left_out_and_the_others_finish(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    # group 2 dies during step index 9 (after 9 steps): rounds after steps 4 and 8 had it, 12 on do not
    procs = _launch_groups(lighthouse, outs, 3, {2: ["--die-at-step", "10"]})
    codes = wait_groups(procs, outs, 120)
    assert codes["0"] == codes["1"] == 0 and codes["2"] != 0
    expected = simulate(
        groups=3,
        steps=STEPS,
        tau=TAU,
        contributors=lambda step: [0, 1, 2] if step <= 8 else [0, 1],
        last_step={2: 9},
    )
    for g in (0, 1):
        record = _load(outs[str(g)])
        assert [h[1] for h in record["history"]] == [3, 3, 2, 2, 2, 2]
        assert_models_close(record["final"], expected[g])
        assert any(e["changed"] and e["groups"] == 2 for e in record["events"])


def test_pr_sgd_momentum_between_groups_averages_the_inner_momentum_of_the_contributors(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    # local SGD with averaged momentum (PR-SGD-Momentum) between groups; group 2 dies after 9 steps
    common = ("--outer", "average", "--momentum", "average")
    procs = _launch_groups(lighthouse, outs, 3, {2: ["--die-at-step", "10"]}, *common)
    codes = wait_groups(procs, outs, 120)
    assert codes["0"] == codes["1"] == 0 and codes["2"] != 0
    expected = simulate(
        groups=3, steps=STEPS, tau=TAU, contributors=lambda step: [0, 1, 2] if step <= 8 else [0, 1],
        last_step={2: 9}, outer="average", momentum="average",
    )  # fmt: skip
    records = {g: _load(outs[str(g)]) for g in (0, 1)}
    for g, record in records.items():
        assert_models_close(record["final"], expected[g])
    # after every round both groups hold the same momentum (the mean), unlike DiLoCo's local momentum
    for mine, theirs in zip(records[0]["after_round"], records[1]["after_round"]):
        assert all(torch.equal(a, b) for a, b in zip(mine["momentum"], theirs["momentum"]))


def test_streaming_diloco_between_groups_syncs_each_fragment_in_a_round_of_its_own(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    # F = 2 fragments of H = 4: fragment 0 leaves after steps 1, 5, 9, ..., fragment 1 after 3, 7, 11, ...;
    # each mean lands one step later (d = 1), merged half and half with the local value (w = 0.5)
    common = ("--fragments", "2", "--sync-delay", "1", "--local-weight", "0.5")
    procs = _launch_groups(lighthouse, outs, 3, {2: ["--die-at-step", "10"]}, *common)
    codes = wait_groups(procs, outs, 120)
    assert codes["0"] == codes["1"] == 0 and codes["2"] != 0
    expected = simulate_streaming(
        groups=3, steps=STEPS, tau=TAU, fragments=[[0, 1], [2, 3]], sync_delay=1, local_weight=0.5,
        contributors=lambda step: [0, 1, 2] if step <= 9 else [0, 1], last_step={2: 9},
    )  # fmt: skip
    for g in (0, 1):
        record = _load(outs[str(g)])
        # one round per fragment sync (12 in 24 steps) and the two final ones
        assert [h[0] for h in record["history"]] == [*range(1, STEPS, 2), STEPS, STEPS]
        assert [h[1] for h in record["history"]][:6] == [3, 3, 3, 3, 3, 2]
        assert_models_close(record["final"], expected[g])


def test_adacomm_between_groups_decides_one_tau_from_every_groups_losses(lighthouse, tmp_path):
    """AdaComm(tau0=4, T0=4 steps) between three groups: each decision agrees on the interval's losses summed
    over the groups (rounds of their own), so every group rounds at the same steps with the same tau, the one
    AdaComm decides from the three groups' losses together."""
    steps, interval = 36, 4
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    procs = _launch_groups(lighthouse, outs, 3, {}, "--adacomm", str(interval), steps=steps)
    codes = wait_groups(procs, outs, 120)
    assert codes == {"0": 0, "1": 0, "2": 0}
    records = {g: _load(outs[str(g)]) for g in range(3)}

    class Summed:  # the losses below are summed over the groups already
        world_size = 1

        def all_reduce_scalars(self, values, op="sum", *, tag):  # noqa: ANN001, ANN201
            return list(values)

    schedule = AdaComm(tau0=TAU, interval_steps=interval, lr_aware=False)
    expected, last, rounds = [], 0, 0
    for step in range(1, steps + 1):
        schedule.on_step(step, None, sum(records[g]["losses"][step - 1] for g in range(3)), 3)
        if step - last >= schedule.tau:
            last, rounds = step, rounds + 1
            schedule.after_round(RoundInfo(step, rounds, Summed()))
            expected.append((step, schedule.tau))
    for g, record in records.items():
        assert record["periods"] == expected, g
        assert record["ledger"]["schedule"][0] >= len(expected) // 2  # its agreements went between groups
    assert all(torch.equal(a, b) for a, b in zip(records[0]["final"], records[2]["final"]))


def test_a_group_killed_inside_a_round_makes_the_others_run_it_again_without_it(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    # group 2 dies in round 2 after its quorum formed, before its all-reduce: the others' attempt fails
    procs = _launch_groups(lighthouse, outs, 3, {2: ["--die-in-round", "2"]})
    codes = wait_groups(procs, outs, 150)
    assert codes["0"] == codes["1"] == 0 and codes["2"] != 0
    expected = simulate(
        groups=3, steps=STEPS, tau=TAU, contributors=lambda step: [0, 1, 2] if step <= 4 else [0, 1],
        last_step={2: 8},
    )  # fmt: skip
    for g in (0, 1):
        record = _load(outs[str(g)])
        assert [h[1] for h in record["history"]] == [3, 2, 2, 2, 2, 2]
        assert record["metrics"]["ft_failed_commits"] >= 1
        assert_models_close(record["final"], expected[g])


def test_a_restarted_group_heals_from_a_live_peer_and_rejoins(lighthouse, tmp_path):
    steps, slow = 40, ["--step-sleep", "0.2"]  # slow enough that the restarted group joins mid-run
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(3)}
    outs["2b"] = tmp_path / "g2b.pt"
    procs = _launch_groups(lighthouse, outs, 3, {2: ["--die-at-step", "10"]}, *slow, steps=steps)
    died = procs["2"].wait(timeout=120)
    assert died != 0
    death = time.time()
    procs["2b"] = _launch(lighthouse, 2, outs["2b"], "--start-groups", "3", *slow, steps=steps)  # as before
    codes = wait_groups({k: v for k, v in procs.items() if k != "2"}, outs, 150)
    assert codes == {"0": 0, "1": 0, "2b": 0}
    records = {name: _load(outs[name]) for name in ("0", "1", "2b")}
    healer = records["2b"]
    assert healer["joined"]["healed"], "the restarted group should have healed from a live peer"
    join_step = healer["joined"]["step"]
    assert join_step % TAU == 0 and 8 < join_step < steps and healer["healed_from"] in (0, 1)
    source = assert_healed_bitwise(records, "2b", join_step)  # after its first round: its source's state

    # the whole run is the simulation of that membership history
    def contributors(step: int) -> list[int]:
        return [0, 1, 2] if step <= 8 or step > join_step else [0, 1]

    expected = simulate(
        groups=3,
        steps=steps,
        tau=TAU,
        contributors=contributors,
        last_step={2: 9},
        joins={2: (join_step, source)},
    )
    for name, g in (("0", 0), ("1", 1), ("2b", 2)):
        assert_models_close(records[name]["final"], expected[g])
    survivor = records["0"]
    assert [h[1] for h in survivor["history"]] == [len(contributors(t)) for t in range(TAU, steps + 1, TAU)]
    heal = next(e for e in healer["events"] if e["healed"])
    assert heal["heal_seconds"] > 0
    print(f"restarted group rejoined at step {join_step}, {heal['wall_time'] - death:.1f} s after the death")


def test_a_group_with_another_model_is_refused_at_the_start_naming_the_mismatch(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(2)}
    procs = _launch_groups(lighthouse, outs, 2, {1: ["--hidden", "32"]})
    codes = wait_groups(procs, outs, 120)
    assert codes["0"] != 0 and codes["1"] != 0
    for g in range(2):
        log = outs[str(g)].with_suffix(".log").read_text()
        assert "ReplicaGroupError" in log and "run different configurations: model" in log, log[-2000:]


def test_a_rejoining_group_with_another_model_is_refused_naming_the_mismatch(lighthouse, tmp_path):
    steps, slow = 100, ["--step-sleep", "0.1"]  # still training when the stranger comes
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(2)}
    outs["2"] = tmp_path / "g2.pt"
    procs = _launch_groups(lighthouse, outs, 2, {}, *slow, steps=steps)
    time.sleep(4.0)  # the two groups are past their first round
    stranger = _launch(lighthouse, 2, outs["2"], "--hidden", "32", steps=steps)
    assert stranger.wait(timeout=120) != 0
    log = outs["2"].with_suffix(".log").read_text()
    assert "cannot join: its configuration differs (model:" in log, log[-2000:]
    codes = wait_groups(procs, outs, 120)
    assert codes == {"0": 0, "1": 0}


def test_an_unreachable_lighthouse_ends_the_group_with_a_clear_error(tmp_path):
    out = tmp_path / "g0.pt"
    process = subprocess.Popen(
        [sys.executable, str(WORKER), "--group", "0", "--lighthouse", "http://localhost:9", "--timeout", "3",
         "--quorum-timeout", "3", "--out", str(out)],
        env=group_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output, _ = process.communicate(timeout=90)
    assert process.returncode != 0
    assert (
        "QuorumUnavailableError: Replica group 0 cannot reach the Lighthouse at http://localhost:9" in output
    )


@pytest.mark.parametrize("loop", ["trainer", pytest.param("plain", marks=pytest.mark.extended)])
def test_the_fault_tolerance_example_kills_restarts_and_ends_on_one_model(loop):
    example = HERE.parent / "examples" / "fault_tolerance" / "run.py"
    result = subprocess.run(
        [sys.executable, str(example), "--steps", "400", "--kill-at-step", "48", "--restart-after", "1",
         "--loop", loop],
        env=group_env(), capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "[run] killed group 1 (SIGKILL)" in output and "round with 2 groups" in output
    assert "group 1 healed from group" in output and "every group ends on the same model: yes" in output
