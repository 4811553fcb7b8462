"""RI-SGD's data placement as one config object: :class:`RedundancyInfusion`.

Redundancy-infused SGD (Haddadpour et al., ICML 2019): each worker also holds a fraction mu of the whole
dataset from its neighbours' shards. Given to a strategy as ``redundancy=RedundancyInfusion(mu=0.25)`` (or
just ``redundancy=0.25``), it rebuilds the *training* DataLoader around a
:class:`~lightning_commsgd.samplers.RedundantBatchSampler` (placement from a
:class:`~lightning_commsgd.samplers.RedundantDistributedSampler`), in ``"stratified"`` mode (the DataLoader's
``batch_size`` being b, the per-shard share of a batch) or ``"union"`` mode (batches of b from the shuffled
union). ``batch_sizes`` replaces b by one value per rank (heterogeneous mini-batches). Validation and test
loaders keep the framework's sampler. Users change nothing in their DataModule.

Placement rule (explicit, the same across a sweep of mu): a strategy given a ``RedundancyInfusion`` (``mu=0``
included) trains on the fixed strided shards of the placement; a strategy given none keeps the framework's
``DistributedSampler`` (a global reshuffle every epoch: iid shards). So ``mu=0`` is the mu = 0 point of the
same placement as ``mu=0.25``, not a different data distribution. The shuffling seed is Lightning's
(``PL_GLOBAL_SEED``, as for its DistributedSampler). The batch sampler's epoch and position go into each
rank's checkpoint entry.

No Lightning import: the Lightning and Fabric adapters both use it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch.utils.data import DataLoader

from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.samplers import RedundantBatchSampler, RedundantDistributedSampler

__all__ = ["SAMPLING_MODES", "RedundancyInfusion", "as_redundancy"]

SAMPLING_MODES: tuple[str, ...] = ("stratified", "union")


@dataclass(frozen=True)
class RedundancyInfusion:
    """RI-SGD's placement of the training data (see the module docstring).

    Args:
        mu: the redundancy mu in [0, 1 - 1/p]: each worker also holds this fraction of the whole dataset
            from its neighbours' shards (0: plain strided shards, the same placement without redundancy).
        sampling: ``"stratified"`` (the reference and the default: per batch, the DataLoader's batch_size b
            from each held shard, so a worker's batch grows to about b (1 + mu p)) or ``"union"`` (the held
            samples shuffled together, batches of b).
        original_world_size: p of the placement when resuming with fewer workers (data locality).
        failed_workers: original ids of the lost workers; rank r is the r-th survivor.
        min_coverage: refuse to start when less of the dataset is still held by a survivor.
        batch_sizes: heterogeneous mini-batches: one b per rank (``batch_sizes[rank]`` replaces the training
            DataLoader's batch_size on that rank; every rank still takes the same number of batches per
            epoch). Pair it with ``LocalSGD(replica_weights="samples")`` to weight each replica by its
            samples at a round.
    """

    mu: float = 0.0
    sampling: Literal["stratified", "union"] = "stratified"
    original_world_size: int | None = None
    failed_workers: Sequence[int] = field(default_factory=tuple)
    min_coverage: float = 1.0
    batch_sizes: Sequence[int] | None = None

    def __post_init__(self) -> None:
        mu = self.mu
        if (
            isinstance(mu, bool)
            or not isinstance(mu, (int, float))
            or not math.isfinite(mu)
            or not 0 <= mu < 1
        ):
            raise ValueError(
                f"Arg `mu` (RI-SGD's redundancy) must be a finite number in [0, 1 - 1/p], got {mu!r}."
            )
        check_choice(self.sampling, "sampling", SAMPLING_MODES)
        object.__setattr__(self, "failed_workers", tuple(self.failed_workers))
        if self.original_world_size is not None and (
            isinstance(self.original_world_size, bool)
            or not isinstance(self.original_world_size, int)
            or self.original_world_size < 1
        ):
            raise ValueError(
                f"Arg `original_world_size` must be an int >= 1, got {self.original_world_size!r}."
            )
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"Arg `min_coverage` must lie in [0, 1], got {self.min_coverage}.")
        if self.batch_sizes is not None:
            sizes = self.batch_sizes
            if not isinstance(sizes, (list, tuple)) or not sizes:
                raise ValueError(f"Arg `batch_sizes` must be a non-empty list of ints >= 1, got {sizes!r}.")
            for b in sizes:
                if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                    raise ValueError(
                        f"Arg `batch_sizes` must hold ints >= 1 (one per rank), got {list(sizes)}."
                    )
            object.__setattr__(self, "batch_sizes", tuple(sizes))

    def check_world(self, world_size: int) -> None:
        """Validate against the world size before any process starts (placement checks, survivors)."""
        if self.batch_sizes is not None and len(self.batch_sizes) != world_size:
            raise ValueError(
                f"Arg `batch_sizes` gives {len(self.batch_sizes)} per-rank batch sizes, but this run has "
                f"{world_size} processes."
            )
        from lightning_commsgd.samplers import RedundantPlacement

        p = self.original_world_size or world_size
        # the dataset is not known yet: p samples are enough to check mu and the failed workers
        placement = RedundantPlacement(p, p, self.mu, self.failed_workers)
        if len(placement.survivors) != world_size:
            raise ValueError(
                f"original_world_size={p} minus failed_workers={list(self.failed_workers)} leaves "
                f"{len(placement.survivors)} workers, but this run has {world_size} processes."
            )

    def sampler(
        self, dataset: Any, world_size: int, rank: int, drop_last: bool
    ) -> RedundantDistributedSampler:
        return RedundantDistributedSampler(
            dataset,
            world_size,
            rank,
            redundancy=self.mu,
            shuffle=True,
            seed=int(os.getenv("PL_GLOBAL_SEED", 0)),
            drop_last=drop_last,
            original_world_size=self.original_world_size,
            failed_workers=self.failed_workers,
            min_coverage=self.min_coverage,
        )

    def dataloader(self, loader: DataLoader, world_size: int, rank: int) -> DataLoader:
        """``loader`` rebuilt around the redundant batch sampler (its other settings kept)."""
        if loader.batch_size is None and self.batch_sizes is None:
            raise ValueError(
                "RI-SGD needs the training DataLoader to have a batch_size (b, the per-shard share) or the "
                "strategy's `batch_sizes`."
            )
        sampler = self.sampler(loader.dataset, world_size, rank, loader.drop_last)
        batch_size = list(self.batch_sizes) if self.batch_sizes is not None else loader.batch_size
        batches = RedundantBatchSampler(sampler, batch_size, self.sampling)
        return DataLoader(
            loader.dataset,
            batch_sampler=batches,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
            persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        )


def as_redundancy(value: Any) -> RedundancyInfusion | None:
    """A strategy's ``redundancy`` argument: ``None`` (the framework's sampler), a
    :class:`RedundancyInfusion`, or a number, shorthand for ``RedundancyInfusion(mu=value)``."""
    if value is None or isinstance(value, RedundancyInfusion):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Arg `redundancy` must be None, a number mu or a RedundancyInfusion, got {type(value).__name__}."
        )
    return RedundancyInfusion(mu=float(value))
