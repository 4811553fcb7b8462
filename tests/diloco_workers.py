"""Workers that run :class:`~lightning_commsgd.algorithms.diloco.OuterStepAverager` on gloo processes in a
plain loop (``test_diloco.py``): the same nets, data and optimizers as ``diloco_simulation``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_commsgd.algorithms.diloco import OuterStepAverager
from lightning_commsgd.algorithms.finite import NonFiniteError
from lightning_commsgd.algorithms.periodic import PeriodicAverager
from lightning_commsgd.comm import Communicator

__all__ = ["adamw", "make_batches", "make_net", "mse", "run_outer_steps", "sgd_momentum"]


def sgd_momentum(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.01)


def make_net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)]
    if batch_norm:
        layers.insert(1, nn.BatchNorm1d(16))
    return nn.Sequential(*layers)


def make_batches(world_size: int, steps: int) -> list[list[tuple[Tensor, Tensor]]]:
    """``out[r][t]``: rank r's (x, y) at step t, a regression target from a fixed random map."""
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(99))
    out = []
    for r in range(world_size):
        rank_batches = []
        for t in range(steps):
            g = torch.Generator().manual_seed(1000 * r + t)
            x = torch.randn(16, 8, generator=g)
            rank_batches.append((x, torch.tanh(x @ w) + 0.1 * torch.randn(16, 4, generator=g)))
        out.append(rank_batches)
    return out


def mse(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(net(x), y)


def run_outer_steps(rank: int, world_size: int, case: dict[str, Any]) -> dict[str, Any]:
    """Train ``case["steps"]`` steps with ``OuterStepAverager(**case["algorithm"])``; every step's flat
    parameters, and the ledger, come back. ``case["save_at"]``: also return the algorithm's state_dict
    after that step (a resume test restores it into a fresh run and continues)."""
    torch.set_num_threads(1)
    net = make_net(case.get("batch_norm", False))
    net.train()
    inner = case["inner"](net)
    comm = Communicator()
    if case.get("local_sgd"):  # the reference of the outer-SGD(lr 1, momentum 0) equivalence
        algorithm: Any = PeriodicAverager(net, [inner], comm, momentum="local", **case["algorithm"])
    else:
        algorithm = OuterStepAverager(net, [inner], comm, **case["algorithm"])
    batches = make_batches(world_size, case["steps"])[rank]
    start = 0
    if "resume" in case:
        saved = case["resume"][rank]
        net.load_state_dict(saved["net"])
        inner.load_state_dict(saved["inner"])
        algorithm.load_state_dict(saved["algorithm"])
        start = saved["step"]
    records, saved_state = [], None
    for t in range(start, case["steps"]):
        inner.zero_grad()
        mse(net, batches[t]).backward()
        inner.step()
        if case.get("poison") == (rank, t + 1):  # a replica that went NaN before a round
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        try:
            algorithm.after_optimizer_step()
        except NonFiniteError as error:
            return {"error": str(error), "step": t + 1}
        for group in inner.param_groups:  # a changing inner lr (SlowMo follows gamma_t)
            group["lr"] *= case.get("inner_lr_decay", 1.0)
        records.append(torch.cat([q.detach().reshape(-1).double() for q in net.parameters()]))
        if case.get("save_at") == t + 1:
            # deep copies: state dicts hold references to tensors that later steps change in place
            saved_state = copy.deepcopy(
                {"net": net.state_dict(), "inner": inner.state_dict(), "algorithm": algorithm.state_dict()}
            )
            saved_state["step"] = t + 1
    if case.get("finalize", True):
        algorithm.finalize()
        records.append(torch.cat([q.detach().reshape(-1).double() for q in net.parameters()]))
    return {
        "records": records,
        "saved": saved_state,
        "bytes_sent": comm.ledger.bytes_sent,
        "by_tag": {tag: stats.bytes_sent for tag, stats in comm.ledger.by_tag.items()},
        "metrics": algorithm.metrics(),
        "in_sync": algorithm.in_sync,
    }


def run_cases(rank: int, world_size: int, cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`run_outer_steps` for every case in turn, in one process group (one spawn for all)."""
    return {name: run_outer_steps(rank, world_size, case) for name, case in cases.items()}
