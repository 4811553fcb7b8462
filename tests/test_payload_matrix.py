"""Every optimizer x payload format x momentum mode trains: the loss falls to the fp32 run's.

Issue: Adam with ``compressor="int4"`` diverged to a loss of 5e12 (about half of ``exp_avg_sq`` rounded
to exactly 0 each round, so Adam divided by its eps), and SGD-momentum with BatchNorm stopped on a NaN
(``running_var`` turned negative). The matrix runs the algorithms the two strategies run
(:class:`PeriodicAverager` for ``LocalSGDStrategy``, :class:`OverlapAverager` for
``OverlapLocalSGDStrategy``) on 2 gloo ranks, one process group for all 130 runs; the combinations that
cannot be made sound are refused at construction (checked below, without processes).
"""

from __future__ import annotations

import math

import pytest
import torch
from mp import run_workers
from payload_matrix_workers import (
    MATRIX_OPTIMIZERS,
    make_classifier,
    make_data,
    make_optimizer,
    matrix_worker,
)

from lightning_commsgd import OverlapLocalSGDStrategy
from lightning_commsgd.algorithms import OverlapAverager, PeriodicAverager
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression import QSGD, BlockInt4, BlockInt8, Cast, ScaledSign, TopK

PAYLOADS = (None, "bf16", "fp16", "int8", "int4")
STEPS, TAU = 60, 4


def _cases() -> list[dict]:
    cases = []
    for strategy, modes in (("local_sgd", ("average", "local", "zero")), ("overlap", ("local", "zero"))):
        for optimizer in MATRIX_OPTIMIZERS:
            for payload in PAYLOADS:
                for momentum in modes:
                    case_id = f"{strategy}-{optimizer}-{payload}-{momentum}"
                    cases.append(
                        {"id": case_id, "strategy": strategy, "optimizer": optimizer, "payload": payload,
                         "momentum": momentum}
                    )  # fmt: skip
    return cases + _object_cases()


# A codec name is shorthand for a compressor object (lightning_commsgd.compression.names): the object runs the
# same round bit for bit. Any other unbiased compressor is a codec too (QSGD here), and trains.
NAMED_OBJECTS = {
    "bf16": Cast("bf16"), "fp16": Cast(torch.float16), "int8": BlockInt8(256), "int4": BlockInt4(64),
}  # fmt: skip
OTHER_UNBIASED = QSGD(levels=16, bucket_size=64)


def _object_cases() -> list[dict]:
    cases = []
    for strategy, momentum in (("local_sgd", "average"), ("overlap", "local")):
        for label, compressor in [*NAMED_OBJECTS.items(), ("qsgd", OTHER_UNBIASED)]:
            cases.append(
                {"id": f"{strategy}-adam-{label}-object-{momentum}", "strategy": strategy,
                 "optimizer": "adam", "payload": compressor, "momentum": momentum}
            )  # fmt: skip
    return cases


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return run_workers(matrix_worker, 2, tmp_path_factory.mktemp("matrix"), _cases(), STEPS, TAU)


def _initial_loss() -> float:
    x, y = make_data()
    model = make_classifier().eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["local_sgd", "overlap"])
@pytest.mark.parametrize("optimizer", MATRIX_OPTIMIZERS)
def test_every_payload_trains_like_fp32(matrix, strategy, optimizer):
    start = _initial_loss()
    rank0, rank1 = matrix
    for case in _cases():
        if (case["strategy"], case["optimizer"]) != (strategy, optimizer) or "object" in case["id"]:
            continue
        got = rank0[case["id"]]
        reference = rank0[f"{strategy}-{optimizer}-None-{case['momentum']}"]
        assert math.isfinite(got["loss"]), case["id"]
        # training made progress, and the rounded payload kept the fp32 run's loss (a few % of noise)
        assert got["loss"] < 0.5 * start, (case["id"], got["loss"], start)
        assert got["loss"] <= 1.05 * reference["loss"] + 0.005, (case["id"], got["loss"], reference["loss"])
        # non-negative state kept its meaning: no negative second moment, no non-positive running variance
        assert got["negative_second_moments"] == 0, case["id"]
        assert got["running_var_min"] > 0, case["id"]
        # finalize left both ranks with the same model
        assert torch.equal(got["params"], rank1[case["id"]]["params"]), case["id"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("strategy", "momentum"), [("local_sgd", "average"), ("overlap", "local")])
def test_a_codec_name_and_its_compressor_object_run_bitwise_alike(matrix, strategy, momentum):
    rank0, rank1 = matrix
    for name in NAMED_OBJECTS:
        by_name = rank0[f"{strategy}-adam-{name}-{momentum}"]
        by_object = rank0[f"{strategy}-adam-{name}-object-{momentum}"]
        assert torch.equal(by_name["params"], by_object["params"]), name
        assert by_name["bytes_sent"] == by_object["bytes_sent"], name
    # another unbiased compressor: same model on both ranks, and the fp32 run's loss within QSGD's noise
    qsgd = rank0[f"{strategy}-adam-qsgd-object-{momentum}"]
    assert torch.equal(qsgd["params"], rank1[f"{strategy}-adam-qsgd-object-{momentum}"]["params"])
    assert qsgd["loss"] <= 1.05 * rank0[f"{strategy}-adam-None-{momentum}"]["loss"] + 0.005
    assert qsgd["negative_second_moments"] == 0 and qsgd["running_var_min"] > 0


@pytest.mark.parametrize("biased", [TopK(0.1), ScaledSign(16)], ids=["top_k", "sign"])
def test_averaging_refuses_a_biased_compressor(biased):
    """A round has no error feedback: a biased codec would shift the average by its error every round."""
    model = make_classifier()
    with pytest.raises(ValueError, match=r"`compressor`.*biased.*error feedback"):
        PeriodicAverager(model, [make_optimizer("sgd", model)], Communicator(), compressor=biased)
    with pytest.raises(ValueError, match=r"`compressor`.*biased"):
        OverlapLocalSGDStrategy(compressor=biased)


@pytest.mark.multiprocess
def test_second_moments_cost_bf16_bytes(matrix):
    """The byte rule, measured: under a rounded payload Adam's exp_avg_sq travels as bf16 values, so an
    Adam round costs (2 signed sections in the payload format) + (1 section in bf16)."""
    rank0, _ = matrix
    adam = {p: rank0[f"local_sgd-adam-{p}-average"]["bytes_sent"] for p in PAYLOADS}
    sgd = {p: rank0[f"local_sgd-sgd_nesterov-{p}-local"]["bytes_sent"] for p in PAYLOADS}  # params only
    bf16_section = sgd["bf16"]
    for payload in ("int8", "int4"):
        signed = rank0[f"local_sgd-sgd_nesterov-{payload}-average"]["bytes_sent"]  # params + momentum
        # params + exp_avg in the payload format, exp_avg_sq in bf16 (running_var: a few values, either way)
        assert abs(adam[payload] - (signed + bf16_section)) <= 0.02 * adam[payload], payload
        assert adam[payload] < adam["bf16"] < adam[None]


def test_overlap_refuses_averaged_optimizer_state():
    """Overlap's average lands a round late on a moved replica: no defined meaning for optimizer state."""
    with pytest.raises(ValueError, match=r"`momentum`.*'average'.*LocalSGDStrategy"):
        OverlapLocalSGDStrategy(momentum="average")
    model = make_classifier()
    with pytest.raises(ValueError, match="`momentum`"):
        OverlapAverager(model, [make_optimizer("adam", model)], Communicator(), momentum="average")
