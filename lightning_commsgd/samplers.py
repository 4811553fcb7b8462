"""RI-SGD's redundancy-infused data placement (Haddadpour, Kamani, Mahdavi, Cadambe, ICML 2019).

Placement, as in the authors' reference code: the dataset is split into p *strided* shards (shard j holds
samples j, j + p, j + 2p, ...). With redundancy mu (a fraction of the WHOLE dataset added to each worker),
q = mu p, worker i holds its own shard i, the full shards of workers (i + 1 .. i + floor(q)) mod p and,
when r = q - floor(q) > 0, the strided part ``shard[::ceil(1/r)]`` of shard (i + floor(q) + 1) mod p.
mu lies in [0, 1 - 1/p] (1 - 1/p = full replication); mu = 0 is the standard split.

Multiplicity (tested): every sample is held by exactly ``1 + floor(mu p)`` workers, plus one more when
r > 0 and its position inside its shard is a multiple of ``ceil(1/r)``.

Sampling modes:

- ``"stratified"`` (the reference): each batch draws ``b`` samples from the own shard, ``b`` from each
  full redundant shard and ``int(b r)`` from the partial one, ``b`` being the DataLoader's batch size;
  a worker's batch therefore has ``b (1 + floor(q)) + int(b r)`` samples, about ``b (1 + mu p)``.
  :class:`RedundantBatchSampler` produces those batches.
- ``"union"``: the union of the held samples, shuffled each epoch and batched normally.

Fault tolerance: placement is fixed by the *original* number of workers (data locality). After losing
workers (``failed_workers``, original ids), the survivors keep sampling what they hold; every shard is
assigned to a surviving holder when one exists, and :attr:`RedundantPlacement.coverage` says which
fraction of the dataset is still reachable. Below ``min_coverage`` the sampler refuses to start and names
the lost shards. With mu >= 1/p any single failure keeps 100% coverage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Sampler

__all__ = ["RedundantBatchSampler", "RedundantDistributedSampler", "RedundantPlacement"]

SamplingMode = Literal["stratified", "union"]


def _check_mu(mu: Any, p: int) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu):
        raise ValueError(f"Arg `redundancy` (mu) must be a finite number, got {mu!r}.")
    upper = 1 - 1 / p
    if not 0 <= mu <= upper + 1e-12:
        raise ValueError(
            f"Arg `redundancy` (mu) must lie in [0, 1 - 1/p] = [0, {upper:.4g}] for p = {p}, got {mu}."
        )
    return float(mu)


class RedundantPlacement:
    """Which samples each original worker holds, and what survives failures.

    Args:
        num_samples: dataset size N (>= p).
        num_workers: p, the original number of workers (fixes the placement).
        redundancy: mu in [0, 1 - 1/p].
        failed_workers: original worker ids that are gone.
    """

    def __init__(
        self, num_samples: int, num_workers: int, redundancy: float, failed_workers: Sequence[int] = ()
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"Arg `num_workers` (p) must be an int >= 1, got {num_workers!r}.")
        if num_samples < num_workers:
            raise ValueError(f"The dataset has {num_samples} samples, fewer than the {num_workers} workers.")
        self.num_samples, self.p = num_samples, num_workers
        self.mu = _check_mu(redundancy, num_workers)
        q = self.mu * num_workers
        self.full = int(math.floor(q + 1e-9))
        remainder = q - self.full
        self.remainder = remainder if remainder > 1e-9 else 0.0
        self.stride = math.ceil(1 / self.remainder - 1e-9) if self.remainder else 0
        failed = sorted(set(int(w) for w in failed_workers))
        if any(not 0 <= w < num_workers for w in failed):
            raise ValueError(
                f"Arg `failed_workers` must hold original worker ids in [0, {num_workers}), got {failed}."
            )
        if len(failed) == num_workers:
            raise ValueError("Arg `failed_workers` names every worker; nobody is left to train.")
        self.failed = failed
        self.survivors = [w for w in range(num_workers) if w not in failed]

    def shard(self, j: int) -> torch.Tensor:
        """Indices of shard j: j, j + p, j + 2p, ..."""
        return torch.arange(j, self.num_samples, self.p)

    def partial(self, j: int) -> torch.Tensor:
        """The strided part of shard j that a partial holder keeps (empty when mu p is an integer)."""
        return self.shard(j)[:: self.stride] if self.stride else torch.empty(0, dtype=torch.long)

    def holdings(self, worker: int) -> list[tuple[int, bool]]:
        """``(shard, complete)`` pairs worker ``worker`` holds: own, full redundant, then partial."""
        held = [((worker + k) % self.p, True) for k in range(self.full + 1)]
        if self.stride:
            held.append(((worker + self.full + 1) % self.p, False))
        return held

    def indices(self, worker: int) -> torch.Tensor:
        """Every sample index worker ``worker`` holds (sorted)."""
        parts = [self.shard(j) if complete else self.partial(j) for j, complete in self.holdings(worker)]
        return torch.cat(parts).unique()

    def assignment(self) -> dict[int, int | None]:
        """Shard -> the surviving worker that holds it completely (the owner first), ``None`` if none."""
        out: dict[int, int | None] = {}
        for j in range(self.p):
            holders = [(j - k) % self.p for k in range(self.full + 1)]
            out[j] = next((w for w in holders if w not in self.failed), None)
        return out

    @property
    def coverage(self) -> float:
        """Fraction of the dataset some surviving worker still holds."""
        reachable = torch.cat([self.indices(w) for w in self.survivors]).unique()
        return reachable.numel() / self.num_samples

    def lost_shards(self) -> list[int]:
        """Shards no survivor holds completely (part of them may survive in a partial holder)."""
        return [j for j, holder in self.assignment().items() if holder is None]


class RedundantDistributedSampler(Sampler[int]):
    """RI-SGD's sampler for one rank, in place of ``DistributedSampler`` (``"union"`` mode), and the
    placement behind :class:`RedundantBatchSampler` (``"stratified"`` mode).

    Args:
        dataset: anything with ``len``.
        num_replicas: the current number of ranks (survivors); default: the world size.
        rank: this rank among the survivors (0 .. num_replicas - 1).
        redundancy: mu, the fraction of the whole dataset each worker holds beyond its own shard.
        shuffle: reshuffle every epoch (deterministic per ``(seed, epoch)``).
        seed: base seed, the same on every rank.
        drop_last: as ``DistributedSampler``: drop the tail so every rank has the same number of samples
            (else pad by repeating samples from the start).
        original_world_size: p of the placement (default: ``num_replicas``); with failures, p is larger.
        failed_workers: original ids of lost workers; rank r is the r-th surviving original worker.
        min_coverage: refuse to start (ValueError naming the lost shards) when less of the dataset
            remains reachable.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        *,
        redundancy: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        original_world_size: int | None = None,
        failed_workers: Sequence[int] = (),
        min_coverage: float = 1.0,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist  # only when not given explicitly, like DistributedSampler

            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        p = original_world_size or num_replicas
        self.placement = RedundantPlacement(len(dataset), p, redundancy, failed_workers)
        if len(self.placement.survivors) != num_replicas:
            raise ValueError(
                f"{p} original workers minus {len(self.placement.failed)} failed leaves "
                f"{len(self.placement.survivors)}, but the world size is {num_replicas}."
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Arg `rank` must lie in [0, {num_replicas}), got {rank}.")
        if not 0 <= min_coverage <= 1:
            raise ValueError(f"Arg `min_coverage` must lie in [0, 1], got {min_coverage}.")
        coverage = self.placement.coverage
        if coverage < min_coverage - 1e-12:
            raise ValueError(
                f"Only {coverage:.1%} of the dataset is reachable after losing workers "
                f"{self.placement.failed} (min_coverage={min_coverage}); shards with no surviving holder: "
                f"{self.placement.lost_shards()}. Raise `redundancy` or lower `min_coverage`."
            )
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.worker = self.placement.survivors[rank]
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        sizes = [self.placement.indices(w).numel() for w in self.placement.survivors]
        self.num_samples = min(sizes) if drop_last else max(sizes)

    @property
    def coverage(self) -> float:
        """Fraction of the dataset the surviving ranks can still reach."""
        return self.placement.coverage

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (Lightning calls this every epoch)."""
        self.epoch = epoch

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + salt)

    def _permute(self, indices: torch.Tensor, salt: int) -> torch.Tensor:
        if not self.shuffle:
            return indices
        return indices[torch.randperm(indices.numel(), generator=self._generator(salt))]

    def __iter__(self) -> Iterator[int]:
        indices = self._permute(self.placement.indices(self.worker), salt=self.worker)
        return iter(_fit_length(indices, self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """The epoch (position within it is the batch sampler's)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


def _fit_length(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Truncate, or pad by cycling from the start (as DistributedSampler pads), to ``length``."""
    if indices.numel() >= length:
        return indices[:length]
    repeats = math.ceil(length / indices.numel())
    return indices.repeat(repeats)[:length]


class RedundantBatchSampler(Sampler[list[int]]):
    """Stratified RI-SGD batches: ``batch_size`` samples from the own shard and from each full redundant
    shard, ``int(batch_size r)`` from the partial one, per batch (see the module docstring).

    Every rank yields the same number of batches: ``floor(n / batch_size)`` with ``drop_last`` (n the
    smallest own-shard size over the survivors), else ``ceil(n_max / batch_size)`` with shards cycled.
    Tracks its position inside the epoch, so a resumed run continues with the next batch.

    Args:
        sampler: the rank's :class:`RedundantDistributedSampler` (placement, seed, epoch).
        batch_size: b, samples per batch from each complete shard (the DataLoader's batch size).
    """

    def __init__(self, sampler: RedundantDistributedSampler, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Arg `batch_size` must be an int >= 1, got {batch_size!r}.")
        placement = sampler.placement
        self.partial_size = int(batch_size * placement.remainder + 1e-9)
        if placement.remainder and self.partial_size == 0:
            raise ValueError(
                f"batch_size {batch_size} times the fractional part of mu p ({placement.remainder:.4g}) "
                "is < 1: the partial shard would never be sampled. Use a larger batch_size or a redundancy "
                "with mu p an integer."
            )
        self.sampler, self.batch_size = sampler, batch_size
        own_sizes = [placement.shard(w).numel() for w in placement.survivors]
        if sampler.drop_last:
            self.num_batches = min(own_sizes) // batch_size
        else:
            self.num_batches = math.ceil(max(own_sizes) / batch_size)
        if self.num_batches < 1:
            raise ValueError(f"batch_size {batch_size} is larger than a shard ({min(own_sizes)} samples).")
        self.position = 0  # batches already yielded in the current epoch

    def _streams(self) -> list[tuple[torch.Tensor, int]]:
        s, placement = self.sampler, self.sampler.placement
        streams = []
        for j, complete in placement.holdings(s.worker):
            indices = placement.shard(j) if complete else placement.partial(j)
            per_batch = self.batch_size if complete else self.partial_size
            needed = self.num_batches * per_batch
            streams.append((_fit_length(s._permute(indices, salt=1 + j), needed), per_batch))
        return streams

    def __iter__(self) -> Iterator[list[int]]:
        # A loop may stop after the last batch without exhausting this generator (Lightning knows the
        # length), so "epoch finished" is position == num_batches, not code after the loop.
        start = self.position if self.position < self.num_batches else 0
        streams = self._streams()
        for t in range(start, self.num_batches):
            self.position = t + 1
            yield torch.cat([indices[t * n : (t + 1) * n] for indices, n in streams]).tolist()

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (forwarded to the placement sampler). A new epoch starts from its first
        batch; the same epoch again (a resumed run) keeps the restored position."""
        if epoch != self.sampler.epoch:
            self.position = 0
        self.sampler.set_epoch(epoch)

    @property
    def samples_per_batch(self) -> int:
        """b (1 + floor(mu p)) + int(b r): this rank's batch size."""
        return self.batch_size * (1 + self.sampler.placement.full) + self.partial_size

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.position = int(state["position"])
