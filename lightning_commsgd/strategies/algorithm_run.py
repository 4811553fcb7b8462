"""The algorithm of one fit: its config checked (type, precision), built at setup, its checkpointed state
restored now or at the build.

Lightning restores a checkpoint after setup (``restore_checkpoint_after_setup``), when the algorithm exists;
a checkpoint loaded before the algorithm is built keeps the algorithm's state for :meth:`AlgorithmRun.build`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn import Module
from torch.optim import Optimizer

from lightning_commsgd.algorithms.protocol import AlgorithmConfig, CommAlgorithm, World
from lightning_commsgd.comm import Communicator

__all__ = ["AlgorithmRun"]


class AlgorithmRun:
    """The protocol object a strategy drives (``None`` before the build), and the state waiting for it.

    Args:
        config: the algorithm's config, e.g. :class:`~lightning_commsgd.algorithms.LocalSGD`.
    """

    def __init__(self, config: AlgorithmConfig) -> None:
        if not isinstance(config, AlgorithmConfig):
            raise TypeError(
                "Arg `algorithm` must be an algorithm config (e.g. lightning_commsgd.LocalSGD(tau=8)), "
                f"got {type(config).__name__}."
            )
        self.config = config
        self.algorithm: CommAlgorithm | None = None
        self._pending: tuple[dict[str, Any], bool] | None = None  # (state, resized)

    def check_precision(self, precision: str | None, owner: str) -> None:
        """Before launch: refuse ``precision="16-mixed"`` for ``owner`` (the strategy's name) where the
        algorithm cannot take loss scaling."""
        if precision == "16-mixed" and not self.config.supports_loss_scaling:
            raise ValueError(
                f"{owner} does not support precision='16-mixed': its GradScaler rescales the "
                "gradients every step and the residual states would absorb the scale. Use 'bf16-mixed' or "
                "'32-true'."
            )

    def build(
        self,
        module: Module,
        optimizers: list[Optimizer],
        communicator: Communicator,
        world: World,
        owner: str,
    ) -> CommAlgorithm:
        """Build the algorithm (every rank), describe it under ``owner``'s name (rank 0), and restore the
        state of a checkpoint loaded before."""
        algorithm = self.algorithm = self.config.build(module, optimizers, communicator, world)
        description = self.config.describe(world)
        if description:
            rank_zero_info(f"{owner}: {description}")
        if self._pending is not None:
            algorithm.restore(*self._pending)
            self._pending = None
        if not communicator.is_distributed:
            rank_zero_info(f"{owner}: world size 1, nothing to synchronise; no collectives will run.")
        return algorithm

    def restore(self, state: dict[str, Any], resized: bool) -> None:
        """The algorithm's state from a checkpoint (``resized``: written by another world size), restored now
        or at :meth:`build`."""
        if self.algorithm is not None:
            self.algorithm.restore(state, resized)
        else:
            self._pending = (state, resized)
