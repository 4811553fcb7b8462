"""Workers and the dense-matrix reference for the decentralized-mixing tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from mp import CountingPatch
from mp_workers import loss_fn, make_batches, make_model, make_optimizer
from torch import nn

from lightning_commsgd import Communicator
from lightning_commsgd.algorithms.elastic import ElasticAverager
from lightning_commsgd.algorithms.gossip import GossipMixer
from lightning_commsgd.topology import make_topology

__all__ = ["CASES", "dense_gossip", "dense_elastic", "mixing_worker", "flat"]

STEPS, TAU = 8, 2


def cases_for(world_size: int) -> list[dict[str, Any]]:
    """Every named topology defined at ``world_size`` (torus needs a square), with both momentum modes
    spread over them, plus elastic averaging."""
    names = ["ring", "complete", "star", "exponential", "one_peer_exponential"]
    if int(world_size**0.5) ** 2 == world_size and world_size >= 4:
        names.append("torus")
    cases = [
        {"kind": "gossip", "topology": n, "momentum": "average" if i % 2 == 0 else "local"}
        for i, n in enumerate(names)
    ]
    return cases + [{"kind": "elastic", "alpha": None}]


CASES = cases_for


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def mixing_worker(rank: int, world_size: int) -> dict[str, Any]:
    """For every case: the trajectory (flat params after each step), the ledger, the torch.distributed
    calls per step, and one mixing round on rank-dependent parameters (before/after)."""
    batches = make_batches(world_size, STEPS, seed=7)
    results: dict[str, Any] = {}
    for case in cases_for(world_size):
        key = case.get("topology", "elastic")
        model = make_model("bn", seed=3)
        optimizer = make_optimizer("sgd_m", model)
        communicator = Communicator()
        if case["kind"] == "gossip":
            topology = make_topology(case["topology"], world_size)
            algorithm = GossipMixer(
                model, [optimizer], communicator, topology, tau=TAU, momentum=case["momentum"]
            )
        else:
            algorithm = ElasticAverager(model, [optimizer], communicator, tau=TAU)
        trajectory = []
        with CountingPatch(skip=("isend", "irecv")) as patch:  # P2POp checks those by identity
            for t in range(STEPS):
                patch.label = t
                optimizer.zero_grad()
                loss_fn(model, batches[rank][t]).backward()
                optimizer.step()
                algorithm.after_optimizer_step()
                trajectory.append(torch.cat([flat(model), _buffers(model)]))
            calls = list(patch.calls)
        # One round on very different replicas: the sum over ranks must not change (gossip).
        torch.manual_seed(100 + rank)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        before = flat(model)
        algorithm.communicate("average")
        after = flat(model)
        algorithm.finalize()
        results[key] = {
            "trajectory": trajectory,
            "ledger": communicator.ledger.as_dict(),
            "calls": calls,
            "before": before,
            "after": after,
            "final": flat(model),
            "alpha": getattr(algorithm, "alpha", None),
        }
    return results


def _buffers(module: nn.Module) -> torch.Tensor:
    return torch.cat(
        [b.detach().reshape(-1).double() for b in module.buffers() if torch.is_floating_point(b)]
    )


def _replicas(world_size: int):
    models = [make_model("bn", seed=3) for _ in range(world_size)]
    return models, [make_optimizer("sgd_m", m) for m in models]


def _local_step(models, optimizers, batches, t):
    for r, (model, optimizer) in enumerate(zip(models, optimizers)):
        optimizer.zero_grad()
        loss_fn(model, batches[r][t]).backward()
        optimizer.step()


def _columns(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The paper's X: one column per worker (d x m), float64."""
    return torch.stack([t.detach().reshape(-1).double() for t in tensors], dim=1)


def _assign(tensors: list[torch.Tensor], columns: torch.Tensor) -> None:
    with torch.no_grad():
        for i, t in enumerate(tensors):
            t.copy_(columns[:, i].reshape(t.shape).to(t.dtype))


def dense_gossip(world_size: int, topology_name: str, momentum: str) -> list[list[torch.Tensor]]:
    """X <- (X - eta G) W_k with W_k = W(phase) every TAU steps, else I; as a dense matrix product."""
    topology = make_topology(topology_name, world_size)
    batches = make_batches(world_size, STEPS, seed=7)
    models, optimizers = _replicas(world_size)
    out: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    rounds = 0
    for t in range(STEPS):
        _local_step(models, optimizers, batches, t)
        if (t + 1) % TAU == 0:
            w = topology.weights(rounds)
            for tensors in zip(*[list(m.parameters()) for m in models]):
                _assign(list(tensors), _columns(list(tensors)) @ w)
            for tensors in zip(*[[b for b in m.buffers() if torch.is_floating_point(b)] for m in models]):
                _assign(list(tensors), _columns(list(tensors)) @ w)
            if momentum == "average":
                for params in zip(*[list(m.parameters()) for m in models]):
                    bufs = [opt.state[p]["momentum_buffer"] for opt, p in zip(optimizers, params)]
                    _assign(bufs, _columns(bufs) @ w)
            rounds += 1
        for r, m in enumerate(models):
            out[r].append(torch.cat([flat(m), _buffers(m)]))
    return out


def dense_elastic(world_size: int) -> list[list[torch.Tensor]]:
    """EASGD as A(TAU, W_alpha, 1): [X z] <- [X z] W_alpha every TAU steps, alpha = 2/(m+2)."""
    m, alpha = world_size, 2.0 / (world_size + 2)
    w = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    w[:m, :m] = torch.eye(m) * (1 - alpha)
    w[:m, m] = alpha  # z gathers alpha x_i from every worker
    w[m, :m] = alpha  # every worker pulls alpha z
    w[m, m] = 1 - m * alpha
    batches = make_batches(world_size, STEPS, seed=7)
    models, optimizers = _replicas(world_size)
    center = copy.deepcopy(models[0])
    out: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    for t in range(STEPS):
        _local_step(models, optimizers, batches, t)
        if (t + 1) % TAU == 0:
            for tensors in zip(*[list(x.parameters()) for x in [*models, center]]):
                _assign(list(tensors), _columns(list(tensors)) @ w)
            for tensors in zip(
                *[[b for b in x.buffers() if torch.is_floating_point(b)] for x in [*models, center]]
            ):
                _assign(list(tensors), _columns(list(tensors)) @ w)
        for r, x in enumerate(models):
            out[r].append(torch.cat([flat(x), _buffers(x)]))
    return out
