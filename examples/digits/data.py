"""scikit-learn's 8x8 handwritten digits as a :class:`~lightning.pytorch.LightningDataModule`.

The data set ships inside scikit-learn (1797 samples, 64 features, 10 classes), so the example, the tests
and the benchmarks (``benchmarks/jobs/``, which also use ``repeat`` and ``label_skew_shards``) run offline
and in seconds on a laptop CPU.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

__all__ = ["DigitsDataModule", "label_skew_order", "load_digits_tensors"]

# Pixel intensities in load_digits are integers in [0, 16].
_MAX_PIXEL = 16.0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The full digits data set: features ``(1797, 64)`` float32 in ``[0, 1]``, labels int64 in ``[0, 9]``.
    Raises an ImportError if scikit-learn (an optional dependency) is not installed."""
    # Imported lazily: scikit-learn is an optional extra, and the core package must import without it.
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "DigitsDataModule needs scikit-learn: pip install 'lightning_commsgd[examples]'"
        ) from err
    bunch = load_digits()
    features = torch.as_tensor(bunch.data, dtype=torch.float32) / _MAX_PIXEL
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return features, labels


def label_skew_order(labels: torch.Tensor, shards: int) -> torch.Tensor:
    """Positions that make every strided shard of ``shards`` a contiguous block of the label-sorted data.

    Returns ``order`` (indices into ``labels``) such that the samples ``order[j], order[j + k],
    order[j + 2k], ...`` (strided shard ``j`` of ``k = shards``, the placement of
    :class:`~lightning_commsgd.samplers.RedundantPlacement`) are the ``j``-th of ``k`` equal contiguous
    blocks of the samples sorted by label (stable sort): each shard is dominated by one to a few labels.
    Only the first ``k * floor(n / k)`` samples are used, so that the blocks are equal and the strided
    pattern has no ragged end (at most ``k - 1`` samples are dropped; ``order`` is shorter than ``labels``
    then).

    Raises:
        ValueError: ``shards`` is not an int >= 1, or larger than the number of samples.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    per_block = len(labels) // shards
    if per_block < 1:
        raise ValueError(f"cannot split {len(labels)} samples into {shards} label-sorted shards")
    kept = labels[: shards * per_block]
    by_label = torch.sort(kept, stable=True).indices
    # Row j of the (k, n/k) view is block j; reading the transpose row by row puts block j's m-th
    # sample at position m * k + j, i.e. into strided shard j.
    return by_label.view(shards, per_block).t().reshape(-1)


class DigitsDataModule(LightningDataModule):
    """Train/validation split of scikit-learn's digits data set.

    Args:
        batch_size: samples per batch and per process (must be >= 1).
        val_fraction: fraction of the samples held out for validation, in the open interval ``(0, 1)``.
        seed: seed of the train/validation split; the same seed gives the same split on every rank.
        num_workers: ``DataLoader`` worker processes (must be >= 0; 0 loads in the main process).
        repeat: how many times the training set is repeated per epoch (must be >= 1), so that benchmarks
            can make epochs longer without changing the data distribution.
        label_skew_shards: non-iid training data for ``k`` workers (an int >= 0; 0, the default, keeps the
            random order): the training set is reordered by :func:`label_skew_order` (the samples it drops
            chosen at random by the split), before ``repeat``, so every repeat keeps the same strided
            shards. Lightning's ``DistributedSampler`` shuffles globally and undoes the skew; workers see
            it under a strided placement (a strategy with ``redundancy``/``original_world_size``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        repeat: int = 1,
        label_skew_shards: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        if type(label_skew_shards) is not int or label_skew_shards < 0:  # bool is an int, but no count
            raise ValueError(f"label_skew_shards must be an int >= 0, got {label_skew_shards!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.repeat = repeat
        self.label_skew_shards = label_skew_shards
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the data and split it; deterministic in ``seed``, so every rank builds the same split."""
        if self.train_dataset is not None and self.val_dataset is not None:
            return
        features, labels = load_digits_tensors()
        # A private generator keeps the split independent of the global RNG state (seed_everything,
        # model initialisation order, ...), so all ranks agree without communicating.
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(labels), generator=generator)
        num_val = max(1, round(self.val_fraction * len(labels)))
        val_idx, train_idx = order[:num_val], order[num_val:]
        if self.label_skew_shards:
            # train_idx is in random order, so the (at most k - 1) samples the truncation drops are
            # random ones, not the tail of the last label.
            train_idx = train_idx[label_skew_order(labels[train_idx], self.label_skew_shards)]
        train = TensorDataset(features[train_idx], labels[train_idx])
        # Repeating the same TensorDataset costs no extra memory; ConcatDataset only maps indices.
        self.train_dataset = train if self.repeat == 1 else ConcatDataset([train] * self.repeat)
        self.val_dataset = TensorDataset(features[val_idx], labels[val_idx])

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; in multi-process runs Lightning swaps in a ``DistributedSampler``."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)
