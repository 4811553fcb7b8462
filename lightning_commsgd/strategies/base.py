"""The Lightning Trainer adapter: a strategy that drives one algorithm through the protocol.

:class:`CommunicationStrategy` takes an algorithm config (``LocalSGD(tau=8)``, ``DORE(...)``) and calls the
algorithm it builds at Lightning's hooks, in the order :mod:`lightning_commsgd.algorithms.protocol` shows,
nothing else (Trainer -> strategy hook -> algorithm -> communicator):

- ``setup``: model to device, x_0 broadcast from rank 0, optimizers created and checked, algorithm built
  (:mod:`.algorithm_run`).
- ``training_step``: ``record_batch(loss, samples)``.
- ``optimizer_step``: ``after_backward`` at the end of the user's closure for gradient-exchanging
  algorithms, the step only where ``should_step`` (:mod:`.stepping`), then ``after_optimizer_step()``.
- ``on_validation_start``/``end`` during fit, ``eval_on="consensus"``: validation sees the algorithm's
  evaluation model while replicas differ; every rank gets its own back after (:mod:`.evaluation`).
- ``on_train_end``: ``finalize()``, so the model after ``fit`` is the algorithm's output.
- checkpoints: per-rank entries (:mod:`.checkpointing`, :mod:`.rank_entry`).

Processes, counted Lightning collectives and faults are the base class's (:mod:`.process`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.adapter_support import AlgorithmSettings
from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, CommAlgorithm, World
from lightning_commsgd.comm import Communicator
from lightning_commsgd.internals import weights_only_kwargs
from lightning_commsgd.redundancy import RedundancyInfusion, as_redundancy
from lightning_commsgd.replica_check import check_replicas_equal
from lightning_commsgd.strategies.algorithm_run import AlgorithmRun
from lightning_commsgd.strategies.data_placement import TrainingData
from lightning_commsgd.strategies.evaluation import ConsensusEvaluation
from lightning_commsgd.strategies.lockstep import StepReduceWarning, refuse_sync_batchnorm
from lightning_commsgd.strategies.process import ProcessGroupStrategy
from lightning_commsgd.strategies.rank_entry import RankEntry
from lightning_commsgd.strategies.stepping import exchange_then_step, record_batch

__all__ = ["EVAL_MODES", "CommunicationStrategy", "check_strategy_class"]

EVAL_MODES = ("consensus", "local")


def check_strategy_class(strategy: object, algorithm: AlgorithmConfig) -> None:
    """Refuse ``algorithm`` under ``strategy`` when its config names another Trainer strategy it needs
    (:attr:`AlgorithmConfig.trainer_strategy`), naming that one."""
    needed = algorithm.trainer_strategy
    if needed is None:
        return
    module_name, _, class_name = needed.partition(":")
    if not isinstance(strategy, getattr(importlib.import_module(module_name), class_name)):
        raise TypeError(
            f"{type(algorithm).__name__} runs under the Trainer with {module_name}.{class_name}, not "
            f"{type(strategy).__name__}: Trainer(strategy={class_name}(...))."
        )


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
        run = AlgorithmRun(algorithm)  # raises unless `algorithm` is a config
        check_strategy_class(self, algorithm)
        check_choice(eval_on, "eval_on", EVAL_MODES)
        if not isinstance(check_replicas, bool):
            raise TypeError(f"Arg `check_replicas` must be a bool, got {check_replicas!r}.")
        super().__init__(**kwargs)
        self.algorithm_config = algorithm
        self.eval_on = eval_on
        self.check_replicas = check_replicas
        self.data = TrainingData(as_redundancy(redundancy))  # RI-SGD's placement, or Lightning's sampler
        self._run = run
        self._evaluation = ConsensusEvaluation()
        self._entry = RankEntry(self._run, self.data, self._evaluation)
        self._step_reduces = StepReduceWarning()
        self._started: CommAlgorithm | None = None  # the algorithm started by this fit, until closed

    @property
    def redundancy(self) -> RedundancyInfusion | None:
        """RI-SGD's placement, or ``None``."""
        return self.data.redundancy

    @property
    def algorithm(self) -> CommAlgorithm | None:
        """The algorithm of this fit (the protocol object), ``None`` before setup and outside fit."""
        return self._run.algorithm

    @property
    def world(self) -> World:
        return World(self.world_size, self.num_processes)

    @override
    def data_shard(self) -> tuple[int, int]:
        return self.algorithm_config.data_shard(self.world_size, self.global_rank)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        shards, shard = self.data_shard()
        return {"num_replicas": shards, "rank": shard}

    # -- before any process ---------------------------------------------------------------------------
    @override
    def check_before_launch(self) -> None:
        self.data.check_world(self.algorithm_config.data_shard(self.world_size, 0)[0])
        self.algorithm_config.check_world(self.world)
        refuse_sync_batchnorm(self)
        self._run.check_precision(getattr(self.precision_plugin, "precision", None), type(self).__name__)
        super().check_before_launch()

    # -- setup (ProcessGroupStrategy.setup calls these) ------------------------------------------------
    @override
    def check_optimizers(self, optimizers: list[Optimizer]) -> None:
        self.algorithm_config.check_optimizers(optimizers)

    @override
    def start_training(self, trainer: pl.Trainer, communicator: Communicator) -> None:
        owner = type(self).__name__
        module, optimizers = self.lightning_module, list(self.optimizers)
        algorithm = self._run.build(module, optimizers, communicator, self.world, owner)
        self.before_start(algorithm)
        algorithm.start()
        self._started = algorithm

    def before_start(self, algorithm: CommAlgorithm) -> None:  # noqa: B027 (optional hook)
        """Between the build and ``algorithm.start()`` (what a subclass registers with the algorithm)."""

    @override
    def teardown(self) -> None:
        started, self._started = self._started, None  # closed once: teardown follows every stage
        if started is not None:
            started.close()
        super().teardown()

    # -- the algorithm's hooks ----------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.faults.step = self.lightning_module.trainer.global_step
        with self._step_reduces.training_step():
            output = super().training_step(*args, **kwargs)
        if self.algorithm is not None:
            record_batch(self.algorithm, output, args[0] if args else kwargs.get("batch"))
        return output

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        algorithm = self.algorithm
        if algorithm is not None and algorithm.exchanges_gradients:
            optimizer, closure = exchange_then_step(optimizer, closure, algorithm)  # type: ignore[assignment]
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
        if self.algorithm is not None:
            self.algorithm.finalize()
            if self.check_replicas:
                self._check_replicas()

    # -- validation on the consensus model --------------------------------------------------------------
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        algorithm = self.algorithm
        fitting = self.is_fitting(self.lightning_module.trainer)
        if self.eval_on == "consensus" and fitting and algorithm is not None:
            self._evaluation.enter(self.lightning_module, algorithm)

    @override
    def on_validation_end(self) -> None:
        self._evaluation.exit(self.lightning_module)
        super().on_validation_end()

    @override
    def before_reduce(self) -> None:
        """Warn once of a reduction inside ``training_step`` (:mod:`.lockstep`)."""
        self._step_reduces.before_reduce(type(self).__name__, self.world_size, self.algorithm)

    # -- checkpoints ----------------------------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Gather every rank's entry into the checkpoint (:mod:`.rank_entry`); rank 0 writes. Must be called
        on every rank, as ``Trainer.save_checkpoint`` and ``ModelCheckpoint`` do."""
        if self._communicator is not None and self.algorithm is not None:
            progress = self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current
            self._entry.save(checkpoint, self._communicator, progress.ready)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, **weights_only_kwargs(weights_only))
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not self.is_fitting(trainer):
            return checkpoint
        return self._entry.resume(
            checkpoint, checkpoint_path, self.world_size, self.global_rank, self._communicator
        )
