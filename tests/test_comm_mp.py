"""Communicator on 2 and 4 gloo processes: results, ledger bytes by the CommLedger convention, and the
``torch.distributed`` calls actually issued (counted by patching the module attributes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from mp import run_workers
from mp_workers import (
    LOWP_NUMEL,
    LOWP_SEED,
    broadcast_payload,
    comm_worker,
    gather_payload,
    lowp_input,
    lowp_worker,
    replica_check_worker,
)
from simulation import lowp_mean_reference

from lightning_commsgd.comm import Communicator
from lightning_commsgd.payload import payload_codec
from lightning_commsgd.replica_check import replica_digest

pytestmark = pytest.mark.multiprocess

F32, F64, I64 = 4, 8, 8
BASE = torch.arange(6, dtype=torch.float32) + 1  # rank r holds BASE * (r + 1)
TAGS = (
    "ar_sum", "ar_mean", "ar_max", "ar_min", "ar_int_mean", "ar_f64", "scalars", "scalars_max",
    "bcast", "allgather", "barrier", "bobj", "gobj",
)  # fmt: skip


@pytest.fixture(scope="module", params=[2, 4], ids=["p2", "p4"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    p = request.param
    return run_workers(comm_worker, p, tmp_path_factory.mktemp(f"comm_p{p}"))


def _stats(res: dict[str, Any], tag: str) -> dict[str, Any]:
    return res["ledger"]["by_tag"][tag]


def _check_tag(
    res: dict[str, Any], tag: str, *, sent: int, received: int, calls: list[tuple[str, int]]
) -> None:
    """Ledger of ``tag`` equals the analytic values, and the counted calls made under it equal ``calls``."""
    stats = _stats(res, tag)
    assert stats["rounds"] == 1, (tag, stats)
    assert stats["bytes_sent"] == sent, (tag, stats)
    assert stats["bytes_received"] == received, (tag, stats)
    assert stats["collectives"] == len(calls), (tag, stats)
    counted = [(name, nbytes) for label, name, nbytes in res["calls"] if label == tag]
    assert counted == calls, (tag, counted)
    assert stats["seconds"] >= 0.0


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_identity(world: list[dict[str, Any]]) -> None:
    p = len(world)
    for rank, res in enumerate(world):
        assert res["rank"] == rank
        assert res["world_size"] == p
        assert res["distributed"] is True
        assert res["ledger_world_size"] == p


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min"])
def test_all_reduce(world: list[dict[str, Any]], op: str) -> None:
    p = len(world)
    factor = {"sum": p * (p + 1) / 2, "mean": (p + 1) / 2, "max": p, "min": 1}[op]
    nbytes = BASE.numel() * F32
    for res in world:
        out = res[f"ar_{op}"]
        assert out["same_object"], "all_reduce_ works in place and returns its argument"
        assert out["result"].dtype == torch.float32
        torch.testing.assert_close(out["result"], BASE * factor, rtol=0, atol=0)
        _check_tag(res, f"ar_{op}", sent=nbytes, received=nbytes, calls=[("all_reduce", nbytes)])


def test_all_reduce_integer_mean_and_float64(world: list[dict[str, Any]]) -> None:
    p = len(world)
    int_expected = torch.tensor([(3 * p * (p - 1) // 2 + p) // p, 7], dtype=torch.int64)
    for res in world:
        assert res["ar_int_mean"].dtype == torch.int64
        assert torch.equal(res["ar_int_mean"], int_expected)
        _check_tag(res, "ar_int_mean", sent=2 * I64, received=2 * I64, calls=[("all_reduce", 2 * I64)])
        assert torch.equal(res["ar_f64"], torch.full((2, 3), p * (p - 1) / 2, dtype=torch.float64))
        _check_tag(res, "ar_f64", sent=6 * F64, received=6 * F64, calls=[("all_reduce", 6 * F64)])


def test_all_reduce_scalars(world: list[dict[str, Any]]) -> None:
    p = len(world)
    for res in world:
        assert res["scalars"] == [p * (p - 1) / 2, 1.5 * p, -2.0 * p]
        assert all(isinstance(v, float) for v in res["scalars"])
        _check_tag(res, "scalars", sent=3 * F64, received=3 * F64, calls=[("all_reduce", 3 * F64)])
        assert res["scalars_max"] == [float(p - 1), 0.0]
        _check_tag(res, "scalars_max", sent=2 * F32, received=2 * F32, calls=[("all_reduce", 2 * F32)])


def test_broadcast(world: list[dict[str, Any]]) -> None:
    p = len(world)
    src = p - 1
    nbytes = 12 * F32
    for rank, res in enumerate(world):
        assert res["bcast"]["same_object"]
        assert torch.equal(res["bcast"]["result"], torch.full((3, 4), src + 0.25))
        _check_tag(
            res,
            "bcast",
            sent=nbytes if rank == src else 0,
            received=0 if rank == src else nbytes,
            calls=[("broadcast", nbytes)],
        )


def test_all_gather(world: list[dict[str, Any]]) -> None:
    p = len(world)
    nbytes = 5 * F64
    for res in world:
        gathered = res["allgather"]
        assert len(gathered) == p
        for r, t in enumerate(gathered):
            assert torch.equal(t, torch.arange(5, dtype=torch.float64) + 10 * r)
        _check_tag(res, "allgather", sent=nbytes, received=(p - 1) * nbytes, calls=[("all_gather", nbytes)])


def test_barrier(world: list[dict[str, Any]]) -> None:
    for res in world:
        assert res["barrier"] is None
        _check_tag(res, "barrier", sent=0, received=0, calls=[("barrier", 0)])


def test_broadcast_object(world: list[dict[str, Any]]) -> None:
    src = 1
    expected = broadcast_payload(src)
    n = world[src]["bobj_own_size"]  # torch.save size of the source's object
    assert n > 100
    for rank, res in enumerate(world):
        assert _same(res["bobj"], expected), (rank, res["bobj"])
        # two collectives: the int64 size, then the payload; the ledger counts both
        _check_tag(
            res,
            "bobj",
            sent=n + I64 if rank == src else 0,
            received=0 if rank == src else n + I64,
            calls=[("broadcast", I64), ("broadcast", n)],
        )


def test_gather_object(world: list[dict[str, Any]]) -> None:
    p = len(world)
    dst = p - 1
    sizes = [res["gobj_own_size"] for res in world]
    assert len(set(sizes)) == p, "payloads were meant to differ in size"
    padded = max(sizes)  # gather needs equal shapes: every payload is padded to the largest
    for rank, res in enumerate(world):
        if rank == dst:
            assert len(res["gobj"]) == p
            for r, obj in enumerate(res["gobj"]):
                assert _same(obj, gather_payload(r)), (r, obj)
            sent, received = I64, I64 * (p - 1) + padded * (p - 1)
        else:
            assert res["gobj"] is None
            sent, received = I64 + padded, I64 * (p - 1)
        _check_tag(res, "gobj", sent=sent, received=received, calls=[("all_gather", I64), ("gather", padded)])


def test_totals_match_counted_calls(world: list[dict[str, Any]]) -> None:
    p = len(world)
    allreduce_payload = 4 * 6 * F32 + 2 * I64 + 6 * F64 + 3 * F64 + 2 * F32
    for res in world:
        ledger = res["ledger"]
        assert sorted(ledger["by_tag"]) == sorted(TAGS)
        assert ledger["rounds"] == len(TAGS)
        # every torch.distributed call was made under one of the tags and is on the ledger
        assert all(label in TAGS for label, _, _ in res["calls"])
        assert ledger["collectives"] == len(res["calls"])
        assert ledger["bytes_sent"] == sum(s["bytes_sent"] for s in ledger["by_tag"].values())
        assert ledger["bytes_received"] == sum(s["bytes_received"] for s in ledger["by_tag"].values())
        ring = 2 * (p - 1) * allreduce_payload // p
        assert ledger["wire_bytes_estimate"] == ring + ledger["bytes_sent"] - allreduce_payload


def _lowp_reference(p: int, wire: torch.dtype) -> torch.Tensor:
    """The mean as all_reduce_mean_lowp_ defines it: 16-bit values summed in fp32 in rank order, / p
    (two ranks: the all-gather form), then rounded to 16 bits again (three or more: the chunk means of the
    reduce-scatter travel too)."""
    rows = torch.stack([lowp_input(r).to(wire) for r in range(p)]).to(torch.float32)
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total / p if p == 2 else (total / p).to(wire).to(torch.float32)


def _lowp_bytes(p: int, payload_nbytes: Callable[[int], int]) -> int:
    """Payload bytes each rank sends in one low-precision mean of LOWP_NUMEL values: (p - 1) payloads of
    all of them (two ranks; the pieces are whole blocks, so their payloads add up to the whole's), else
    2 (p - 1) payloads of a chunk of ceil(n / p)."""
    if p == 2:
        return payload_nbytes(LOWP_NUMEL)
    return 2 * (p - 1) * payload_nbytes(-(-LOWP_NUMEL // p))


@pytest.mark.parametrize("p", [2, 3])
def test_low_precision_mean_and_exchange_in_segments(tmp_path, p):
    """Messages larger than SEGMENT_BYTES (set to 32 KiB by the worker) travel in segments, and with two
    ranks the buffer is encoded and sent in pieces: the 16-bit mean (blocking, bf16; in the background,
    fp16, overlapping a ring exchange on the training thread) and the int8 and int4 means (stochastic
    rounding, seeded) equal their definitions on every rank, the exchange delivers the neighbour's tensor
    bit for bit, and the ledger counts the payload and the batches of messages."""
    results = run_workers(lowp_worker, p, tmp_path)
    int8_reference = lowp_mean_reference([lowp_input(r) for r in range(p)], "int8", LOWP_SEED)
    exact = torch.stack([lowp_input(r) for r in range(p)]).mean(0)
    # unbiased rounding within 1/127 of a 256-block's largest value, at most twice: close to the exact mean
    assert (int8_reference - exact).abs().max() <= 2 * exact.abs().max() / 127
    int4_reference = lowp_mean_reference([lowp_input(r) for r in range(p)], "int4", LOWP_SEED)
    assert (int4_reference - exact).abs().max() <= 2 * exact.abs().max() / 7
    assert not torch.equal(int4_reference, int8_reference)
    pieces = Communicator()
    pieces.SEGMENT_BYTES = 32 * 1024  # as the worker sets it

    def calls(payload: str | torch.dtype) -> int:
        """Two ranks: one receive and one send per piece; more: two batches of messages."""
        return 2 * len(pieces._pieces(payload_codec(payload), LOWP_NUMEL, False)) if p == 2 else 2

    for rank, res in enumerate(results):
        assert torch.equal(res["blocking"], _lowp_reference(p, torch.bfloat16))
        assert torch.equal(res["background"], _lowp_reference(p, torch.float16))
        assert torch.equal(res["int8"], int8_reference)
        assert torch.equal(res["int4"], int4_reference)
        assert torch.equal(res["ring"], lowp_input((rank - 1) % p))
        by_tag = res["ledger"]["by_tag"]
        assert (
            by_tag["lowp"]["bytes_sent"]
            == by_tag["lowp_async"]["bytes_sent"]
            == _lowp_bytes(p, lambda n: 2 * n)
        )
        assert by_tag["lowp_int8"]["bytes_sent"] == _lowp_bytes(p, lambda n: 4 * -(-n // 256) + n)
        assert by_tag["lowp_int4"]["bytes_sent"] == _lowp_bytes(p, lambda n: 4 * -(-n // 64) + -(-n // 2))
        payloads = {
            "lowp": torch.bfloat16,
            "lowp_async": torch.float16,
            "lowp_int8": "int8",
            "lowp_int4": "int4",
        }
        for tag, payload in payloads.items():
            assert by_tag[tag]["collectives"] == calls(payload), (tag, by_tag[tag])
        assert by_tag["ring"]["bytes_sent"] == by_tag["ring"]["bytes_received"] == LOWP_NUMEL * 4


def test_replica_check_passes_equal_replicas_and_stops_every_rank_on_one_ulp(tmp_path):
    """check_replicas_equal: equal replicas pass (one 8-byte all-gather each); a one-ulp difference on
    rank 2 raises on every rank, naming rank 2 and the step."""
    results = run_workers(replica_check_worker, 3, tmp_path)
    for res in results:
        assert res["error"] is not None and "rank(s) [2]" in res["error"] and "step 7" in res["error"]
        stats = res["ledger"]["by_tag"]["replica_check"]
        assert stats["rounds"] == 2 and stats["bytes_sent"] == 2 * 8


def test_replica_digest_sees_every_bit_shape_and_dtype():
    base = torch.linspace(-1, 1, 1000)
    assert replica_digest([base, torch.ones(3)]) == replica_digest([base.clone(), torch.ones(3)])
    bumped = base.clone()
    bumped[123] = torch.nextafter(bumped[123], torch.tensor(2.0))
    assert replica_digest([bumped]) != replica_digest([base])
    assert replica_digest([base.view(10, 100)]) != replica_digest([base])
    assert replica_digest([base.double()]) != replica_digest([base])
    assert 0 <= replica_digest([base]) < 2**63
