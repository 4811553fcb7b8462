"""The Lightning layer every lightning_commsgd strategy shares.

A :class:`CommunicationStrategy` is Lightning's ``DDPStrategy`` (launchers, cluster environments,
process group) without ``DistributedDataParallel``: no gradient all-reduce ever happens behind the
user's back. Synchronisation is handed to an *algorithm* object (pure torch, see
``lightning_commsgd.algorithms``) after every optimizer step, and every collective, Lightning's own
``reduce``/``broadcast``/``barrier`` included, goes through one :class:`~lightning_commsgd.comm.Communicator`.

Hook order (Trainer -> strategy -> algorithm -> communicator):

- ``setup``: model to device, parameters and buffers broadcast from rank 0 (x_0 is the same on every
  rank), optimizers created, algorithm built.
- ``optimizer_step``: the user's closure and step, then ``algorithm.after_optimizer_step()``.
- ``on_validation_start``/``end`` during fit, ``eval_on="consensus"``: validation runs on the average
  model, then every rank gets its own replica back (costs one round when replicas differ).
- ``on_train_end``: a final round, so the model after ``fit`` is the consensus model.
- ``on_exception``/``teardown``: a rank that fails posts why for the others; the failure watchdog stops
  (see :mod:`lightning_commsgd.watchdog` and ``sync_timeout``).
- ``save_checkpoint``/``load_checkpoint``: per-rank states, see :mod:`.checkpointing`.
"""

from __future__ import annotations

import atexit
import difflib
import gc
import inspect
import math
import os
import sys
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.checkpoint_io import AtomicCheckpointIO, verify_checkpoint
from lightning_commsgd.comm import (
    Communicator,
    destroy_process_group_at_exit,
    skip_group_destruction_at_exit,
)
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.rendezvous import init_process_group
from lightning_commsgd.replica_check import check_replicas_equal
from lightning_commsgd.resumable import resumable_loader
from lightning_commsgd.strategies.checkpointing import CHECKPOINT_FORMAT, CHECKPOINT_KEY, consensus_state_dict
from lightning_commsgd.strategies.launcher import ReportingScriptLauncher
from lightning_commsgd.strategies.lightning_patches import (
    explain_sigterm,
    quiet_exact_resume_warning,
    remove_per_step_collectives,
)
from lightning_commsgd.strategies.redundancy import RedundancyConfig
from lightning_commsgd.watchdog import FailureWatchdog, RankFailureError

__all__ = ["CommunicationStrategy", "SyncAlgorithm"]

EVAL_MODES = ("consensus", "local")
DEFAULT_SYNC_TIMEOUT = 600.0
# The least time the ranks get to find each other when the process group forms: processes start seconds
# to minutes apart (imports under load, nodes of a multi-node job), more than a collective may wait.
MIN_RENDEZVOUS_TIMEOUT = 300.0


def validate_sync_timeout(value: Any, name: str = "sync_timeout") -> float:
    """``value`` (``sync_timeout`` or ``rendezvous_timeout``) as a float of seconds in (0, inf), else a
    TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Arg `{name}` must be a number of seconds, got {value!r}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Arg `{name}` must be a finite number of seconds > 0, got {value!r}.")
    return float(value)


def _accepted_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts: the named parameters of every ``__init__`` from ``cls`` up
    to :class:`CommunicationStrategy` (a subclass passes its ``**kwargs`` on to its parents)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not issubclass(klass, CommunicationStrategy):
            continue
        for param in inspect.signature(init).parameters.values():
            named = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            if named and param.name != "self" and param.name not in names:
                names.append(param.name)
    return names


def unexpected_arguments_error(cls: type, unknown: Sequence[str]) -> TypeError:
    """A TypeError naming the strategy class, each unknown argument and the closest accepted name."""
    accepted = _accepted_arguments(cls)
    guesses = {name: difflib.get_close_matches(name, accepted, n=1, cutoff=0.6) for name in unknown}
    listing = f"it accepts: {', '.join(sorted(accepted))}."
    if len(unknown) == 1:
        name, close = unknown[0], guesses[unknown[0]]
        hint = f"did you mean {close[0]!r}?" if close else listing
        return TypeError(f"{cls.__name__} got an unexpected argument {name!r}; {hint}")
    parts = [f"{n!r} (did you mean {guesses[n][0]!r}?)" if guesses[n] else repr(n) for n in unknown]
    return TypeError(f"{cls.__name__} got unexpected arguments {', '.join(parts)}; {listing}")


_heap_freeze_registered = False


def _freeze_heap_at_exit() -> None:
    """A failed rank ends sooner: at exit, ``gc.freeze()`` keeps the interpreter's final garbage collections
    off the heap built by torch and Lightning, the bulk of its shutdown time (measured on 2 loaded cores:
    2.6 - 4.5 s from the last exit handler to the process's end, 0.8 s frozen). The other ranks, blocked in
    a collective with this one, fail as soon as its connections close, so the whole job ends about that
    much sooner. Objects still alive are freed as usual; only cyclic garbage is left to the operating
    system, whose finalizers Python never promises to run at exit anyway. Registered once, on failure."""
    global _heap_freeze_registered
    if not _heap_freeze_registered:
        atexit.register(gc.freeze)
        _heap_freeze_registered = True


def _reduce_kind(reduce_op: Any) -> str | None:
    """Lightning's reduce_op (a string or a ``ReduceOp``) as a Communicator op name, ``None`` if unknown."""
    named = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
    if isinstance(reduce_op, str):
        return named.get(reduce_op.lower())
    ops = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}
    return next((name for op, name in ops.items() if reduce_op == op), None)


def _is_world(group: Any) -> bool:
    """Lightning passes the default group as ``None`` or as ``dist.group.WORLD``."""
    return group is None or group is dist.group.WORLD


def _warn_if_torchrun_restarts_share_the_store() -> None:
    """torchrun (torch >= 2.5) shares its rendezvous store with the workers' process group, and a restarted
    attempt can read the failed attempt's addresses from it and fail to connect (pytorch#135712; seen
    here with torch 2.13 and gloo). Its own switch turns the sharing off."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        rank_zero_warn(
            "torchrun --max-restarts > 0 with the rendezvous store shared by the workers: a restarted "
            "attempt can connect to the failed attempt's addresses and fail (pytorch#135712). Set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment."
        )


class SyncAlgorithm(Protocol):
    """What a strategy needs from an algorithm object."""

    consensus_every: int | None
    last_consensus: tuple[int, float] | None

    @property
    def in_sync(self) -> bool: ...  # no local step since the latest round: all replicas equal

    def after_optimizer_step(self) -> bool: ...

    def record_loss(self, loss: Any) -> None: ...  # a training loss of the coming step (schedules)

    def finalize(self) -> None: ...  # bring every replica to the consensus model

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _ChecksArguments(type(DDPStrategy)):  # type: ignore[misc]
    """Metaclass of the strategies: a misspelt keyword argument would travel through a subclass's ``**kwargs``
    and be reported by Python against ``CommunicationStrategy.__init__``; checked here, when the class is
    called, against every ``__init__`` from the class the user built up to :class:`CommunicationStrategy`,
    the error names that class and the closest valid name. (Not a ``**kwargs`` of ``__init__`` nor a
    ``__new__``: LightningCLI reads those signatures to build its arguments.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        unknown = [name for name in kwargs if name not in _accepted_arguments(cls)]
        if unknown:
            raise unexpected_arguments_error(cls, unknown)
        return super().__call__(*args, **kwargs)


class CommunicationStrategy(DDPStrategy, metaclass=_ChecksArguments):
    """Base of all lightning_commsgd strategies: DDP's process handling, the package's synchronisation.

    Args:
        eval_on: which model validation inside ``fit`` sees: ``"consensus"`` (default; the average of
            the replicas, one extra round when they differ) or ``"local"`` (each rank's own replica).
        redundancy: RI-SGD's mu (Haddadpour et al. 2019): each worker also holds this fraction of the whole
            dataset from its neighbours' shards, mu in [0, 1 - 1/p]. Placement rule: when any RI-SGD option
            (this one -- ``0.0`` included --, ``sampling``, ``batch_sizes``, ``original_world_size``,
            ``failed_workers``) is given, the training data lives in fixed strided shards, the same for
            every mu; only when none is (default) Lightning's DistributedSampler stays. See
            :mod:`lightning_commsgd.samplers`.
        sampling: ``"stratified"`` (the reference and the default once RI-SGD is on: per batch, the
            DataLoader's batch_size b from each held shard, so a worker's batch grows to about b (1 + mu p))
            or ``"union"`` (the held samples shuffled together, batches of b).
        original_world_size: p of the data placement when resuming with fewer workers (data locality).
        failed_workers: original ids of the lost workers; rank r is the r-th survivor.
        min_coverage: refuse to start when less of the dataset is still held by a survivor.
        check_replicas: debug option: after every round that leaves the replicas equal (and after the
            final round of fit), hash each rank's parameters and gather the hashes (8 bytes per rank, tag
            ``"replica_check"``); unless they are bitwise equal, every rank raises a
            ``ReplicasDivergedError`` (:mod:`lightning_commsgd.replica_check`) naming the differing ranks
            and the step.
            Off by default (it hashes the whole model at every round).
        sync_timeout: seconds any collective of the run may wait for the other ranks (default 600) before
            the job is declared failed. Set on the process group after its rendezvous (bounded by
            ``rendezvous_timeout``) and on every group the strategy creates. When a collective fails
            (a rank crashed, was killed, or is stuck longer than this), every rank raises a
            :class:`~lightning_commsgd.watchdog.RankFailureError` naming the failed rank and its step, and a
            watchdog thread ends any rank that does not stop by itself (a stuck one) a few seconds later,
            so that no process is left behind; see :mod:`lightning_commsgd.watchdog`. Choose it above the
            longest time one rank may legitimately spend while the others wait: a round over the slowest
            link, rank 0 writing a checkpoint, an uneven validation.
        rendezvous_timeout: seconds the ranks wait for each other while the process group forms (default:
            the larger of ``sync_timeout`` and 300). When a rank never joins (its process failed at import,
            its node never started), every rank that did raises a
            :class:`~lightning_commsgd.rendezvous.RendezvousError` naming the missing ranks after this long,
            instead of waiting torch's 30 minutes; see :mod:`lightning_commsgd.rendezvous`. Keep it above
            the time the ranks' processes may start apart (imports on a loaded machine take seconds, the
            nodes of a multi-node job may start minutes apart).
        batch_sizes: heterogeneous mini-batches: one b per rank (``batch_sizes[rank]`` replaces the training
            DataLoader's batch_size on that rank; every rank still takes the same number of batches per
            epoch, see :class:`~lightning_commsgd.samplers.RedundantBatchSampler`). Pair it with
            ``LocalSGDStrategy(weights="samples")`` to weight each replica by its samples at a round.
        checkpoint_io: how checkpoint files are written and read; default
            :class:`~lightning_commsgd.checkpoint_io.AtomicCheckpointIO` (atomic local saves, files verified
            before loading). A ``ckpt_path`` given to the Trainer is verified on every rank before the process
            group is created, whatever the checkpoint_io (popen launcher, which Lightning also uses under
            torchrun and SLURM; with ``start_method="spawn"``/``"fork"`` it is refused when loaded).
        accelerator, parallel_devices, cluster_environment, precision_plugin,
        process_group_backend, timeout, start_method: as for Lightning's ``DDPStrategy`` (set by the
            Trainer from ``accelerator``/``devices``/``num_nodes`` when left out). ``timeout`` only bounds
            a process group that something else formed before the strategy's setup; the strategy's own
            rendezvous uses ``rendezvous_timeout`` and its collectives ``sync_timeout``.
    """

    def __init__(
        self,
        *,
        eval_on: Literal["consensus", "local"] = "consensus",
        redundancy: float | None = None,
        sampling: Literal["stratified", "union"] | None = None,
        original_world_size: int | None = None,
        failed_workers: Sequence[int] = (),
        min_coverage: float = 1.0,
        batch_sizes: Sequence[int] | None = None,
        check_replicas: bool = False,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        rendezvous_timeout: float | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        check_choice(eval_on, "eval_on", EVAL_MODES)
        if not isinstance(check_replicas, bool):
            raise TypeError(f"Arg `check_replicas` must be a bool, got {check_replicas!r}.")
        self.sync_timeout = validate_sync_timeout(sync_timeout)
        self.rendezvous_timeout = (
            max(self.sync_timeout, MIN_RENDEZVOUS_TIMEOUT)
            if rendezvous_timeout is None
            else validate_sync_timeout(rendezvous_timeout, "rendezvous_timeout")
        )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.eval_on = eval_on
        self.check_replicas = check_replicas
        self.redundancy = RedundancyConfig(
            redundancy,
            sampling,
            original_world_size,
            tuple(failed_workers),
            min_coverage,
            None if batch_sizes is None else list(batch_sizes),
        )
        self._communicator: Communicator | None = None
        # one ledger per Trainer stage ("fit", "validate", "test", "predict"): a later test() keeps fit's
        self._ledgers: dict[str, CommLedger] = {}
        self._counting = False  # from setup to teardown: Lightning's collectives go through the communicator
        self._in_training_step = False
        self._warned_step_reduce = False
        self._algorithm: SyncAlgorithm | None = None
        self._pending_algorithm_state: dict[str, Any] | None = None
        self._eval_stash: dict[str, Tensor] | None = None
        # the training loader's batch sampler, RI-SGD's or a ResumableBatchSampler: its epoch position is
        # checkpointed, so a resumed run continues at the next batch
        self._train_batches: Any = None
        self._pending_sampler_state: dict[str, Any] | None = None
        self._sampler_state_restored = False  # the checkpoint's loader position was applied (exact resume)
        self._watchdog: FailureWatchdog | None = None
        self._ckpt_path_to_verify: Any = None  # the checkpoint the Trainer will load (set by the launcher)

    # -- what subclasses provide --------------------------------------------------------------------
    def check_optimizers(self, optimizers: list[Optimizer]) -> None:  # noqa: B027 (optional hook)
        """Raise if the algorithm cannot work with ``optimizers`` (called at setup, after the user's
        ``configure_optimizers`` and before the first collective). The base accepts any optimizer."""

    @abstractmethod
    def build_algorithm(self, module: Module, optimizers: list[Optimizer], communicator: Communicator) -> Any:
        """Create the algorithm object (a :class:`SyncAlgorithm`) for this run."""

    # -- public accessors ---------------------------------------------------------------------------
    @property
    def communicator(self) -> Communicator:
        """This rank's communicator (its ``ledger`` counts bytes and rounds); available after setup."""
        if self._communicator is None:
            raise RuntimeError(
                f"{type(self).__name__}.communicator exists once the Trainer has set up the strategy."
            )
        return self._communicator

    @property
    def ledgers(self) -> Mapping[str, CommLedger]:
        """This rank's ledger of each Trainer stage run so far, by ``trainer.state.fn``: ``"fit"``,
        ``"validate"``, ``"test"``, ``"predict"``. Each stage counts into its own (a second call of the same
        stage continues it), so ``trainer.test()`` after ``fit`` leaves fit's figures as they were;
        :attr:`communicator` records into the latest stage's."""
        return dict(self._ledgers)

    @property
    def algorithm(self) -> SyncAlgorithm | None:
        """The algorithm object while fitting, ``None`` before setup and in evaluation-only runs."""
        return self._algorithm

    # -- no DistributedDataParallel ---------------------------------------------------------------------
    @override
    def _setup_model(self, model: Module) -> Module:  # type: ignore[override]
        return model

    @override
    def _register_ddp_hooks(self) -> None:
        return None

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Weights are restored after setup's broadcast from rank 0, so each rank keeps its own replica.
        return True

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        # the training loader only; validation keeps Lightning's sampler
        training = trainer is not None and trainer.training and isinstance(dataloader, DataLoader)
        if training and self.redundancy.active:
            loader = self.redundancy.dataloader(dataloader, self.world_size, self.global_rank)  # type: ignore[arg-type]
        else:
            loader = super().process_dataloader(dataloader)
            if training:  # resumes mid-epoch at the next batch (see lightning_commsgd.resumable)
                loader = resumable_loader(loader) or loader  # type: ignore[arg-type]
        batches = getattr(loader, "batch_sampler", None)
        if training and callable(getattr(batches, "load_state_dict", None)):
            self._train_batches = batches
            self._sampler_state_restored = self._pending_sampler_state is not None
            if self._pending_sampler_state is not None:
                batches.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return loader

    def _resumes_exactly(self, loaders: Sequence[Any]) -> bool:
        """The training loaders continue where the checkpoint stopped: one loader, whose batch sampler took
        the position saved in this rank's checkpoint entry (see :meth:`process_dataloader`)."""
        return (
            self._sampler_state_restored
            and len(loaders) == 1
            and getattr(loaders[0], "batch_sampler", None) is self._train_batches
        )

    @override
    def _configure_launcher(self) -> None:
        # The Trainer calls this while it is constructed, after applying its flags and before any
        # process or process group exists: the place to refuse flags that contradict the strategy.
        self.redundancy.check_world(self.world_size)
        if self._layer_sync is not None:
            raise ValueError(
                f"Trainer(sync_batchnorm=True) all-reduces BatchNorm statistics at every forward pass, which "
                f"{type(self).__name__} exists to avoid; BatchNorm buffers are averaged at each round "
                "instead (average_buffers=True)."
            )
        _warn_if_torchrun_restarts_share_the_store()
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:  # popen: report a dead child rank
            self._launcher = ReportingScriptLauncher(
                self.cluster_environment,
                self.num_processes,
                self.num_nodes,
                watchdog=lambda: self._watchdog,
                on_ckpt_path=self._remember_ckpt_path,
            )

    def _remember_ckpt_path(self, path: Any) -> None:
        self._ckpt_path_to_verify = path

    @override
    def setup_distributed(self) -> None:
        # A damaged checkpoint is refused by every rank before the process group exists (the popen
        # launcher, used by Lightning's own, torchrun and SLURM runs, tells the path); spawn/fork runs
        # refuse it when it is loaded.
        path = self._ckpt_path_to_verify
        if path is not None and "://" not in str(path):
            verify_checkpoint(path)
        self._form_process_group()  # Lightning's own _init_dist_connection then finds the group formed
        super().setup_distributed()
        destroy_process_group_at_exit()

    def _form_process_group(self) -> None:
        """The default process group, as Lightning's ``DDPStrategy.setup_distributed`` forms it, but with a
        rendezvous bounded by ``rendezvous_timeout`` that names the ranks that never joined (see
        :mod:`lightning_commsgd.rendezvous`)."""
        if not dist.is_available() or dist.is_initialized():
            return
        assert self.cluster_environment is not None
        self.set_world_ranks()
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address  # as Lightning's _init_dist_connection sets them
        os.environ["MASTER_PORT"] = str(env.main_port)
        init_process_group(
            self._get_process_group_backend(),
            address=env.main_address,
            port=env.main_port,
            rank=self.global_rank,
            world_size=self.world_size,
            timeout=self.rendezvous_timeout,
            device_id=self.root_device if self.root_device.type != "cpu" else None,
        )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._watchdog = FailureWatchdog.for_process_group(store_grace=self.sync_timeout)
            self._watchdog.start()
        stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        self._communicator = Communicator(
            device=self.root_device,
            ledger=self._ledgers.get(stage),
            timeout=self.sync_timeout,
            monitor=self._watchdog,
        )
        self._ledgers[stage] = self._communicator.ledger
        self._counting = True
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            # before the first collective: an optimizer the algorithm cannot handle stops every rank here,
            # at the same point, instead of failing on some ranks while the others wait in a collective
            self.setup_optimizers(trainer)
            self.check_optimizers(list(self.optimizers))
        self._broadcast_module_state()
        self.setup_precision_plugin()
        if not fitting:
            return
        _optimizers_to_device(self.optimizers, self.root_device)
        self._algorithm = self.build_algorithm(
            self.lightning_module, list(self.optimizers), self._communicator
        )
        if self._pending_algorithm_state is not None:
            self._algorithm.load_state_dict(self._pending_algorithm_state)
            self._pending_algorithm_state = None
        remove_per_step_collectives(trainer)
        quiet_exact_resume_warning(trainer, self._resumes_exactly)
        if not self._communicator.is_distributed:
            rank_zero_info(
                f"{type(self).__name__}: world size 1, nothing to synchronise; no collectives will run."
            )

    def _float_state(self) -> dict[str, Tensor]:
        """The module's floating-point parameters and buffers by state-dict key (integer buffers such
        as ``num_batches_tracked`` are equal on all ranks and stay out)."""
        assert self.model is not None
        return {k: t for k, t in self.model.state_dict(keep_vars=True).items() if torch.is_floating_point(t)}

    def _broadcast_module_state(self) -> None:
        """x_0 identical everywhere: without DDP's constructor nobody else broadcasts it."""
        tensors = list(self._float_state().values())
        if not tensors or not self.communicator.is_distributed:
            return
        flat = FlatBuffer(tensors)
        self.communicator.broadcast_(flat.pack(tensors), src=0, tag="setup_broadcast")
        flat.unpack(tensors)

    # -- the algorithm's hooks ----------------------------------------------------------------------
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._watchdog is not None:  # Lightning counts this step once optimizer_step returns
            self._watchdog.step = self.lightning_module.trainer.global_step + 1
        if self._algorithm is not None:
            ran_round = self._algorithm.after_optimizer_step()
            if ran_round and self.check_replicas and self._algorithm.in_sync:
                self._check_replicas()
        return output

    def _check_replicas(self) -> None:
        """``check_replicas``: every rank's parameters bitwise equal, or every rank raises."""
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        step = self.lightning_module.trainer.global_step
        check_replicas_equal(params, self.communicator, step=step)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._watchdog is not None:
            self._watchdog.step = self.lightning_module.trainer.global_step
        self._in_training_step = True  # see _warn_per_step_reduce
        try:
            output = super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False
        if self._algorithm is not None:
            loss = output.get("loss") if isinstance(output, Mapping) else output
            self._algorithm.record_loss(loss if isinstance(loss, Tensor) else None)
        return output

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._algorithm is not None:
            self._algorithm.finalize()
            if self.check_replicas:
                self._check_replicas()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        skip_group_destruction_at_exit()
        _freeze_heap_at_exit()
        watchdog = self._watchdog
        trainer = getattr(self.lightning_module, "_trainer", None)
        if isinstance(exception, SIGTERMException) and trainer is not None:
            # Lightning raises it bare: say which rank got which signal, at which step (see lightning_patches)
            message = explain_sigterm(exception, trainer)
            print(f"[lightning_commsgd] SIGTERMException: {message}", file=sys.stderr, flush=True)
            if watchdog is not None:
                watchdog.abort(message)
        elif watchdog is not None and not isinstance(exception, RankFailureError):
            # This rank failed by itself: tell the others why, before its process ends.
            what = f"{type(exception).__name__}: {exception}".strip().splitlines()[0]
            watchdog.abort(f"rank {watchdog.rank} failed at step {watchdog.step}: {what}")

    @override
    def teardown(self) -> None:
        # The communicator stays readable (its ledger is this stage's); collectives Lightning makes before
        # the next stage's setup are its own again, as before the first (so they do not land in this ledger).
        self._counting = False
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        super().teardown()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer
        if (
            self.eval_on == "consensus"
            and trainer.state.fn == TrainerFn.FITTING
            and self._algorithm is not None
            and not self._algorithm.in_sync
        ):
            self._load_consensus_for_eval()

    @override
    def on_validation_end(self) -> None:
        if self._eval_stash is not None:
            self._restore_local_after_eval()
        super().on_validation_end()

    def _load_consensus_for_eval(self) -> None:
        state = self._float_state()
        self._eval_stash = {k: t.detach().clone() for k, t in state.items()}
        tensors = list(state.values())
        flat = FlatBuffer(tensors)
        self.communicator.all_reduce_(flat.pack(tensors), "mean", tag="eval_consensus")
        flat.unpack(tensors)

    def _restore_local_after_eval(self) -> None:
        assert self._eval_stash is not None
        with torch.no_grad():
            for key, tensor in self._float_state().items():
                tensor.copy_(self._eval_stash[key])
        self._eval_stash = None

    # -- Lightning's own collectives, counted ---------------------------------------------------------
    @property
    def _counted(self) -> Communicator | None:
        """The communicator Lightning's collectives go through (between setup and teardown), else ``None``."""
        return self._communicator if self._counting else None

    def _rounds_every_step(self) -> bool:
        """Whether the algorithm already synchronises every optimizer step (tau = 1, or no period at all, as
        for the compressed-gradient strategies): then one more collective per step changes little."""
        tau = getattr(self._algorithm, "tau", None)
        return tau is None or tau <= 1

    def _warn_per_step_reduce(self) -> None:
        """A reduction inside ``training_step`` (``self.log(..., sync_dist=True)``) under a local strategy:
        warn once that it puts every step back in lock-step."""
        if self._warned_step_reduce or self.world_size <= 1 or self._rounds_every_step():
            return
        self._warned_step_reduce = True
        tau = getattr(self._algorithm, "tau", None)
        rank_zero_warn(
            "A reduction ran inside `training_step` (`self.log(..., sync_dist=True)`, or `self.reduce`): "
            f"under {type(self).__name__}, whose ranks synchronise only every {tau} steps, it adds a "
            "collective to every step and puts every step back in lock-step across ranks, waiting for the "
            "slowest (counted in the ledger under 'lightning_reduce'). Log training metrics without "
            "`sync_dist` (each rank logs its own value; rank 0's is shown), or with `on_step=False, "
            "on_epoch=True` (one reduction per epoch)."
        )

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        if self._in_training_step:
            self._warn_per_step_reduce()
        op = _reduce_kind(reduce_op)
        comm = self._counted
        if not isinstance(tensor, Tensor) or not _is_world(group) or op is None or comm is None:
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        return comm.all_reduce_(tensor, op, tag="lightning_reduce")

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        # The autograd-aware gather (sync_grads) and sub-groups stay Lightning's, uncounted.
        comm = self._counted
        if not _is_world(group) or sync_grads or comm is None or not comm.is_distributed:
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)
        return torch.stack(comm.all_gather(tensor, tag="lightning_all_gather"))

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        comm = self._counted
        if comm is None:
            return super().barrier(*args, **kwargs)
        comm.barrier(tag="lightning_barrier")

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        comm = self._counted
        if comm is None:
            return super().broadcast(obj, src)
        return comm.broadcast_object(obj, src, tag="lightning_broadcast")

    # -- checkpoints ----------------------------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Gather every rank's local state into the checkpoint (see :mod:`.checkpointing`); rank 0 writes.

        Must be called on every rank, as ``Trainer.save_checkpoint`` and ``ModelCheckpoint`` do.
        """
        if self._communicator is not None and self._algorithm is not None:
            local = self._local_state(checkpoint)
            gathered = self._communicator.gather_object(local, dst=0, tag="checkpoint")
            if gathered is not None:
                checkpoint["state_dict"] = consensus_state_dict([g["state_dict"] for g in gathered])
                if "optimizer_states" in checkpoint:
                    checkpoint[CHECKPOINT_KEY] = {
                        "format": CHECKPOINT_FORMAT,
                        "world_size": len(gathered),
                        "ranks": gathered,
                    }
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
        if self._train_batches is not None:
            # Batches the loop consumed in this epoch: the fetcher reads ahead, so the sampler's own
            # position can be one batch further than what training has seen.
            progress = self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current
            local["sampler"] = {"epoch": self._train_batches.epoch, "position": progress.ready}
        return local

    def _resized_algorithm_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's algorithm state, adapted for a resume on a different world size."""
        state["last_round_step"] = state["step"]  # replicas are equal again
        state["last_global_step"] = state["step"]
        state.pop("samples_since_round", None)
        return state

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        extra = checkpoint.get(CHECKPOINT_KEY)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if extra is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        ranks = extra["ranks"]
        if len(ranks) == self.world_size:
            mine = ranks[self.global_rank]
            checkpoint = {
                **checkpoint,
                "state_dict": mine["state_dict"],
                "optimizer_states": mine["optimizer_states"],
            }
            if self._communicator is not None:
                self._communicator.ledger.load_state_dict(mine["ledger"])
            algorithm_state = dict(mine["algorithm"])
            self._pending_sampler_state = mine.get("sampler")
        else:
            rank_zero_warn(
                f"{checkpoint_path} was written by {len(ranks)} ranks and is resumed on {self.world_size}: "
                "every rank starts from the consensus model with rank 0's optimizer state (not the exact "
                "trajectory)."
            )
            algorithm_state = self._resized_algorithm_state(dict(ranks[0]["algorithm"]))
            # RI-SGD after losing workers: the survivors continue the interrupted epoch at the same batch
            # (their shard streams depend on (seed, epoch, shard) only, not on the world size).
            self._pending_sampler_state = ranks[0].get("sampler")
        if self._algorithm is not None:
            self._algorithm.load_state_dict(algorithm_state)
        else:
            self._pending_algorithm_state = algorithm_state
        return checkpoint
