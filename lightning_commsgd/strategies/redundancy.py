"""Putting RI-SGD's redundant sampler where Lightning would put its DistributedSampler.

Users change nothing in their DataModule: the strategy rebuilds the *training* DataLoader around a
:class:`~lightning_commsgd.samplers.RedundantDistributedSampler` (``sampling="union"``) or a
:class:`~lightning_commsgd.samplers.RedundantBatchSampler` (``sampling="stratified"``, the DataLoader's
``batch_size`` being b, the per-shard share of a batch). Validation and test loaders keep Lightning's
sampler. The shuffling seed is Lightning's (``PL_GLOBAL_SEED``, as for its DistributedSampler).
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

__all__ = ["SAMPLING_MODES", "RedundancyConfig"]

SAMPLING_MODES: tuple[str, ...] = ("stratified", "union")


@dataclass(frozen=True)
class RedundancyConfig:
    """RI-SGD options of a strategy (see ``CommunicationStrategy``'s arguments)."""

    redundancy: float = 0.0
    sampling: Literal["stratified", "union"] = "stratified"
    original_world_size: int | None = None
    failed_workers: Sequence[int] = field(default_factory=tuple)
    min_coverage: float = 1.0

    def __post_init__(self) -> None:
        mu = self.redundancy
        if (
            isinstance(mu, bool)
            or not isinstance(mu, (int, float))
            or not math.isfinite(mu)
            or not 0 <= mu < 1
        ):
            raise ValueError(f"Arg `redundancy` (mu) must be a finite number in [0, 1 - 1/p], got {mu!r}.")
        check_choice(self.sampling, "sampling", SAMPLING_MODES)
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

    @property
    def active(self) -> bool:
        """False for the standard split (mu = 0, nobody lost): Lightning's own sampler stays."""
        return self.redundancy > 0 or bool(self.failed_workers) or self.original_world_size is not None

    def check_world(self, world_size: int) -> None:
        """Validate against the world size before any process starts (placement checks, survivors)."""
        if not self.active:
            return
        from lightning_commsgd.samplers import RedundantPlacement

        p = self.original_world_size or world_size
        # the dataset is not known yet: p samples are enough to check mu and the failed workers
        placement = RedundantPlacement(p, p, self.redundancy, self.failed_workers)
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
            redundancy=self.redundancy,
            shuffle=True,
            seed=int(os.getenv("PL_GLOBAL_SEED", 0)),
            drop_last=drop_last,
            original_world_size=self.original_world_size,
            failed_workers=self.failed_workers,
            min_coverage=self.min_coverage,
        )

    def dataloader(self, loader: DataLoader, world_size: int, rank: int) -> DataLoader:
        """``loader`` rebuilt around the redundant sampler (its other settings kept)."""
        if loader.batch_size is None:
            raise ValueError(
                "RI-SGD needs the training DataLoader to have a batch_size (b, the per-shard share)."
            )
        sampler = self.sampler(loader.dataset, world_size, rank, loader.drop_last)
        common: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "worker_init_fn": loader.worker_init_fn,
            "persistent_workers": loader.persistent_workers if loader.num_workers > 0 else False,
        }
        if self.sampling == "stratified":
            return DataLoader(
                loader.dataset, batch_sampler=RedundantBatchSampler(sampler, loader.batch_size), **common
            )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            drop_last=loader.drop_last,
            **common,
        )
