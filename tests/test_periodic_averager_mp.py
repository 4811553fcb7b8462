"""PeriodicAverager in a plain PyTorch loop on 2 and 4 gloo processes, against the independent
single-process reference ``simulation.simulate_local_sgd``; bytes and the absence of off-round traffic."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from mp import run_workers
from mp_workers import averager_worker, float_buffers, loss_fn, make_batches, make_model, make_optimizer
from simulation import simulate_local_sgd

pytestmark = pytest.mark.multiprocess

STEPS, DATA_SEED, MODEL_SEED = 12, 1234, 7
TOL = 1e-6
N_PARAMS = {"mlp": 5 * 8 + 8 + 8 * 1 + 1, "bn": 5 * 8 + 8 + 8 + 8 * 1 + 1}  # Linear, [BN affine], Linear
N_FLOAT_BUFFERS = {"mlp": 0, "bn": 8 + 8}  # BN running_mean, running_var (num_batches_tracked is int)
STATE_PER_PARAM = {"sgd_m": 1, "sgd_nesterov_wd": 1, "adam": 2}  # averaged optimizer-state tensors


def _case(
    model: str, optimizer: str, momentum: str, tau: int, average_buffers: bool = True
) -> dict[str, Any]:
    suffix = "" if average_buffers else "-nobuf"
    return {
        "id": f"{model}-{optimizer}-{momentum}-tau{tau}{suffix}",
        "model": model,
        "optimizer": optimizer,
        "momentum": momentum,
        "tau": tau,
        "average_buffers": average_buffers,
    }


TAUS = (3, 1, 5)  # 5 does not divide the 12 steps
CASES = [
    *(_case("mlp", "sgd_m", mode, tau) for mode in ("average", "local", "zero") for tau in TAUS),
    *(_case("mlp", "sgd_nesterov_wd", "average", tau) for tau in TAUS),
    *(_case("mlp", "adam", mode, tau) for mode in ("average", "local") for tau in TAUS),
    _case("bn", "sgd_m", "average", 3),
    _case("bn", "adam", "local", 5),
    _case("bn", "sgd_m", "zero", 1),
    _case("bn", "sgd_m", "average", 3, average_buffers=False),
]
CASE_BY_ID = {c["id"]: c for c in CASES}
IDS = list(CASE_BY_ID)


@pytest.fixture(scope="module", params=[2, 4], ids=["p2", "p4"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    p = request.param
    return run_workers(
        averager_worker, p, tmp_path_factory.mktemp(f"averager_p{p}"), CASES, STEPS, DATA_SEED, MODEL_SEED
    )


@functools.cache
def _simulate(p: int, case_id: str, tau: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference params ``[rank, step, :]`` and each replica's final float buffers."""
    case = CASE_BY_ID[case_id]
    replicas: list[torch.nn.Module] = []

    def capturing_loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
        if len(replicas) < p:  # step 0 visits replicas 0..p-1 in order
            replicas.append(module)
        return loss_fn(module, batch)

    out = simulate_local_sgd(
        make_model(case["model"], MODEL_SEED),
        functools.partial(make_optimizer, case["optimizer"]),
        make_batches(p, STEPS, DATA_SEED),
        capturing_loss,
        tau=case["tau"] if tau is None else tau,
        momentum=case["momentum"],
        average_buffers=case["average_buffers"],
    )
    return torch.stack([torch.stack(steps) for steps in out]), [float_buffers(m) for m in replicas]


def _maxabs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _params(world: list[dict[str, Any]], case_id: str) -> torch.Tensor:
    return torch.stack([res[case_id]["params"] for res in world])  # [rank, step, n]


def _round_steps(tau: int) -> list[int]:
    return [t for t in range(1, STEPS + 1) if t % tau == 0]


@pytest.mark.parametrize("case_id", IDS)
def test_matches_simulation(world: list[dict[str, Any]], case_id: str) -> None:
    p = len(world)
    expected, expected_buffers = _simulate(p, case_id)
    got = _params(world, case_id)
    assert got.shape == expected.shape == (p, STEPS, N_PARAMS[CASE_BY_ID[case_id]["model"]])
    diff = (got - expected).abs().amax(dim=(0, 2))
    assert float(diff.max()) < TOL, f"max abs diff per step: {diff.tolist()}"
    for rank, res in enumerate(world):
        buffers = res[case_id]["buffers"][-1]
        assert buffers.shape == expected_buffers[rank].shape
        assert _maxabs(buffers - expected_buffers[rank]) < TOL, rank


@pytest.mark.parametrize("case_id", IDS)
def test_rounds_run_every_tau_steps(world: list[dict[str, Any]], case_id: str) -> None:
    tau = CASE_BY_ID[case_id]["tau"]
    expected_ran = [t % tau == 0 for t in range(1, STEPS + 1)]
    for res in world:
        assert res[case_id]["ran"] == expected_ran
        assert res[case_id]["in_sync"] == expected_ran
        assert res[case_id]["rounds"] == len(_round_steps(tau)) + (1 if STEPS % tau else 0)  # + finalize


@pytest.mark.parametrize("case_id", IDS)
def test_replicas_equal_after_rounds_and_apart_between(world: list[dict[str, Any]], case_id: str) -> None:
    """Would fail if the averager did nothing (replicas see different batches) or averaged every step."""
    case = CASE_BY_ID[case_id]
    got = _params(world, case_id)
    buffers = torch.stack([res[case_id]["buffers"] for res in world])
    has_buffers = N_FLOAT_BUFFERS[case["model"]] > 0
    for t in range(1, STEPS + 1):
        spread = float((got[:, t - 1] - got[0, t - 1]).abs().max())
        buf_spread = _maxabs(buffers[:, t - 1] - buffers[0, t - 1])
        if t % case["tau"] == 0:
            assert spread == 0.0, (t, spread)
            if case["average_buffers"]:
                assert buf_spread == 0.0, (t, buf_spread)
        else:
            assert spread > 1e-4, (t, spread)
            if has_buffers:
                assert buf_spread > 1e-4, (t, buf_spread)
        if has_buffers and not case["average_buffers"]:
            assert buf_spread > 1e-4, (t, buf_spread)
    # the consensus model after finalize() is the same on every rank, and is the mean of the replicas
    final = torch.stack([res[case_id]["final_params"] for res in world])
    assert float((final - final[0]).abs().max()) == 0.0
    assert float((final[0] - got[:, -1].mean(0)).abs().max()) < TOL
    for res in world:  # integer buffers (num_batches_tracked) never travel and stay equal
        assert [int(b) for b in res[case_id]["int_buffers"]] == [STEPS] * len(res[case_id]["int_buffers"])


@pytest.mark.parametrize("case_id", IDS)
def test_differs_from_no_averaging(world: list[dict[str, Any]], case_id: str) -> None:
    """The reference with no rounds at all is far from what ran: the simulation comparison has teeth."""
    p = len(world)
    never, _ = _simulate(p, case_id, tau=STEPS + 1)
    got = _params(world, case_id)
    assert float((got[:, -1] - never[:, -1]).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("optimizer", "modes"), [("sgd_m", ("average", "local", "zero")), ("adam", ("average", "local"))]
)
@pytest.mark.parametrize("tau", TAUS)
def test_momentum_modes_are_distinguishable(
    world: list[dict[str, Any]], optimizer: str, modes: tuple[str, ...], tau: int
) -> None:
    """Different momentum modes give different trajectories, so matching the reference checks the mode.

    Exception: SGD momentum is linear, so with tau=1 (averaging x after every step) the mean of local
    momentum buffers evolves exactly like the averaged buffer: "average" and "local" coincide.
    """
    runs = {mode: _params(world, f"mlp-{optimizer}-{mode}-tau{tau}") for mode in modes}
    for a in modes:
        for b in modes:
            if a < b:
                gap = float((runs[a][:, -1] - runs[b][:, -1]).abs().max())
                if optimizer == "sgd_m" and tau == 1 and {a, b} == {"average", "local"}:
                    assert gap < TOL, (a, b, gap)
                else:
                    assert gap > 1e-4, (a, b, gap)


def _expected_elements(case: dict[str, Any]) -> int:
    model = make_model(case["model"], MODEL_SEED)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers() if torch.is_floating_point(b))
    assert n_params == N_PARAMS[case["model"]]
    assert n_buffers == N_FLOAT_BUFFERS[case["model"]]
    state = STATE_PER_PARAM[case["optimizer"]] * n_params if case["momentum"] == "average" else 0
    return n_params + state + (n_buffers if case["average_buffers"] else 0)


@pytest.mark.parametrize("case_id", IDS)
def test_bytes_and_no_off_round_traffic(world: list[dict[str, Any]], case_id: str) -> None:
    case = CASE_BY_ID[case_id]
    rounds = _round_steps(case["tau"])
    nbytes = (_expected_elements(case) + len(world)) * 4  # float32, and one finite flag per rank
    for res in world:
        r = res[case_id]
        average = r["ledger"]["by_tag"]["average"]
        assert average["rounds"] == len(rounds)
        assert average["collectives"] == len(rounds)
        assert average["bytes_sent"] == len(rounds) * nbytes
        assert average["bytes_received"] == len(rounds) * nbytes
        assert sorted(r["ledger"]["by_tag"]) == ["average"]
        # torch.distributed saw exactly one all-reduce of that payload per round step, and nothing else
        step_calls = [(label, name, b) for label, name, b in r["calls"] if label != "final"]
        assert step_calls == [(t, "all_reduce", nbytes) for t in rounds]
        assert sum(b for _, _, b in step_calls) == average["bytes_sent"]
        final_calls = [(name, b) for label, name, b in r["calls"] if label == "final"]
        final = r["ledger_after_final"]["by_tag"].get("final")
        if STEPS % case["tau"]:
            assert final_calls == [("all_reduce", nbytes)]
            assert final is not None and final["bytes_sent"] == nbytes and final["collectives"] == 1
        else:  # already in sync: finalize() communicates nothing
            assert final_calls == []
            assert final is None
