"""Parameter-server strategies: sync, K-sync, async, K-async and K-batch-async SGD (Dutta et al. 2018).

The server runs on rank 0 in a background thread while rank 0 also trains (its pushes and pulls are
in-process and cost no bytes; the thread and rank 0's training share rank 0's CPU/GPU, so rank 0 is a
little slower than the others), or, with ``server="dedicated"``, rank 0 only serves. Every other rank
is a worker: after Lightning's closure has computed the gradient, the worker pushes it to the server
instead of stepping its optimizer, and continues from the model the server sends back
(:mod:`lightning_commsgd.algorithms.ps_runtime`). The user's optimizer, its momentum, weight decay and
schedulers run on the server: ``interval="step"`` ones after every update, ``interval="epoch"`` ones after
every N updates, N the batches of one worker's epoch (where DDP steps them in sync SGD).

Ranks run at different speeds, so the usual Trainer notions mean:

- **global step** = the server's update count (each worker's ``trainer.global_step`` follows the version
  of the last model it received); ``max_steps`` is the number of server updates.
- **max_epochs**: each worker passes over its own shard that many times and then leaves; training ends
  when fewer workers remain than an update needs (or at ``max_steps``). Every worker is told to stop.
- **validation** inside ``fit``: each rank validates the latest model it pulled; on rank 0 (whose metrics
  loggers record) that is the server's current model. Logging with ``sync_dist=True``, barriers and
  broadcasts are rank-local while training (a collective between unsynchronised ranks could deadlock).
- **checkpoints** are written by rank 0: the server's model (``state_dict``), its optimizer
  (``optimizer_states``) and the server state (version, schedulers) under ``"lightning_commsgd_ps"``. A
  resumed run starts every worker from the server's model and version; rank 0's data position is
  applied to every worker (exact for sync SGD, where all workers are at the same batch).
- After ``fit`` rank 0's module holds the server's final model.

A worker whose process dies is dropped by the server while enough workers remain for an update (K-sync
and K-async: k; K-batch-async: one); otherwise the server fails with ``TooFewWorkersError`` naming the
lost ranks, and every rank stops. Use Lightning's own launcher or SLURM for that: ``torchrun`` restarts
the whole group when any worker fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.algorithms.parameter_server import (
    StalenessAwareLR,
    check_variant,
    clone_scheduler,
    copy_flat_into,
)
from lightning_commsgd.algorithms.ps_runtime import ServerRuntime, WorkerClient, connect
from lightning_commsgd.algorithms.straggler import ExponentialDelay
from lightning_commsgd.comm import Communicator, skip_group_destruction_at_exit
from lightning_commsgd.internals import (
    weights_only_kwargs,
)
from lightning_commsgd.strategies.process import ProcessGroupStrategy

__all__ = ["PS_CHECKPOINT_KEY", "AsyncSGDStrategy", "KSyncSGDStrategy", "ParameterServerStrategy"]

PS_CHECKPOINT_KEY = "lightning_commsgd_ps"
SERVER_RANK = 0
SERVER_PLACEMENTS = ("colocated", "dedicated")


class _ServerJob:
    """One fit's parameter server (rank 0's runtime) and this rank's worker client, over ``params``."""

    def __init__(
        self, runtime: ServerRuntime | None, client: WorkerClient | None, params: list[Tensor]
    ) -> None:
        self.runtime, self.client, self.params = runtime, client, params

    def load_model(self, flat: Tensor) -> None:
        copy_flat_into(self.params, flat)

    def flat_grad(self) -> Tensor:
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                for p in self.params
            ]
        )


class ParameterServerStrategy(ProcessGroupStrategy):
    """Parameter-server SGD with a server thread on rank 0 (see the module docstring for what global
    step, epochs, validation and checkpoints mean here). Use :class:`KSyncSGDStrategy` or
    :class:`AsyncSGDStrategy`.

    Args:
        k: K of the variant (see the subclasses); ``None`` means every worker (P).
        mode: ``"sync"`` (K-sync), ``"async"`` (K-async) or ``"batch"`` (K-batch-async).
        staleness_lr: a :class:`~lightning_commsgd.algorithms.parameter_server.StalenessAwareLR`
            (eta_j = min(C / ||w_j - w_tau(j)||^2, eta_max)), or ``None``.
        straggler_mu: emulate stragglers: after computing each gradient, a worker waits Y ~ Exp(mu)
            seconds (mean 1/mu), the runtime model of the paper; ``None`` (default) adds nothing. A K-sync
            worker stops waiting when a newer model arrives (its computation is cancelled).
        straggler_seed: seed of the delays (each rank draws from its own stream).
        server: ``"colocated"`` (default): the server is a background thread on rank 0, which also trains
            (P = world size); ``"dedicated"``: rank 0 only serves (P = world size - 1; the workers split the
            data P ways). Its Lightning loop then takes one "step" per server update, so its checkpoints,
            validation (of the server's model) and logs follow the global step.
        sync_timeout: seconds a worker waits for its model, and the server for any push, before the job
            fails (default 600).
        **kwargs: Lightning's process plumbing (``accelerator``, ``cluster_environment``, ``checkpoint_io``,
            ``timeout``, ``start_method``, ...) as for the other strategies.
    """

    def __init__(
        self,
        *,
        k: int | None,
        mode: Literal["sync", "async", "batch"],
        staleness_lr: StalenessAwareLR | None = None,
        straggler_mu: float | None = None,
        straggler_seed: int = 0,
        server: Literal["colocated", "dedicated"] = "colocated",
        **kwargs: Any,
    ) -> None:
        if server not in SERVER_PLACEMENTS:
            raise ValueError(f"Arg `server` must be one of {list(SERVER_PLACEMENTS)}, got {server!r}.")
        # k's type and lower bound now; k <= P when the Trainer is built and P is known
        check_variant(1 if k is None else k, mode, workers=None)
        if staleness_lr is not None and not isinstance(staleness_lr, StalenessAwareLR):
            raise TypeError(f"Arg `staleness_lr` must be a StalenessAwareLR or None, got {staleness_lr!r}.")
        if straggler_mu is not None and (
            isinstance(straggler_mu, bool)
            or not isinstance(straggler_mu, (int, float))
            or not (straggler_mu > 0 and math.isfinite(straggler_mu))
        ):
            raise ValueError(
                f"Arg `straggler_mu` must be None or a finite rate > 0 (1/seconds), got {straggler_mu!r}."
            )
        super().__init__(**kwargs)
        self._launcher_ends_job = False  # a lost worker is the server's business
        self.k, self.mode, self.staleness_lr = k, mode, staleness_lr
        self.straggler_mu, self.straggler_seed = straggler_mu, straggler_seed
        self.server = server
        self._job: _ServerJob | None = None
        self._delay: ExponentialDelay | None = None
        self._training = False  # between on_train_start and the end of training: no Lightning collectives
        self._pending_server_state: dict[str, Any] | None = None
        self._epoch_schedulers: list[Any] = []
        self._val_stash: list[Tensor] | None = None

    @property
    def num_workers(self) -> int:
        """P: every rank, or every rank but the server's with ``server="dedicated"``."""
        return self.world_size - 1 if self.dedicated else self.world_size

    @property
    def dedicated(self) -> bool:
        return self.server == "dedicated"

    @property
    def effective_k(self) -> int:
        """K with ``None`` resolved to the number of workers."""
        return self.num_workers if self.k is None else self.k

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if not self.dedicated:
            return super().distributed_sampler_kwargs
        # P - 1 workers share the data; the server rank's loader (whose batches it only counts) reads
        # worker 1's shard
        return {"num_replicas": self.num_workers, "rank": max(self.global_rank - 1, 0)}

    # -- before any process group --------------------------------------------------------------------
    @override
    def check_before_launch(self) -> None:
        if self.dedicated and self.world_size < 2:
            raise ValueError('server="dedicated" needs at least 2 processes (a server and a worker).')
        check_variant(self.effective_k, self.mode, self.num_workers)
        super().check_before_launch()

    # -- setup (ProcessGroupStrategy.setup calls it) ------------------------------------------------------
    @override
    def start_training(self, trainer: pl.Trainer, communicator: Communicator) -> None:
        self._job = self._start_job(trainer, list(self.optimizers), communicator)

    def _start_job(
        self, trainer: pl.Trainer, optimizers: list[Optimizer], communicator: Communicator
    ) -> _ServerJob:
        if len(optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} runs one optimizer on the server, got {len(optimizers)}."
            )
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support fp16 loss scaling; use bf16 or fp32.")
        optimizer = optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        step_schedulers, epoch_schedulers = [], []
        for config in trainer.lr_scheduler_configs:
            if config.frequency != 1:
                raise ValueError(
                    f"{type(self).__name__} steps schedulers every update or epoch: frequency must be 1."
                )
            if config.reduce_on_plateau:
                raise ValueError(f"{type(self).__name__} cannot run ReduceLROnPlateau on the server.")
            (step_schedulers if config.interval == "step" else epoch_schedulers).append(config.scheduler)
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        runtime, client = connect(
            communicator, params, optimizer, k=self.effective_k, mode=self.mode, server_rank=SERVER_RANK,
            server_trains=not self.dedicated, staleness_lr=self.staleness_lr, max_updates=max_steps,
            schedulers=tuple(step_schedulers), timeout=self.sync_timeout, start=False,
        )  # fmt: skip
        if runtime is not None:
            server_optimizer = runtime.server.optimizer
            self._epoch_schedulers = [
                clone_scheduler(s, optimizer, server_optimizer) for s in epoch_schedulers
            ]
        if self.straggler_mu is not None:
            self._delay = ExponentialDelay(self.straggler_mu, self.straggler_seed, self.global_rank)
        return _ServerJob(runtime, client, params)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        job = self._job
        if job is None:
            return
        state = self._pending_server_state
        if state is not None:  # a resumed run: the server continues from the checkpoint
            if job.runtime is not None:
                job.runtime.server.load_state_dict(state["server"])
                for scheduler, sched_state in zip(self._epoch_schedulers, state.get("epoch_schedulers", [])):
                    scheduler.load_state_dict(sched_state)
            if job.client is not None:
                job.client.version = int(state["server"]["version"])
            self._pending_server_state = None
        self._training = True
        if job.runtime is not None:
            job.runtime.on_update = self._server_epoch_end_hook()
            job.runtime.start()

    def _server_epoch_end_hook(self) -> Callable[[Any], None] | None:
        """``interval="epoch"`` schedulers step on the server after every N updates, N the batches of
        rank 0's epoch (one worker's shard): where DDP steps them in sync SGD. Called under the server's
        lock, before the next gradient is applied."""
        if not self._epoch_schedulers:
            return None
        per_epoch = self.lightning_module.trainer.num_training_batches
        if not isinstance(per_epoch, int) or per_epoch < 1:  # an infinite loader: no epochs to count
            return None

        def step_at_epoch_end(reply: Any) -> None:
            if reply.version % per_epoch == 0:
                for scheduler in self._epoch_schedulers:
                    scheduler.step()

        return step_at_epoch_end

    # -- a worker's step -------------------------------------------------------------------------------------
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        job = self._job
        if job is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        if job.client is None:  # the dedicated server rank: this "step" waited for the next update
            return self._server_rank_step(job, closure)
        # forward, backward, the on_before_optimizer_step hooks and gradient clipping, as Lightning's
        # precision plugin runs them before a step; the step itself runs on the server
        loss = self.precision_plugin._wrap_closure(self.lightning_module, optimizer, closure)
        client = job.client
        trainer = self.lightning_module.trainer
        if loss is not None and not client.stopped:
            delay = self._delay.next() if self._delay is not None else 0.0
            client.step(job.flat_grad(), job.load_model, delay=delay)
        elif not client.stopped:
            client.newer_model(job.load_model)
        _follow_server_version(trainer, client.version)
        self.faults.step = client.version
        if client.stopped:
            trainer.should_stop = True
        return loss

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        job = self._job
        if job is not None and job.client is None and job.runtime is not None and self._training:
            # the dedicated server rank trains nothing: each of its steps is the server's next update
            # (its loop then checkpoints, validates and logs at the server's global steps)
            version = self.lightning_module.trainer.global_step
            while (
                not job.runtime.done and job.runtime.wait_for_version(version, self.sync_timeout) <= version
            ):
                pass
            # Lightning refuses a skipped step (None) in distributed runs: a constant loss, no parameters
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    def _server_rank_step(self, job: _ServerJob, closure: Callable[[], Any]) -> Any:
        assert job.runtime is not None
        closure()  # runs training_step above: waits for the next update
        trainer = self.lightning_module.trainer
        if job.runtime.failure is not None:
            raise job.runtime.failure
        _follow_server_version(trainer, job.runtime.server.version)
        self.faults.step = job.runtime.server.version
        if job.runtime.done:
            trainer.should_stop = True
        return None

    # -- the end of training ----------------------------------------------------------------------------
    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        job = self._job
        if job is None:
            return
        if job.client is not None:
            job.client.leave()
        if job.runtime is not None:
            # the other workers may still have data: serve until every one has left (the server fails by
            # itself when no worker is heard of for sync_timeout seconds)
            while not job.runtime.done:
                job.runtime.join(timeout=self.sync_timeout)
            job.runtime.join()  # raises the server's failure, if any
            job.load_model(job.runtime.server.flat_model())  # rank 0 ends with the server's model
        self._training = False

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self.global_rank == SERVER_RANK:
            super().on_exception(exception)  # the server is gone: every rank must stop
            return
        # a worker's failure: the server drops it and the other ranks go on (no abort notice); the
        # process group is left to the operating system at exit
        skip_group_destruction_at_exit()

    # -- validation: rank 0 looks at the server's model ---------------------------------------------------
    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        job = self._job
        if job is not None and job.runtime is not None and self._training:
            self._val_stash = [p.detach().clone() for p in job.params]
            with job.runtime.lock:
                model = job.runtime.server.flat_model()
            job.load_model(model)

    @override
    def on_validation_end(self) -> None:
        job = self._job
        if job is not None and self._val_stash is not None:
            with torch.no_grad():
                for p, saved in zip(job.params, self._val_stash):
                    p.copy_(saved)
            self._val_stash = None
        super().on_validation_end()

    # -- Lightning's collectives are rank-local while the ranks run unsynchronised ------------------------
    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        return tensor if self._training else super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not self._training:
            super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self._training else super().broadcast(obj, src)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002
        return decision if self._training else super().reduce_boolean_decision(decision, all=all)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        if self._training:
            raise RuntimeError(
                f"all_gather during training under {type(self).__name__}: the ranks run unsynchronised "
                "(log without sync_dist, or gather after fit)."
            )
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    # -- checkpoints: rank 0 writes the server --------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        job = self._job
        if job is not None and job.runtime is not None and "optimizer_states" in checkpoint:
            state = job.runtime.state_dict()
            model = state["model"]
            names = {id(p): name for name, p in self.lightning_module.named_parameters()}
            state_dict = dict(checkpoint["state_dict"])
            offset = 0
            for p in job.params:
                n = p.numel()
                state_dict[names[id(p)]] = model[offset : offset + n].view_as(p).to(p.dtype).clone()
                offset += n
            checkpoint["state_dict"] = state_dict
            checkpoint["optimizer_states"] = [state["optimizer"]]
            checkpoint[PS_CHECKPOINT_KEY] = {
                "server": state,
                "epoch_schedulers": [s.state_dict() for s in self._epoch_schedulers],
                "ledger": self.communicator.ledger.state_dict(),
                "sampler": self.data.state(
                    self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current.ready
                ),
            }
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, **weights_only_kwargs(weights_only))
        extra = checkpoint.get(PS_CHECKPOINT_KEY)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if extra is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._pending_server_state = extra
            self.data.load(extra.get("sampler"))
            if self.global_rank == SERVER_RANK:
                self.communicator.ledger.load_state_dict(extra["ledger"])
        return checkpoint

    @override
    def teardown(self) -> None:
        self._training = False
        super().teardown()


def _follow_server_version(trainer: pl.Trainer, version: int) -> None:
    """Make this worker's ``global_step`` the server's version once Lightning counts the current step
    (it adds one to ``completed`` after ``optimizer_step`` returns)."""
    loop = trainer.fit_loop.epoch_loop
    if not trainer.lightning_module.automatic_optimization:
        raise ValueError("parameter-server strategies support automatic optimization only.")
    step = loop.automatic_optimization.optim_progress.optimizer.step.total
    step.ready = version
    step.completed = version - 1


class KSyncSGDStrategy(ParameterServerStrategy):
    """K-sync SGD (Dutta et al. 2018): every update averages the first k gradients computed on the
    current model; the other workers' computations are cancelled and every worker continues from the new
    model. ``k = P`` (``None``, the default) is synchronous SGD, the same trajectory as DDP.

    Args:
        k: K in [1, P]; ``None`` for P.
        **kwargs: see :class:`ParameterServerStrategy` (``staleness_lr`` has no effect: gradients are
            never stale; ``straggler_mu``, ``sync_timeout``, ...).
    """

    strategy_name = "ksync_sgd"
    fixed_arguments = ("mode",)  # K-sync is mode "sync"

    def __init__(self, k: int | None = None, **kwargs: Any) -> None:
        super().__init__(k=k, mode="sync", **kwargs)


class AsyncSGDStrategy(ParameterServerStrategy):
    """Asynchronous SGD through a parameter server (Dutta et al. 2018).

    Args:
        k: K. ``variant="k-async"``: each update averages the first k gradients to arrive, whatever model
            they were computed on, and only those k workers pull the new model (k = 1, the default, is
            async SGD); k in [1, P]. ``variant="k-batch"``: K-batch-async, each update averages k
            mini-batch gradients from any workers (one worker may give several), and every worker pulls
            the current model right after its push and goes on; k >= 1.
        variant: ``"k-async"`` or ``"k-batch"``.
        staleness_lr: :class:`~lightning_commsgd.algorithms.parameter_server.StalenessAwareLR` or ``None``.
        **kwargs: see :class:`ParameterServerStrategy`.
    """

    strategy_name = "async_sgd"
    fixed_arguments = ("mode",)  # chosen by `variant`

    def __init__(
        self,
        k: int = 1,
        variant: Literal["k-async", "k-batch"] = "k-async",
        staleness_lr: StalenessAwareLR | None = None,
        **kwargs: Any,
    ) -> None:
        variants = {"k-async": "async", "k-batch": "batch"}
        if variant not in variants:
            raise ValueError(f"Arg `variant` must be one of {list(variants)}, got {variant!r}.")
        self.variant = variant
        super().__init__(k=k, mode=variants[variant], staleness_lr=staleness_lr, **kwargs)  # type: ignore[arg-type]
