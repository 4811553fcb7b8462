"""What would put every step back in lock-step across ranks, under a strategy that synchronises rarely.

- ``Trainer(sync_batchnorm=True)`` all-reduces BatchNorm statistics at every forward pass: refused before
  launch (:func:`refuse_sync_batchnorm`); the rounds average BatchNorm buffers instead.
- ``self.log(..., sync_dist=True)`` or ``self.reduce`` inside ``training_step`` runs a collective at every
  step: :class:`StepReduceWarning` says so, once per strategy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_commsgd.algorithms.protocol import CommAlgorithm
from lightning_commsgd.internals import sync_batchnorm_requested

__all__ = ["StepReduceWarning", "refuse_sync_batchnorm"]


def refuse_sync_batchnorm(strategy: Any) -> None:
    """Raise a ValueError if ``Trainer(sync_batchnorm=True)`` gave ``strategy`` a layer sync."""
    if sync_batchnorm_requested(strategy):
        raise ValueError(
            f"Trainer(sync_batchnorm=True) all-reduces BatchNorm statistics at every forward pass, which "
            f"{type(strategy).__name__} exists to avoid; BatchNorm buffers are averaged at each round "
            "instead (average_buffers=True)."
        )


class StepReduceWarning:
    """Warns once when a reduction runs inside ``training_step`` (see the module docstring)."""

    def __init__(self) -> None:
        self._in_training_step = False
        self._warned = False

    @contextmanager
    def training_step(self) -> Iterator[None]:
        """Around the strategy's ``training_step``: the reductions inside are the ones warned about."""
        self._in_training_step = True
        try:
            yield
        finally:
            self._in_training_step = False

    def before_reduce(self, owner: str, world_size: int, algorithm: CommAlgorithm | None) -> None:
        """A reduction is about to run: warn (once) when it is inside ``training_step``, on several ranks,
        under ``owner`` (the strategy's name) whose ``algorithm`` rounds every ``period > 1`` steps."""
        if not self._in_training_step or self._warned or world_size <= 1:
            return
        period = algorithm.period if algorithm is not None else None
        if period is None or period <= 1:  # rounds every step already: one more collective changes little
            return
        self._warned = True
        rank_zero_warn(
            "A reduction ran inside `training_step` (`self.log(..., sync_dist=True)`, or `self.reduce`): "
            f"under {owner}, whose ranks synchronise only every {period} steps, it adds a "
            "collective to every step and puts every step back in lock-step across ranks, waiting for the "
            "slowest (counted in the ledger under 'lightning_reduce'). Log training metrics without "
            "`sync_dist` (each rank logs its own value; rank 0's is shown), or with `on_step=False, "
            "on_epoch=True` (one reduction per epoch)."
        )
