"""Parameter-server workers for tests/test_parameter_server_mp.py (plain PyTorch, gloo, no Lightning).

Every rank builds the same small regression model and optimizer (SGD with momentum, weight decay on the
weight group only: two parameter groups); worker r's s-th gradient uses batch (r, s) of a fixed data set
and is followed by the scripted straggler delay ``DELAYS[scenario](r, s)`` in seconds, so the arrival
order at the server is set by the script, not by chance. Each worker records which batch and model
version each of its computations used and whether it was pushed; the server records its events and its
model after every update. :func:`replay` repeats the events in one process.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from lightning_commsgd.algorithms.parameter_server import ParameterServer, StalenessAwareLR, clone_optimizer
from lightning_commsgd.algorithms.ps_runtime import connect
from lightning_commsgd.comm import Communicator

DIM = 6
BATCH = 4
MS = 0.001


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1)
    optimizer = torch.optim.SGD(
        [{"params": [model.weight], "weight_decay": 0.01}, {"params": [model.bias]}], lr=0.05, momentum=0.9
    )
    return model, optimizer


def batch(worker: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * worker + index)
    x = torch.randn(BATCH, DIM, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(BATCH, 1, generator=generator)
    return x, y


def gradient(model: nn.Module, worker: int, index: int) -> torch.Tensor:
    model.zero_grad()
    x, y = batch(worker, index)
    nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([model.weight.grad.reshape(-1), model.bias.grad.reshape(-1)])


def load(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(flat[:DIM].view_as(model.weight))
        model.bias.copy_(flat[DIM:].view_as(model.bias))


# Scripted delays (seconds) by scenario: who is slow decides the arrival order.
DELAYS = {
    # worker 3 is 4x slower than the others: K-sync (k=2 of 3) cancels it most of the time
    "slow_last": lambda r, s: (160 if r == 3 else 40 + 15 * ((r + s) % 3)) * MS,
    # a rotating order with distinct gaps
    "rotating": lambda r, s: (20 + 25 * ((r + s) % 3)) * MS,
    "none": lambda r, s: 0.0,
}

SCENARIOS = {
    # name: (mode, k, server_trains, delays, staleness C or None, max_updates)
    "sync_all": ("sync", 3, False, "rotating", None, 8),
    "ksync_2of3": ("sync", 2, False, "slow_last", None, 10),
    "async_1": ("async", 1, False, "rotating", None, 12),
    "kasync_2": ("async", 2, False, "slow_last", None, 10),
    "kbatch_3": ("batch", 3, False, "slow_last", None, 10),
    "async_staleness": ("async", 1, False, "rotating", 0.01, 12),
    "ksync_colocated": ("sync", 2, True, "rotating", None, 8),
    "kbatch_colocated": ("batch", 2, True, "rotating", None, 10),
}


def run_scenario(rank: int, world_size: int, name: str) -> dict:
    mode, k, server_trains, delays, c, max_updates = SCENARIOS[name]
    model, optimizer = make_model()
    comm = Communicator()
    staleness = StalenessAwareLR(C=c) if c is not None else None
    models_after_update: list[torch.Tensor] = []
    runtime, client = connect(
        comm, list(model.parameters()), optimizer, k=k, mode=mode, server_trains=server_trains,
        staleness_lr=staleness, max_updates=max_updates, timeout=30.0,
    )  # fmt: skip
    if runtime is not None:
        runtime.on_update = lambda reply: models_after_update.append(runtime.server.flat_model())
    record: dict = {"rank": rank, "computations": []}
    if client is not None:
        index = 0
        while not client.stopped:
            version = client.version
            grad = gradient(model, rank, index)
            pushed = client.step(grad, lambda flat: load(model, flat), delay=DELAYS[delays](rank, index))
            record["computations"].append((index, version, pushed))
            index += 1
        client.leave()
        record["cancelled"] = client.cancelled
    if runtime is not None:
        if server_trains:
            runtime.join(timeout=60)
        else:
            runtime.run()
        record["events"] = [(e.kind, e.worker, e.version) for e in runtime.events]
        record["models"] = models_after_update
        record["log"] = [(u.version, u.contributors, u.staleness, u.lr_factors) for u in runtime.server.log]
        record["dropped"] = runtime.server.dropped
        record["final"] = runtime.server.flat_model()
    record["ledger"] = comm.ledger.as_dict()
    time.sleep(0.2)  # let the last messages land before the group is destroyed
    return record


def run_all(rank: int, world_size: int, names: list[str]) -> dict:
    torch.set_num_threads(1)
    return {name: run_scenario(rank, world_size, name) for name in names}


def replay(name: str, records: list[dict]) -> tuple[list[torch.Tensor], ParameterServer]:
    """The server's events repeated in one process: each pushed gradient recomputed from the worker's
    batch on the model of the version it claims, which must be the version the replay last sent it."""
    mode, k, server_trains, _, c, max_updates = SCENARIOS[name]
    server_record = records[0]
    workers = [r for r in range(len(records)) if server_trains or r != 0]
    pushes = {r: [(i, v) for i, v, pushed in records[r]["computations"] if pushed] for r in workers}
    model, optimizer = make_model()
    server_params = [p.detach().clone() for p in model.parameters()]
    server = ParameterServer(
        server_params, clone_optimizer(optimizer, server_params), k=k, mode=mode, workers=workers,
        staleness_lr=StalenessAwareLR(C=c) if c is not None else None, max_updates=max_updates,
    )  # fmt: skip
    history = {0: server.flat_model()}
    held = dict.fromkeys(workers, 0)
    next_push = dict.fromkeys(workers, 0)
    models = []
    for kind, worker, version in server_record["events"]:
        if kind == "push":
            index, claimed = pushes[worker][next_push[worker]]
            next_push[worker] += 1
            assert claimed == version, (worker, claimed, version)
            assert version <= held[worker], "a worker pushed a version it was never sent"
            probe, _ = make_model()
            load(probe, history[version])
            reply = server.offer(worker, version, gradient(probe, worker, index))
        elif kind == "leave":
            reply = server.leave(worker)
        else:
            raise AssertionError(f"unexpected event {kind}")
        if reply.updated:
            models.append(server.flat_model())
            history[server.version] = server.flat_model()
        for w in reply.send_to:
            held[w] = reply.version
    assert all(next_push[w] == len(pushes[w]) for w in workers), "a pushed gradient never reached the server"
    return models, server


def kill_worker(rank: int, world_size: int, mode: str, k: int, victim: int, out: str) -> None:
    """Worker ``victim`` dies (os._exit) before its 4th computation; the others go on. Each rank writes
    ``out/rank<r>.json``: how it ended (the server also its update count and the workers it lost)."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{os.environ['PS_PORT']}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=30),
    )  # fmt: skip
    model, optimizer = make_model()
    comm = Communicator()
    runtime, client = connect(
        comm, list(model.parameters()), optimizer, k=k, mode=mode, server_trains=False, max_updates=15,
        timeout=20.0,
    )  # fmt: skip
    record: dict = {"rank": rank}
    try:
        if client is not None:
            index = 0
            while not client.stopped:
                if rank == victim and index == 3:
                    os._exit(17)
                grad = gradient(model, rank, index)
                client.step(grad, lambda flat: load(model, flat), delay=(10 + 10 * rank) * MS)
                index += 1
            client.leave()
            record["pushes"] = client.pushes
        if runtime is not None:
            runtime.run()
        record["outcome"] = "finished"
    except Exception as error:
        record["outcome"] = f"{type(error).__name__}: {error}"
    if runtime is not None:
        record["version"] = runtime.server.version
        record["lost"] = {str(w): why for w, why in runtime.server.lost.items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    os._exit(0)  # a peer is dead: leave the process group to the operating system


if __name__ == "__main__":
    import sys

    mode_, k_, victim_, out_, rank_, world_ = sys.argv[1:7]
    kill_worker(int(rank_), int(world_), mode_, int(k_), int(victim_), out_)
