"""Communication-period schedules: AdaComm's formula, agreement across ranks, resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from mp import run_workers
from schedule_workers import schedule_worker, scripted_loss
from torch import nn

from lightning_commsgd import AdaComm, Communicator, IncreasingPeriod, PeriodicAverager, PostLocalSGD


def _reference_taus(losses, lrs, *, tau0, interval, lr_aware, min_tau=1, max_tau=None):
    """The step-mode spec of docs/ALGORITHMS.md section 3, written out on its own: tau after every step."""

    def clamp(tau):
        tau = max(tau, min_tau)
        return tau if max_tau is None else min(tau, max_tau)

    tau, last_round, decided, f0, out = clamp(tau0), 0, 0, None, []
    for s in range(1, len(losses) + 1):
        if s - last_round >= tau:
            last_round = s
            level = s // interval
            if level > decided:
                f0 = f0 if f0 is not None else sum(losses[:interval]) / interval
                f = sum(losses[(level - 1) * interval : level * interval]) / interval
                ratio = f / f0 * (lrs[0] / lrs[s - 1] if lr_aware else 1.0)
                tau, decided = clamp(math.ceil(math.sqrt(ratio) * tau0 - 1e-9)), level
        out.append(tau)
    return out


def _run(schedule, losses, lrs, start=None, stop=None):
    """Drive a world-size-1 PeriodicAverager with scripted per-step losses and learning rates."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lrs[0])
    averager = PeriodicAverager(model, [optimizer], Communicator(), tau=schedule)
    if start is not None:
        averager.load_state_dict(start)
    taus = []
    for s in range(averager.step + 1, (stop or len(losses)) + 1):
        optimizer.param_groups[0]["lr"] = lrs[s - 1]
        averager.record_loss(torch.tensor(losses[s - 1]))
        averager.after_optimizer_step()
        taus.append(averager.tau)
    return taus, averager


LOSSES = [3.0 * 0.97**s + 0.05 * (s % 3) for s in range(1, 121)]
CONSTANT_LR = [0.1] * 120
DECAYING_LR = [0.1 * 0.5 ** (s // 40) for s in range(120)]


@pytest.mark.parametrize(
    ("lrs", "lr_aware", "min_tau", "max_tau"),
    [
        (CONSTANT_LR, False, 1, None),
        (DECAYING_LR, True, 1, None),
        (DECAYING_LR, False, 1, None),
        (DECAYING_LR, True, 3, 12),  # clamping at both ends
    ],
)
def test_adacomm_step_mode_follows_the_formula(lrs, lr_aware, min_tau, max_tau):
    schedule = AdaComm(tau0=16, interval_steps=10, lr_aware=lr_aware, min_tau=min_tau, max_tau=max_tau)
    taus, _ = _run(schedule, LOSSES, lrs)
    expected = _reference_taus(
        LOSSES, lrs, tau0=16, interval=10, lr_aware=lr_aware, min_tau=min_tau, max_tau=max_tau
    )
    assert taus == expected
    assert len(set(taus)) > 2  # the loss falls, tau moves: the comparison has teeth
    if max_tau is not None:
        assert max(taus) == max_tau and min(taus) >= min_tau
    if lr_aware:  # lr halvings push tau up against the plain variant
        plain = _reference_taus(LOSSES, lrs, tau0=16, interval=10, lr_aware=False)
        assert taus != plain


def test_adacomm_logs_f0_and_f():
    _, averager = _run(AdaComm(tau0=8, interval_steps=10), LOSSES, CONSTANT_LR, stop=40)
    metrics = averager.schedule.metrics()
    assert metrics["adacomm_F0"] == pytest.approx(sum(LOSSES[:10]) / 10)
    assert metrics["adacomm_F"] < metrics["adacomm_F0"]


@pytest.mark.parametrize("stop", [7, 10, 37, 55])  # mid-interval, interval end, mid-period, later
def test_adacomm_resume_reproduces_the_tau_sequence(stop):
    full, _ = _run(AdaComm(tau0=16, interval_steps=10), LOSSES, DECAYING_LR)
    first, averager = _run(AdaComm(tau0=16, interval_steps=10), LOSSES, DECAYING_LR, stop=stop)
    state = averager.state_dict()
    rest, _ = _run(AdaComm(tau0=16, interval_steps=10), LOSSES, DECAYING_LR, start=state)
    assert first + rest == full


def test_post_local_sgd_switches_after_switch_step():
    taus, averager = _run(PostLocalSGD(switch_step=5, tau=4), LOSSES[:20], CONSTANT_LR[:20])
    assert taus[:4] == [1, 1, 1, 1] and taus[4:] == [4] * 16
    assert averager.rounds == 5 + 3  # every step up to 5, then steps 9, 13, 17


def _taus_from_rounds(rounds_and_new_tau, initial, steps):
    """tau after each step, given {round step: tau chosen at that round}."""
    tau, out = initial, []
    for step in range(1, steps + 1):
        tau = rounds_and_new_tau.get(step, tau)
        out.append(tau)
    return out


def test_increasing_period_doubles_every_k_rounds_up_to_the_cap():
    taus, averager = _run(IncreasingPeriod(tau0=1, every_rounds=2, max_tau=8), LOSSES[:60], CONSTANT_LR[:60])
    # rounds 1, 2 at tau 1 -> 4, 6 at tau 2 -> 10, 14 at tau 4 -> 22, 30, ... at tau 8 (capped)
    expected = _taus_from_rounds({2: 2, 6: 4, 14: 8}, 1, 60)
    assert taus == expected
    assert averager.rounds == 6 + len(range(22, 61, 8))


def test_increasing_period_by_steps():
    taus, averager = _run(IncreasingPeriod(tau0=2, every_steps=10, factor=3), LOSSES[:45], CONSTANT_LR[:45])
    # decided at rounds, tau = 2 * 3 ** floor(step / 10):
    # rounds 2, 4, 6, 8, 10 (-> 6), 16, 22 (-> 18), 40 (-> 162)
    assert taus == _taus_from_rounds({10: 6, 22: 18, 40: 162}, 2, 45)
    assert averager.rounds == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau0": 0, "interval_steps": 5}, ValueError, "tau0"),
        ({"tau0": 2.5, "interval_steps": 5}, TypeError, "tau0"),
        ({"interval_steps": 0}, ValueError, "interval_steps"),
        ({"interval_s": 0.0}, ValueError, "interval_s"),
        ({"interval_s": -1.0}, ValueError, "interval_s"),
        ({"interval_s": float("inf")}, ValueError, "interval_s"),
        ({}, ValueError, "exactly one"),
        ({"interval_s": 1.0, "interval_steps": 5}, ValueError, "exactly one"),
        ({"interval_steps": 5, "min_tau": 0}, ValueError, "min_tau"),
        ({"interval_steps": 5, "min_tau": 8, "max_tau": 4}, ValueError, "min_tau"),
    ],
)
def test_adacomm_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaComm(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (PostLocalSGD, {"switch_step": -1, "tau": 4}, "switch_step"),
        (PostLocalSGD, {"switch_step": 5, "tau": 0}, "tau"),
        (IncreasingPeriod, {"tau0": 1}, "exactly one"),
        (IncreasingPeriod, {"tau0": 1, "every_rounds": 2, "every_steps": 2}, "exactly one"),
        (IncreasingPeriod, {"tau0": 4, "every_rounds": 2, "max_tau": 2}, "max_tau"),
        (IncreasingPeriod, {"tau0": 1, "every_rounds": 2, "factor": 1}, "factor"),
    ],
)
def test_other_schedules_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("losses", "match"),
    [
        ([-1.0] * 30, "positive initial training loss"),
        ([0.0] * 30, "positive initial training loss"),
        ([1.0] * 9 + [float("nan")] * 21, "diverged"),
        ([1.0] * 10 + [float("inf")] * 20, "diverged"),
    ],
)
def test_adacomm_refuses_losses_it_cannot_scale(losses, match):
    with pytest.raises(ValueError, match=match):
        _run(AdaComm(tau0=2, interval_steps=5, lr_aware=False), losses, CONSTANT_LR[:30])


def test_adacomm_without_losses_says_what_is_missing():
    model = nn.Linear(2, 1)
    averager = PeriodicAverager(model, [torch.optim.SGD(model.parameters(), lr=0.1)], Communicator(),
                                tau=AdaComm(tau0=2, interval_steps=4))  # fmt: skip
    with pytest.raises(ValueError, match="training_step must return the loss"):
        for _ in range(8):
            averager.after_optimizer_step()


def test_adacomm_lr_aware_needs_an_optimizer():
    averager = PeriodicAverager(nn.Linear(2, 1), [], Communicator(), tau=AdaComm(tau0=2, interval_steps=4))
    with pytest.raises(ValueError, match="needs an optimizer"):
        averager.after_optimizer_step()


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=pytest.mark.extended), 4])
@pytest.mark.parametrize("mode", ["steps", "seconds"])
def test_every_rank_computes_the_same_tau(tmp_path, world_size, mode):
    steps = 60
    results = run_workers(schedule_worker, world_size, tmp_path, steps, mode)
    taus = [r["taus"] for r in results]
    assert all(t == taus[0] for t in taus[1:])
    if mode == "steps":
        mean_losses = [
            sum(scripted_loss(r, s) for r in range(world_size)) / world_size for s in range(1, steps + 1)
        ]
        lrs = [0.1 / (1 + 0.05 * s) for s in range(1, steps + 1)]
        expected = _reference_taus(mean_losses, lrs, tau0=4, interval=6, lr_aware=True)
        assert taus[0] == pytest.approx(expected)
        # A rank deciding on its own losses would have chosen differently.
        own = _reference_taus([scripted_loss(world_size - 1, s) for s in range(1, steps + 1)], lrs, tau0=4,
                              interval=6, lr_aware=True)  # fmt: skip
        assert own != expected
    else:
        assert (
            results[0]["ledger"]["by_tag"]["schedule"]["rounds"]
            == results[0]["ledger"]["by_tag"]["average"]["rounds"]
        )
        assert len(set(taus[0])) > 1  # decisions happened
