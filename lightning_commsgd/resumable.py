"""A training loader that resumes mid-epoch at the next batch instead of replaying the epoch.

Lightning resumes a plain ``DataLoader`` at the start of the interrupted epoch (with a warning), so a run
resumed from a checkpoint written mid-epoch trains on other batches than the uninterrupted run. The
strategies rebuild the training loader around :class:`ResumableBatchSampler`: it wraps the loader's own
batch sampler (Lightning's ``DistributedSampler`` underneath, or the user's), counts the batches of the
current epoch, and after :meth:`~ResumableBatchSampler.load_state_dict` skips the batches already trained
on (as index lists only: no sample is loaded twice). The position travels in the strategies' per-rank
checkpoint state, like the RI-SGD sampler's (:mod:`lightning_commsgd.samplers`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = ["ResumableBatchSampler", "resumable_loader"]


class ResumableBatchSampler(Sampler[list[int]]):
    """``batch_sampler`` with a position inside the epoch that a checkpoint can restore.

    Args:
        batch_sampler: the loader's batch sampler. Its ``sampler`` is exposed as this object's ``sampler``,
            where Lightning calls ``set_epoch``; it must give the same order for the same epoch, as
            ``DistributedSampler`` does, whose ``epoch`` tells a resumed epoch from the next one.
    """

    def __init__(self, batch_sampler: Iterable[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.sampler = getattr(batch_sampler, "sampler", None)
        self.position = 0  # batches of the current epoch skipped or yielded
        self._resume: tuple[int, int] | None = None  # (epoch, batches done), set by load_state_dict

    @property
    def epoch(self) -> int:
        """The sampler's epoch (0 for a sampler that has none)."""
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            # only the interrupted epoch, and only if it was not finished (Lightning then starts the next)
            if epoch == self.epoch and done < len(self):
                skip = done
        self.position = skip
        for batch in itertools.islice(iter(self.batch_sampler), skip, None):
            self.position += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration continues epoch ``state["epoch"]`` after its first ``state["position"]``
        batches (when that epoch is the one being iterated)."""
        self._resume = (int(state["epoch"]), int(state["position"]))


def resumable_loader(loader: DataLoader) -> DataLoader | None:
    """``loader`` rebuilt around a :class:`ResumableBatchSampler` (its other settings kept); ``None`` for an
    iterable-style dataset, a loader without batches, or a ``DataLoader`` subclass (left as they are: such a
    run resumes at the start of the interrupted epoch, as under Lightning's own strategies)."""
    if (
        loader.batch_sampler is None
        or isinstance(loader.dataset, IterableDataset)  # its order is the dataset's own, not a sampler's
        or type(loader) is not DataLoader  # a subclass may rebuild differently
    ):
        return None
    return DataLoader(
        loader.dataset,
        batch_sampler=ResumableBatchSampler(loader.batch_sampler),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        timeout=loader.timeout,
        multiprocessing_context=loader.multiprocessing_context,
        pin_memory_device=loader.pin_memory_device,
    )
