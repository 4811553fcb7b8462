"""The Lightning Trainer adapter: a strategy that drives one algorithm through the protocol.

:class:`CommunicationStrategy` takes an algorithm config (``LocalSGD(tau=8)``, ``DORE(...)``; see
:mod:`lightning_commsgd.algorithms.protocol`) and calls the algorithm it builds at Lightning's hooks, nothing
else (Trainer -> strategy hook -> algorithm -> communicator):

- ``setup``: model to device, x_0 broadcast from rank 0, optimizers created and checked, algorithm built.
- ``training_step``: ``record_batch(loss, samples)``.
- ``optimizer_step``: the user's closure (with ``after_backward`` inside it for gradient-exchanging
  algorithms) and step (only where ``should_step``), then ``after_optimizer_step()``.
- ``on_validation_start``/``end`` during fit, ``eval_on="consensus"``: validation sees the algorithm's
  evaluation model (the mean of the replicas) while replicas differ; every rank gets its own back after.
- ``on_train_end``: ``finalize()``, so the model after ``fit`` is the algorithm's output.
- ``save_checkpoint``/``load_checkpoint``: per-rank entries (:mod:`.checkpointing`).

Process handling, counted Lightning collectives and faults come from
:class:`~lightning_commsgd.strategies.process.ProcessGroupStrategy`; data placement from
:class:`~lightning_commsgd.strategies.data_placement.TrainingData`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.adapter_support import AlgorithmSettings
from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.algorithms.protocol import (
    AlgorithmConfig,
    CommAlgorithm,
    World,
    float_state,
)
from lightning_commsgd.comm import Communicator
from lightning_commsgd.internals import (
    sync_batchnorm_requested,
    weights_only_kwargs,
)
from lightning_commsgd.redundancy import RedundancyInfusion, as_redundancy
from lightning_commsgd.replica_check import check_replicas_equal
from lightning_commsgd.strategies.checkpointing import RankStates
from lightning_commsgd.strategies.data_placement import TrainingData
from lightning_commsgd.strategies.process import ProcessGroupStrategy

__all__ = ["EVAL_MODES", "CommunicationStrategy"]

EVAL_MODES = ("consensus", "local")


class _DeferredStep:
    """Stands in for the optimizer inside Lightning's precision plugin for gradient-exchanging algorithms:
    ``step(closure)`` runs the closure (forward, backward, exchange), then steps the real optimizer only where
    the algorithm says this rank runs the update now. Everything else is the real optimizer's."""

    def __init__(self, optimizer: Optimizer, algorithm: CommAlgorithm) -> None:
        self._optimizer, self._algorithm = optimizer, algorithm

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        result = closure() if closure is not None else None
        if self._algorithm.should_step:
            self._optimizer.step(**kwargs)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class CommunicationStrategy(AlgorithmSettings, ProcessGroupStrategy):
    """Any protocol algorithm under the Lightning Trainer: ``CommunicationStrategy(LocalSGD(tau=8))``.

    The named strategies (``LocalSGDStrategy(tau=8)``, ...) are this class with the algorithm's arguments
    in their signature (:mod:`lightning_commsgd.named`).

    Args:
        algorithm: the algorithm's config, e.g. :class:`~lightning_commsgd.algorithms.LocalSGD`.
        eval_on: which model validation inside ``fit`` sees: ``"consensus"`` (default; the average of the
            replicas, one extra round when they differ) or ``"local"`` (each rank's own replica).
        redundancy: RI-SGD's data placement (Haddadpour et al. 2019): a
            :class:`~lightning_commsgd.redundancy.RedundancyInfusion`, or a number mu as shorthand for
            ``RedundancyInfusion(mu=mu)``; ``None`` (default) keeps Lightning's DistributedSampler.
        check_replicas: debug option: after every round that leaves the replicas equal (and after the final
            round of fit), hash each rank's parameters and gather the hashes (8 bytes per rank, tag
            ``"replica_check"``); unless they are bitwise equal, every rank raises a ``ReplicasDivergedError``
            naming the differing ranks and the step. Off by default (it hashes the whole model every round).
        **kwargs: process options of :class:`~lightning_commsgd.strategies.process.ProcessGroupStrategy`
            (``sync_timeout``, ``rendezvous_timeout``, ``checkpoint_io``, ``start_method``, ...).
    """

    #: the registry name; the named subclasses set their algorithm's
    strategy_name = "communication"

    def __init__(
        self,
        algorithm: AlgorithmConfig,
        *,
        eval_on: Literal["consensus", "local"] = "consensus",
        redundancy: RedundancyInfusion | float | None = None,
        check_replicas: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(algorithm, AlgorithmConfig):
            raise TypeError(
                "Arg `algorithm` must be an algorithm config (e.g. lightning_commsgd.LocalSGD(tau=8)), "
                f"got {type(algorithm).__name__}."
            )
        check_choice(eval_on, "eval_on", EVAL_MODES)
        if not isinstance(check_replicas, bool):
            raise TypeError(f"Arg `check_replicas` must be a bool, got {check_replicas!r}.")
        super().__init__(**kwargs)
        self.algorithm_config = algorithm
        self.eval_on = eval_on
        self.check_replicas = check_replicas
        self.data = TrainingData(as_redundancy(redundancy))  # RI-SGD's placement, or Lightning's sampler
        self._algorithm: CommAlgorithm | None = None
        self._pending_algorithm_state: tuple[dict[str, Any], bool] | None = None  # (state, resized)
        self._eval_stash: dict[str, Tensor] | None = None
        self._in_training_step = False
        self._warned_step_reduce = False

    @property
    def redundancy(self) -> RedundancyInfusion | None:
        """RI-SGD's placement, or ``None``."""
        return self.data.redundancy

    @property
    def algorithm(self) -> CommAlgorithm | None:
        """The algorithm of this fit (the protocol object), ``None`` before setup and outside fit."""
        return self._algorithm

    @property
    def world(self) -> World:
        return World(self.world_size, self.num_processes)

    # -- before any process ---------------------------------------------------------------------------
    @override
    def check_before_launch(self) -> None:
        self.data.check_world(self.world_size)
        self.algorithm_config.check_world(self.world)
        if sync_batchnorm_requested(self):
            raise ValueError(
                f"Trainer(sync_batchnorm=True) all-reduces BatchNorm statistics at every forward pass, which "
                f"{type(self).__name__} exists to avoid; BatchNorm buffers are averaged at each round "
                "instead (average_buffers=True)."
            )
        precision = getattr(self.precision_plugin, "precision", None)
        if precision == "16-mixed" and not self.algorithm_config.supports_loss_scaling:
            raise ValueError(
                f"{type(self).__name__} does not support precision='16-mixed': its GradScaler rescales the "
                "gradients every step and the residual states would absorb the scale. Use 'bf16-mixed' or "
                "'32-true'."
            )
        super().check_before_launch()

    # -- setup (ProcessGroupStrategy.setup calls these) ------------------------------------------------
    @override
    def check_optimizers(self, optimizers: list[Optimizer]) -> None:
        self.algorithm_config.check_optimizers(optimizers)

    @override
    def start_training(self, trainer: pl.Trainer, communicator: Communicator) -> None:
        self._algorithm = self.algorithm_config.build(
            self.lightning_module, list(self.optimizers), communicator, self.world
        )
        description = self.algorithm_config.describe(self.world)
        if description:
            rank_zero_info(f"{type(self).__name__}: {description}")
        if self._pending_algorithm_state is not None:
            self._algorithm.restore(*self._pending_algorithm_state)
            self._pending_algorithm_state = None
        if not communicator.is_distributed:
            rank_zero_info(
                f"{type(self).__name__}: world size 1, nothing to synchronise; no collectives will run."
            )

    # -- the algorithm's hooks ----------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.faults.step = self.lightning_module.trainer.global_step
        self._in_training_step = True  # see before_reduce
        try:
            output = super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False
        algorithm = self._algorithm
        if algorithm is not None:
            loss = output.get("loss") if isinstance(output, Mapping) else output
            batch = args[0] if args else kwargs.get("batch")
            samples = extract_batch_size(batch) if algorithm.counts_samples else None
            algorithm.record_batch(loss if isinstance(loss, Tensor) else None, samples)
        return output

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        algorithm = self._algorithm
        if algorithm is not None and algorithm.exchanges_gradients:

            def closure_then_exchange() -> Any:
                result = closure()
                algorithm.after_backward()
                return result

            deferred = _DeferredStep(optimizer, algorithm)
            output = super().optimizer_step(deferred, closure_then_exchange, model, **kwargs)  # type: ignore[arg-type]
        else:
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.faults.step = self.lightning_module.trainer.global_step + 1  # Lightning counts it on return
        if algorithm is not None:
            ran_round = algorithm.after_optimizer_step()
            if ran_round and self.check_replicas and algorithm.in_sync:
                self._check_replicas()
        return output

    def _check_replicas(self) -> None:
        """``check_replicas``: every rank's parameters bitwise equal, or every rank raises."""
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        check_replicas_equal(params, self.communicator, step=self.lightning_module.trainer.global_step)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._algorithm is not None:
            self._algorithm.finalize()
            if self.check_replicas:
                self._check_replicas()

    # -- validation on the consensus model --------------------------------------------------------------
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        algorithm = self._algorithm
        fitting = self.is_fitting(self.lightning_module.trainer)
        if self.eval_on == "consensus" and fitting and algorithm is not None and not algorithm.in_sync:
            state = float_state(self.lightning_module)
            self._eval_stash = {k: t.detach().clone() for k, t in state.items()}
            algorithm.average_for_evaluation(list(state.values()))

    @override
    def on_validation_end(self) -> None:
        if self._eval_stash is not None:
            with torch.no_grad():
                for key, tensor in float_state(self.lightning_module).items():
                    tensor.copy_(self._eval_stash[key])
            self._eval_stash = None
        super().on_validation_end()

    # -- Lightning's reductions inside training_step ------------------------------------------------------
    @override
    def before_reduce(self) -> None:
        """A reduction inside ``training_step`` (``self.log(..., sync_dist=True)``) under a local strategy:
        warn once that it puts every step back in lock-step."""
        if not self._in_training_step or self._warned_step_reduce or self.world_size <= 1:
            return
        period = self._algorithm.period if self._algorithm is not None else None
        if period is None or period <= 1:  # rounds every step already: one more collective changes little
            return
        self._warned_step_reduce = True
        rank_zero_warn(
            "A reduction ran inside `training_step` (`self.log(..., sync_dist=True)`, or `self.reduce`): "
            f"under {type(self).__name__}, whose ranks synchronise only every {period} steps, it adds a "
            "collective to every step and puts every step back in lock-step across ranks, waiting for the "
            "slowest (counted in the ledger under 'lightning_reduce'). Log training metrics without "
            "`sync_dist` (each rank logs its own value; rank 0's is shown), or with `on_step=False, "
            "on_epoch=True` (one reduction per epoch)."
        )

    # -- checkpoints ----------------------------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Gather every rank's local state into the checkpoint (see :mod:`.checkpointing`); rank 0 writes.

        Must be called on every rank, as ``Trainer.save_checkpoint`` and ``ModelCheckpoint`` do.
        """
        if self._communicator is not None and self._algorithm is not None:
            RankStates.gather(checkpoint, self._local_state(checkpoint), self._communicator)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _local_state(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        state_dict = dict(checkpoint["state_dict"])
        if self._eval_stash is not None:  # saved during consensus validation: the replica is stashed
            state_dict.update({k: v.clone() for k, v in self._eval_stash.items()})
        assert self._algorithm is not None and self._communicator is not None
        local: dict[str, Any] = {
            "state_dict": {
                k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state_dict.items()
            },
            "algorithm": self._algorithm.state_dict(),
            "ledger": self._communicator.ledger.state_dict(),
        }
        if "optimizer_states" in checkpoint:
            local["optimizer_states"] = checkpoint["optimizer_states"]
        progress = self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current
        sampler = self.data.state(progress.ready)
        if sampler is not None:
            local["sampler"] = sampler
        return local

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, **weights_only_kwargs(weights_only))
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        found = RankStates.own_entry(checkpoint, self.world_size, self.global_rank)
        if found is None or trainer is None or not self.is_fitting(trainer):
            return checkpoint
        mine, resized = found
        if resized:
            rank_zero_warn(
                f"{checkpoint_path} was written by {RankStates.saved_world_size(checkpoint)} ranks and is "
                f"resumed on {self.world_size}: every rank starts from the consensus model with rank 0's "
                "optimizer state (not the exact trajectory)."
            )
            # RI-SGD after losing workers: the survivors continue the interrupted epoch at the same batch
            # (their shard streams depend on (seed, epoch, shard) only, not on the world size).
        else:
            checkpoint = {
                **checkpoint,
                "state_dict": mine["state_dict"],
                "optimizer_states": mine["optimizer_states"],
            }
            if self._communicator is not None:
                self._communicator.ledger.load_state_dict(mine["ledger"])
        self.data.load(mine.get("sampler"))
        if self._algorithm is not None:
            self._algorithm.restore(mine["algorithm"], resized)
        else:
            self._pending_algorithm_state = (mine["algorithm"], resized)
        return checkpoint
