"""Worker functions for the multi-process tests (importable by name, as ``torch.multiprocessing.spawn``
needs), plus the model / optimizer / data factories shared with the single-process reference."""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from mp import CountingPatch
from simulation import flat_params
from torch import Tensor, nn

from lightning_commsgd.algorithms import PeriodicAverager
from lightning_commsgd.comm import Communicator
from lightning_commsgd.replica_check import ReplicasDivergedError, check_replicas_equal

# --------------------------------------------------------------------------------------------------
# Communicator worker
# --------------------------------------------------------------------------------------------------


def serialized_size(obj: Any) -> int:
    """Bytes of ``torch.save(obj)``: the payload the communicator's object methods send."""
    stream = io.BytesIO()
    torch.save(obj, stream)
    return len(stream.getvalue())


def broadcast_payload(rank: int) -> dict[str, Any]:
    return {"rank": rank, "w": torch.arange(4.0) * (rank + 1), "s": "x" * (10 * rank)}


def gather_payload(rank: int) -> dict[str, Any]:
    # different sizes on different ranks, so the gather has to pad
    return {"rank": rank, "s": "y" * (300 * rank), "t": torch.full((rank + 1,), float(rank))}


def comm_worker(rank: int, world_size: int) -> dict[str, Any]:
    comm = Communicator()
    out: dict[str, Any] = {
        "rank": comm.rank,
        "world_size": comm.world_size,
        "distributed": comm.is_distributed,
    }
    counter = CountingPatch()
    with counter:
        for op in ("sum", "mean", "max", "min"):
            counter.label = f"ar_{op}"
            t = (torch.arange(6, dtype=torch.float32) + 1) * (rank + 1)
            ret = comm.all_reduce_(t, op, tag=f"ar_{op}")
            out[f"ar_{op}"] = {"result": t.clone(), "same_object": ret is t}

        counter.label = "ar_int_mean"
        t = torch.tensor([3 * rank + 1, 7], dtype=torch.int64)
        comm.all_reduce_(t, "mean", tag="ar_int_mean")
        out["ar_int_mean"] = t.clone()

        counter.label = "ar_f64"
        t = torch.full((2, 3), float(rank), dtype=torch.float64)
        comm.all_reduce_(t, "sum", tag="ar_f64")
        out["ar_f64"] = t.clone()

        counter.label = "scalars"
        out["scalars"] = comm.all_reduce_scalars([float(rank), 1.5, -2.0], "sum", tag="scalars")
        counter.label = "scalars_max"
        out["scalars_max"] = comm.all_reduce_scalars(
            [float(rank), -float(rank)], "max", tag="scalars_max", dtype=torch.float32
        )

        counter.label = "bcast"
        t = torch.full((3, 4), float(rank) + 0.25)
        ret = comm.broadcast_(t, src=world_size - 1, tag="bcast")
        out["bcast"] = {"result": t.clone(), "same_object": ret is t}

        counter.label = "allgather"
        t = torch.arange(5, dtype=torch.float64) + 10 * rank
        out["allgather"] = comm.all_gather(t, tag="allgather")

        counter.label = "barrier"
        out["barrier"] = comm.barrier(tag="barrier")

        counter.label = "bobj"
        mine = broadcast_payload(rank)
        out["bobj_own_size"] = serialized_size(mine)
        out["bobj"] = comm.broadcast_object(mine if rank == 1 else None, src=1, tag="bobj")

        counter.label = "gobj"
        mine = gather_payload(rank)
        out["gobj_own_size"] = serialized_size(mine)
        out["gobj"] = comm.gather_object(mine, dst=world_size - 1, tag="gobj")
    out["calls"] = counter.calls
    out["ledger"] = comm.ledger.as_dict()
    out["ledger_world_size"] = comm.ledger.world_size
    return out


LOWP_NUMEL = 300_007  # > SEGMENT_BYTES in every message, not divisible by 2, 3 or 4
LOWP_SEED = 12  # the int8 and int4 means' rounding seed (a round's step)


def lowp_input(rank: int) -> torch.Tensor:
    """Rank ``rank``'s buffer for :func:`lowp_worker` (values of very different magnitudes)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(LOWP_NUMEL, generator=g) * torch.logspace(-3, 3, LOWP_NUMEL)


def lowp_worker(rank: int, world_size: int) -> dict[str, Any]:
    """16-bit means (blocking and in the background), blocking int8 and int4 means and a ring exchange of a
    large tensor: the segmented point-to-point paths of the communicator, with segments (and two ranks'
    pieces) of 32 KiB so that every payload travels in several."""
    comm = Communicator()
    comm.SEGMENT_BYTES = 32 * 1024
    blocking = lowp_input(rank)
    comm.all_reduce_mean_lowp_(blocking, torch.bfloat16, tag="lowp")
    int8 = lowp_input(rank)
    comm.all_reduce_mean_lowp_(int8, "int8", tag="lowp_int8", seed=LOWP_SEED)
    int4 = lowp_input(rank)
    comm.all_reduce_mean_lowp_(int4, "int4", tag="lowp_int4", seed=LOWP_SEED)
    background = lowp_input(rank)
    pending = comm.all_reduce_mean_lowp_async(background, torch.float16, tag="lowp_async")
    ring = comm.exchange(
        lowp_input(rank), to=[(rank + 1) % world_size], recv_from=[(rank - 1) % world_size], tag="ring"
    )
    pending.wait()
    return {
        "blocking": blocking,
        "int8": int8,
        "int4": int4,
        "background": background,
        "ring": ring[0],
        "ledger": comm.ledger.as_dict(),
    }


# --------------------------------------------------------------------------------------------------
# PeriodicAverager worker
# --------------------------------------------------------------------------------------------------

N_IN, N_HIDDEN = 5, 8


def replica_check_worker(rank: int, world_size: int) -> dict[str, Any]:
    """The debug replica check with real collectives: equal replicas pass; then the last rank's replica
    differs in one value by one ulp, and every rank must raise."""
    comm = Communicator()
    model = [torch.linspace(-1, 1, 1000), torch.ones(3, 4)]
    check_replicas_equal(model, comm, step=3)
    if rank == world_size - 1:
        model[0][500] = torch.nextafter(model[0][500], torch.tensor(2.0))  # one ulp
    try:
        check_replicas_equal(model, comm, step=7)
        error = None
    except ReplicasDivergedError as err:
        error = str(err)
    return {"error": error, "ledger": comm.ledger.as_dict()}


def make_model(kind: str, seed: int) -> nn.Module:
    """x_0, built from ``seed`` (the same on every rank: the averager itself broadcasts nothing)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, 1))
    if kind == "bn":
        # no bias before BN: its gradient would be rounding noise, which Adam blows up to lr-sized steps
        return nn.Sequential(
            nn.Linear(N_IN, N_HIDDEN, bias=False), nn.BatchNorm1d(N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, 1)
        )
    raise ValueError(kind)


def make_optimizer(name: str, module: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd_m":
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    if name == "sgd_nesterov_wd":
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if name == "adam":
        return torch.optim.Adam(module.parameters(), lr=0.01)
    raise ValueError(name)


def make_batches(
    world_size: int, steps: int, seed: int, batch_size: int = 6
) -> list[list[tuple[Tensor, Tensor]]]:
    """``batches[r][t]``: rank r's batch at step t; different on every rank."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(world_size):
        rank_batches = []
        for _ in range(steps):
            x = torch.randn(batch_size, N_IN, generator=gen)
            y = torch.randn(batch_size, 1, generator=gen)
            rank_batches.append((x, y))
        batches.append(rank_batches)
    return batches


def loss_fn(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(module(x), y)


def float_buffers(module: nn.Module) -> Tensor:
    bufs = [b.detach().reshape(-1).double() for b in module.buffers() if torch.is_floating_point(b)]
    return torch.cat(bufs) if bufs else torch.zeros(0, dtype=torch.float64)


def averager_worker(
    rank: int, world_size: int, cases: list[dict[str, Any]], steps: int, data_seed: int, model_seed: int
) -> dict[str, dict[str, Any]]:
    batches = make_batches(world_size, steps, data_seed)
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        model = make_model(case["model"], model_seed)
        model.train()
        optimizer = make_optimizer(case["optimizer"], model)
        comm = Communicator()
        averager = PeriodicAverager(
            model,
            [optimizer],
            comm,
            tau=case["tau"],
            momentum=case["momentum"],
            average_buffers=case.get("average_buffers", True),
        )
        counter = CountingPatch()
        params, buffers, ran, in_sync = [], [], [], []
        with counter:
            for t in range(1, steps + 1):
                counter.label = t
                optimizer.zero_grad()
                loss_fn(model, batches[rank][t - 1]).backward()
                optimizer.step()
                ran.append(averager.after_optimizer_step())
                in_sync.append(averager.in_sync)
                params.append(flat_params(model))
                buffers.append(float_buffers(model))
            ledger_before_final = comm.ledger.as_dict()
            counter.label = "final"
            averager.finalize()
        results[case["id"]] = {
            "params": torch.stack(params),
            "buffers": torch.stack(buffers),
            "int_buffers": [b.clone() for b in model.buffers() if not torch.is_floating_point(b)],
            "final_params": flat_params(model),
            "ran": ran,
            "in_sync": in_sync,
            "rounds": averager.rounds,
            "calls": counter.calls,
            "ledger": ledger_before_final,
            "ledger_after_final": comm.ledger.as_dict(),
        }
    return results


# --------------------------------------------------------------------------------------------------
# Non-finite replicas (on_nonfinite)
# --------------------------------------------------------------------------------------------------


def nonfinite_worker(rank: int, world_size: int, policy: str, momentum: str, poison: str) -> dict[str, Any]:
    """Three ranks, one SGD-momentum step each, then a round; rank 1's parameters or (local) momentum
    buffer is poisoned with Inf before the round. Returns what the round did."""
    torch.manual_seed(rank)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    if rank == 1:
        with torch.no_grad():
            target = model.weight if poison == "params" else optimizer.state[model.weight]["momentum_buffer"]
            target[0, 0] = float("inf")
    averager = PeriodicAverager(
        model, [optimizer], Communicator(), tau=1, momentum=momentum, on_nonfinite=policy
    )
    before = flat_params(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            averager.after_optimizer_step()
    except FloatingPointError as error:
        return {"error": f"{type(error).__name__}: {error}", "before": before}
    return {
        "error": None,
        "before": before,
        "after": flat_params(model),
        "momentum": [optimizer.state[p].get("momentum_buffer") for p in model.parameters()],
        "ledger": averager.communicator.ledger.as_dict(),
        "warnings": [str(w.message) for w in caught],
    }


def nonfinite_round_worker(rank: int, world_size: int, kind: str) -> dict[str, Any]:
    """Rank 1's parameters turn Inf after its second step; EASGD's round (tau=1) or Overlap Local-SGD's
    round then sends, and every rank must stop with the error naming rank 1: at once for EASGD's sum, when
    the average arrives (the next round) for overlap. (Not in the first round: with a rounded payload,
    rank 1 would stop before the others' first round creates the background group, and without the
    strategies' watchdog they would wait for it.)"""
    from lightning_commsgd.algorithms import OverlapAverager
    from lightning_commsgd.algorithms.elastic import ElasticAverager

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = Communicator()
    if kind == "elastic":
        algorithm = ElasticAverager(model, [optimizer], comm, tau=1)
    else:
        algorithm = OverlapAverager(model, [optimizer], comm, tau=1, alpha=0.5, compressor=kind or None)
    rounds_ok = 0
    for step in range(4):
        model(torch.randn(4, 3) + rank).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 1 and step == 1:
            with torch.no_grad():
                model.weight[0, 0] = float("inf")
        try:
            algorithm.after_optimizer_step()
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}", "rounds_ok": rounds_ok}
        rounds_ok += 1
    return {"error": None, "rounds_ok": rounds_ok}


def nonfinite_gossip_worker(rank: int, world_size: int) -> dict[str, Any]:
    """4 ranks on a ring (tau=1); rank 1's parameters turn NaN after its first step. Its neighbours (0 and
    2) and itself must stop in that gossip round without mixing; rank 3, not its neighbour, mixes."""
    from lightning_commsgd.algorithms.gossip import GossipMixer
    from lightning_commsgd.topology import make_topology

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mixer = GossipMixer(model, [optimizer], Communicator(), make_topology("ring", world_size), tau=1)
    model(torch.randn(4, 3) + rank).square().sum().backward()
    optimizer.step()
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    before = flat_params(model)
    try:
        mixer.after_optimizer_step()
    except FloatingPointError as error:
        return {
            "error": f"{type(error).__name__}: {error}",
            "changed": not torch.allclose(before, flat_params(model), rtol=0, atol=0, equal_nan=True),
        }
    return {"error": None, "finite": bool(torch.isfinite(flat_params(model)).all())}
