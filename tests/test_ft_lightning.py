"""Replica groups under the Lightning Trainer (``ReplicaGroupStrategy``): each group one ``Trainer.fit``
process (``ft_lightning_worker.py``) against a torchft Lighthouse in the test process, compared with
``ft_simulation.py`` replaying the same membership history on the same data shards. A killed and restarted
group must heal into Lightning's loop too: its first batch is its peer's next one, on its own shard.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ft_harness import assert_healed_bitwise, assert_models_close, launch_group, wait_groups
from ft_lightning_worker import batch
from ft_simulation import simulate

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ft_lightning_worker.py"
TAU, GROUPS = 4, 3

pytestmark = pytest.mark.timeout(300)


def _launch(address: str, group: int, out: Path, *extra: str) -> subprocess.Popen:
    args = ["--group", str(group), "--lighthouse", address, "--min-groups", "2", "--tau", str(TAU)]
    return launch_group(WORKER, out, *args, "--out", str(out), *extra)


def _kill_and_restart(address: str, tmp_path: Path, *common: str) -> dict[str, dict]:
    """Three groups; group 2 kills itself at step 10 and starts again with the same arguments. Returns each
    finished group's record by name ("0", "1", and "2b" for the restarted one)."""
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(GROUPS)}
    outs["2b"] = tmp_path / "g2b.pt"
    procs = {
        str(g): _launch(address, g, outs[str(g)], *common, *(["--die-at-step", "10"] if g == 2 else []))
        for g in range(GROUPS)
    }
    assert procs["2"].wait(timeout=150) != 0
    procs["2b"] = _launch(address, 2, outs["2b"], *common)
    codes = wait_groups({k: v for k, v in procs.items() if k != "2"}, outs, 200)
    assert codes == {"0": 0, "1": 0, "2b": 0}
    return {name: torch.load(outs[name], weights_only=False) for name in ("0", "1", "2b")}


SHARD_BATCH = functools.partial(batch, groups=GROUPS)


def _sim_batch(group: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return SHARD_BATCH(group, step)


LOOPS = pytest.mark.parametrize("loop", ["trainer", "fabric"])


@LOOPS
def test_three_groups_train_on_their_shards_and_match_the_simulation(lighthouse, tmp_path, loop):
    steps = 20  # 5 batches per epoch and shard: four epochs, rounds mid-epoch
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(GROUPS)}
    extra = ["--steps", str(steps), *(["--fabric"] if loop == "fabric" else [])]
    procs = {str(g): _launch(lighthouse, g, outs[str(g)], *extra) for g in range(GROUPS)}
    codes = wait_groups(procs, outs, 180)
    assert codes == {"0": 0, "1": 0, "2": 0}, {
        n: outs[n].with_suffix(".log").read_text()[-2000:] for n in outs
    }
    records = {g: torch.load(outs[str(g)], weights_only=False) for g in range(GROUPS)}
    expected = simulate(
        groups=GROUPS, steps=steps, tau=TAU, contributors=lambda s: [0, 1, 2], batch=_sim_batch
    )
    for g, record in records.items():
        assert record["global_step"] == steps and record["first_batch"] == (0, 0, 0)
        assert [h[:2] for h in record["history"]] == [(t, 3) for t in range(TAU, steps + 1, TAU)]
        assert_models_close(record["final"], expected[g])
        assert record["ledger"]["outer_step"][0] == steps // TAU
    assert all(torch.equal(a, b) for a, b in zip(records[0]["final"], records[2]["final"]))


# the Trainer heals through Lightning's private checkpoint connector: also run on the oldest Lightning
@pytest.mark.parametrize(
    "loop",
    [
        pytest.param("trainer", marks=pytest.mark.lightning_smoke),
        pytest.param("fabric", marks=pytest.mark.extended),
    ],
)
def test_a_restarted_group_heals_into_the_peers_loop_position(lighthouse, tmp_path, loop):
    steps, slow = 40, ["--step-sleep", "0.2"]  # slow enough that the restarted group joins mid-run
    records = _kill_and_restart(
        lighthouse, tmp_path, "--steps", str(steps), *slow, *(["--fabric"] if loop == "fabric" else [])
    )
    healer = records["2b"]
    assert healer["joined"]["healed"], "the restarted group should have healed from a live peer"
    join_step = healer["joined"]["step"]
    assert join_step % TAU == 0 and 8 < join_step < steps
    # the loop moved to the peer's position: its next step, its epoch, the batch after the peer's (the
    # Trainer's loop by healing; the Fabric loop starts from algorithm.step)
    per_epoch = 120 // GROUPS // 8
    assert healer["first_batch"] == (join_step, join_step // per_epoch, join_step % per_epoch)
    assert healer["global_step"] == steps
    # healing: after its first round the restarted group's state equals its source's bit for bit (the Trainer
    # worker knows the source from a callback's state that travelled with the loops; else: the equal one)
    source = assert_healed_bitwise(records, "2b", join_step)

    def contributors(step: int) -> list[int]:
        return [0, 1, 2] if step <= 8 or step > join_step else [0, 1]

    expected = simulate(
        groups=GROUPS,
        steps=steps,
        tau=TAU,
        contributors=contributors,
        last_step={2: 9},
        joins={2: (join_step, source)},
        batch=_sim_batch,
    )
    for name, g in (("0", 0), ("1", 1), ("2b", 2)):
        assert_models_close(records[name]["final"], expected[g])
    assert healer["ledger"]["ft_heal"][0] >= 1  # the healing transfer is in the ledger
    if loop == "trainer":  # the monitor logs the groups' figures: live groups, quorum changes, heals
        survivor = records["0"]["monitor"]
        assert survivor["comm/ft_groups"] == 3 and survivor["comm/ft_contributors"] == 3
        assert survivor["comm/ft_quorum_changes"] >= 3  # start, without group 2, with it again
        assert healer["monitor"]["comm/ft_heals"] == 1 and healer["monitor"]["comm/ft_heal_seconds"] > 0


def _wait_for(path: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    pytest.fail(f"{text!r} never appeared in {path}: {path.read_text()[-2000:] if path.exists() else ''}")


def test_a_lost_lighthouse_lets_the_groups_train_on_up_to_the_bound_then_stop_with_a_clear_error(tmp_path):
    # the Lighthouse in its own process, killed mid-run (one in this process would keep serving the
    # connections it has open after a shutdown)
    env = dict(os.environ, RUST_LOG="warn")
    command = [
        sys.executable,
        "-m",
        "lightning_commsgd.cli",
        "lighthouse",
        "--port",
        "0",
        "--min-groups",
        "2",
    ]
    command += ["--join-timeout-ms", "20000", "--heartbeat-timeout-ms", "1000"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    address = server.stdout.readline().split()[3]  # "lighthouse listening at http://host:port (...)"
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(2)}
    extra = ["--start-groups", "2", "--steps", "2000", "--step-sleep", "0.02"]
    extra += ["--max-missed-rounds", "2", "--quorum-timeout", "3"]
    procs = {str(g): _launch(address, g, outs[str(g)], *extra) for g in range(2)}
    try:
        for g in range(2):
            _wait_for(outs[str(g)].with_suffix(".log"), "round at step 8,", 90)
    finally:
        server.kill()  # the Lighthouse is lost mid-run
        server.wait()
    codes = wait_groups(procs, outs, 120)
    for g in range(2):
        log = outs[str(g)].with_suffix(".log").read_text()
        assert codes[str(g)] != 0 and not outs[str(g)].exists()
        # it trained on through the missed rounds (logged), then stopped naming why and since when
        assert "training on locally (1 of at most 2 missed rounds in a row)" in log, log[-3000:]
        assert "training on locally (2 of at most 2 missed rounds in a row)" in log
        assert "QuorumUnavailableError: Replica group stops at step" in log
        assert "3 rounds in a row without a quorum (max_missed_rounds=2)" in log
        assert "the Lighthouse is unreachable or fewer groups than the minimum are live" in log


def test_fewer_live_groups_than_the_minimum_stop_the_survivor_with_a_clear_error(lighthouse, tmp_path):
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(2)}
    extra = ["--start-groups", "2", "--steps", "2000", "--max-missed-rounds", "1", "--quorum-timeout", "3"]
    procs = {
        str(g): _launch(lighthouse, g, outs[str(g)], *extra, *(["--die-at-step", "10"] if g == 1 else []))
        for g in range(2)
    }  # min_groups 2 (the Lighthouse's and the groups'): alone, group 0 has no quorum
    codes = wait_groups(procs, outs, 120)
    log = outs["0"].with_suffix(".log").read_text()
    assert codes["1"] != 0 and codes["0"] != 0 and not outs["0"].exists()
    assert "2 rounds in a row without a quorum (max_missed_rounds=1)" in log, log[-3000:]
    assert "fewer groups than the minimum are live" in log


def test_groups_of_two_processes_average_inside_and_carry_half_the_round_each(lighthouse, tmp_path):
    """Two groups of two Trainer processes each (``devices=2``): inside a group the processes average their
    gradients every step (one replica, shards 2g and 2g+1), between groups each process carries half of the
    round. Group 1 dies whole at step 10 (as a node would) and restarts; every process of it heals."""
    steps, samples = 40, 96  # 4 shards of 24 samples: 3 batches per epoch, rounds mid-epoch
    outs = {"0": tmp_path / "g0.pt", "1": tmp_path / "g1.pt", "1b": tmp_path / "g1b.pt"}
    common = ["--devices", "2", "--start-groups", "2", "--samples", str(samples), "--steps", str(steps)]
    common += ["--step-sleep", "0.3"]
    procs = {
        "0": _launch(lighthouse, 0, outs["0"], *common),
        "1": _launch(lighthouse, 1, outs["1"], *common, "--die-at-step", "10"),
    }
    assert procs["1"].wait(timeout=150) != 0
    time.sleep(1)  # its second process dies at the same step
    procs["1b"] = _launch(lighthouse, 1, outs["1b"], *common)
    codes = wait_groups({k: v for k, v in procs.items() if k != "1"}, outs, 240)
    assert codes == {"0": 0, "1b": 0}, {n: outs[n].with_suffix(".log").read_text()[-3000:] for n in outs}
    records = {name: torch.load(outs[name], weights_only=False) for name in ("0", "1b")}
    seconds = {name: torch.load(f"{outs[name]}.rank1", weights_only=False) for name in ("0", "1b")}
    healer = records["1b"]
    join_step = healer["joined"]["step"]
    assert healer["joined"]["healed"] and seconds["1b"]["joined"]["healed"]  # both of its processes
    assert join_step % TAU == 0 and 8 < join_step < steps
    # inside a group the processes hold one replica, bit for bit
    for name in ("0", "1b"):
        assert all(torch.equal(a, b) for a, b in zip(records[name]["final"], seconds[name]["final"]))
    # between groups each process sent half of a round (and the weight)
    group_params = sum(p.numel() for p in records["0"]["final"])
    rounds, sent = records["0"]["ledger"]["outer_step"]
    assert sent / rounds == pytest.approx(4 * (group_params + 2) / 2, abs=8)

    def group_batch(group: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = (batch(2 * group + r, step, groups=4, samples=samples) for r in (0, 1))
        return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])

    def contributors(step: int) -> list[int]:
        return [0, 1] if step <= 8 or step > join_step else [0]

    expected = simulate(
        groups=2,
        steps=steps,
        tau=TAU,
        contributors=contributors,
        last_step={1: 9},
        joins={1: (join_step, 0)},
        batch=group_batch,
    )
    for name, g in (("0", 0), ("1b", 1)):
        assert_models_close(records[name]["final"], expected[g])


@pytest.mark.extended  # the core case: Streaming DiLoCo between plain-loop groups (test_ft_groups.py)
def test_streaming_diloco_groups_under_the_trainer_heal_mid_run_and_end_on_one_model(lighthouse, tmp_path):
    """StreamingDiLoCo between Trainer groups (F = 2, d = 1, w = 0.5): fragment syncs at odd steps, each a
    round of its own, at a batch's end; group 2 is killed and restarted, heals at a fragment's round, and
    every group ends on the same model after the final syncs."""
    steps = 40
    common = ["--steps", str(steps), "--step-sleep", "0.2", "--fragments", "2", "--sync-delay", "1"]
    records = _kill_and_restart(lighthouse, tmp_path, *common, "--local-weight", "0.5")
    healer = records["2b"]
    join_step = healer["joined"]["step"]
    assert healer["joined"]["healed"] and join_step % 2 == 1 and 9 < join_step < steps  # a fragment's round
    per_epoch = 120 // GROUPS // 8
    assert healer["first_batch"] == (join_step, join_step // per_epoch, join_step % per_epoch)
    # the rounds at odd steps (one fragment each), then the two final syncs
    assert [h[0] for h in records["0"]["history"]] == [*range(1, steps, 2), steps, steps]
    for name in ("1", "2b"):
        assert all(torch.equal(a, b) for a, b in zip(records["0"]["final"], records[name]["final"]))


@pytest.mark.parametrize(("mu", "covered"), [(1 / 3, 120), pytest.param(0.0, 80, marks=pytest.mark.extended)])
def test_ri_sgd_across_groups_keeps_every_sample_seen_while_a_group_is_down(
    lighthouse, tmp_path, mu, covered
):
    """RI-SGD's placement over the groups (mu = 1/3: each group also holds the next group's shard). Group 2
    dies at step 10 and stays down: in every later epoch the two live groups still train on all 120 samples,
    and the survivors report full coverage at the quorum change. Without redundancy (mu = 0) a third of the
    data is not seen while group 2 is down, and the report names its shard as lost."""
    steps = 40  # 5 batches per epoch: epochs 3 .. 7 run wholly without group 2
    outs = {str(g): tmp_path / f"g{g}.pt" for g in range(GROUPS)}
    common = ["--steps", str(steps), "--step-sleep", "0.05", "--redundancy", str(mu)]
    procs = {
        str(g): _launch(lighthouse, g, outs[str(g)], *common, *(["--die-at-step", "10"] if g == 2 else []))
        for g in range(GROUPS)
    }
    codes = wait_groups(procs, outs, 180)
    assert codes["0"] == codes["1"] == 0 and codes["2"] != 0
    records = {g: torch.load(outs[str(g)], weights_only=False) for g in (0, 1)}
    for epoch in range(3, 8):
        seen = set(records[0]["seen"][epoch]) | set(records[1]["seen"][epoch])
        assert len(seen) == covered, (epoch, len(seen))
    lost = [] if covered == 120 else [2]
    for g, record in records.items():
        assert record["monitor"]["comm/ft_live_groups"] == 2
        assert record["monitor"]["comm/ft_data_coverage"] == pytest.approx(covered / 120)
        assert record["monitor"]["comm/ft_lost_shards"] == len(lost)
        log = outs[str(g)].with_suffix(".log").read_text()
        share = f"{covered / 120:.1%}"
        report = "no shard lost" if not lost else "lost shards (no live group holds them whole): 2"
        assert f"2 of 3 live (missing: 2); the live groups hold {share} of the training data, {report}" in log
