"""A plain multi-layer perceptron classifier as a :class:`~lightning.pytorch.LightningModule` (steps from
:class:`~lightning_commsgd.models.classification.ClassifierModule`).

Deliberately free of randomness after initialisation (no dropout), so that tests can compare the
parameter trajectories of different strategies exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_commsgd.models.classification import ClassifierModule

__all__ = ["MLPClassifier"]

_OPTIMIZERS = ("sgd", "adam")


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
