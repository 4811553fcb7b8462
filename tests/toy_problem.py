"""A tiny regression problem shared by the Lightning worker script and the tests' simulations."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

__all__ = ["BATCH_SIZE", "make_dataset", "make_net", "lightning_batches", "mse", "redundant_batches"]

BATCH_SIZE = 4
NUM_SAMPLES = 96
IN_FEATURES = 6


def make_dataset() -> TensorDataset:
    """96 samples of y = sin(x . w) + noise; the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_SAMPLES, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(NUM_SAMPLES, 1, generator=g)
    return TensorDataset(x, y)


def make_net(seed: int, batch_norm: bool = False) -> nn.Sequential:
    """x_0 from ``seed`` (ranks pass different seeds to prove the strategy broadcasts rank 0's)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, 16)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 1)]
    return nn.Sequential(*layers)


def mse(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((net(x) - y) ** 2).mean()


def lightning_batches(world_size: int, steps: int, accumulate: int = 1) -> list[list[list[tuple]]]:
    """``out[r][t]``: the micro-batches rank r sees at optimizer step t, in the order Lightning feeds them
    (DistributedSampler, shuffle=True, seed 0, set_epoch(epoch) each epoch)."""
    dataset = make_dataset()
    out: list[list[list[tuple]]] = []
    for rank in range(world_size):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        micro: list[tuple] = []
        epoch = 0
        while len(micro) < steps * accumulate:
            sampler.set_epoch(epoch)
            indices = list(sampler)
            batches = [indices[i : i + BATCH_SIZE] for i in range(0, len(indices), BATCH_SIZE)]
            # Lightning only steps on whole accumulation groups within an epoch's last partial group too;
            # the tests pick sizes where the epoch length is a multiple of ``accumulate``.
            micro += [dataset[idx] for idx in batches]
            epoch += 1
        out.append([micro[t * accumulate : (t + 1) * accumulate] for t in range(steps)])
    return out


def redundant_batches(
    world_size: int,
    steps: int,
    redundancy: float,
    sampling: str,
    batch_sizes: list[int] | None = None,
    original_world_size: int | None = None,
    failed_workers: tuple[int, ...] = (),
) -> list[list[tuple]]:
    """``out[r][t]``: rank r's batch at step t under RI-SGD (seed 0, set_epoch each epoch)."""
    from torch.utils.data import default_collate

    from lightning_commsgd.samplers import RedundantBatchSampler, RedundantDistributedSampler

    dataset = make_dataset()
    out = []
    for rank in range(world_size):
        sampler = RedundantDistributedSampler(
            dataset,
            world_size,
            rank,
            redundancy=redundancy,
            seed=0,
            original_world_size=original_world_size,
            failed_workers=failed_workers,
        )
        batcher = RedundantBatchSampler(sampler, batch_sizes or BATCH_SIZE, sampling)
        batches: list[tuple] = []
        epoch = 0
        while len(batches) < steps:
            batcher.set_epoch(epoch)
            batches += [default_collate([dataset[i] for i in g]) for g in batcher]
            epoch += 1
        out.append(batches[:steps])
    return out
