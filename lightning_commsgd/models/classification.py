"""The training and validation steps every classifier of the package shares (the MLP, the examples' CNN
and ResNet): cross-entropy, a rank-local training loss and rank-averaged validation loss and accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

__all__ = ["ClassifierModule"]


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
