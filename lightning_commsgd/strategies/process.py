"""The minimal Lightning base of every lightning_commsgd strategy: processes without DDP's wrapper.

:class:`ProcessGroupStrategy` is Lightning's ``DDPStrategy`` (launchers, cluster environments, process
group) with no ``DistributedDataParallel``: no gradient all-reduce ever happens behind the user's back. It
adds what every strategy of the package needs and nothing about algorithms:

- a rendezvous bounded by ``rendezvous_timeout`` that names the ranks that never joined
  (:mod:`lightning_commsgd.rendezvous`), and a checkpoint verified before the group forms;
- a :class:`~lightning_commsgd.comm.Communicator` per Trainer stage, through which Lightning's own
  ``reduce``/``all_gather``/``barrier``/``broadcast`` go too (counted in the ledger under framework tags);
- fault handling (:class:`~lightning_commsgd.strategies.faults.FaultHandling`) and the popen launcher that
  reports a dead rank (:mod:`.launcher`);
- keyword arguments checked against every ``__init__`` of the class the user built (a misspelt name gets
  the closest valid one).

:class:`~lightning_commsgd.strategies.base.CommunicationStrategy` (protocol-driven algorithms) and the
parameter-server strategies (:mod:`lightning_commsgd.strategies.parameter_server`) are its two children.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_commsgd.adapter_support import (
    DEFAULT_SYNC_TIMEOUT,
    is_world_group,
    reduce_kind,
    rendezvous_timeout_for,
    validate_sync_timeout,
)
from lightning_commsgd.algorithms.protocol import broadcast_module_state
from lightning_commsgd.checkpoint_io import AtomicCheckpointIO, verify_checkpoint
from lightning_commsgd.comm import Communicator, destroy_process_group_at_exit
from lightning_commsgd.internals import (
    DDPWithoutWrapperHooks,
    is_popen_launcher,
    optimizers_to_device,
    process_group_backend,
    quiet_exact_resume_warning,
    remove_per_step_collectives,
    replace_launcher,
)
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.rendezvous import init_process_group
from lightning_commsgd.strategies.data_placement import TrainingData
from lightning_commsgd.strategies.faults import FaultHandling, warn_if_torchrun_restarts_share_the_store
from lightning_commsgd.strategies.launcher import ReportingScriptLauncher

__all__ = ["ProcessGroupStrategy"]


def accepted_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts: the named parameters of every ``__init__`` from ``cls`` up
    to :class:`ProcessGroupStrategy` (a subclass passes its ``**kwargs`` on to its parents), except those a
    subclass fixes itself (its ``fixed_arguments``, e.g. the parameter server's ``mode``)."""
    names: list[str] = []
    fixed = set(getattr(cls, "fixed_arguments", ()))
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not issubclass(klass, ProcessGroupStrategy):
            continue
        for param in inspect.signature(init).parameters.values():
            named = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            if named and param.name != "self" and param.name not in names and param.name not in fixed:
                names.append(param.name)
    return names


def unexpected_arguments_error(cls: type, unknown: Sequence[str]) -> TypeError:
    """A TypeError naming the strategy class, each unknown argument and the closest accepted name."""
    accepted = accepted_arguments(cls)
    guesses = {name: difflib.get_close_matches(name, accepted, n=1, cutoff=0.6) for name in unknown}
    listing = f"it accepts: {', '.join(sorted(accepted))}."
    if len(unknown) == 1:
        name, close = unknown[0], guesses[unknown[0]]
        hint = f"did you mean {close[0]!r}?" if close else listing
        return TypeError(f"{cls.__name__} got an unexpected argument {name!r}; {hint}")
    parts = [f"{n!r} (did you mean {guesses[n][0]!r}?)" if guesses[n] else repr(n) for n in unknown]
    return TypeError(f"{cls.__name__} got unexpected arguments {', '.join(parts)}; {listing}")


class _ChecksArguments(type(DDPStrategy)):  # type: ignore[misc]
    """Metaclass of the strategies: a misspelt keyword argument would travel through a subclass's ``**kwargs``
    and be reported by Python against a parent's ``__init__``; checked here, when the class is called,
    against every ``__init__`` from the class the user built up to :class:`ProcessGroupStrategy`, the error
    names that class and the closest valid name. (Not a ``**kwargs`` of ``__init__`` nor a ``__new__``:
    LightningCLI reads those signatures to build its arguments.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        unknown = [name for name in kwargs if name not in accepted_arguments(cls)]
        if unknown:
            raise unexpected_arguments_error(cls, unknown)
        return super().__call__(*args, **kwargs)


class ProcessGroupStrategy(DDPWithoutWrapperHooks, DDPStrategy, metaclass=_ChecksArguments):
    """DDP's process handling without its wrapper (see the module docstring).

    Args:
        sync_timeout: seconds any collective of the run may wait for the other ranks (default 600) before
            the job is declared failed. Set on the process group after its rendezvous and on every group the
            strategy creates. When a collective fails (a rank crashed, was killed, or is stuck longer than
            this), every rank raises a :class:`~lightning_commsgd.watchdog.RankFailureError` naming the failed
            rank and its step, and a watchdog thread ends any rank that does not stop by itself a few seconds
            later; see :mod:`lightning_commsgd.watchdog`. Choose it above the longest time one rank may
            legitimately spend while the others wait: a round over the slowest link, rank 0 writing a
            checkpoint, an uneven validation.
        rendezvous_timeout: seconds the ranks wait for each other while the process group forms (default:
            the larger of ``sync_timeout`` and 300). When a rank never joins, every rank that did raises a
            :class:`~lightning_commsgd.rendezvous.RendezvousError` naming the missing ranks after this long.
        checkpoint_io: how checkpoint files are written and read; default
            :class:`~lightning_commsgd.checkpoint_io.AtomicCheckpointIO` (atomic local saves, files verified
            before loading). A ``ckpt_path`` given to the Trainer is verified on every rank before the process
            group is created (popen launcher, also under torchrun and SLURM; with ``start_method="spawn"`` /
            ``"fork"`` it is refused when loaded).
        accelerator, parallel_devices, cluster_environment, precision_plugin, process_group_backend, timeout,
            start_method: as for Lightning's ``DDPStrategy`` (set by the Trainer from ``accelerator`` /
            ``devices`` / ``num_nodes`` when left out). ``timeout`` only bounds a process group that something
            else formed before the strategy's setup.
    """

    def __init__(
        self,
        *,
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
        self.sync_timeout = validate_sync_timeout(sync_timeout)
        self.rendezvous_timeout = rendezvous_timeout_for(self.sync_timeout, rendezvous_timeout)
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
        self.faults = FaultHandling(self.sync_timeout)
        self.data = TrainingData(None)  # the training loader's placement and resume position
        self._communicator: Communicator | None = None
        # one ledger per Trainer stage ("fit", "validate", "test", "predict"): a later test() keeps fit's
        self._ledgers: dict[str, CommLedger] = {}
        self._counting = False  # from setup to teardown: Lightning's collectives go through the communicator
        self._ckpt_path_to_verify: Any = None  # the checkpoint the Trainer will load (set by the launcher)
        self._launcher_ends_job = True  # a dead child rank ends the job (the parameter server decides itself)

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

    # -- before any process ---------------------------------------------------------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Weights are restored after setup's broadcast from rank 0, so each rank keeps its own replica.
        return True

    @override
    def check_before_launch(self) -> None:
        warn_if_torchrun_restarts_share_the_store()

    @override
    def after_launcher_configured(self) -> None:
        if is_popen_launcher(self.launcher):  # popen: report a dead child rank
            replace_launcher(
                self,
                ReportingScriptLauncher(
                    self.cluster_environment,
                    self.num_processes,
                    self.num_nodes,
                    watchdog=lambda: self.faults.watchdog,
                    end_job=self._launcher_ends_job,
                    on_ckpt_path=self._remember_ckpt_path,
                ),
            )

    def _remember_ckpt_path(self, path: Any) -> None:
        self._ckpt_path_to_verify = path

    # -- the process group --------------------------------------------------------------------------
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
        rendezvous bounded by ``rendezvous_timeout`` that names the ranks that never joined."""
        if not dist.is_available() or dist.is_initialized():
            return
        assert self.cluster_environment is not None
        self.set_world_ranks()
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address  # as Lightning's _init_dist_connection sets them
        os.environ["MASTER_PORT"] = str(env.main_port)
        init_process_group(
            process_group_backend(self),
            address=env.main_address,
            port=env.main_port,
            rank=self.global_rank,
            world_size=self.world_size,
            timeout=self.rendezvous_timeout,
            device_id=self.root_device if self.root_device.type != "cpu" else None,
        )

    # -- setup: the steps every strategy takes, with two hooks ----------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        communicator = self.start_counting(trainer)
        fitting = self.is_fitting(trainer)
        if fitting:
            # before the first collective: an optimizer the strategy cannot handle stops every rank here,
            # at the same point, instead of failing on some ranks while the others wait in a collective
            self.setup_optimizers(trainer)
            self.check_optimizers(list(self.optimizers))
        broadcast_module_state(self.model, communicator)
        self.setup_precision_plugin()
        if not fitting:
            return
        optimizers_to_device(self.optimizers, self.root_device)
        self.start_training(trainer, communicator)
        remove_per_step_collectives(trainer)
        quiet_exact_resume_warning(trainer, self.data.resumes_exactly)

    def check_optimizers(self, optimizers: list[Optimizer]) -> None:  # noqa: B027 (optional hook)
        """Raise if the strategy cannot work with ``optimizers`` (at setup, before the first collective)."""

    def start_training(self, trainer: pl.Trainer, communicator: Communicator) -> None:  # noqa: B027
        """What the strategy starts once model, optimizers and communicator are ready (fit only)."""

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        # the training loader only; validation keeps Lightning's sampler
        if trainer is None or not trainer.training or not isinstance(dataloader, DataLoader):
            return super().process_dataloader(dataloader)
        shards, shard = self.data_shard()
        return self.data.process(dataloader, shards, shard, super().process_dataloader)

    def data_shard(self) -> tuple[int, int]:
        """``(shards, shard)``: the training data is split in ``shards`` and this rank reads ``shard`` (one
        per rank; replica groups split it over their groups too)."""
        return self.world_size, self.global_rank

    def start_counting(self, trainer: pl.Trainer) -> Communicator:
        """Start this stage's failure watchdog and communicator (collective: every rank, in setup)."""
        watchdog = self.faults.start()
        stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        self._communicator = Communicator(
            device=self.root_device,
            ledger=self._ledgers.get(stage),
            timeout=self.sync_timeout,
            monitor=watchdog,
        )
        self._ledgers[stage] = self._communicator.ledger
        self._counting = True
        return self._communicator

    @staticmethod
    def is_fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    # -- failures and the end ---------------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        module = self.lightning_module
        self.faults.on_exception(exception, getattr(module, "_trainer", None) if module is not None else None)

    @override
    def teardown(self) -> None:
        # The communicator stays readable (its ledger is this stage's); collectives Lightning makes before
        # the next stage's setup are its own again, as before the first (so they do not land in this ledger).
        self._counting = False
        self.faults.stop()
        super().teardown()

    # -- Lightning's own collectives, counted ---------------------------------------------------------
    @property
    def _counted(self) -> Communicator | None:
        """The communicator Lightning's collectives go through (between setup and teardown), else ``None``."""
        return self._communicator if self._counting else None

    def before_reduce(self) -> None:  # noqa: B027 (optional hook)
        """Called before each of Lightning's reductions (``self.log(..., sync_dist=True)``, ``reduce``)."""

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        self.before_reduce()
        op = reduce_kind(reduce_op)
        comm = self._counted
        if not isinstance(tensor, Tensor) or not is_world_group(group) or op is None or comm is None:
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        return comm.all_reduce_(tensor, op, tag="lightning_reduce")

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        # The autograd-aware gather (sync_grads) and sub-groups stay Lightning's, uncounted.
        comm = self._counted
        if not is_world_group(group) or sync_grads or comm is None or not comm.is_distributed:
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
