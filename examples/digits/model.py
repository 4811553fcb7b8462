"""The digits example's model: a plain multi-layer perceptron classifier as a
:class:`~lightning.pytorch.LightningModule`, on top of :class:`ClassifierModule` (cross-entropy training
and validation steps, which the benchmarks' CNN shares).

Deliberately free of randomness after initialisation (no dropout), so that tests can compare the
parameter trajectories of different strategies exactly. The benchmarks (``benchmarks/jobs/``) train this
model too: a change here changes their numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

__all__ = ["ClassifierModule", "MLPClassifier"]

_OPTIMIZERS = ("sgd", "adam")


class ClassifierModule(LightningModule):
    """A :class:`~lightning.pytorch.LightningModule` whose ``forward`` returns class logits; subclasses
    build the network and ``configure_optimizers``."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy loss of one batch, logged as ``train_loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        # Not synced across ranks: a per-step all-reduce would add communication to every strategy
        # and distort the byte counts that the benchmarks compare.
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``val_loss`` and ``val_acc``, averaged over the epoch (weighted by batch size) and ranks."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Computed by hand rather than with a torchmetrics state: it keeps the module free of extra
        # state, and the batch-size-weighted epoch mean Lightning computes is the exact accuracy.
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log("val_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log("val_acc", acc, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=len(y))


class MLPClassifier(ClassifierModule):
    """``depth`` hidden ``Linear -> [BatchNorm1d] -> ReLU`` blocks followed by a linear classifier.

    Args:
        in_features: input dimension (64 for the 8x8 digits).
        hidden: width of every hidden layer.
        depth: number of hidden layers (0 gives multinomial logistic regression).
        num_classes: number of output classes.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty passed to the optimizer.
        nesterov: use Nesterov momentum with SGD (needs ``momentum > 0``).
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_norm: insert ``BatchNorm1d`` after each hidden ``Linear``, so that strategies that average
            buffers (running mean/variance) have something to average.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 128,
        depth: int = 2,
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        optimizer: str = "sgd",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if nesterov and optimizer == "sgd" and momentum == 0:
            # torch.optim.SGD would reject this too, but only later, inside configure_optimizers.
            raise ValueError("nesterov=True needs momentum > 0")
        self.save_hyperparameters()

        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of shape ``(batch, num_classes)``."""
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD (with optional momentum/Nesterov) or Adam, as chosen by ``optimizer``."""
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
