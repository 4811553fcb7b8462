"""DiLoCo, SlowMo and Streaming DiLoCo on gloo processes equal a single-process simulation of the spec
(docs/ALGORITHMS.md; ``diloco_simulation.py``): bitwise on 2 ranks, to fp32 rounding on 3; every payload
format; a resume from any step continues the same trajectory; bad settings are refused before any process
exists."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from diloco_simulation import simulate_diloco
from diloco_workers import adamw, make_batches, make_net, mse, run_cases, sgd_momentum
from mp import run_workers

from lightning_commsgd.algorithms.diloco import DiLoCo, OuterStepAverager, SlowMo, StreamingDiLoCo
from lightning_commsgd.algorithms.fragments import split_into_fragments
from lightning_commsgd.algorithms.protocol import World
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression import BlockInt4, ScaledSign, TopK
from lightning_commsgd.schedules import AdaComm, IncreasingPeriod

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
TWO_FRAGMENTS = [["0", "4"], ["2"]]  # strided: layers 0 and 2 of three in one fragment


def _simulate(world_size, steps, inner=sgd_momentum, fragments=(("",),), batch_norm=False, **kwargs):
    net = functools.partial(make_net, batch_norm)
    return simulate_diloco(net, inner, make_batches(world_size, steps), mse, fragments=fragments, **kwargs)


def _max_diff(results, simulated):
    return max(
        float((got - want).abs().max())
        for result, sim in zip(results, simulated)
        for got, want in zip(result["records"], sim, strict=True)
    )


STEPS = 13  # ends mid-period: finalize's outer step is checked too
BN_FRAGMENTS = [["0", "1", "5"], ["3"]]  # BatchNorm (1) with the first and last Linear
SLOWMO = SlowMo(tau=3, slow_lr=1.0, slow_momentum=0.6)
PLAIN_SGD = functools.partial(torch.optim.SGD, lr=1.0)

#: name -> (world size, the worker's case, the simulation's settings); every case of a world size runs in
#: one launch. "algorithm" holds OuterStepAverager's arguments (outer optimizer: Nesterov unless given).
CASES = {
    "diloco": (2, {"algorithm": {"tau": 4}}, {}),
    "diloco_adamw_zero": (3, {"inner": adamw, "algorithm": {"tau": 3, "momentum": "zero"}},
                          {"momentum": "zero", "inner": adamw}),
    "streaming_delay_alpha": (
        2, {"algorithm": {"tau": 6, "fragments": TWO_FRAGMENTS, "sync_delay": 2, "local_weight": 0.5}},
        {"fragments": TWO_FRAGMENTS, "sync_delay": 2, "local_weight": 0.5}),
    "streaming_int4": (
        2, {"algorithm": {"tau": 4, "fragments": TWO_FRAGMENTS, "sync_delay": 1,
                          "compressor": BlockInt4(64)}},
        {"fragments": TWO_FRAGMENTS, "sync_delay": 1, "compressor": BlockInt4(64)}),
    "diloco_int8_3_ranks": (3, {"algorithm": {"tau": 4, "compressor": "int8"}}, {"compressor": "int8"}),
    "diloco_bf16": (2, {"algorithm": {"tau": 4, "compressor": "bf16"}}, {"compressor": "bf16"}),
    "diloco_topk_error_feedback": (
        2, {"algorithm": {"tau": 4, "compressor": TopK(0.25), "error_feedback": True}},
        {"compressor": TopK(0.25), "error_feedback": True}),
    "streaming_sign_error_feedback_delay": (
        2, {"algorithm": {"tau": 4, "fragments": TWO_FRAGMENTS, "sync_delay": 1, "compressor": ScaledSign(16),
                          "error_feedback": True}},
        {"fragments": TWO_FRAGMENTS, "sync_delay": 1, "compressor": ScaledSign(16), "error_feedback": True}),
    # floating buffers ride in their fragment's sync as values (no outer step): the mean, then the same merge
    "batch_norm_buffers": (
        2, {"batch_norm": True,
            "algorithm": {"tau": 4, "fragments": BN_FRAGMENTS, "sync_delay": 1, "local_weight": 0.5}},
        {"batch_norm": True, "fragments": BN_FRAGMENTS, "sync_delay": 1, "local_weight": 0.5}),
    # SlowMo: u <- beta u + Delta / gamma_t, x <- x - alpha gamma_t u, gamma_t the inner lr at the round
    "slowmo_decaying_inner_lr": (
        2, {"inner_lr_decay": 0.9,
            "algorithm": {"tau": 3, "outer_optimizer": SLOWMO.outer_optimizer, "scale_by_inner_lr": True}},
        {"make_outer": SLOWMO.outer_optimizer, "slowmo": True, "inner_lr_decay": 0.9}),
    # outer SGD(lr 1, no momentum) against local SGD with momentum "local" (no simulation: compared below)
    "outer_sgd_lr_1": (2, {"algorithm": {"tau": 4, "outer_optimizer": PLAIN_SGD}}, None),
    "local_sgd_momentum_local": (2, {"local_sgd": True, "algorithm": {"tau": 4}}, None),
    # rank 1 goes NaN at step 3, before the outer step at 4: the flags ride in the exact mean's buffer
    "nonfinite_exact": (2, {"poison": (1, 3), "algorithm": {"tau": 4}}, None),
    "nonfinite_skip": (2, {"poison": (1, 3), "algorithm": {"tau": 4, "on_nonfinite": "skip"}}, None),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's result per rank: ``runs[name][rank]``."""
    out = {}
    for world_size in (2, 3):
        cases = {}
        for name, (size, case, _) in CASES.items():
            if size == world_size:
                algorithm = {"outer_optimizer": NESTEROV, **case["algorithm"]}
                if case.get("local_sgd"):
                    algorithm = case["algorithm"]
                cases[name] = {"steps": STEPS, "inner": sgd_momentum, **case, "algorithm": algorithm}
        per_rank = run_workers(run_cases, world_size, tmp_path_factory.mktemp(f"diloco{world_size}"), cases)
        out.update({name: [rank[name] for rank in per_rank] for name in cases})
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [n for n, (_, _, sim) in CASES.items() if sim is not None])
def test_outer_steps_equal_the_simulation(runs, name):
    world_size, case, sim_kwargs = CASES[name]
    results = runs[name]
    sim_kwargs = {"make_outer": NESTEROV, "inner": case.get("inner", sgd_momentum), **sim_kwargs}
    simulated = _simulate(world_size, STEPS, tau=case["algorithm"]["tau"], **sim_kwargs)
    diff = _max_diff(results, simulated)
    # 2 ranks: the same sums in the same order, bitwise; 3: gloo's ring sums in another order
    assert diff == 0.0 if world_size == 2 else diff < 1e-6, (name, diff)
    # the replicas drifted apart between outer steps (the comparison can fail), and end equal
    spread = max(float((a - b).abs().max()) for a, b in zip(results[0]["records"], results[1]["records"]))
    assert spread > 1e-3
    assert torch.equal(results[0]["records"][-1], results[1]["records"][-1])
    assert all(r["in_sync"] for r in results)
    assert results[0]["by_tag"]["outer_step"] > 0


@pytest.mark.multiprocess
def test_slowmo_scaling_by_the_inner_lr_matters(runs):
    """Without the 1/gamma_t scaling the simulated trajectory differs: the SlowMo case can fail."""
    plain = _simulate(2, STEPS, tau=3, make_outer=SLOWMO.outer_optimizer, inner_lr_decay=0.9)
    assert _max_diff(runs["slowmo_decaying_inner_lr"], plain) > 1e-4


@pytest.mark.multiprocess
def test_outer_sgd_with_lr_1_and_no_momentum_is_local_sgd(runs):
    """docs/ALGORITHMS.md: outer SGD(lr 1, momentum 0) is periodic averaging with momentum "local". Not
    bitwise: x - (x - mean) rounds differently from mean (one fp32 rounding per round); equal to fp32
    rounding."""
    local = [r["records"] for r in runs["local_sgd_momentum_local"]]
    diff = _max_diff(runs["outer_sgd_lr_1"], local)
    assert diff < 1e-6, diff
    # the equivalence is not vacuous: Nesterov outer steps (same tau, data, inner optimizer) go elsewhere
    assert _max_diff(runs["diloco"], local) > 1e-3


@pytest.mark.multiprocess
def test_a_nonfinite_replica_stops_every_rank_at_the_outer_step(runs):
    for rank in range(2):
        result = runs["nonfinite_exact"][rank]
        assert result["step"] == 4 and "rank(s) [1]" in result["error"], result


@pytest.mark.multiprocess
def test_skip_leaves_a_nonfinite_replica_out_and_hands_it_the_global_model(runs):
    """on_nonfinite="skip": the outer step at 4 uses rank 0's pseudo-gradient alone; rank 1 takes the new
    anchor (and a fresh inner state) and trains on."""
    rank0, rank1 = (r["records"] for r in runs["nonfinite_skip"])
    assert torch.isnan(rank1[2]).any() and not torch.isnan(rank1[3]).any()
    assert torch.equal(rank0[3], rank1[3])  # both on the new anchor after the outer step at 4
    assert all(torch.isfinite(x).all() for x in rank0 + rank1[3:])
    assert torch.equal(rank0[-1], rank1[-1])
    # a mean over the finite replica only: rank 0 alone (no NaN in it), unlike the exact run's
    assert not torch.equal(rank0[3], runs["diloco"][0]["records"][3])


@pytest.mark.multiprocess
def test_resume_continues_the_same_trajectory(tmp_path):
    """Anchors, outer optimizer state, residuals and the fragment in flight are in the state; a resumed run
    equals the uninterrupted one bitwise (tau 4, 2 fragments, delay 1: fragment 0 sends at 5, lands at 6)."""
    algorithm = {"tau": 4, "fragments": TWO_FRAGMENTS, "sync_delay": 1, "local_weight": 0.5,
                 "compressor": TopK(0.3), "error_feedback": True, "outer_optimizer": NESTEROV}  # fmt: skip
    points = {"fragment_in_flight": 5, "after_a_landing": 6}
    first_cases = {
        name: {"steps": 12, "inner": sgd_momentum, "algorithm": algorithm, "save_at": step}
        for name, step in points.items()
    }
    first = run_workers(run_cases, 2, tmp_path / "first", first_cases)
    resumed_cases = {
        name: {**case, "save_at": None, "resume": [rank[name]["saved"] for rank in first]}
        for name, case in first_cases.items()
    }
    resumed = run_workers(run_cases, 2, tmp_path / "resumed", resumed_cases)
    for name, step in points.items():
        assert (first[0][name]["saved"]["algorithm"]["in_flight"] is not None) == (step == 5)
        for rank in range(2):
            tail, again = first[rank][name]["records"][step:], resumed[rank][name]["records"]
            assert len(tail) == len(again) and all(torch.equal(x, y) for x, y in zip(tail, again)), name


def test_default_fragments_deal_the_layers_out_in_turn():
    net = make_net()  # Linear layers at 0, 2, 4
    params = list(net.parameters())
    two = split_into_fragments(net, params, 2, set(), True)
    assert [f.param_names for f in two] == [
        ["0.weight", "0.bias", "4.weight", "4.bias"],
        ["2.weight", "2.bias"],
    ]
    three = split_into_fragments(net, params, [["2"], ["0", "4"]], set(), True)
    assert three[0].param_names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="at most the model's layers"):
        split_into_fragments(net, params, 4, set(), True)
    with pytest.raises(ValueError, match="'2.weight' is in none of the `fragments`"):
        split_into_fragments(net, params, [["0"], ["4"]], set(), True)


def test_metrics_and_a_single_process_run():
    """One process: every outer step is the outer optimizer on the replica's own pseudo-gradient."""
    net = make_net()
    inner = sgd_momentum(net)
    algorithm = OuterStepAverager(net, [inner], Communicator(), tau=2, outer_optimizer=NESTEROV)
    for batch in make_batches(1, 4)[0]:
        inner.zero_grad()
        mse(net, batch).backward()
        inner.step()
        algorithm.after_optimizer_step()
    metrics = algorithm.metrics()
    assert metrics["tau"] == 2 and metrics["outer_lr"] == 0.7 and metrics["pseudo_gradient_norm"] > 0
    assert algorithm.rounds == 2 and algorithm.in_sync


def test_the_outer_lr_scheduler_steps_after_every_outer_step_and_resumes():
    """outer_lr_scheduler: built on the outer optimizer, stepped after each outer step; its state is in the
    algorithm's state, so a resumed run continues the same outer lr."""
    halve = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)

    def run(steps, state=None):
        net = make_net()
        inner = sgd_momentum(net)
        algorithm = DiLoCo(tau=2, outer_optimizer=NESTEROV, outer_lr_scheduler=halve).build(
            net, [inner], Communicator(), World(1)
        )
        if state is not None:
            algorithm.load_state_dict(state)
        for batch in make_batches(1, steps)[0]:
            inner.zero_grad()
            mse(net, batch).backward()
            inner.step()
            algorithm.after_optimizer_step()
        return algorithm

    after_three_outer_steps = run(6)
    assert after_three_outer_steps.metrics()["outer_lr"] == 0.7 * 0.5**3
    resumed = run(0, copy.deepcopy(after_three_outer_steps.state_dict()))
    assert resumed.metrics()["outer_lr"] == 0.7 * 0.5**3
    assert resumed.outer_schedulers[0].last_epoch == 3


def test_a_period_schedule_chooses_h():
    """DiLoCo asks its schedule after every outer step: IncreasingPeriod(tau0=2, every_rounds=1) doubles H,
    so outer steps land at steps 2, 6, 14."""
    net = make_net()
    inner = sgd_momentum(net)
    schedule = IncreasingPeriod(tau0=2, every_rounds=1)
    algorithm = DiLoCo(tau=schedule, outer_optimizer=NESTEROV).build(net, [inner], Communicator(), World(1))
    landed = []
    for step, batch in enumerate(make_batches(1, 15)[0], start=1):
        inner.zero_grad()
        mse(net, batch).backward()
        inner.step()
        if algorithm.after_optimizer_step():
            landed.append(step)
    assert landed == [2, 6, 14] and algorithm.adaptive_period and algorithm.period == 16


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: DiLoCo(tau=0), ValueError, "`tau`"),
        (lambda: DiLoCo(momentum="average"), ValueError, "`momentum`"),
        (lambda: DiLoCo(compressor=TopK(0.1)), ValueError, "`compressor`.*biased.*error_feedback=True"),
        (lambda: DiLoCo(error_feedback=True), ValueError, "`error_feedback=True` needs a `compressor`"),
        (lambda: DiLoCo(compressor="int3"), ValueError, "`compressor`"),
        (lambda: DiLoCo(outer_optimizer=0.7), TypeError, "`outer_optimizer`"),
        (lambda: StreamingDiLoCo(tau=5, fragments=2), ValueError, "`tau` \\(5\\) must be a multiple"),
        (lambda: StreamingDiLoCo(tau=8, fragments=2, sync_delay=4), ValueError, "`sync_delay` \\(4\\)"),
        (lambda: StreamingDiLoCo(sync_delay=-1), ValueError, "`sync_delay`"),
        (lambda: StreamingDiLoCo(local_weight=1.5), ValueError, "`local_weight`"),
        (lambda: StreamingDiLoCo(fragments=0), ValueError, "`fragments`"),
        (lambda: StreamingDiLoCo(fragments=[[]]), TypeError, "`fragments`"),
        (lambda: StreamingDiLoCo(tau=AdaComm(tau0=4, interval_steps=8)), ValueError, "schedule"),
        (lambda: SlowMo(slow_momentum=1.0), ValueError, "`slow_momentum`"),
        (lambda: SlowMo(slow_lr=0), ValueError, "`slow_lr`"),
        (lambda: DiLoCo(compressor="int8", on_nonfinite="skip"), ValueError, "`on_nonfinite=\"skip\"`"),
        (lambda: DiLoCo(on_nonfinite="ignore"), ValueError, "`on_nonfinite`"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()
