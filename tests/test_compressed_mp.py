"""DORE, DIANA, QSGD and MEM-SGD in a plain PyTorch loop on 2 and 4 gloo processes, against the
independent single-process references in ``compression_simulation.py``: trajectories, bytes per step
from the payload formats, checkpoint resume and NaN handling."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from compression_simulation import simulate_compressed_sgd, simulate_dore, simulate_sgd_on_mean_gradient
from compression_workers import COMPRESSORS, compression_worker, nan_worker, resume_worker, wire_worker
from mp import run_workers
from mp_workers import loss_fn, make_batches, make_model, make_optimizer

pytestmark = pytest.mark.multiprocess

STEPS, DATA_SEED, MODEL_SEED = 8, 4321, 3
NUMEL = 5 * 8 + 8 + 8 + 1  # the mlp of mp_workers
TOL = 1e-6


def _dore(server: str, compressor: str, optimizer: str = "sgd_m", **kw: Any) -> dict[str, Any]:
    model = kw.get("model_compressor", compressor)
    cid = f"dore-{server}-{compressor}-{model}-{optimizer}" + "".join(f"-{k}{v}" for k, v in kw.items())
    return {
        "id": cid,
        "algorithm": "dore",
        "server": server,
        "compressor": compressor,
        "optimizer": optimizer,
        **kw,
    }


def _csgd(
    compressor: str, error_feedback: bool, server: str = "replicated", server_compressor: str | None = None
) -> dict[str, Any]:
    return {
        "id": f"csgd-{compressor}-ef{int(error_feedback)}-{server}-{server_compressor}",
        "algorithm": "csgd",
        "compressor": compressor,
        "error_feedback": error_feedback,
        "server": server,
        "server_compressor": server_compressor,
        "optimizer": "sgd_m",
    }


CASES = [
    *(_dore(server, "pnorm") for server in ("rank0", "replicated")),  # the default: the paper's rates
    _dore("rank0", "pnorm", rates="theory"),
    *(
        _dore(server, "qsgd", "sgd_nesterov_wd", model_compressor="pnorm")
        for server in ("rank0", "replicated")
    ),
    _dore("rank0", "pnorm", alpha=0.3, beta=0.9, eta=0.5),
    _dore("rank0", "identity", alpha=0.5, beta=1.0),  # Q = identity: plain SGD on the mean gradient
    _dore("replicated", "pnorm", model_compressor="identity", beta=1.0, eta=0.0),  # DIANA
    _csgd("qsgd", False),  # QSGD
    _csgd("topk", True),  # MEM-SGD
    _csgd("randk", False),
    _csgd("qsgd", False, server="rank0"),  # parameter-server QSGD: the fp32 mean broadcast
    _csgd("sign", True, server="rank0", server_compressor="sign"),  # DoubleSqueeze
    _csgd("sign", True, server="replicated", server_compressor="sign"),
]
CASE_BY_ID = {c["id"]: c for c in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=["p2", "p4"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    p = request.param
    return run_workers(
        compression_worker,
        p,
        tmp_path_factory.mktemp(f"compressed_p{p}"),
        CASES,
        STEPS,
        DATA_SEED,
        MODEL_SEED,
    )


@functools.cache
def _reference(p: int, case_id: str) -> torch.Tensor:
    case = CASE_BY_ID[case_id]
    args = (
        make_model("mlp", MODEL_SEED),
        functools.partial(make_optimizer, case["optimizer"]),
        make_batches(p, STEPS, DATA_SEED),
        loss_fn,
    )
    if case["algorithm"] == "csgd":
        server_compressor = case["server_compressor"]
        out = simulate_compressed_sgd(
            *args,
            COMPRESSORS[case["compressor"]](),
            error_feedback=case["error_feedback"],
            server_compressor=COMPRESSORS[server_compressor]() if server_compressor else None,
        )
    else:
        compressor = COMPRESSORS[case["compressor"]]()
        model_compressor = COMPRESSORS[case.get("model_compressor", case["compressor"])]()
        c, cm = compressor.variance_bound(NUMEL), model_compressor.variance_bound(NUMEL)
        theory = case.get("rates") == "theory"
        out = simulate_dore(
            *args,
            compressor,
            model_compressor,
            alpha=case.get("alpha", 1 / (2 * (c + 1)) if theory else 0.1),
            beta=case.get("beta", 1 / (cm + 1) if theory else 1.0),
            eta=case.get("eta", 1.0),
        )
    return torch.stack(out)


@pytest.mark.parametrize("case_id", list(CASE_BY_ID))
def test_trajectory_equals_the_single_process_reference(world, case_id):
    p = len(world)
    reference = _reference(p, case_id)
    for rank, result in enumerate(world):
        diff = float((result[case_id]["params"] - reference).abs().max())
        assert diff <= TOL, (rank, diff)
        # every rank holds the same model after every step, bitwise
        assert torch.equal(result[case_id]["params"], world[0][case_id]["params"])
    # and compression changed something (the reference is not trivially plain SGD)
    if "identity" not in case_id:
        plain = torch.stack(
            simulate_sgd_on_mean_gradient(
                make_model("mlp", MODEL_SEED),
                functools.partial(make_optimizer, CASE_BY_ID[case_id]["optimizer"]),
                make_batches(p, STEPS, DATA_SEED),
                loss_fn,
            )
        )
        assert float((reference - plain).abs().max()) > 1e-4


def test_default_rates_are_the_papers_and_theory_rates_come_from_the_compressor_constant(world):
    paper = world[0][_dore("rank0", "pnorm")["id"]]
    assert (paper["alpha"], paper["beta"]) == (0.1, 1.0)
    case_id = _dore("rank0", "pnorm", rates="theory")["id"]
    c = COMPRESSORS["pnorm"]().variance_bound(NUMEL)  # (sqrt(16) - 1) / 2 = 1.5
    assert c == 1.5
    assert world[0][case_id]["alpha"] == pytest.approx(1 / (2 * (c + 1)))
    assert world[0][case_id]["beta"] == pytest.approx(1 / (c + 1))


def test_identity_compression_is_sgd_on_the_mean_gradient(world):
    case_id = _dore("rank0", "identity", alpha=0.5, beta=1.0)["id"]
    plain = torch.stack(
        simulate_sgd_on_mean_gradient(
            make_model("mlp", MODEL_SEED),
            functools.partial(make_optimizer, "sgd_m"),
            make_batches(len(world), STEPS, DATA_SEED),
            loss_fn,
        )
    )
    assert float((world[0][case_id]["params"] - plain).abs().max()) <= TOL


def _steps_calls(result: dict[str, Any]) -> dict[int, list[tuple[str, int | None]]]:
    by_step: dict[int, list] = {}
    for label, name, nbytes in result["calls"]:
        by_step.setdefault(label, []).append((name, nbytes))
    return by_step


@pytest.mark.parametrize("server", ["rank0", "replicated"])
def test_bytes_per_step_are_the_payload_sizes(world, server):
    """rank0: one gather of Q(Delta_i) (+1 status byte) and one broadcast of Q_m(q) (+p+1 status bytes)
    per step; replicated: one all-gather per step. The ledger counts exactly those payloads."""
    p = len(world)
    case_id = _dore(server, "pnorm")["id"]
    payload = COMPRESSORS["pnorm"]().payload_nbytes(NUMEL)
    assert payload == 4 * 4 + 15  # 4 blocks of 16 (one norm each) + 57 ternary codes in 2 bits
    for rank, result in enumerate(world):
        calls = _steps_calls(result[case_id])
        assert sorted(calls) == list(range(1, STEPS + 1))
        for step_calls in calls.values():
            if server == "rank0":
                assert step_calls == [("gather", payload + 1), ("broadcast", payload + p + 1)]
            else:
                assert step_calls == [("all_gather", payload + 1)]
        ledger = result[case_id]["ledger"]
        if server == "rank0":
            sent = (payload + p + 1) if rank == 0 else (payload + 1)
            received = (p - 1) * (payload + 1) if rank == 0 else (payload + p + 1)
        else:
            sent, received = payload + 1, (p - 1) * (payload + 1)
        assert ledger["bytes_sent"] == STEPS * sent
        assert ledger["bytes_received"] == STEPS * received
        assert ledger["bytes_sent"] < STEPS * 4 * NUMEL / 4  # far below an fp32 gradient


@pytest.mark.parametrize(
    "case",
    [
        _dore("rank0", "pnorm", "sgd_nesterov_wd"),
        _dore("replicated", "qsgd", model_compressor="pnorm"),
        _csgd("topk", True),
        _csgd("sign", True, server="rank0", server_compressor="sign"),
    ],
    ids=lambda c: c["id"],
)
def test_resume_from_a_checkpoint_continues_bitwise(tmp_path, case):
    """h_i, h, e, x_hat, the memory and both random streams are in the state dict."""
    results = run_workers(resume_worker, 2, tmp_path, case, 9, 4, DATA_SEED, MODEL_SEED)
    for result in results:
        assert torch.equal(result["full"], result["resumed"])


@pytest.mark.parametrize(
    ("case", "poison"),
    [
        (_dore("rank0", "pnorm"), (1, 3)),
        (_dore("rank0", "pnorm"), (0, 2)),
        (_dore("replicated", "pnorm"), (1, 3)),
        (_csgd("topk", True), (2, 2)),
        (_csgd("sign", True, server="rank0", server_compressor="sign"), (1, 2)),
    ],
    ids=["rank0-worker", "rank0-master", "replicated", "memsgd", "doublesqueeze-rank0"],
)
def test_a_nan_gradient_on_one_rank_stops_every_rank_with_the_residuals_untouched(tmp_path, case, poison):
    results = run_workers(nan_worker, 3, tmp_path, case, poison, DATA_SEED, MODEL_SEED)
    bad_rank, step = poison
    for result in results:
        assert result["error"] is not None
        assert f"rank(s) [{bad_rank}]" in result["error"] and f"step {step}" in result["error"]
        assert result["state_unchanged"] and result["params_unchanged"] and result["optimizer_unchanged"]


def test_double_squeeze_sends_compressed_both_ways(world):
    """DoubleSqueeze, rank0: a gather of Q(v_i) (+1 status byte) and a broadcast of Q_s(v) (+p verdict
    bytes) each step: 1 bit a value plus a scale per block of 16, both ways."""
    p = len(world)
    case_id = _csgd("sign", True, server="rank0", server_compressor="sign")["id"]
    payload = COMPRESSORS["sign"]().payload_nbytes(NUMEL)
    assert payload == 4 * 4 + 8  # 4 scales + 57 sign bits
    for result in world:
        calls = _steps_calls(result[case_id])
        assert all(c == [("gather", payload + 1), ("broadcast", payload + p)] for c in calls.values())


WIRE_CASES = [
    {"id": "dore-rank0", "algorithm": "dore", "server": "rank0", "compressor": "pnorm256"},
    {"id": "dore-replicated", "algorithm": "dore", "server": "replicated", "compressor": "pnorm256"},
    {"id": "qsgd-rank0", "algorithm": "csgd", "compressor": "qsgd", "error_feedback": False,
     "server": "rank0"},
    {"id": "topk-ef", "algorithm": "csgd", "compressor": "topk", "error_feedback": True},
]
# the largest (coded bytes) / (packed bytes) each case may reach, sent and received together
WIRE_RATIO = {"dore-rank0": 0.7, "dore-replicated": 0.7, "qsgd-rank0": 0.8, "topk-ef": 0.6}


def test_the_entropy_wire_keeps_the_trajectory_bitwise_and_sends_fewer_bytes(tmp_path):
    """3 ranks, both masters: wire="entropy" gives every rank bitwise the parameters of wire="packed" at every
    step (the coding is lossless; only the messages change), with fewer bytes in the ledger: the ternary and
    QSGD codes are far from uniform and top-k's sorted indices travel as gaps. The rank0 broadcast of the
    fp32 aggregate (QSGD's parameter-server form) is coded too (byte planes)."""
    world = run_workers(wire_worker, 3, tmp_path, WIRE_CASES, 6)
    for case in WIRE_CASES:
        for rank, result in enumerate(world):
            packed, coded = result[f"{case['id']}-packed"], result[f"{case['id']}-entropy"]
            assert torch.equal(packed["params"], coded["params"]), (case["id"], rank)
            assert torch.equal(coded["params"], world[0][f"{case['id']}-entropy"]["params"])
            sent = coded["ledger"]["bytes_sent"] + coded["ledger"]["bytes_received"]
            sent_packed = packed["ledger"]["bytes_sent"] + packed["ledger"]["bytes_received"]
            assert sent < WIRE_RATIO[case["id"]] * sent_packed, (case["id"], rank, sent, sent_packed)
