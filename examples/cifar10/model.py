"""A torchvision ResNet for 32x32 images as a :class:`~lightning.pytorch.LightningModule`. torchvision (an
optional extra that must match torch) is imported when the model is built, so that this module and every
``configs/cifar10/*.yaml`` import and parse without it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

# torchvision's ResNet family: all share the conv1/maxpool stem that the CIFAR variant replaces.
ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)  # fmt: skip
SCHEDULES = ("cosine", "step", "constant")


class TorchvisionMissingError(ImportError):
    """torchvision is not installed, or does not load with this torch (the message says what to install)."""


def _import_torchvision() -> Any:
    try:
        import torchvision
    # A torchvision built for another torch fails at import with RuntimeError (missing operators) or
    # OSError (its C++ library does not load) rather than ImportError: all get the same advice.
    except (ImportError, RuntimeError, OSError) as err:
        raise TorchvisionMissingError(
            f"ResNetClassifier needs torchvision, which is not installed or does not load ({err}). "
            'Install the torchvision that matches your torch: pip install "lightning_commsgd[cifar10]", or '
            "name both versions, e.g. pip install torch==2.14.1 torchvision==0.29.1 (the pair used on this "
            "project's machines; the CPU build torch 2.13.0+cpu has no working torchvision). The data "
            "module and the configs do not need it."
        ) from err
    return torchvision


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of the base rate: a linear warm-up from
    ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then ``"cosine"`` (from 1 down to 0 at
    ``total_steps``), ``"step"`` (times ``gamma`` at each fraction of ``total_steps`` in ``milestones``) or
    ``"constant"``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(step >= fraction * total_steps for fraction in milestones)
    return 1.0


class ResNetClassifier(LightningModule):
    """A torchvision ResNet with the CIFAR stem (3x3 convolution, stride 1, no max-pool), trained with SGD
    and cross-entropy. It logs the training loss (not synced: a per-step all-reduce would add communication
    to every strategy) and the validation loss and accuracy, averaged over the epoch and the ranks.

    Args:
        arch: a torchvision ResNet constructor name (see ``ARCHS``); randomly initialised, no weights
            are downloaded.
        num_classes: output classes.
        lr: base learning rate of SGD (per worker: strategies average models or gradients, not sums).
        momentum: SGD momentum.
        weight_decay: L2 penalty on every parameter.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        schedule: ``"cosine"`` (to zero at the end of training), ``"step"`` or ``"constant"``.
        warmup_steps: optimizer steps of linear warm-up before the schedule (0: none).
        milestones: fractions of the run where the ``"step"`` schedule multiplies the rate by ``gamma``.
        gamma: the ``"step"`` schedule's factor.

    Raises:
        TorchvisionMissingError: torchvision is missing or does not match torch (an ``ImportError``).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if lr <= 0 or momentum < 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError("lr must be > 0; momentum, weight_decay and warmup_steps >= 0")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if not 0 < gamma <= 1 or not all(0 < f < 1 for f in milestones):
            raise ValueError("gamma must be in (0, 1] and every milestone in (0, 1)")
        torchvision = _import_torchvision()
        self.save_hyperparameters()
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        # 32x32 inputs: ImageNet's 7x7 stride-2 convolution and max-pool would leave 8x8 maps after the
        # stem; the CIFAR variant (He et al. 2016, Sec. 4.2) keeps the full resolution.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(batch, num_classes)`` of normalised images ``(batch, 3, 32, 32)``."""
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log("val_acc", acc, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD and a learning-rate schedule (:func:`lr_factor`) per optimizer step over the whole run,
        ``trainer.estimated_stepping_batches`` (``max_epochs`` times the batches per epoch, or ``max_steps``
        when that comes first), so that it follows ``--trainer.max_epochs`` without being told."""
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
        total = self.trainer.estimated_stepping_batches
        if hp.schedule != "constant" and not math.isfinite(total):
            raise ValueError(f"schedule={hp.schedule!r} needs a finite run: set max_epochs or max_steps")
        total = int(total) if math.isfinite(total) else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, total, hp.schedule, hp.warmup_steps, tuple(hp.milestones), hp.gamma),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
