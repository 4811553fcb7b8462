"""Single-process tests: FlatBuffer, CommLedger, Communicator without a process group, PeriodicAverager
argument validation and step counting with a world size of 1."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_commsgd.algorithms import PeriodicAverager
from lightning_commsgd.comm import Communicator
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.ledger import CommLedger, TagStats

# --------------------------------------------------------------------------------------------------
# FlatBuffer
# --------------------------------------------------------------------------------------------------


def _mixed() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.tensor(3.25),  # scalar, fp32
        torch.randn(7, generator=gen).to(torch.bfloat16),  # 1-D bf16
        torch.randn(2, 3, 4, generator=gen).to(torch.float16),  # 3-D fp16
        torch.randn(5, generator=gen),  # 1-D fp32
    ]


def test_flat_round_trip_mixed_shapes_and_dtypes() -> None:
    tensors = _mixed()
    flat = FlatBuffer(tensors)
    assert flat.buffer.dtype == torch.float32  # the widest
    assert flat.numel == 1 + 7 + 24 + 5
    assert flat.nbytes == (1 + 7 + 24 + 5) * 4
    assert flat.shapes == [torch.Size([]), torch.Size([7]), torch.Size([2, 3, 4]), torch.Size([5])]

    buffer = flat.pack(tensors)
    assert buffer is flat.buffer
    assert buffer.shape == (37,)
    expected = torch.cat([t.float().reshape(-1) for t in tensors])
    assert torch.equal(buffer, expected)  # widening is exact

    views = flat.views()
    assert [v.shape for v in views] == [t.shape for t in tensors]
    assert all(v.data_ptr() >= buffer.data_ptr() for v in views)

    out = [torch.zeros_like(t) for t in tensors]
    flat.unpack(out)
    for got, want in zip(out, tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)

    # unpack from another buffer (what comes back from a collective), rounding to each dtype
    other = buffer * 2 + 0.5
    flat.unpack(out, other)
    for got, want in zip(out, tensors, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, (want.float() * 2 + 0.5).to(want.dtype))


def test_flat_explicit_dtype() -> None:
    tensors = [torch.randn(3), torch.randn(2, 2)]
    flat = FlatBuffer(tensors, dtype=torch.float64)
    assert flat.buffer.dtype == torch.float64
    assert flat.nbytes == 7 * 8
    assert torch.equal(flat.pack(tensors), torch.cat([t.double().reshape(-1) for t in tensors]))


@pytest.mark.parametrize("half_first", [True, False], ids=["fp16-first", "bf16-first"])
def test_flat_half_and_bfloat16_round_trip_exactly(half_first: bool) -> None:
    """The class promises lower precisions are widened *exactly*; fp16 and bf16 have the same bit width,
    so neither is wide enough for the other (fp16 lacks bf16's range, bf16 lacks fp16's mantissa)."""
    tensors = [
        torch.tensor([1.0009765625, 3.0], dtype=torch.float16),  # 1 + 2**-10: needs fp16's 10-bit mantissa
        torch.tensor([1.0e5, -2.0], dtype=torch.bfloat16),  # beyond fp16's max (65504)
    ]
    order = tensors if half_first else tensors[::-1]
    flat = FlatBuffer(order)
    flat.pack(order)
    out = [torch.zeros_like(t) for t in order]
    flat.unpack(out)
    for got, want in zip(out, order, strict=True):
        assert torch.equal(got, want), (flat.buffer.dtype, got, want)


def test_flat_refuses_integer_and_empty() -> None:
    with pytest.raises(TypeError, match="floating"):
        FlatBuffer([torch.randn(3), torch.arange(3)])
    with pytest.raises(TypeError, match="floating"):
        FlatBuffer([torch.ones(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="at least one"):
        FlatBuffer([])


def test_flat_refuses_mixed_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        FlatBuffer([torch.randn(2), torch.empty(2, device="meta")])


def test_flat_matches() -> None:
    tensors = [torch.randn(2, 3), torch.randn(4)]
    flat = FlatBuffer(tensors)
    assert flat.matches(tensors)
    assert flat.matches([torch.zeros(2, 3), torch.zeros(4)])
    assert not flat.matches([torch.zeros(3, 2), torch.zeros(4)])  # same numel, other shape
    assert not flat.matches([torch.zeros(2, 3)])
    assert not flat.matches([torch.zeros(2, 3), torch.zeros(4), torch.zeros(1)])
    assert not flat.matches([])


def test_flat_pack_does_not_join_autograd_graph() -> None:
    weight = torch.randn(4, 3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    flat = FlatBuffer([weight, bias])
    with torch.enable_grad():
        buffer = flat.pack([weight, bias])
    assert not buffer.requires_grad
    assert buffer.grad_fn is None
    # unpack into leaf parameters works in place without autograd complaining
    flat.unpack([weight, bias], torch.zeros_like(buffer))
    assert torch.equal(weight, torch.zeros(4, 3)) and weight.requires_grad and weight.grad_fn is None


# --------------------------------------------------------------------------------------------------
# CommLedger
# --------------------------------------------------------------------------------------------------


def _filled(world_size: int) -> CommLedger:
    ledger = CommLedger(world_size=world_size)
    ledger.record("average", sent=100, received=100, seconds=0.5, kind="all_reduce")
    ledger.record("average", sent=100, received=100, seconds=0.25, kind="all_reduce")
    ledger.record("checkpoint", sent=10, received=0, seconds=0.125, collectives=2)
    ledger.record("gather", sent=0, received=30, seconds=0.0)
    return ledger


def test_ledger_record_and_totals() -> None:
    ledger = _filled(2)
    assert ledger.tag("average") == TagStats(
        rounds=2, collectives=2, bytes_sent=200, bytes_received=200, seconds=0.75, allreduce_bytes=200
    )
    assert ledger.tag("checkpoint") == TagStats(1, 2, 10, 0, 0.125)
    assert ledger.tag("gather") == TagStats(1, 1, 0, 30, 0.0)
    assert ledger.rounds == 4
    assert ledger.collectives == 5
    assert ledger.bytes_sent == 210
    assert ledger.bytes_received == 230
    assert ledger.seconds == pytest.approx(0.875)


def test_ledger_unknown_tag_is_zeros() -> None:
    ledger = _filled(2)
    assert ledger.tag("never") == TagStats(0, 0, 0, 0, 0.0)
    assert "never" not in ledger.by_tag  # looking does not create it
    empty = CommLedger()
    assert (empty.rounds, empty.collectives, empty.bytes_sent, empty.bytes_received) == (0, 0, 0, 0)
    assert empty.wire_bytes_estimate() == 0


def test_ledger_as_dict() -> None:
    d = _filled(4).as_dict()
    assert d["bytes_sent"] == 210
    assert d["bytes_received"] == 230
    assert d["rounds"] == 4
    assert d["collectives"] == 5
    assert d["seconds"] == pytest.approx(0.875)
    assert d["wire_bytes_estimate"] == 310
    assert list(d["by_tag"]) == ["average", "checkpoint", "gather"]  # sorted
    assert d["by_tag"]["checkpoint"] == {
        "rounds": 1, "collectives": 2, "bytes_sent": 10, "bytes_received": 0, "seconds": 0.125,
        "allreduce_bytes": 0,
    }  # fmt: skip
    json.dumps(d)  # loggable as is


@pytest.mark.parametrize(("world_size", "ring"), [(1, 0), (2, 200), (4, 300)])
def test_ledger_wire_bytes_estimate(world_size: int, ring: int) -> None:
    # all-reduce payload 200 -> ring all-reduce 2 (p-1)/p * 200 on the wire; other payloads (10) as counted
    assert _filled(world_size).wire_bytes_estimate() == ring + 10


def test_ledger_state_dict_round_trip() -> None:
    ledger = _filled(4)
    state = ledger.state_dict()
    json.dumps(state)
    restored = CommLedger(world_size=4)
    restored.load_state_dict(state)
    assert restored.as_dict() == ledger.as_dict()
    assert restored.wire_bytes_estimate() == ledger.wire_bytes_estimate() == 310
    # the state is a snapshot: counting on in either ledger does not change it or the other
    ledger.record("average", sent=100, received=100, seconds=0.0, kind="all_reduce")
    assert restored.tag("average").rounds == 2
    assert state["by_tag"]["average"]["rounds"] == 2
    restored.record("average", sent=100, received=100, seconds=0.0, kind="all_reduce")
    assert restored.as_dict() == ledger.as_dict()
    assert restored.wire_bytes_estimate() == 2 * 3 * 300 // 4 + 10


# --------------------------------------------------------------------------------------------------
# Communicator without a process group
# --------------------------------------------------------------------------------------------------


def test_communicator_single_process_is_identity() -> None:
    assert not dist.is_initialized()
    comm = Communicator()
    assert (comm.rank, comm.world_size, comm.is_distributed, comm.group) == (0, 1, False, None)
    assert comm.ledger.world_size == 1

    t = torch.arange(4.0)
    for op in ("sum", "mean", "max", "min"):
        assert comm.all_reduce_(t, op, tag="x") is t
    assert torch.equal(t, torch.arange(4.0))
    ints = torch.tensor([3, 5])
    assert comm.all_reduce_(ints, "mean", tag="x") is ints and torch.equal(ints, torch.tensor([3, 5]))
    assert comm.all_reduce_scalars([1.5, -2.0], "sum", tag="x") == [1.5, -2.0]
    assert comm.broadcast_(t, src=0, tag="x") is t
    gathered = comm.all_gather(t, tag="x")
    assert len(gathered) == 1 and gathered[0] is t
    assert comm.barrier(tag="x") is None
    obj = {"a": [1, 2], "t": torch.ones(2)}
    assert comm.broadcast_object(obj, tag="x") is obj
    got = comm.gather_object(obj, tag="x")
    assert got == [obj] and got[0] is obj

    assert comm.ledger.by_tag == {}
    assert comm.ledger.as_dict()["rounds"] == 0
    assert comm.ledger.bytes_sent == comm.ledger.bytes_received == comm.ledger.collectives == 0


def test_communicator_rejects_unknown_op() -> None:
    with pytest.raises(ValueError, match="op must be one of"):
        Communicator().all_reduce_(torch.ones(2), "avg", tag="x")  # type: ignore[arg-type]


def test_communicator_group_without_distributed() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialised"):
        Communicator(group=object())


# --------------------------------------------------------------------------------------------------
# PeriodicAverager: arguments
# --------------------------------------------------------------------------------------------------


def _model_and_sgd(momentum: float = 0.9) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)


@pytest.mark.parametrize("tau", [0, -1])
def test_averager_tau_must_be_positive(tau: int) -> None:
    model, opt = _model_and_sgd()
    with pytest.raises(ValueError, match="tau"):
        PeriodicAverager(model, [opt], Communicator(), tau=tau)


@pytest.mark.parametrize("tau", [2.5, "8", True, False, None, 4.0])
def test_averager_tau_must_be_int(tau: object) -> None:
    model, opt = _model_and_sgd()
    with pytest.raises(TypeError, match="tau"):
        PeriodicAverager(model, [opt], Communicator(), tau=tau)  # type: ignore[arg-type]


def test_averager_tau_setter_validates() -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=4)
    with pytest.raises(ValueError):
        averager.tau = 0
    with pytest.raises(TypeError):
        averager.tau = True  # type: ignore[assignment]
    with pytest.raises(TypeError):
        averager.tau = "2"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        averager.tau = 1.5  # type: ignore[assignment]
    assert averager.tau == 4
    averager.tau = 2
    assert averager.tau == 2


def test_averager_unknown_momentum_mode() -> None:
    model, opt = _model_and_sgd()
    with pytest.raises(ValueError, match="momentum") as info:
        PeriodicAverager(model, [opt], Communicator(), momentum="foo")  # type: ignore[arg-type]
    for mode in ("average", "local", "zero"):
        assert mode in str(info.value)
    assert "foo" in str(info.value)


def test_averager_average_mode_refuses_unknown_optimizer() -> None:
    model = nn.Linear(3, 2)
    rmsprop = torch.optim.RMSprop(model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="RMSprop"):
        PeriodicAverager(model, [rmsprop], Communicator(), momentum="average")
    for mode in ("local", "zero"):
        averager = PeriodicAverager(model, [rmsprop], Communicator(), momentum=mode)  # type: ignore[arg-type]
        assert averager.momentum == mode
    for ok in (torch.optim.Adam, torch.optim.AdamW):
        PeriodicAverager(model, [ok(model.parameters())], Communicator(), momentum="average")


# --------------------------------------------------------------------------------------------------
# PeriodicAverager: world size 1
# --------------------------------------------------------------------------------------------------


def _train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, averager: PeriodicAverager, n: int
) -> list[bool]:
    ran = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=gen)).square().mean().backward()
        opt.step()
        ran.append(averager.after_optimizer_step())
    return ran


def test_averager_rounds_every_tau_steps_world_size_one() -> None:
    model, opt = _model_and_sgd()
    comm = Communicator()
    averager = PeriodicAverager(model, [opt], comm, tau=3)
    assert averager.in_sync and averager.step == 0
    ran, in_sync = [], []
    for _ in range(10):
        ran += _train_steps(model, opt, averager, 1)
        in_sync.append(averager.in_sync)
    assert ran == [False, False, True] * 3 + [False]
    assert in_sync == ran
    assert (averager.step, averager.last_round_step, averager.rounds) == (10, 9, 3)
    assert comm.ledger.by_tag == {}  # nothing crossed a network
    # momentum state survives rounds in the default "average" mode
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_averager_tau_change_counts_from_latest_round() -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=3)
    assert _train_steps(model, opt, averager, 4) == [False, False, True, False]
    averager.tau = 2
    assert _train_steps(model, opt, averager, 3) == [True, False, True]  # steps 5, 6, 7


def test_averager_state_dict_round_trip() -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=3)
    _train_steps(model, opt, averager, 10)
    state = averager.state_dict()
    assert state == {
        "step": 10,
        "last_round_step": 9,
        "rounds": 3,
        "schedule": {"tau": 3},
        "samples_since_round": 0,
        "last_global_step": 9,
    }

    resumed = PeriodicAverager(model, [opt], Communicator(), tau=4)
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.last_round_step, resumed.rounds) == (10, 9, 3)
    assert resumed.tau == 4  # the constructor's period wins over the stored one
    assert not resumed.in_sync
    # next round 4 steps after the latest one (step 9): at step 13
    assert _train_steps(model, opt, resumed, 4) == [False, False, True, False]
    assert resumed.state_dict()["step"] == 14 and resumed.state_dict()["last_round_step"] == 13

    same_tau = PeriodicAverager(model, [opt], Communicator(), tau=3)
    same_tau.load_state_dict(state)
    assert _train_steps(model, opt, same_tau, 3) == [False, True, False]  # steps 11, 12, 13: round at 12


def test_sample_weights_are_counted_reset_at_rounds_and_checkpointed() -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=3, weights="samples")
    for n in (5, 7):
        averager.record_samples(n)
        averager.after_optimizer_step()
    assert averager.state_dict()["samples_since_round"] == 12
    averager.record_samples(1)
    assert averager.after_optimizer_step() and averager.samples_since_round == 0  # a round resets it
    averager.record_samples(4)
    resumed = PeriodicAverager(model, [opt], Communicator(), tau=3, weights="samples")
    resumed.load_state_dict(averager.state_dict())
    assert resumed.samples_since_round == 4
    uniform = PeriodicAverager(model, [opt], Communicator(), tau=3)
    uniform.record_samples(9)  # ignored: only "samples" weighting counts
    assert uniform.samples_since_round == 0
    with pytest.raises(ValueError, match="weights"):
        PeriodicAverager(model, [opt], Communicator(), weights="batch")
    with pytest.raises(ValueError, match="count"):
        averager.record_samples(-1)


def test_averager_world_size_one_leaves_params_alone() -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=1)
    _train_steps(model, opt, averager, 1)
    before = [p.detach().clone() for p in model.parameters()]
    averager.average()
    averager.finalize()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_averager_zero_mode_clears_state_at_rounds_world_size_one() -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=2, momentum="zero")
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 7):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=gen)).square().mean().backward()
        grads = [p.grad.clone() for p in params]
        previous = [
            opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state[p] else None
            for p in params
        ]
        opt.step()
        for p, g, prev in zip(params, grads, previous, strict=True):
            if step % 2 == 1:  # first step after a round (or the start): the buffer starts from the gradient
                assert prev is None
                assert torch.equal(opt.state[p]["momentum_buffer"], g)
            else:
                assert prev is not None
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.9 * prev + g)
        ran = averager.after_optimizer_step()
        assert ran == (step % 2 == 0)
        if ran:
            assert len(opt.state) == 0 or all(len(opt.state[p]) == 0 for p in params)
        else:
            assert all("momentum_buffer" in opt.state[p] for p in params)


@pytest.mark.parametrize("mode", ["average", "local"])
def test_averager_other_modes_keep_state_world_size_one(mode: str) -> None:
    model, opt = _model_and_sgd()
    averager = PeriodicAverager(model, [opt], Communicator(), tau=1, momentum=mode)  # type: ignore[arg-type]
    _train_steps(model, opt, averager, 3)
    assert averager.rounds == 3
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
