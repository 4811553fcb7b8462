"""The parameter server of the sync / K-sync / K-async / K-batch-async family (Dutta, Joshi et al., "Slow
and stale gradients can win the race", AISTATS 2018; docs/ALGORITHMS.md section 7).

This module is the server's *decisions* only: pure torch, no threads, no network. It is fed events (a
worker pushed a gradient computed on model version v; a worker left; a worker was lost) and answers which
workers get the current model next. Everything timing-dependent lives in
:mod:`lightning_commsgd.algorithms.ps_runtime`; a single-process replay of the same events gives the same
updates, which is how the tests check the distributed server.

The variants, for P workers and a server holding w and its version j:

- ``"sync"`` (K-sync; sync SGD is k = P): the server takes the first k gradients computed on the current
  w_j, applies their mean and sends w_{j+1} to *every* worker. Gradients of an older version arriving later
  are dropped (their computation was cancelled: the worker already has w_{j+1} on its way).
- ``"async"`` (K-async; async SGD is k = 1): the server takes the first k gradients to arrive, whatever
  version they were computed on, applies their mean and sends w_{j+1} to those k workers only; the others
  keep computing on the model they have.
- ``"batch"`` (K-batch-async): every push is answered at once with the current model, the worker goes on
  at once; the server updates when k gradients (possibly several from one worker) have arrived.

Staleness of a gradient used in update j is j - tau, tau the version it was computed on. With
:class:`StalenessAwareLR` each gradient is applied with learning rate
eta = min(C / ||w_j - w_tau||^2, eta_max) (the paper's rule; eta_max when w_j = w_tau).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "MODES",
    "ParameterServer",
    "ParameterServerError",
    "ServerReply",
    "StalenessAwareLR",
    "TooFewWorkersError",
    "UpdateRecord",
    "clone_optimizer",
    "clone_scheduler",
    "copy_flat_into",
]

Mode = Literal["sync", "async", "batch"]
MODES: tuple[str, ...] = ("sync", "async", "batch")


class ParameterServerError(RuntimeError):
    """The parameter server failed; the message says why (and which worker, when one is to blame)."""


class TooFewWorkersError(ParameterServerError):
    """The server cannot make another update: fewer workers remain than one update needs."""


@dataclass(frozen=True)
class StalenessAwareLR:
    """The staleness-aware learning rate eta_j = min(C / ||w_j - w_tau(j)||_2^2, eta_max) of Dutta et al.

    Args:
        C: the constant C (> 0): the squared distance the model may have moved since the gradient's version
            for which the learning rate is C / distance.
        eta_max: the cap eta_max (> 0), used for fresh gradients (w_j = w_tau(j)); ``None`` takes the
            optimizer's current learning rate of each parameter group (so a scheduler still shapes it).

    The server realises eta by scaling the gradient by eta / lr of its parameter group before the user's
    optimizer step (lr unchanged): exactly the rule for plain SGD; with momentum each gradient enters the
    momentum buffer scaled by its own eta / lr.
    """

    C: float
    eta_max: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.C, (int, float)) and math.isfinite(self.C) and self.C > 0):
            raise ValueError(f"StalenessAwareLR C must be a finite number > 0, got {self.C!r}.")
        if self.eta_max is not None and not (
            isinstance(self.eta_max, (int, float)) and math.isfinite(self.eta_max) and self.eta_max > 0
        ):
            raise ValueError(
                f"StalenessAwareLR eta_max must be None or a finite number > 0, got {self.eta_max!r}."
            )

    def rate(self, squared_distance: float, lr: float) -> float:
        """eta for a gradient whose model is ``squared_distance`` = ||w_j - w_tau||^2 away; ``lr`` is the
        group's learning rate (the cap when ``eta_max`` is None)."""
        cap = self.eta_max if self.eta_max is not None else lr
        if squared_distance <= 0:
            return cap
        return min(self.C / squared_distance, cap)


@dataclass
class UpdateRecord:
    """One server update: its new version, the gradients it averaged (worker, version computed on, in
    arrival order), their staleness and the learning-rate factor applied to each (1 without
    :class:`StalenessAwareLR`; one per parameter group otherwise)."""

    version: int
    contributors: list[tuple[int, int]]
    staleness: list[int]
    lr_factors: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class ServerReply:
    """What the runtime does after an event: send the current model (version ``version``) to each worker
    in ``send_to``, telling them to stop when ``stop``; ``updated`` says an update happened."""

    send_to: tuple[int, ...] = ()
    stop: bool = False
    updated: bool = False
    version: int = 0


class ParameterServer:
    """The server's model, optimizer and update rule (see the module docstring for the variants).

    Args:
        params: the server's own parameter tensors, in the order of the workers' flat gradients, grouped
            by optimizer parameter group (each group a contiguous slice); the server owns them.
        optimizer: the optimizer over ``params`` (the user's optimizer, cloned for the server with
            :func:`clone_optimizer`): momentum, weight decay and the rest run here.
        k: K, the gradients one update averages (1 <= k; k <= P for ``"sync"`` and ``"async"``).
        mode: ``"sync"`` (K-sync), ``"async"`` (K-async) or ``"batch"`` (K-batch-async).
        workers: the workers' ids (global ranks).
        staleness_lr: the staleness-aware learning rate, or ``None`` for the optimizer's own.
        max_updates: stop after this many updates (the global step); ``None`` for no limit.
        schedulers: learning-rate schedulers of ``optimizer`` stepped once per update.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        optimizer: Optimizer,
        *,
        k: int,
        mode: Mode,
        workers: Iterable[int],
        staleness_lr: StalenessAwareLR | None = None,
        max_updates: int | None = None,
        schedulers: Sequence[Any] = (),
    ) -> None:
        self.workers = sorted(set(workers))
        check_variant(k, mode, len(self.workers))
        if max_updates is not None and (not isinstance(max_updates, int) or max_updates < 0):
            raise ValueError(f"max_updates must be None or an integer >= 0, got {max_updates!r}.")
        self.params = list(params)
        self.optimizer, self.k, self.mode = optimizer, k, mode
        self.staleness_lr, self.max_updates, self.schedulers = staleness_lr, max_updates, list(schedulers)
        self.numel = sum(p.numel() for p in self.params)
        self.group_slices = _group_slices(optimizer, self.params)
        self.version = 0
        self.active = set(self.workers)  # workers that may still push
        self.held = dict.fromkeys(self.workers, 0)  # model version last sent to each worker
        self.stopping = max_updates == 0
        self.dropped = 0  # K-sync gradients that arrived after their version was replaced
        self.lost: dict[int, str] = {}
        self._buffer: list[tuple[int, int, Tensor]] = []
        self._history: dict[int, Tensor] = {}  # model of each version still referenced (staleness LR)
        self.log: list[UpdateRecord] = []
        self._remember_current()

    # -- the model ------------------------------------------------------------------------------------
    def flat_model(self) -> Tensor:
        """The current model as one flat fp32 tensor (a copy), in the workers' layout."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    # -- events ---------------------------------------------------------------------------------------
    def offer(self, worker: int, version: int, grad: Tensor) -> ServerReply:
        """Worker ``worker`` pushed ``grad`` (flat, fp32), computed on model version ``version``."""
        if worker not in self.active:
            if worker in self.workers:  # told to stop (or lost) while this gradient was on its way
                return ServerReply(version=self.version)
            raise ValueError(f"worker {worker} is not a worker of this server ({self.workers}).")
        if version > self.version or version < 0:
            raise ValueError(
                f"worker {worker} pushed a gradient of version {version}; the server is at {self.version}."
            )
        if grad.numel() != self.numel:
            raise ValueError(f"worker {worker} pushed {grad.numel()} values; the model has {self.numel}.")
        if self.stopping:
            return self._send({worker}, updated=False)
        grad = grad.to(self.params[0].device, torch.float32)  # from the wire (CPU) to the server's device
        if self.mode == "sync" and version < self.version:
            self.dropped += 1  # cancelled: w_{version+1} was already sent to this worker
            return ServerReply(version=self.version)
        self._buffer.append((worker, version, grad))
        updated = len(self._buffer) == self.k
        if updated:
            contributors = [w for w, _, _ in self._buffer]
            self._update()
        if self.mode == "sync":
            return self._send(self.active, updated) if updated else ServerReply(version=self.version)
        if self.mode == "async":
            return self._send(set(contributors), updated) if updated else ServerReply(version=self.version)
        return self._send({worker}, updated)  # batch: the pusher pulls at once

    def leave(self, worker: int) -> ServerReply:
        """Worker ``worker`` has no more data (its epochs are done): it stops; training ends when fewer
        workers remain than an update needs."""
        return self._remove(worker, reason=None)

    def lose(self, worker: int, reason: str) -> ServerReply:
        """Worker ``worker`` is gone (its process died). Raises :class:`TooFewWorkersError` when the
        remaining workers cannot make another update (K-sync and K-async need k of them; K-batch-async
        one)."""
        return self._remove(worker, reason=reason)

    @property
    def finished(self) -> bool:
        """Every worker has been told to stop (or is gone)."""
        return not self.active

    @property
    def waiting(self) -> set[int]:
        """Workers whose gradient is in the buffer and who wait for the update (K-async)."""
        return {w for w, _, _ in self._buffer} if self.mode == "async" else set()

    # -- internals ------------------------------------------------------------------------------------
    def _needed(self) -> int:
        return 1 if self.mode == "batch" else self.k

    def _remove(self, worker: int, reason: str | None) -> ServerReply:
        if worker not in self.active:
            return ServerReply(version=self.version)
        self.active.discard(worker)
        self.held.pop(worker, None)
        if reason is not None:
            self.lost[worker] = reason
        if self.stopping:
            return ServerReply(version=self.version)
        if len(self.active) >= self._needed():
            return ServerReply(version=self.version)
        if reason is not None:
            lost = ", ".join(f"rank {w} ({why})" for w, why in sorted(self.lost.items()))
            raise TooFewWorkersError(
                f"{self._describe()} needs {self._needed()} live worker(s) per update but only "
                f"{len(self.active)} remain after update {self.version}: lost {lost}."
            )
        # the data ran out on enough workers: a normal end; whoever waits is told to stop
        self.stopping = True
        return self._send(self.waiting | (self.active if self.mode == "sync" else set()), updated=False)

    def _describe(self) -> str:
        name = {"sync": "K-sync SGD", "async": "K-async SGD", "batch": "K-batch-async SGD"}[self.mode]
        return f"{name} (k={self.k})"

    def _send(self, workers: Iterable[int], updated: bool) -> ServerReply:
        targets = tuple(sorted(w for w in workers if w in self.active))
        for w in targets:
            self.held[w] = self.version
        if self.stopping:
            for w in targets:
                self.active.discard(w)
                self.held.pop(w, None)
        self._prune_history()
        return ServerReply(send_to=targets, stop=self.stopping, updated=updated, version=self.version)

    def _update(self) -> None:
        grads = self._buffer
        self._buffer = []
        factors = [self._lr_factors(version) for _, version, _ in grads]
        mean = torch.zeros(self.numel, dtype=torch.float32, device=self.params[0].device)
        # summed in worker order, not arrival order: the same contributors give the same bits whatever
        # the network did (sync SGD is then bitwise reproducible); the log keeps the arrival order
        by_worker = sorted(zip(grads, factors), key=lambda item: item[0][0])
        for (_, _, grad), per_group in by_worker:
            if self.staleness_lr is None:
                mean.add_(grad)
            else:
                for (start, stop), factor in zip(self.group_slices, per_group):
                    mean[start:stop].add_(grad[start:stop], alpha=factor)
        mean.div_(len(grads))
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = mean[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        self.optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()
        self.version += 1
        self.log.append(
            UpdateRecord(
                version=self.version,
                contributors=[(w, v) for w, v, _ in grads],
                staleness=[self.version - 1 - v for _, v, _ in grads],
                lr_factors=factors,
            )
        )
        if self.max_updates is not None and self.version >= self.max_updates:
            self.stopping = True
        self._remember_current()

    def _lr_factors(self, version: int) -> list[float]:
        """eta / lr per parameter group for a gradient of ``version`` used now."""
        if self.staleness_lr is None:
            return [1.0] * len(self.group_slices)
        old = self._history[version]
        current = self.flat_model()
        squared = float((current - old).pow(2).sum())
        lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        return [self.staleness_lr.rate(squared, lr) / lr for lr in lrs]

    def _remember_current(self) -> None:
        if self.staleness_lr is not None:
            self._history[self.version] = self.flat_model()

    def _prune_history(self) -> None:
        if self.staleness_lr is None:
            return
        keep = set(self.held.values()) | {v for _, v, _ in self._buffer} | {self.version}
        for version in [v for v in self._history if v not in keep]:
            del self._history[version]

    # -- checkpoint -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, schedulers, version and counters. Gradients waiting in the buffer are not
        kept: after a resume they are computed again."""
        return {
            "version": self.version,
            "model": self.flat_model(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "dropped": self.dropped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; every worker is then held at the restored version."""
        copy_flat_into(self.params, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for scheduler, sched_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(sched_state)
        self.version = int(state["version"])
        self.dropped = int(state.get("dropped", 0))
        self.held = dict.fromkeys(self.active, self.version)
        self.stopping = self.max_updates is not None and self.version >= self.max_updates
        self._history = {}
        self._remember_current()


def copy_flat_into(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy the flat vector ``flat`` (the layout of :meth:`ParameterServer.flat_model`) into ``params``."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def check_variant(k: Any, mode: Any, workers: int | None) -> None:
    """Raise ``ValueError``/``TypeError`` for a k or mode the variant cannot run with ``workers`` workers
    (``None``: not known yet; only k >= 1 is checked)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an integer, got {type(k).__name__}.")
    if workers is not None and workers < 1:
        raise ValueError("a parameter server needs at least one worker.")
    if mode == "batch":
        if k < 1:
            raise ValueError(f"k must be >= 1 for K-batch-async SGD, got {k}.")
        return
    if workers is None:
        if k < 1:
            raise ValueError(f"k must be in [1, P] (P: the number of workers) for this variant, got {k}.")
        return
    if not 1 <= k <= workers:
        raise ValueError(f"k must be in [1, {workers}] (the number of workers) for this variant, got {k}.")


def _group_slices(optimizer: Optimizer, params: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(start, stop) of each optimizer group in the flat layout; groups must be contiguous, in order."""
    position = {id(p): i for i, p in enumerate(params)}
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    slices, expected = [], 0
    for group in optimizer.param_groups:
        indices = [position.get(id(p)) for p in group["params"]]
        if any(i is None for i in indices) or indices != list(range(expected, expected + len(indices))):
            raise ValueError("the server's parameters must be the optimizer's, group after group, in order.")
        slices.append((offsets[expected], offsets[expected + len(indices)]))
        expected += len(indices)
    if expected != len(params):
        raise ValueError("every server parameter must belong to one optimizer parameter group.")
    return slices


def clone_optimizer(optimizer: Optimizer, params: Sequence[Tensor]) -> Optimizer:
    """A fresh optimizer of the same class and hyperparameters (per group) over ``params``, which are
    ``optimizer``'s parameters group after group in order (copies owned by the server). The state
    (momentum buffers) starts empty, as the original's does before its first step."""
    params = list(params)
    originals = [p for group in optimizer.param_groups for p in group["params"]]
    if len(originals) != len(params) or any(a.shape != b.shape for a, b in zip(originals, params)):
        raise ValueError("params must match the optimizer's parameters one to one, group after group.")
    memo = {id(original): replacement for original, replacement in zip(originals, params)}
    clone = copy.deepcopy(optimizer, memo)
    clone.__dict__.pop("step", None)  # a scheduler's step-tracking wrapper bound to the original
    clone.state.clear()
    return clone


def clone_scheduler(scheduler: Any, original: Optimizer, clone: Optimizer) -> Any:
    """``scheduler`` (built for ``original``) rebound to the server's ``clone`` of it."""
    _track_step_calls(clone)
    return copy.deepcopy(scheduler, {id(original): clone})


def _track_step_calls(optimizer: Optimizer) -> None:
    """What torch's LR schedulers do to their optimizer's ``step`` (mark that it was called), for a clone:
    the original's marker is bound to the original, which :func:`clone_optimizer` therefore drops."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = type(optimizer).step
    target = weakref.ref(optimizer)

    def tracked(*args: Any, **kwargs: Any) -> Any:
        opt = target()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    tracked._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = tracked  # type: ignore[method-assign]
