"""The synthetic CNN benchmark job: a small CNN on synthetic 32x32x3 images under any strategy, JSON results.

It takes every option of the digits job (:mod:`benchmarks.jobs.digits`): DDP, local SGD, gossip, EASGD,
DORE, DIANA, QSGD, MEM-SGD or DoubleSqueeze. The benchmarks run it through :mod:`benchmarks.runner`; by
hand, from the repository root::

    python -m benchmarks.jobs.synthetic_cnn --strategy ddp --max-steps 200
    python -m benchmarks.jobs.synthetic_cnn --strategy dore --max-steps 200 --trace --json /tmp/cnn_dore.json
    python -m benchmarks.jobs.synthetic_cnn --strategy mem_sgd --topk-ratio 0.01 --devices 2

The data are generated in-process and deterministically (no download, no torchvision): every class has a
smooth random colour pattern (an 8x8x3 grid of Gaussian values upsampled bilinearly to 32x32); a sample is
its class pattern, shifted by up to ``--max-shift`` pixels in each direction (circularly), scaled by a
random contrast and buried in Gaussian pixel noise of standard deviation ``--noise``. The shifts make a
convolution (translation equivariance, pooling) pay off over a linear model; the noise keeps the task from
being solved in a few steps. The prototypes depend on ``--data-seed`` only, so every ``--seed`` (model
initialisation, shuffling) sees the same task.

The model (:class:`SmallCNN`): ``--depth`` blocks of ``conv3x3 -> ReLU -> maxpool2`` with ``--width``,
then ``2 --width`` channels for every later block, a hidden ``Linear`` of ``--hidden`` units and the
classifier; about 190k parameters with the defaults (depth 3, width 32, hidden 128). SGD with momentum
0.9, like the digits MLP, with a default learning rate of 0.02.

Everything else (strategies and their options, ``--json``, ``--trace``, ``--val-every-steps``, the
results' keys) is the digits job's: this job hands it a different :class:`~benchmarks.jobs.digits.Workload`.
Lightning re-runs ``python -m benchmarks.jobs.synthetic_cnn ...`` once per extra rank, as it does the
digits job.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.jobs import digits
from examples.digits.data import label_skew_order
from examples.digits.model import ClassifierModule

__all__ = [
    "CNN_WORKLOAD",
    "SmallCNN",
    "SyntheticImageDataModule",
    "main",
    "make_prototypes",
    "make_synthetic_images",
    "parse_args",
]

NUM_CLASSES = 10
IMAGE_SIZE = 32
CHANNELS = 3
# The prototypes' resolution before upsampling: smooth enough for a 3x3 conv stack with pooling, fine
# enough that a shift of a few pixels decorrelates a pattern from itself (with 4x4 grids the unshifted
# prototypes still classify 60% of the noisy shifted samples; with 8x8, 28%: the CNN has to learn).
PROTOTYPE_GRID = 8


def make_prototypes(seed: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The class patterns, ``(num_classes, 3, 32, 32)``: Gaussian 8x8x3 grids upsampled bilinearly and
    scaled to unit standard deviation per class (so no class is easier for being brighter)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, CHANNELS, PROTOTYPE_GRID, PROTOTYPE_GRID, generator=generator)
    smooth = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    smooth = smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)
    return smooth / smooth.std(dim=(1, 2, 3), keepdim=True)


def make_synthetic_images(
    prototypes: torch.Tensor, num_samples: int, *, noise: float, max_shift: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` images ``(n, 3, 32, 32)`` float32 and their labels ``(n,)`` int64, from one seed.

    Sample i: label uniform over the classes; its prototype rolled by ``(dy, dx)`` uniform in
    ``[-max_shift, max_shift]``, times a contrast uniform in [0.5, 1.5], plus N(0, noise^2) per pixel;
    then the whole divided by its expected standard deviation ``sqrt(13/12 + noise^2)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    generator = torch.Generator().manual_seed(seed)
    num_classes = prototypes.shape[0]
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    shifts = torch.randint(-max_shift, max_shift + 1, (num_samples, 2), generator=generator)
    contrast = 0.5 + torch.rand(num_samples, generator=generator)
    # One gather instead of a roll per sample: pixel (r, c) of sample i reads its prototype at
    # ((r - dy) mod 32, (c - dx) mod 32), which is torch.roll's convention.
    positions = torch.arange(IMAGE_SIZE)
    rows = (positions.view(1, -1) - shifts[:, :1]) % IMAGE_SIZE  # (n, 32)
    cols = (positions.view(1, -1) - shifts[:, 1:]) % IMAGE_SIZE  # (n, 32)
    chosen = prototypes[labels]  # (n, 3, 32, 32)
    index_rows = rows.view(num_samples, 1, IMAGE_SIZE, 1).expand(-1, CHANNELS, -1, IMAGE_SIZE)
    shifted = chosen.gather(2, index_rows)
    index_cols = cols.view(num_samples, 1, 1, IMAGE_SIZE).expand(-1, CHANNELS, IMAGE_SIZE, -1)
    shifted = shifted.gather(3, index_cols)
    images = shifted * contrast.view(-1, 1, 1, 1)
    images = images + noise * torch.randn(images.shape, generator=generator)
    # Unit pixel variance whatever the noise (E[contrast^2] = 13/12 for U[0.5, 1.5]), so that the
    # default-initialised convolutions see inputs of the scale they were initialised for, at any --noise.
    return (images / (13 / 12 + noise**2) ** 0.5).float(), labels


class SyntheticImageDataModule(LightningDataModule):
    """Deterministic synthetic 32x32x3 images of 10 classes (see the module docstring).

    Args:
        batch_size: samples per batch and per process.
        train_size: training samples.
        val_size: validation samples.
        noise: standard deviation of the pixel noise (the prototypes have unit standard deviation).
        max_shift: largest circular shift of a prototype, in pixels, in each direction.
        data_seed: seed of the prototypes; the training and validation samples use ``data_seed + 1`` and
            ``data_seed + 2``, so the two sets share the task but not their samples.
        repeat: how many times the training set is repeated per epoch.
        label_skew_shards: non-iid training data for ``k`` workers (0: the random order), as in
            :class:`~examples.digits.data.DigitsDataModule`.
    """

    def __init__(
        self,
        batch_size: int = 32,
        train_size: int = 8192,
        val_size: int = 2048,
        noise: float = 3.0,
        max_shift: int = 8,
        data_seed: int = 0,
        repeat: int = 1,
        label_skew_shards: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("train_size", train_size), ("val_size", val_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        if label_skew_shards < 0:
            raise ValueError(f"label_skew_shards must be >= 0, got {label_skew_shards}")
        self.batch_size = batch_size
        self.train_size, self.val_size = train_size, val_size
        self.noise, self.max_shift, self.data_seed = noise, max_shift, data_seed
        self.repeat, self.label_skew_shards = repeat, label_skew_shards
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate both sets (every rank generates the same ones: no file, no broadcast needed)."""
        if self.train_dataset is not None:
            return
        prototypes = make_prototypes(self.data_seed)
        options: dict[str, Any] = {"noise": self.noise, "max_shift": self.max_shift}
        x, y = make_synthetic_images(prototypes, self.train_size, seed=self.data_seed + 1, **options)
        if self.label_skew_shards:
            order = label_skew_order(y, self.label_skew_shards)
            x, y = x[order], y[order]
        if self.repeat > 1:
            x, y = x.repeat(self.repeat, 1, 1, 1), y.repeat(self.repeat)
        self.train_dataset = TensorDataset(x, y)
        self.val_dataset = TensorDataset(
            *make_synthetic_images(prototypes, self.val_size, seed=self.data_seed + 2, **options)
        )

    def train_dataloader(self) -> DataLoader:
        # Shuffled by Lightning's DistributedSampler (or the strategy's RI-SGD sampler) under several
        # processes; in one process this shuffle is the one that counts.
        assert self.train_dataset is not None
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=self.label_skew_shards == 0)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None
        return DataLoader(self.val_dataset, batch_size=256)


class SmallCNN(ClassifierModule):
    """``depth`` blocks of ``Conv2d(3x3, padding 1) -> ReLU -> MaxPool2d(2)`` (``width`` channels, then
    ``2 width``), a hidden ``Linear`` of ``hidden`` units with ReLU, and a linear classifier. No BatchNorm
    and no dropout: x is the parameters alone, as the compressed strategies assume.

    Args:
        width: channels of the first block (later blocks have twice as many).
        depth: convolution blocks, 1..5 (each halves the 32x32 resolution).
        hidden: units of the hidden fully connected layer.
        num_classes: output classes.
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(
        self,
        width: int = 32,
        depth: int = 3,
        hidden: int = 128,
        num_classes: int = NUM_CLASSES,
        lr: float = 0.05,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if width < 1 or hidden < 1:
            raise ValueError(f"width and hidden must be >= 1, got {width} and {hidden}")
        if not 1 <= depth <= 5:
            raise ValueError(f"depth must lie in [1, 5] (32x32 halved per block), got {depth}")
        if lr <= 0 or momentum < 0:
            raise ValueError(f"lr must be > 0 and momentum >= 0, got {lr} and {momentum}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        channels = CHANNELS
        for block in range(depth):
            out = width if block == 0 else 2 * width
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        side = IMAGE_SIZE // 2**depth
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.classifier(self.features(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum (the master's update under the compressed strategies)."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The digits job's options (``--hidden`` and ``--depth`` mean the CNN's) plus the data's and
    the model's own; see ``--help``."""
    parser = digits.build_parser(__doc__.splitlines()[0])
    # --hidden: the hidden Linear; --depth: convolution blocks. The digits' defaults (128, 2) would give
    # a 545k-parameter model whose first Linear dominates; 3 blocks keep it near 190k. lr 0.05 (the
    # digits' default) makes this CNN blow up after a few hundred steps under plain DDP; 0.02 does not.
    parser.set_defaults(hidden=128, depth=3, lr=0.02)
    meanings = {
        "hidden": "units of the CNN's hidden Linear layer",
        "depth": "convolution blocks, 1..5",
        "lr": "SGD learning rate",
    }
    for action in parser._actions:  # argparse has no public way to reword an inherited option's help
        if action.dest in meanings:
            action.help = f"{meanings[action.dest]} (default {action.default})"
    cnn = parser.add_argument_group("synthetic CNN workload")
    cnn.add_argument("--width", type=int, default=32, help="channels of the first conv block (default 32)")
    cnn.add_argument("--train-size", type=int, default=8192, help="training images (default 8192)")
    cnn.add_argument("--val-size", type=int, default=2048, help="validation images (default 2048)")
    cnn.add_argument("--noise", type=float, default=3.0, help="pixel noise standard deviation (default 3)")
    cnn.add_argument("--max-shift", type=int, default=8, help="largest shift of a pattern in pixels (8)")
    cnn.add_argument("--data-seed", type=int, default=0, help="seed of the class patterns and samples")
    args = digits.check_args(parser, parser.parse_args(argv))
    for name in ("width", "train_size", "val_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.depth <= 5:
        parser.error(f"--depth (conv blocks) must lie in [1, 5], got {args.depth}")
    if args.noise < 0 or args.max_shift < 0:
        parser.error("--noise and --max-shift must be >= 0")
    return args


CNN_WORKLOAD = digits.Workload(
    name="synthetic_cnn",
    make_model=lambda args: SmallCNN(width=args.width, depth=args.depth, hidden=args.hidden, lr=args.lr),
    make_datamodule=lambda args: SyntheticImageDataModule(
        batch_size=args.batch_size,
        train_size=args.train_size,
        val_size=args.val_size,
        noise=args.noise,
        max_shift=args.max_shift,
        data_seed=args.data_seed,
        repeat=args.repeat,
        label_skew_shards=args.devices if args.non_iid else 0,
    ),
    config=lambda args: {
        "width": args.width,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "noise": args.noise,
        "max_shift": args.max_shift,
        "data_seed": args.data_seed,
    },
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    return digits.main(argv, CNN_WORKLOAD, parse_args)


if __name__ == "__main__":
    sys.exit(main())
