"""Workers of the optimizer x payload x momentum matrix (``test_payload_matrix.py``).

Every combination trains the same small classifier (64 -> 32 -> BatchNorm -> 10, on standardised digits-like
data) on 2 gloo ranks, through the pure algorithms (:class:`PeriodicAverager`, :class:`OverlapAverager`) that
``LocalSGDStrategy`` and ``OverlapLocalSGDStrategy`` run; after ``finalize`` it reports the consensus model's
loss on the whole data set, and how many optimizer-state values are non-positive where they must be positive.
One process group serves every combination, so the matrix costs one spawn.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_commsgd.algorithms import OverlapAverager, PeriodicAverager
from lightning_commsgd.comm import Communicator

__all__ = ["MATRIX_OPTIMIZERS", "make_classifier", "make_data", "make_optimizer", "matrix_worker"]

MATRIX_OPTIMIZERS: tuple[str, ...] = ("sgd", "sgd_nesterov", "adam", "adamw", "adam_amsgrad")
N_FEATURES, N_CLASSES, N_SAMPLES = 64, 10, 1024


def make_data() -> tuple[Tensor, Tensor]:
    """A separable-but-noisy 10-class problem: class means on a sphere, unit noise; standardised."""
    g = torch.Generator().manual_seed(7)
    means = torch.randn(N_CLASSES, N_FEATURES, generator=g) * 0.6
    labels = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    x = means[labels] + torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    return (x - x.mean(0)) / x.std(0), labels


def make_classifier() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(N_FEATURES, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, N_CLASSES)
    )


def make_optimizer(name: str, module: nn.Module) -> torch.optim.Optimizer:
    params = module.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    if name == "adam_amsgrad":
        return torch.optim.Adam(params, lr=0.01, amsgrad=True)
    raise ValueError(name)


def _nonpositive_second_moments(optimizer: torch.optim.Optimizer) -> int:
    """Entries of exp_avg_sq / max_exp_avg_sq that are <= 0 although their gradient was ever nonzero."""
    count = 0
    for state in optimizer.state.values():
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                count += int((state[key] < 0).sum())
    return count


def _train(rank: int, case: dict[str, Any], x: Tensor, y: Tensor, steps: int, tau: int) -> dict[str, Any]:
    model = make_classifier()
    model.train()
    optimizer = make_optimizer(case["optimizer"], model)
    comm = Communicator()
    if case["strategy"] == "local_sgd":
        algorithm: Any = PeriodicAverager(
            model, [optimizer], comm, tau=tau, momentum=case["momentum"], compressor=case["payload"]
        )
    else:
        algorithm = OverlapAverager(
            model, [optimizer], comm, tau=tau, momentum=case["momentum"], compressor=case["payload"]
        )
    shard = torch.arange(rank, N_SAMPLES, 2)
    gen = torch.Generator().manual_seed(100 + rank)
    negative = 0
    for _ in range(steps):
        idx = shard[torch.randint(0, shard.numel(), (32,), generator=gen)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        algorithm.after_optimizer_step()
        negative = max(negative, _nonpositive_second_moments(optimizer))
    algorithm.finalize()
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
        running_var_min = min(
            (float(m.running_var.min()) for m in model.modules() if isinstance(m, nn.BatchNorm1d)),
            default=1.0,
        )
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "loss": loss,
        "negative_second_moments": negative,
        "running_var_min": running_var_min,
        "params": params,
        "bytes_sent": comm.ledger.bytes_sent,
    }


def matrix_worker(
    rank: int, world_size: int, cases: list[dict[str, Any]], steps: int, tau: int
) -> dict[str, dict[str, Any]]:
    """Train every case in ``cases`` (dicts with id, strategy, optimizer, payload, momentum) in turn."""
    x, y = make_data()
    return {case["id"]: _train(rank, case, x, y, steps, tau) for case in cases}
