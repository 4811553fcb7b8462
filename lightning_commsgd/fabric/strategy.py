"""The Lightning Fabric adapter: a Fabric strategy that drives one algorithm through the protocol.

:class:`CommunicationStrategy` is Fabric's ``DDPStrategy`` (launchers, cluster environments, process
group) without ``DistributedDataParallel``: no gradient all-reduce ever happens behind the user's back.
It calls the algorithm (:mod:`lightning_commsgd.algorithms.protocol`) at Fabric's hooks, nothing else
(Fabric -> strategy hook -> algorithm -> communicator)::

    Fabric(strategy=...)         check_before_launch: check_world(World), fp16 loss scaling refused where
                                 the algorithm cannot take it (before any process exists)
    fabric.launch()              setup_environment: the process group (rendezvous bounded by
                                 rendezvous_timeout), the failure watchdog, one Communicator
    fabric.setup(model, opt)     setup_module_and_optimizers: check_optimizers, x_0 broadcast from rank 0
                                 (tag setup_broadcast), build; the module is returned unwrapped
                                 (fabric.setup_module + fabric.setup_optimizers: broadcast at setup_module,
                                 check at setup_optimizer, build at the first backward)
    fabric.backward(loss)        backward: record_batch(loss, samples); backward; gradient-exchanging
                                 algorithms: after_backward() (not inside fabric.no_backward_sync)
    optimizer.step()             optimizer_step: the step (only where should_step), after_optimizer_step()
    fabric.save / fabric.load    save_checkpoint / load_checkpoint: per-rank entries (see below)
    fabric.strategy.finalize()   the algorithm's finalize(): every replica holds the output model

Fabric has no end-of-training hook: call ``fabric.strategy.finalize()`` on every rank when training ends.
Evaluate the consensus model during training with ``with fabric.strategy.consensus_model(): ...``.

Trainer-only (not here): RI-SGD's data placement (``redundancy``; Fabric users build their loaders, and
``fabric.setup_dataloaders`` gets the plain DistributedSampler arguments), ``eval_on`` (use
``consensus_model()``), ``check_replicas``, and the parameter-server strategies. Fabric reports no exception
to its strategy, so a rank that fails in the user's code does not post the job's abort notice: the other
ranks' next collective fails and the failure watchdog names the rank whose heartbeat stopped.

Checkpoints. ``fabric.save(path, state)`` gathers every rank's local state to rank 0 (one object gather,
tag ``checkpoint``), which writes one file::

    {
        "model": {...},        # every nn.Module entry of ``state``: the consensus (mean over ranks)
        "optimizer": {...},    # every other entry: rank 0's
        ...,
        "lightning_commsgd": {"format": 1, "world_size": p, "ranks": [  # one entry per rank, in rank order
            {"state": {"model": ..., "optimizer": ..., ...}, "algorithm": {...}, "ledger": {...}},
        ]},
    }

``fabric.load(path, state)`` gives each rank its own entry back when the world size is the same (the run
continues bitwise as if uninterrupted), else every rank starts from the top level (the consensus model,
rank 0's other entries) with ``load_resized_state_dict`` of rank 0's algorithm state. A plain Fabric run
(any strategy) can load the same file: its top level is an ordinary Fabric checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.adapter_support import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEY,
    DEFAULT_SYNC_TIMEOUT,
    AlgorithmSettings,
    consensus_state_dict,
    is_world_group,
    reduce_kind,
    rendezvous_timeout_for,
    validate_sync_timeout,
)
from lightning_commsgd.algorithms.protocol import (
    AlgorithmConfig,
    CommAlgorithm,
    World,
    broadcast_module_state,
    float_state,
)
from lightning_commsgd.checkpoint_io import AtomicCheckpointIO
from lightning_commsgd.comm import Communicator, destroy_process_group_at_exit
from lightning_commsgd.internals import FabricDDPHooks, replace_backward_sync_control, weights_only_kwargs
from lightning_commsgd.rendezvous import init_process_group
from lightning_commsgd.watchdog import FailureWatchdog

__all__ = ["CommunicationStrategy"]

_NO_SCHEDULER: Any = object()  # setup_module_and_optimizers called without one (Lightning < 2.6)


def _is_stateful(obj: Any) -> bool:
    """A user object Fabric saves through its own ``state_dict`` / ``load_state_dict``."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class _ExchangeControl:
    """What ``fabric.no_backward_sync(model, enabled)`` does under the strategy: while enabled, backward
    passes do not exchange gradients (gradient accumulation), as DDP skips its all-reduce. Periodic
    algorithms exchange nothing in backward anyway."""

    def __init__(self, strategy: CommunicationStrategy) -> None:
        self._strategy = strategy

    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        if not enabled:
            return nullcontext()
        return self._strategy._accumulating_context()


class CommunicationStrategy(AlgorithmSettings, FabricDDPHooks, DDPStrategy):
    """Any protocol algorithm under Lightning Fabric: ``Fabric(strategy=CommunicationStrategy(LocalSGD(8)))``.

    The named strategies (``LocalSGDStrategy(tau=8)``, ...) are this class with the algorithm's arguments in
    their signature (:mod:`lightning_commsgd.named`); every registry name works as ``Fabric(strategy=name)``.
    The module is not wrapped: ``fabric.setup`` returns Fabric's wrapper around the module itself.

    The training loop is Fabric's, with one addition, ``fabric.strategy.finalize()`` at the end::

        fabric = Fabric(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(tau=8))
        fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)
        for x, y in loader:
            optimizer.zero_grad()
            fabric.backward(loss_fn(model(x), y))   # samples=len(x) with replica_weights="samples"
            optimizer.step()
        fabric.strategy.finalize()                  # every rank now holds the algorithm's output model

    Gradient accumulation: ``with fabric.no_backward_sync(model, enabled=accumulating): fabric.backward(...)``
    (needed by the gradient-exchanging algorithms, DORE/DIANA/compressed SGD, which exchange at the end of
    the backward pass outside that context; with several backward passes per step and no context they
    raise). ``fabric.clip_gradients`` between backward and step then clips the exchanged gradient.

    Args:
        algorithm: the algorithm's config, e.g. :class:`~lightning_commsgd.algorithms.LocalSGD`.
        sync_timeout: seconds any collective of the run may wait for the other ranks (default 600) before the
            job is declared failed: every rank raises a
            :class:`~lightning_commsgd.watchdog.RankFailureError` naming the failed rank and its step. Choose
            it above the longest time one rank may legitimately spend while the others wait (a round over the
            slowest link, rank 0 writing a checkpoint, an uneven evaluation).
        rendezvous_timeout: seconds the ranks wait for each other while the process group forms (default: the
            larger of ``sync_timeout`` and 300); a rank that never joins is named in a
            :class:`~lightning_commsgd.rendezvous.RendezvousError`.
        accelerator, parallel_devices, cluster_environment, precision, process_group_backend, start_method: as
            for Fabric's ``DDPStrategy`` (set by Fabric from ``accelerator`` / ``devices`` / ``num_nodes`` /
            ``precision`` when left out).
        checkpoint_io: how checkpoint files are written and read; default
            :class:`~lightning_commsgd.checkpoint_io.AtomicCheckpointIO` (atomic local saves, verified loads).
    """

    #: the registry name; the named subclasses set their algorithm's
    strategy_name = "communication"

    def __init__(
        self,
        algorithm: AlgorithmConfig,
        *,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        rendezvous_timeout: float | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if not isinstance(algorithm, AlgorithmConfig):
            raise TypeError(
                "Arg `algorithm` must be an algorithm config (e.g. lightning_commsgd.LocalSGD(tau=8)), "
                f"got {type(algorithm).__name__}."
            )
        self.sync_timeout = validate_sync_timeout(sync_timeout)
        self.rendezvous_timeout = rendezvous_timeout_for(self.sync_timeout, rendezvous_timeout)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision=precision,
            process_group_backend=process_group_backend,
            start_method=start_method,
        )
        self.algorithm_config = algorithm
        replace_backward_sync_control(self, _ExchangeControl(self))
        self._communicator: Communicator | None = None
        self._watchdog: FailureWatchdog | None = None
        self._algorithm: CommAlgorithm | None = None
        self._modules: list[Module] = []  # every module set up, in order (x_0 broadcast for each)
        self._module: Module | None = None  # the one the algorithm trains
        self._optimizers: list[Optimizer] = []  # the optimizers set up, in order: the algorithm's
        self._stepped: set[int] = set()  # ids of the optimizers stepped since the latest optimizer step
        self._steps = 0  # optimizer steps of the model (the watchdog reports it)
        self._pending_algorithm_state: tuple[dict[str, Any], bool] | None = None  # (state, resized)
        self._closed = False  # close() ran (teardown may follow)
        self._eval_stash: dict[str, Tensor] | None = None
        self._accumulating = False  # inside fabric.no_backward_sync(..., enabled=True)
        self._exchanged = False  # after_backward ran since the latest optimizer step

    # -- public accessors -----------------------------------------------------------------------------
    @property
    def algorithm(self) -> CommAlgorithm | None:
        """The algorithm of this run (the protocol object); ``None`` until the model and its optimizers are
        set up (``fabric.setup``)."""
        return self._algorithm

    @property
    def communicator(self) -> Communicator:
        """This rank's communicator (its ``ledger`` counts bytes and rounds), from ``fabric.launch()`` on."""
        if self._communicator is None:
            raise RuntimeError(f"{type(self).__name__}.communicator exists once `fabric.launch()` has run.")
        return self._communicator

    @property
    def world(self) -> World:
        """The job's shape: ``num_nodes x devices`` ranks, ``devices`` per node."""
        return World(self.num_nodes * self.num_processes, max(self.num_processes, 1))

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """What ``fabric.setup_dataloaders`` builds each rank's DistributedSampler with: the algorithm's
        shard of the data (replica groups split it over the groups too)."""
        shards, shard = self.algorithm_config.data_shard(self.world_size, self.global_rank)
        return {"num_replicas": shards, "rank": shard}

    def finalize(self) -> None:
        """End of training: the algorithm's last round (e.g. local SGD's final average, EASGD's centre
        variable), after which every rank holds the model the algorithm outputs. Call it on every rank (a
        collective), once, after the last optimizer step; Fabric has no end-of-training hook to do it."""
        if self._algorithm is not None:
            self._algorithm.finalize()

    def close(self) -> None:
        """Release what the algorithm connected to at setup (a replica group: its torchft manager, after which
        no peer heals from this group); once, after :meth:`finalize`. ``teardown`` does it too."""
        if self._algorithm is not None and not self._closed:
            self._algorithm.close()
            self._closed = True

    @contextmanager
    def consensus_model(self) -> Iterator[None]:
        """Evaluate the model the replicas agree on, inside training::

            with fabric.strategy.consensus_model():
                val_loss = evaluate(model)

        While replicas differ, the module holds the algorithm's evaluation model (the mean of the replicas,
        one all-reduce, tag ``eval_consensus``) inside the block, and every rank gets its own replica back
        after it; when they agree nothing is sent. Enter it on every rank at the same point (a collective).
        A ``fabric.save`` inside the block stores each rank's own replica."""
        algorithm, module = self._algorithm, self._module
        if algorithm is None or module is None or algorithm.in_sync or self._eval_stash is not None:
            yield
            return
        state = float_state(module)
        self._eval_stash = {k: t.detach().clone() for k, t in state.items()}
        try:
            algorithm.average_for_evaluation(list(state.values()))
            yield
        finally:
            with torch.no_grad():
                for key, tensor in float_state(module).items():
                    tensor.copy_(self._eval_stash[key])
            self._eval_stash = None

    # -- before any process: Fabric(...) ----------------------------------------------------------------
    @override
    def check_before_launch(self) -> None:
        # Fabric's connector calls this once it has set the devices, nodes and precision, before any
        # process or process group exists: the checks that need the world size run here.
        self.algorithm_config.check_world(self.world)
        if (
            getattr(self.precision, "scaler", None) is not None
            and not self.algorithm_config.supports_loss_scaling
        ):
            raise ValueError(
                f"{type(self).__name__} does not support precision='16-mixed': its GradScaler rescales the "
                "gradients every step and the residual states would absorb the scale. Use 'bf16-mixed' or "
                "'32-true'."
            )

    # -- the process group: fabric.launch() --------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # the device, then _setup_distributed
        if self._communicator is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self._watchdog = FailureWatchdog.for_process_group(store_grace=self.sync_timeout)
                self._watchdog.start()  # Fabric never tears the strategy down: it stops itself at exit
            self._communicator = Communicator(
                device=self.root_device, timeout=self.sync_timeout, monitor=self._watchdog
            )

    @override
    def form_process_group(self, backend: str) -> None:
        """The default process group, as Fabric's ``DDPStrategy`` forms it, but with a rendezvous bounded by
        ``rendezvous_timeout`` that names the ranks that never joined."""
        if dist.is_available() and not dist.is_initialized():
            assert self.cluster_environment is not None
            env = self.cluster_environment
            os.environ["MASTER_ADDR"] = env.main_address  # as Fabric's _init_dist_connection sets them
            os.environ["MASTER_PORT"] = str(env.main_port)
            init_process_group(
                backend,
                address=env.main_address,
                port=env.main_port,
                rank=self.global_rank,
                world_size=self.world_size,
                timeout=self.rendezvous_timeout,
                device_id=self.root_device if self.root_device.type != "cpu" else None,
            )
        elif dist.is_available() and dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"A process group of {dist.get_world_size()} ranks already exists, but {type(self).__name__} "
                f"runs on {self.world_size}."
            )
        destroy_process_group_at_exit()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    @override
    def teardown(self) -> None:
        self.close()
        self._stop_watchdog()
        super().teardown()

    # -- the model and its optimizers: fabric.setup(...) -------------------------------------------------
    @override
    def setup_module_and_optimizers(  # type: ignore[override]
        self, module: Module, optimizers: list[Optimizer], scheduler: Any = _NO_SCHEDULER
    ) -> tuple[Any, ...]:
        self._refuse_second_model()
        # before the first collective: an optimizer the algorithm cannot handle stops every rank here, at
        # the same point, instead of failing on some ranks while the others wait in a collective
        self.algorithm_config.check_optimizers(list(optimizers))
        self._broadcast_x0(module)
        self._optimizers = list(optimizers)
        self._build(module)
        if scheduler is _NO_SCHEDULER:  # Lightning < 2.6 passes no scheduler and expects two values back
            return module, list(optimizers)
        return module, list(optimizers), scheduler

    @override
    def setup_module(self, module: Module) -> Module:
        """x_0 from rank 0 (one broadcast); the module itself is returned (no DDP wrapper)."""
        self._broadcast_x0(module)
        return module

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """``fabric.setup_optimizers`` after ``fabric.setup_module``: checked now, the algorithm is built at
        the first backward pass or step (once every optimizer is known)."""
        self._refuse_second_model()
        self.algorithm_config.check_optimizers([*self._optimizers, optimizer])
        self._optimizers.append(optimizer)
        return optimizer

    def _refuse_second_model(self) -> None:
        if self._algorithm is not None:
            raise RuntimeError(
                f"{type(self).__name__} trains one model with its optimizers, set up already; set up further "
                "models without optimizers (fabric.setup_module), or use one Fabric per trained model."
            )

    def _broadcast_x0(self, module: Module) -> None:
        if self._communicator is None:
            raise RuntimeError("Call `fabric.launch()` before setting up the model.")
        broadcast_module_state(module, self._communicator)
        self._modules.append(module)

    def _build(self, module: Module) -> CommAlgorithm:
        assert self._communicator is not None
        self._module = module
        algorithm = self.algorithm_config.build(
            module, list(self._optimizers), self._communicator, self.world
        )
        self._algorithm = algorithm
        description = self.algorithm_config.describe(self.world)
        if description:
            rank_zero_info(f"{type(self).__name__}: {description}")
        if not self._communicator.is_distributed:
            rank_zero_info(
                f"{type(self).__name__}: world size 1, nothing to synchronise; no collectives will run."
            )
        if self._pending_algorithm_state is not None:
            self._algorithm.restore(*self._pending_algorithm_state)
            self._pending_algorithm_state = None
        algorithm.start()  # replica groups meet the others here (a late group heals from a live one)
        return algorithm

    def _ensure_algorithm(self) -> CommAlgorithm | None:
        """The algorithm; built here on the separate-setup path (the module owning the optimizers' first
        parameter, among the modules set up)."""
        if self._algorithm is not None or not self._optimizers:
            return self._algorithm
        first = next((p for g in self._optimizers[0].param_groups for p in g["params"]), None)
        owner = next((m for m in self._modules if any(p is first for p in m.parameters())), None)
        if owner is None:
            raise RuntimeError(
                "The optimizer set up with `fabric.setup_optimizers` steps no module set up with "
                "`fabric.setup_module`: set up the model first (or both at once with `fabric.setup`)."
            )
        return self._build(owner)

    # -- one training step ------------------------------------------------------------------------------
    @contextmanager
    def _accumulating_context(self) -> Iterator[None]:
        previous, self._accumulating = self._accumulating, True
        try:
            yield
        finally:
            self._accumulating = previous

    @override
    def backward(self, tensor: Tensor, module: Module | None, *args: Any, **kwargs: Any) -> None:
        """``fabric.backward(loss)``, or ``fabric.backward(loss, samples=n)`` where the algorithm weighs
        replicas by their samples (``replica_weights="samples"``): the loss (for schedules that adapt to it,
        e.g. AdaComm) is recorded, then the backward pass; gradient-exchanging algorithms exchange at its end
        unless inside ``fabric.no_backward_sync(model)``."""
        samples = kwargs.pop("samples", None)
        algorithm = self._ensure_algorithm()
        if algorithm is not None:
            if algorithm.counts_samples and samples is None:
                raise ValueError(
                    f"{type(self).__name__} weighs replicas by their samples: pass the batch's size, "
                    "`fabric.backward(loss, samples=len(batch))`."
                )
            if algorithm.exchanges_gradients and self._exchanged:
                raise RuntimeError(
                    "A second backward pass since the gradients were exchanged: with gradient accumulation, "
                    "run every backward pass but the last of an optimizer step inside "
                    "`fabric.no_backward_sync(model)`."
                )
            algorithm.record_batch(tensor, samples)
        super().backward(tensor, module, *args, **kwargs)
        if algorithm is not None and algorithm.exchanges_gradients and not self._accumulating:
            algorithm.after_backward()
            self._exchanged = True

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        algorithm = self._ensure_algorithm()
        if algorithm is None or not any(optimizer is o for o in self._optimizers):
            return super().optimizer_step(optimizer, **kwargs)
        if algorithm.exchanges_gradients:
            closure: Callable[[], Any] | None = kwargs.pop("closure", None)
            output = closure() if closure is not None else None  # its fabric.backward exchanges
            if not self._exchanged:  # loss.backward() outside Fabric, or no backward at all
                algorithm.after_backward()
            self._exchanged = False
            if algorithm.should_step:
                stepped = self.precision.optimizer_step(optimizer, **kwargs)
                output = stepped if closure is None else output
        else:
            output = self.precision.optimizer_step(optimizer, **kwargs)
        # one step of the model once each of its optimizers has stepped (with one optimizer: every step)
        self._stepped.add(id(optimizer))
        if len(self._stepped) == len(self._optimizers):
            self._stepped.clear()
            self._steps += 1
            if self._watchdog is not None:
                self._watchdog.step = self._steps
            algorithm.after_optimizer_step()
        return output

    # -- Fabric's own collectives, counted ---------------------------------------------------------------
    @override
    def all_reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any | None = "mean"
    ) -> Any:
        op, comm = reduce_kind(reduce_op), self._communicator
        if not isinstance(tensor, Tensor) or not is_world_group(group) or op is None or comm is None:
            return super().all_reduce(tensor, group=group, reduce_op=reduce_op)
        return comm.all_reduce_(tensor, op, tag="lightning_reduce")  # type: ignore[arg-type]

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        # the autograd-aware gather (sync_grads) and sub-groups stay Fabric's, uncounted
        comm = self._communicator
        if not is_world_group(group) or sync_grads or comm is None or not comm.is_distributed:
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)
        return torch.stack(comm.all_gather(tensor, tag="lightning_all_gather"))

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._communicator is None:
            return super().barrier(*args, **kwargs)
        self._communicator.barrier(tag="lightning_barrier")

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self._communicator is None:
            return super().broadcast(obj, src)
        return self._communicator.broadcast_object(obj, src, tag="lightning_broadcast")

    # -- checkpoints -------------------------------------------------------------------------------------
    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Gather every rank's state to rank 0, which writes one file (see the module docstring). Called by
        ``fabric.save`` on every rank."""
        converted = self._convert_state(state, filter or {})
        algorithm, comm = self._algorithm, self._communicator
        if algorithm is None or comm is None:  # nothing per rank yet: Fabric's own layout
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(converted, path, storage_options=storage_options)
            return
        modules = [k for k, v in state.items() if isinstance(v, Module) and k in converted]
        local = dict(converted)
        for key in modules:
            local[key] = self._own_replica(state[key], converted[key])
        entry = {"state": local, "algorithm": algorithm.state_dict(), "ledger": comm.ledger.state_dict()}
        gathered = comm.gather_object(entry, dst=0, tag="checkpoint")
        if gathered is None:
            return
        checkpoint = dict(gathered[0]["state"])
        for key in modules:
            checkpoint[key] = consensus_state_dict([g["state"][key] for g in gathered])
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "world_size": len(gathered),
            "ranks": gathered,
        }
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def _convert_state(
        self, state: Mapping[str, Any], filters: Mapping[str, Callable[[str, Any], bool]]
    ) -> dict[str, Any]:
        """Modules and optimizers as their state dicts, stateful objects as theirs, ``filter`` applied (what
        Fabric's strategies write)."""
        out: dict[str, Any] = {}
        for key, obj in state.items():
            if isinstance(obj, Module):
                converted = self.get_module_state_dict(obj)
            elif isinstance(obj, Optimizer):
                converted = self.get_optimizer_state(obj)
            elif _is_stateful(obj):
                converted = obj.state_dict()
            else:
                converted = obj
            if key in filters and isinstance(converted, dict):
                converted = {k: v for k, v in converted.items() if filters[key](k, v)}
            out[key] = converted
        return out

    def _own_replica(self, module: Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """``state_dict`` of this rank's own replica, on the CPU: inside :meth:`consensus_model` the module
        holds the evaluation model, and the replica is the stashed one."""
        stash = self._eval_stash if module is self._module else None
        out = {}
        for key, value in state_dict.items():
            if stash is not None and key in stash:
                value = stash[key].clone()
            out[key] = value.detach().cpu() if isinstance(value, Tensor) else value
        return out

    @override
    def load_checkpoint(
        self,
        path: Any,
        state: Module | Optimizer | dict[str, Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from this rank's entry (same world size) or from the consensus model
        and rank 0's entries (another world size); the algorithm's state and the ledger with it. Returns
        what ``state`` did not ask for. ``fabric.load(path)`` without ``state`` returns the file as written,
        and ``fabric.load_raw`` loads a raw module or optimizer file, both untouched by the strategy."""
        only = weights_only_kwargs(weights_only)  # Lightning < 2.6 does not take it
        if not state or isinstance(state, (Module, Optimizer)):
            return super().load_checkpoint(path, state, strict=strict, **only)
        checkpoint = self.checkpoint_io.load_checkpoint(path, **only)
        checkpoint = self._own_view(checkpoint, path)
        missing = [key for key in state if key not in checkpoint]
        if strict and missing:
            raise KeyError(
                f"The requested state contains a key {missing[0]!r} that does not exist in the loaded "
                "checkpoint. To disable strict loading, set `strict=False`."
            )
        for name, obj in list(state.items()):
            if name not in checkpoint:
                continue
            value = checkpoint.pop(name)
            if isinstance(obj, Module):
                self.load_module_state_dict(module=obj, state_dict=value, strict=strict)
            elif _is_stateful(obj):
                obj.load_state_dict(value)
            else:
                state[name] = value
        return checkpoint

    def _own_view(self, checkpoint: dict[str, Any], path: Any) -> dict[str, Any]:
        """This rank's part of a loaded checkpoint (the algorithm's state and the ledger restored or kept for
        the build); a checkpoint without per-rank entries is returned as it is."""
        extra = checkpoint.pop(CHECKPOINT_KEY, None)
        if extra is None:
            return checkpoint
        ranks = extra["ranks"]
        resized = len(ranks) != self.world_size
        mine = dict(ranks[0] if resized else ranks[self.global_rank])
        if resized:
            rank_zero_warn(
                f"{path} was written by {len(ranks)} ranks and is resumed on {self.world_size}: every rank "
                "starts from the consensus model with rank 0's other state (not the exact trajectory)."
            )
            view = checkpoint
        else:
            view = dict(mine["state"])
            if self._communicator is not None:
                self._communicator.ledger.load_state_dict(mine["ledger"])
        if self._algorithm is not None:
            self._algorithm.restore(mine["algorithm"], resized)
        else:
            self._pending_algorithm_state = (mine["algorithm"], resized)
        return view

    # -- the registry -----------------------------------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register every protocol algorithm of :data:`lightning_commsgd.registry.ENTRIES` (not DDP's names,
        which ``DDPStrategy.register_strategies`` would register for this class)."""
        from lightning_commsgd.fabric import register_strategies

        register_strategies(strategy_registry)
