"""RI-SGD's redundancy-infused data placement (Haddadpour, Kamani, Mahdavi, Cadambe, ICML 2019).

Placement, as in the authors' reference code: the dataset is split into p *strided* shards (shard j holds
samples j, j + p, j + 2p, ...). With redundancy mu (a fraction of the WHOLE dataset added to each worker),
q = mu p, worker i holds its own shard i, the full shards of workers (i + 1 .. i + floor(q)) mod p and,
when r = q - floor(q) > 0, the strided part ``shard[::ceil(1/r)]`` of shard (i + floor(q) + 1) mod p.
mu lies in [0, 1 - 1/p] (1 - 1/p = full replication); mu = 0 is the plain strided split (each worker only
its own fixed shard, the same placement as every other mu: not DistributedSampler's global reshuffle).

Multiplicity (tested): every sample is held by exactly ``1 + floor(mu p)`` workers, plus one more when
r > 0 and its position inside its shard is a multiple of ``ceil(1/r)``.

Sampling modes:

- ``"stratified"`` (the reference): each batch draws ``b`` samples from the own shard, ``b`` from each
  full redundant shard and ``int(b r)`` from the partial one, ``b`` being the DataLoader's batch size;
  a worker's batch therefore has ``b (1 + floor(q)) + int(b r)`` samples, about ``b (1 + mu p)``.
  :class:`RedundantBatchSampler` produces those batches.
- ``"union"``: the union of the held samples, shuffled each epoch and batched normally.

In both modes every worker shuffles what it holds in its own order (seeded by ``(seed, epoch, worker)``,
and by the shard in stratified mode), as in the authors' code, where each device reads each of its shards
through its own unseeded ``tf.data`` shuffle: two holders of a shard draw different samples from it at the
same step, and at mu = 1 - 1/p the p workers compute p different mini-batches of the whole dataset, not one
batch p times.

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
    """RI-SGD batches for one rank, in either sampling mode, with per-rank batch sizes allowed.

    ``"stratified"`` (the reference): each batch takes ``b`` samples from the own shard and from each full
    redundant shard and ``int(b r)`` from the partial one (see the module docstring). ``"union"``: the
    rank's held samples, shuffled together, in batches of ``b``.

    Heterogeneous mini-batch sizes (the paper's extension): ``batch_size`` may give one ``b`` per rank.
    Every rank still yields the same number of batches per epoch, so no rank waits at a round or at the
    epoch's end for a batch another rank never takes:

    - ``drop_last``: ``min_r floor(n_r / b_r)`` batches (n_r: rank r's own-shard size in stratified mode,
      its held-sample count in union mode): no rank repeats a sample within an epoch; a rank whose share
      lasts longer sees a different part of it each epoch.
    - otherwise ``max_r ceil(n_r / b_r)`` batches, every one full: a rank whose data runs out first
      cycles through it again (its shuffled order) to fill its batches, as DistributedSampler pads.

    With equal ``b`` this is one pass over each rank's data per epoch. Tracks its position inside the
    epoch, so a resumed run continues with the next batch.

    Args:
        sampler: the rank's :class:`RedundantDistributedSampler` (placement, seed, epoch).
        batch_size: b, the samples per batch from each complete shard (stratified) or per batch (union);
            an int for every rank, or a sequence with one b per rank (``batch_size[rank]``).
        sampling: ``"stratified"`` or ``"union"``.
    """

    def __init__(
        self,
        sampler: RedundantDistributedSampler,
        batch_size: int | Sequence[int],
        sampling: SamplingMode = "stratified",
    ) -> None:
        if sampling not in ("stratified", "union"):
            raise ValueError(f"Arg `sampling` must be one of ('stratified', 'union'), got {sampling!r}.")
        sizes = _check_batch_sizes(batch_size, sampler.num_replicas)
        placement = sampler.placement
        partial_sizes = [int(b * placement.remainder + 1e-9) for b in sizes]
        if sampling == "stratified" and placement.remainder and min(partial_sizes) == 0:
            raise ValueError(
                f"batch_size {min(sizes)} times the fractional part of mu p ({placement.remainder:.4g}) is "
                "< 1: the partial shard would never be sampled. Use a larger batch_size or a redundancy "
                "with mu p an integer."
            )
        if sampling == "stratified":
            shares = [placement.shard(w).numel() for w in placement.survivors]
        else:
            shares = [placement.indices(w).numel() for w in placement.survivors]
        if sampler.drop_last:
            self.num_batches = min(n // b for n, b in zip(shares, sizes))
        else:
            self.num_batches = max(math.ceil(n / b) for n, b in zip(shares, sizes))
        if self.num_batches < 1:
            worst = min(range(len(sizes)), key=lambda r: shares[r] // sizes[r])
            raise ValueError(
                f"batch_size {sizes[worst]} of rank {worst} is larger than its data ({shares[worst]} samples "
                f"{'per shard' if sampling == 'stratified' else 'held'}); with drop_last no batch is left."
            )
        self.sampler, self.sampling = sampler, sampling
        self.batch_sizes = sizes
        self.batch_size = sizes[sampler.rank]
        self.partial_size = partial_sizes[sampler.rank] if sampling == "stratified" else 0
        self.position = 0  # batches already yielded in the current epoch

    def _streams(self) -> list[tuple[torch.Tensor, int]]:
        """(indices long enough for the epoch, samples per batch) for each source of a batch."""
        s, placement = self.sampler, self.sampler.placement
        if self.sampling == "union":
            indices = s._permute(placement.indices(s.worker), salt=s.worker)
            return [(_fit_length(indices, self.num_batches * self.batch_size), self.batch_size)]
        streams = []
        for j, complete in placement.holdings(s.worker):
            indices = placement.shard(j) if complete else placement.partial(j)
            per_batch = self.batch_size if complete else self.partial_size
            needed = self.num_batches * per_batch
            # Each holder of shard j shuffles it in its own order (salt per (worker, shard)), as the authors'
            # code does (one unseeded tf.data shuffle per device and shard): a salt per shard alone would
            # make every holder draw the same samples at the same step, and at mu = 1 - 1/p all p workers
            # would compute one replica p times.
            salt = 1 + j + placement.p * s.worker
            streams.append((_fit_length(s._permute(indices, salt=salt), needed), per_batch))
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
    def epoch(self) -> int:
        """The current epoch (the placement sampler's)."""
        return self.sampler.epoch

    @property
    def samples_per_batch(self) -> int:
        """This rank's batch size: b (1 + floor(mu p)) + int(b r) stratified, b in union mode."""
        if self.sampling == "union":
            return self.batch_size
        return self.batch_size * (1 + self.sampler.placement.full) + self.partial_size

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.position = int(state["position"])


def _check_batch_sizes(batch_size: int | Sequence[int], num_replicas: int) -> list[int]:
    """One b >= 1 per rank, from an int (the same everywhere) or a sequence of length ``num_replicas``."""
    if isinstance(batch_size, (list, tuple)):
        sizes = list(batch_size)
        if len(sizes) != num_replicas:
            raise ValueError(
                f"Arg `batch_size` gives {len(sizes)} per-rank batch sizes for {num_replicas} ranks."
            )
    else:
        sizes = [batch_size] * num_replicas  # type: ignore[list-item]
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"Arg `batch_size` must be an int >= 1 (or one per rank), got {batch_size!r}.")
    return sizes
