"""CIFAR-10 as a :class:`~lightning.pytorch.LightningDataModule`, read from the standard python folder
(``cifar-10-batches-py``, unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) with no
download and no torchvision, or synthetic images (``synthetic.py``); augmented on the device (``augment.py``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from augment import random_crop_flip  # augment.py and synthetic.py: next to this file
from lightning.pytorch import LightningDataModule
from synthetic import make_synthetic_cifar
from torch.utils.data import DataLoader, TensorDataset

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel mean and standard deviation of the 50,000 training images, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10NotFoundError(FileNotFoundError):
    """The CIFAR-10 folder or one of its files is missing (the message says what to do)."""


def _not_found_message(root: Path, missing: list[str]) -> str:
    what = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
    return (
        f"CIFAR-10 not found: {root} {what}.\n"
        "Expected the python version of CIFAR-10, a folder holding "
        f"{', '.join(TRAIN_FILES)} and {TEST_FILE}.\n"
        "Get it from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (about 163 MB; this example "
        "never downloads) and unpack it, e.g.\n"
        "    mkdir -p data && tar -xzf cifar-10-python.tar.gz -C data    # gives data/cifar-10-batches-py\n"
        "or point --data.data_dir at the folder. To run without the data set, pass --data.synthetic=true "
        "(random images with class structure)."
    )


def load_batch_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` int64 of one CIFAR-10 batch file: a pickle (only
    open files you trust) of ``data``, ``(n, 3072)`` uint8 (red, green, blue 32x32 planes), and ``labels``."""
    with open(path, "rb") as f:
        # The official files were pickled by Python 2: encoding="bytes" keeps their str keys as bytes.
        entry: dict[Any, Any] = pickle.load(f, encoding="bytes")
    data, labels = entry.get(b"data", entry.get("data")), entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch: no 'data' and 'labels' entries")
    images = torch.as_tensor(data, dtype=torch.uint8)
    targets = torch.as_tensor(list(labels), dtype=torch.int64)
    if images.dim() != 2 or images.shape[1] != 3072 or len(images) != len(targets):
        raise ValueError(
            f"{path}: expected data of shape (n, 3072) and n labels, "
            f"got {tuple(images.shape)} and {len(targets)}"
        )
    return images.view(-1, 3, 32, 32), targets


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 (``data_batch_1`` ... ``data_batch_5``, 50,000 training images; ``test_batch``, 10,000 images
    for validation, as usual for CIFAR-10), or synthetic images; all in memory, augmented on the device.

    Args:
        data_dir: the unpacked ``cifar-10-batches-py`` folder, absolute or relative to the working
            directory. Checked in ``__init__`` unless ``synthetic``; missing files raise
            :class:`CIFAR10NotFoundError` naming the absolute path.
        synthetic: use :func:`synthetic.make_synthetic_cifar` instead of the files (``data_dir`` ignored).
        batch_size: images per batch and per process (>= 1). Training drops the last, incomplete batch, so
            that BatchNorm never sees a batch of one.
        synthetic_size: synthetic training images (>= 1); the validation set has a fifth as many (at least
            one), CIFAR-10's ratio.
        synthetic_seed: seed of the synthetic task and samples.
        augment: random crop and horizontal flip of training batches (validation batches never are).
    """

    def __init__(
        self,
        data_dir: str | Path = "data/cifar-10-batches-py",
        synthetic: bool = False,
        batch_size: int = 128,
        synthetic_size: int = 10_000,
        synthetic_seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if synthetic_size < 1:
            raise ValueError(f"synthetic_size must be >= 1, got {synthetic_size}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.synthetic, self.augment = bool(synthetic), bool(augment)
        self.batch_size = batch_size
        self.synthetic_size, self.synthetic_seed = synthetic_size, synthetic_seed
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        if not self.synthetic:
            # Here rather than in prepare_data/setup: Lightning calls those inside fit, after the other
            # ranks and the process group exist, where one rank's error leaves the others to be killed.
            missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (self.data_dir / name).is_file()]
            if missing:
                raise CIFAR10NotFoundError(_not_found_message(self.data_dir, missing))

    def setup(self, stage: str | None = None) -> None:
        """Read the files (or draw the synthetic set); every rank builds the same sets."""
        if self.train_dataset is not None:
            return
        if self.synthetic:
            train = make_synthetic_cifar(self.synthetic_size, self.synthetic_seed, "train")
            val = make_synthetic_cifar(max(1, self.synthetic_size // 5), self.synthetic_seed, "val")
        else:
            parts = [load_batch_file(self.data_dir / name) for name in TRAIN_FILES]
            train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            val = load_batch_file(self.data_dir / TEST_FILE)
        self.train_dataset, self.val_dataset = TensorDataset(*train), TensorDataset(*val)

    def transform(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        """uint8 images ``(n, 3, 32, 32)`` (4x less host-to-device traffic than float32) to float32 in [0, 1],
        randomly cropped (4 pixels of zero padding) and flipped if ``augment``, normalised with the CIFAR-10
        channel mean and std."""
        x = images.float().div_(255.0)
        if augment:
            x = random_crop_flip(x)
        mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook: :meth:`transform` on the device; augmentation only in the training loop."""
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        return self.transform(images, augment=self.augment and training), labels

    def _loader(self, dataset: TensorDataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # Under several processes Lightning swaps in a DistributedSampler that shuffles instead.
            shuffle=train,
            drop_last=train,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled uint8 training batches (the last incomplete one dropped)."""
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """uint8 validation batches in a fixed order."""
        return self._loader(self.val_dataset, train=False)
