"""The replica-group adapters without torchft processes: the config's checks, the settings from the
environment, which Trainer strategy runs it, the data shard of each group, and rounds deferred to the batch's
end (scripted quorums from ``test_ft_units``)."""

from __future__ import annotations

import functools

import pytest
import torch
from test_ft_units import ScriptedRounds, _group, _move, _params

from lightning_commsgd import DORE, CommunicationStrategy, DiLoCo, LocalSGD
from lightning_commsgd.algorithms.protocol import World
from lightning_commsgd.comm import Communicator
from lightning_commsgd.fabric import CommunicationStrategy as FabricStrategy
from lightning_commsgd.ft import (
    GroupOuterStep,
    ReplicaGroupError,
    ReplicaGroups,
    ReplicaGroupSettings,
    ReplicaGroupStrategy,
)
from lightning_commsgd.schedules import AdaComm, IncreasingPeriod

SETTINGS = ReplicaGroupSettings(lighthouse="http://localhost:29510", group=1)


@pytest.mark.parametrize(
    ("algorithm", "error", "match"),
    [
        (LocalSGD(tau=4, replica_weights="samples"), ValueError, r"replica_weights='samples'"),
        (LocalSGD(tau=4, momentum="local", compressor="bf16"), ValueError, r"compressor="),
        (LocalSGD(tau=4, momentum="local", global_every=2), ValueError, r"global_every=2"),
        (DiLoCo(tau=4, compressor="int8"), ValueError, r"DiLoCo with compressor=BlockInt8"),
        (DORE(compressor="int8"), TypeError, r"LocalSGD or DiLoCo.*got DORE"),
        ("diloco", TypeError, r"Arg `algorithm` must be an algorithm config"),
    ],
)
def test_what_cannot_run_between_groups_is_refused_naming_it(algorithm, error, match):
    with pytest.raises(error, match=match):
        ReplicaGroups(algorithm, SETTINGS, start_groups=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_groups": 1}, r"`start_groups` \(1\) must exceed the group index \(1\)"),
        ({"start_groups": 0}, r"`start_groups` must be an int >= 1"),
        ({"start_groups": 2, "round_attempts": 0}, r"`round_attempts` must be an int >= 1"),
        ({"start_groups": 2, "max_missed_rounds": -1}, r"`max_missed_rounds` must be an int >= 0"),
        ({"start_groups": 2, "start_timeout": -1}, r"`start_timeout` must be a number of seconds >= 0"),
    ],
)
def test_bad_group_arguments_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReplicaGroups(DiLoCo(tau=4), SETTINGS, **kwargs)


def test_the_options_between_groups_follow_the_algorithm():
    outer = functools.partial(torch.optim.SGD, lr=0.5)
    diloco = ReplicaGroups(DiLoCo(tau=6, outer_optimizer=outer, momentum="zero"), SETTINGS, start_groups=2)
    assert diloco.options["outer_optimizer"] is outer and diloco.options["momentum"] == "zero"
    assert diloco.options["tau"] == 6
    averaging = ReplicaGroups(LocalSGD(tau=3, momentum="local"), SETTINGS, start_groups=2)
    assert averaging.options["outer_optimizer"].__name__ == "averaging_outer_optimizer"
    assert ReplicaGroups(LocalSGD(tau=3), SETTINGS, start_groups=2).options["momentum"] == "average"


def test_each_group_and_each_of_its_processes_reads_its_own_shard():
    config = ReplicaGroups(DiLoCo(tau=4), SETTINGS, start_groups=3)
    assert config.data_shard(1, 0) == (3, 1)  # group 1 of 3
    assert config.data_shard(2, 1) == (6, 3)  # (processes per group): group 1's second process
    assert DiLoCo(tau=4).data_shard(4, 2) == (4, 2)  # every other algorithm: one shard per rank
    config.check_world(World(2))  # several processes per group


def test_settings_come_from_torchfts_environment_variables(monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    with pytest.raises(ValueError, match=r"`lighthouse` or the environment variable TORCHFT_LIGHTHOUSE"):
        ReplicaGroupSettings.from_env()
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://lh:29510")
    with pytest.raises(ValueError, match=r"REPLICA_GROUP_ID"):
        ReplicaGroupSettings.from_env()
    monkeypatch.setenv("REPLICA_GROUP_ID", "two")
    with pytest.raises(ValueError, match=r"REPLICA_GROUP_ID must be an int >= 0, got 'two'"):
        ReplicaGroupSettings.from_env()
    monkeypatch.setenv("REPLICA_GROUP_ID", "2")
    settings = ReplicaGroupSettings.from_env(min_groups=2)
    assert (settings.lighthouse, settings.group, settings.min_groups) == ("http://lh:29510", 2, 2)
    assert ReplicaGroups(DiLoCo(tau=4), start_groups=3).replica_group == settings.__class__(
        lighthouse="http://lh:29510", group=2
    )


def test_the_trainer_runs_replica_groups_only_under_their_strategy():
    config = ReplicaGroups(DiLoCo(tau=4), SETTINGS, start_groups=2)
    with pytest.raises(TypeError, match=r"ReplicaGroups runs under the Trainer with .*ReplicaGroupStrategy"):
        CommunicationStrategy(config)
    strategy = ReplicaGroupStrategy(DiLoCo(tau=4), SETTINGS, start_groups=2)
    assert isinstance(strategy.algorithm_config, ReplicaGroups)
    assert strategy.algorithm_config.start_groups == 2
    assert ReplicaGroupStrategy(config).algorithm_config is config
    with pytest.raises(ValueError, match=r"either a ReplicaGroups config or the algorithm"):
        ReplicaGroupStrategy(config, start_groups=3)
    FabricStrategy(config)  # Fabric: the user's loop reads algorithm.step after setup


def test_deferred_rounds_run_at_the_batch_end_with_the_same_result():
    immediate, model_a = _group(ScriptedRounds(peers=2, peer_value=0.3))
    deferred, model_b = _group(ScriptedRounds(peers=2, peer_value=0.3), defer_rounds=True)
    for model in (model_a, model_b):
        _move(model, -0.6)
    assert immediate.after_optimizer_step()
    assert not deferred.after_optimizer_step()  # counted, not run
    assert deferred.step == 1 and deferred.rounds == 0
    assert deferred.run_due_round() and not deferred.run_due_round()  # once
    assert torch.equal(_params(model_a), _params(model_b))
    assert deferred.round_history == immediate.round_history and deferred.rounds == 1


def test_a_due_round_left_at_the_end_runs_in_finalize():
    deferred, model = _group(ScriptedRounds(peers=1, peer_value=0.0), defer_rounds=True)
    _move(model, -0.2)
    deferred.after_optimizer_step()
    deferred.finalize()
    assert deferred.rounds == 1 and deferred.round_history[-1][0] == 1


def test_a_schedule_that_follows_the_rounds_runs_between_groups():
    """IncreasingPeriod doubles tau every round: rounds after steps 1, 3 and 7, as in one job."""
    rounds = ScriptedRounds(peers=1, peer_value=0.0)
    config = ReplicaGroups(LocalSGD(tau=IncreasingPeriod(tau0=1, every_rounds=1)), SETTINGS, start_groups=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {k: v for k, v in config.options.items() if k != "momentum"}
    algorithm = GroupOuterStep(model, [optimizer], Communicator(), rounds, **options)  # type: ignore[arg-type]
    rounds.algorithm = algorithm
    ran = [step for step in range(1, 8) if algorithm.after_optimizer_step()]
    assert ran == [1, 3, 7] and algorithm.period == 8


def test_a_trainer_group_healed_mid_run_stops_with_a_clear_error():
    """torchft heals a live group that fell behind (it missed rounds the others completed): under the Trainer
    its loop cannot take the peer's position mid-run, so the group stops at that batch's end, saying to
    restart it (it then rejoins at setup)."""
    from lightning_commsgd.strategies.replica_groups import _RoundsBetweenBatches

    rounds = ScriptedRounds(peers=1, peer_value=0.0)
    algorithm, _ = _group(rounds, defer_rounds=True)
    strategy = ReplicaGroupStrategy(DiLoCo(tau=4), SETTINGS, start_groups=2)
    strategy._rounds = callback = _RoundsBetweenBatches(algorithm)
    callback.on_train_batch_end(None, None)  # not healed: nothing happens
    strategy._take_peer_state({"loops": {}})  # before the loop runs: the heal at setup, no error
    callback.on_train_batch_end(None, None)
    callback.training = True
    strategy._take_peer_state({"loops": {}})
    with pytest.raises(ReplicaGroupError, match=r"healed from a live group at step 0, mid-run.*restart this"):
        callback.on_train_batch_end(None, None)


@pytest.mark.parametrize(("second", "tau"), [("ok", 2), ("none", 4)])
def test_adacomm_between_groups_decides_from_the_groups_losses_in_rounds_of_its_own(second, tau):
    """AdaComm agrees on the interval losses through quorum rounds of their own (sums over the groups; here
    the scripted peers report the same numbers). Loss 1.0 in interval 0, 0.25 in interval 1: at step 8 tau
    becomes ceil(sqrt(0.25) 4) = 2. Without a quorum for that agreement the schedule keeps tau = 4."""
    script = ["ok", "ok", "ok", "ok", second, "ok"]  # step 4: round, F_0, F_1; step 8: round, F_1
    rounds = ScriptedRounds(peers=2, peer_value=0.0, script=script)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    adacomm = AdaComm(tau0=4, interval_steps=4, lr_aware=False)
    algorithm = GroupOuterStep(model, [optimizer], Communicator(), rounds, tau=adacomm)  # type: ignore[arg-type]
    rounds.algorithm = algorithm
    for step in range(1, 9):
        algorithm.record_batch(torch.tensor(1.0 if step <= 4 else 0.25))
        algorithm.after_optimizer_step()
    assert algorithm.period == tau
    agreements = [b for b in rounds.sent if b.dtype == torch.float64]  # (loss sum, count, processes)
    assert len(agreements) == (3 if second == "ok" else 2)
    assert agreements[0].tolist() == [4.0, 4.0, 1.0]  # interval 0: four losses of 1.0, one process
