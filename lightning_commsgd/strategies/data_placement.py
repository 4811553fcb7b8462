"""Where each rank's training batches come from, and where it resumes in them.

A collaborator of :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`: Lightning hands every
dataloader to ``strategy.process_dataloader``, which passes the training loader here. With RI-SGD
(``redundancy=``, :mod:`lightning_commsgd.redundancy`) the loader is rebuilt around the redundant batch
sampler; otherwise Lightning's own DistributedSampler stays, wrapped so that it can resume mid-epoch
(:mod:`lightning_commsgd.resumable`). Either way the batch sampler's epoch and position (as far as the
training loop consumed it) go into each rank's checkpoint entry, and a resumed run continues at the next
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader

from lightning_commsgd.redundancy import RedundancyInfusion
from lightning_commsgd.resumable import resumable_loader

__all__ = ["TrainingData"]


class TrainingData:
    """This rank's training batches (see the module docstring).

    Args:
        redundancy: RI-SGD's placement, or ``None`` for the framework's DistributedSampler.
    """

    def __init__(self, redundancy: RedundancyInfusion | None) -> None:
        self.redundancy = redundancy
        # the training loader's batch sampler, RI-SGD's or a ResumableBatchSampler (its position is saved)
        self.batches: Any = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's position, applied to the next loader
        self.restored = False  # the checkpoint's position was applied (an exact resume)

    def check_world(self, world_size: int) -> None:
        """Validate the placement against the world size, before any process starts."""
        if self.redundancy is not None:
            self.redundancy.check_world(world_size)

    def process(
        self, loader: DataLoader, world_size: int, rank: int, framework_default: Callable[[Any], Any]
    ) -> Any:
        """The training ``loader`` of this rank: RI-SGD's, or ``framework_default(loader)``, resumable."""
        if self.redundancy is not None:
            loader = self.redundancy.dataloader(loader, world_size, rank)
        else:
            loader = framework_default(loader)
            loader = resumable_loader(loader) or loader  # resumes mid-epoch at the next batch
        batches = getattr(loader, "batch_sampler", None)
        if callable(getattr(batches, "load_state_dict", None)):
            self.batches = batches
            self.restored = self._pending is not None
            if self._pending is not None:
                batches.load_state_dict(self._pending)
            self._pending = None
        return loader

    def state(self, batches_consumed: int) -> dict[str, Any] | None:
        """The position to save: the epoch and the batches the loop consumed in it (the fetcher reads ahead,
        so the sampler's own position can be one batch further than what training has seen)."""
        if self.batches is None:
            return None
        return {"epoch": self.batches.epoch, "position": batches_consumed}

    def load(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's position, applied when the training loader is next built."""
        self._pending = state

    def resumes_exactly(self, loaders: Sequence[Any]) -> bool:
        """The training loaders continue where the checkpoint stopped: one loader, whose batch sampler took
        the position saved in this rank's checkpoint entry."""
        return (
            self.restored and len(loaders) == 1 and getattr(loaders[0], "batch_sampler", None) is self.batches
        )
