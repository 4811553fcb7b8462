"""Outer optimizers over local SGD: DiLoCo, SlowMo and Streaming DiLoCo (docs/ALGORITHMS.md).

Every H inner steps (``tau``) replica i, which started from the anchor x^(t-1), sends its pseudo-gradient
Delta_i = x^(t-1) - x_i; Delta = (1/m) sum_i Delta_i; the *outer optimizer* (any torch optimizer; the paper's:
SGD, lr 0.7, momentum 0.9, Nesterov) steps the anchor with gradient Delta, x^(t) = OuterOpt(x^(t-1), Delta),
and every replica restarts from x^(t). Inner optimizer state stays local (or is reset, ``momentum="zero"``).
Douillard et al. 2023 (DiLoCo); with outer SGD lr 1 and no momentum it is periodic averaging (local SGD
with ``momentum="local"``, up to floating-point rounding of x - (x - mean)); SlowMo (Wang et al. 2020) is
outer heavy-ball SGD (:class:`SlowMo`).

Streaming DiLoCo (Douillard et al. 2025) splits the model into F fragments (:mod:`.fragments`) with their
own anchors and outer optimizers. With K = H / F, fragment f sends its pseudo-gradient at inner steps
t = (f + 1) K - d (mod H) and applies its outer step d steps later, at t = (f + 1) K (mod H), counting inner
steps from 1 (the schedule of torchft's ``DiLoCo``): each round carries one fragment (peak bytes / F), and
the mean travels while d more inner steps run. On arrival the new global value g is merged with the local
value l the replica holds *then*: x_f <- lerp(g, l, w) = (1 - w) g + w l (``local_weight`` w; the paper's
alpha, torchft's ``fragment_update_alpha``).

Pseudo-gradients travel through any ``compressor``: a codec name or unbiased compressor through the
low-precision mean (:meth:`Communicator.all_reduce_mean_lowp_`), a biased one (top-k, sign) with error
feedback (each rank adds its last compression error to its next pseudo-gradient) through an all-gather of
payloads. The anchor and the outer optimizer's state are fp32 (whatever the model's dtype) on
``backup_device``; the outer step runs there, identically on every rank.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, as_schedule, check_choice
from lightning_commsgd.algorithms.finite import NONFINITE_POLICIES, finite_flags
from lightning_commsgd.algorithms.fragments import Fragment, check_fragments, split_into_fragments
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.algorithms.replica import ReplicaState, nonnegative_buffers
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.names import as_compressor
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.payload import rounding_seed
from lightning_commsgd.schedules import ConstantPeriod, PeriodSchedule

__all__ = [
    "OUTER_MOMENTUM_MODES",
    "DiLoCo",
    "OuterOptimizerFactory",
    "OuterStepAverager",
    "SlowMo",
    "StreamingDiLoCo",
    "paper_outer_optimizer",
]

#: what an outer step does to the inner optimizer state
OUTER_MOMENTUM_MODES = ("local", "zero")
OuterOptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


def paper_outer_optimizer(params: Iterable[Tensor]) -> Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


@dataclass
class _InFlight:
    """A fragment's mean pseudo-gradient on its way: ``wait()`` gives the mean (flags checked)."""

    fragment: int
    apply_step: int
    wait: Callable[[], Tensor]
    #: this rank's replica was not finite and was left out of the mean (``on_nonfinite="skip"``)
    skipped: bool = False


class OuterStepAverager(PeriodicAlgorithm):
    """One run of DiLoCo / SlowMo / Streaming DiLoCo on this rank (see the module docstring).

    Args:
        module: the replica x_i (parameters, and floating buffers with ``average_buffers``).
        optimizers: the inner optimizers (their parameters are the ones synchronised).
        communicator: carries and counts every collective.
        tau: H, inner steps between two outer steps of the same fragment; an int or (one fragment, no
            delay) a schedule such as AdaComm.
        outer_optimizer: builds the outer optimizer from a fragment's anchor tensors.
        outer_lr_scheduler: builds an LR scheduler for an outer optimizer (stepped after each of its outer
            steps); ``None``: constant outer lr.
        fragments: F, or a list of fragments of parameter-name prefixes (see :mod:`.fragments`).
        sync_delay: d, inner steps a fragment's mean travels before its outer step (0: blocking); < H / F.
        local_weight: w in [0, 1], weight of the local value when a fragment's new global value arrives.
        compressor: Q for the pseudo-gradients (``None``: exact fp32 mean).
        error_feedback: keep each rank's compression error and add it to its next pseudo-gradient (needed by
            biased compressors, refused without one).
        momentum: ``"local"`` (inner optimizer state kept) or ``"zero"`` (reset after each outer step of
            the fragment).
        average_buffers: floating buffers (BatchNorm statistics) are averaged (as values) at each sync.
        backup_device: where anchors and outer-optimizer state live (``None``: the model's device).
        scale_by_inner_lr: SlowMo: the outer gradient is Delta / gamma and the outer lr alpha gamma, gamma the
            inner optimizer's lr at the outer step (alpha: the outer optimizer's lr as built).
        on_nonfinite: a replica with NaN/Inf at a sync: ``"raise"`` (every rank raises ``NonFiniteError``)
            or ``"skip"`` (exact means only: the mean of the finite replicas; the poisoned one takes the new
            global value of the fragment and forgets its inner state for it).
    """

    round_tags = ("outer_step", "final")
    FINAL_SEED_OFFSET = 1 << 40  # the final sync's rounding streams, apart from every round's

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        *,
        tau: int | PeriodSchedule = 500,
        outer_optimizer: OuterOptimizerFactory = paper_outer_optimizer,
        outer_lr_scheduler: SchedulerFactory | None = None,
        fragments: int | list[list[str]] = 1,
        sync_delay: int = 0,
        local_weight: float = 0.0,
        compressor: Compressor | None = None,
        error_feedback: bool = False,
        momentum: str = "local",
        average_buffers: bool = True,
        backup_device: str | torch.device | None = None,
        scale_by_inner_lr: bool = False,
        on_nonfinite: str = "raise",
    ) -> None:
        momentum = check_choice(momentum, "momentum", OUTER_MOMENTUM_MODES)
        super().__init__(ReplicaState(module, optimizers, momentum, average_buffers), communicator, tau)
        self.on_nonfinite = check_nonfinite_policy(on_nonfinite, compressor)
        self.fragments: list[Fragment] = split_into_fragments(
            module,
            self.replica.params,
            check_fragments(fragments),
            {id(b) for b in nonnegative_buffers(module)},
            average_buffers,
        )
        self.sync_delay, self.local_weight = sync_delay, float(local_weight)
        self.compressor, self.error_feedback = compressor, error_feedback
        self.streaming = len(self.fragments) > 1 or sync_delay > 0
        check_streaming_period(self.schedule, len(self.fragments), sync_delay)
        self.device = self.replica.params[0].device
        self.backup_device = torch.device(backup_device) if backup_device is not None else self.device
        self.anchors = [self._new_anchor(f) for f in self.fragments]  # fp32 x^(t) per fragment
        self.anchor_params = [self._anchor_views(a, f) for a, f in zip(self.anchors, self.fragments)]
        self.outer_optimizers = [outer_optimizer(views) for views in self.anchor_params]
        self.outer_schedulers = [
            None if outer_lr_scheduler is None else outer_lr_scheduler(opt) for opt in self.outer_optimizers
        ]
        self.residuals: list[Tensor | None] = [None] * len(self.fragments)  # e_i per fragment
        self._flats: list[FlatBuffer | None] = [None] * len(self.fragments)
        self.in_flight: _InFlight | None = None
        self._fresh = [True] * len(self.fragments)  # the fragment equals its anchor on every rank
        self.last_pseudo_gradient_norm = 0.0
        self.scale_by_inner_lr = scale_by_inner_lr
        self._slow_lr = [float(opt.param_groups[0]["lr"]) for opt in self.outer_optimizers]

    def _slowmo_scaling(self, f: int, gradient: Tensor) -> None:
        gamma = self._learning_rate()
        if gamma is None or gamma <= 0:
            raise ValueError(f"SlowMo needs the inner optimizer's learning rate gamma > 0, got {gamma}.")
        gradient.div_(gamma)
        for group in self.outer_optimizers[f].param_groups:
            group["lr"] = self._slow_lr[f] * gamma

    # -- anchors -------------------------------------------------------------------------------------
    def _new_anchor(self, fragment: Fragment) -> Tensor:
        flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in fragment.params])
        anchor = flat.to(self.backup_device, copy=True)
        if anchor.device.type == "cpu" and self.device.type == "cuda":
            anchor = anchor.pin_memory()  # the copies to and from the accelerator run asynchronously
        return anchor

    @staticmethod
    def _anchor_views(anchor: Tensor, fragment: Fragment) -> list[Tensor]:
        """A flat fragment-sized tensor (the anchor, or the mean pseudo-gradient) as tensors shaped like the
        fragment's parameters, views of its storage: the outer optimizer's parameters and their gradients,
        so per-tensor optimizers (LAMB, weight decay) see the model's shapes."""
        views, offset = [], 0
        for p in fragment.params:
            views.append(anchor[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    # -- the schedule --------------------------------------------------------------------------------
    def _send_offset(self, f: int) -> int:
        return (f + 1) * (self.tau // len(self.fragments)) - self.sync_delay

    def after_optimizer_step(self) -> bool:
        self._fresh = [False] * len(self.fragments)
        if not self.streaming:
            return super().after_optimizer_step()  # a blocking outer step every tau (schedules allowed)
        self.step += 1
        self.schedule.on_step(self.step, self._learning_rate(), self._loss_sum, self._loss_count)
        self._loss_sum, self._loss_count = 0.0, 0
        return self._streaming_rounds()

    def _streaming_rounds(self) -> bool:
        """Streaming, at the current step: the fragment in flight lands if its step came, and the fragment
        whose offset this step is sends (and lands at once without a delay). Returns whether one landed."""
        landed = 0
        if self.in_flight is not None and self.in_flight.apply_step == self.step:
            self._land(tag="outer_step")
            landed += 1
        for f in range(len(self.fragments)):
            if self.step >= self._send_offset(f) and (self.step - self._send_offset(f)) % self.tau == 0:
                self._send(f, tag="outer_step", apply_step=self.step + self.sync_delay)
                if self.sync_delay == 0:
                    self._land(tag="outer_step")
                    landed += 1
        self.rounds += landed  # a round: one fragment's outer step
        return landed > 0

    def communicate(self, tag: str) -> None:
        """One blocking outer step of the whole model (one fragment, no delay; ledger tag ``outer_step``,
        whatever the base's round calls it)."""
        self._send(0, tag="outer_step", apply_step=self.step)
        self._land(tag="outer_step")

    # -- a fragment's sync ---------------------------------------------------------------------------
    def _pack_fragment(self, f: int) -> Tensor:
        tensors = self.fragments[f].tensors
        flat = self._flats[f]
        if flat is None or not flat.matches(tensors):
            flat = self._flats[f] = FlatBuffer(tensors, dtype=torch.float32)
        return flat.pack(tensors)

    def _send(self, f: int, *, tag: str, apply_step: int, seed_offset: int = 0) -> None:
        """Start fragment f's sync: its pseudo-gradient (anchor - local) and buffer values leave now."""
        assert self.in_flight is None, "one fragment in flight at a time (sync_delay < H / F)"
        fragment = self.fragments[f]
        n = fragment.param_numel
        with torch.no_grad():
            message = self._pack_fragment(f).clone()
            message[:n] = self.anchors[f].to(self.device, non_blocking=True) - message[:n]
        nonnegative = sum(b.numel() for b in fragment.nonnegative_buffers)
        comm, seed = self.communicator, self.step + seed_offset
        skipped = False
        if self.compressor is None:
            wait, skipped = self._exact_mean(message, fragment, tag)
        elif self.error_feedback:
            wait = self._error_feedback_mean(f, message, n, tag, seed)
        else:
            self._refuse_nonfinite(fragment.tensors)
            if self.sync_delay > 0:
                pending = comm.all_reduce_mean_lowp_async(
                    message, self.compressor, tag=tag, seed=seed, nonnegative=nonnegative
                )
                wait = pending.wait
            else:
                comm.all_reduce_mean_lowp_(
                    message, self.compressor, tag=tag, seed=seed, nonnegative=nonnegative
                )

                def wait() -> Tensor:
                    return message

        self.in_flight = _InFlight(f, apply_step, wait, skipped)

    def _exact_mean(self, message: Tensor, fragment: Fragment, tag: str) -> tuple[Callable[[], Tensor], bool]:
        """The exact mean, the finite flags riding behind the values (every rank raises alike, or, with
        ``on_nonfinite="skip"``, the mean of the finite replicas); and whether this rank is left out."""
        comm = self.communicator
        if not comm.is_distributed:
            return (lambda: message), False
        p = comm.world_size
        finite = self._replica_finite(fragment.tensors)
        if not finite:
            message.zero_()  # contributes nothing (NaN never reaches the sum)
        buffer = torch.cat([message, finite_flags(finite, comm.rank, p, message.device)])
        if self.sync_delay > 0:
            pending = comm.all_reduce_mean_async(buffer, tag=tag)  # divided by p when waited for
        else:
            comm.all_reduce_(buffer, "sum", tag=tag)
            buffer.div_(p)

        def wait() -> Tensor:
            arrived = pending.wait() if self.sync_delay > 0 else buffer
            poisoned = self._check_flags(arrived[-p:] * p, comm)  # raises unless on_nonfinite="skip"
            if poisoned:
                arrived.mul_(p / (p - len(poisoned)))  # the mean of the finite replicas
            return arrived[:-p]

        return wait, not finite

    def _error_feedback_mean(
        self, f: int, message: Tensor, n: int, tag: str, seed: int
    ) -> Callable[[], Tensor]:
        """A biased compressor: C(Delta_i + e_i) all-gathered (blocking) and averaged, e_i kept; buffers as
        an exact mean."""
        assert self.compressor is not None
        comm = self.communicator
        self._refuse_nonfinite(self.fragments[f].tensors)
        residual = self.residuals[f]
        corrected = message[:n] + (residual if residual is not None else 0.0)
        generator = torch.Generator(device=message.device).manual_seed(rounding_seed(seed, comm.rank, 2))
        payload = self.compressor.encode(corrected, generator)
        self.residuals[f] = corrected - self.compressor.decode(payload, n)
        total = torch.zeros(n, dtype=torch.float32, device=message.device)
        for received in comm.all_gather(payload, tag=tag):
            total += self.compressor.decode(received, n)
        mean = message.clone()
        mean[:n] = total / comm.world_size
        if mean.numel() > n:
            mean[n:] = comm.all_reduce_(message[n:].clone(), "mean", tag=tag)
        return lambda: mean

    def _land(self, *, tag: str, local_weight: float | None = None) -> None:
        """The fragment in flight arrives: the outer step, then the merge with the local value."""
        assert self.in_flight is not None
        f, mean, skipped = self.in_flight.fragment, self.in_flight.wait(), self.in_flight.skipped
        self.in_flight = None
        fragment, weight = self.fragments[f], self.local_weight if local_weight is None else local_weight
        if skipped:
            weight = 0.0  # the poisoned replica's own value is not finite: it takes the global one
        n = fragment.param_numel
        self.last_pseudo_gradient_norm = float(mean[:n].norm())  # ||Delta||, before SlowMo's 1/gamma
        with torch.no_grad():
            # blocking: a non-blocking device-to-host copy may not have landed when the CPU step reads it
            gradient = mean[:n].to(self.backup_device)
            if self.scale_by_inner_lr:
                self._slowmo_scaling(f, gradient)
            for view, grad in zip(self.anchor_params[f], self._anchor_views(gradient, fragment)):
                view.grad = grad
            self.outer_optimizers[f].step()
            for view in self.anchor_params[f]:
                view.grad = None
            scheduler = self.outer_schedulers[f]
            if scheduler is not None:
                scheduler.step()
            merged = torch.cat([self.anchors[f].to(self.device, non_blocking=True), mean[n:]])
            if weight > 0:
                merged = torch.lerp(merged, self._pack_fragment(f), weight)
            assert self._flats[f] is not None
            self._flats[f].unpack(fragment.tensors, merged)  # type: ignore[union-attr]
        if self.replica.momentum == "zero" or skipped:
            for opt in self.replica.optimizers:
                for param in fragment.params:
                    opt.state.pop(param, None)
        self._fresh[f] = weight == 0

    # -- the protocol --------------------------------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        return self.in_flight is None and all(self._fresh)

    def finalize(self) -> None:
        """The fragment in flight lands; then every fragment with inner steps since its latest outer step
        takes one more (tag ``"final"``), merged with weight 0: every replica ends on the global model."""
        if self.in_flight is not None:
            self._land(tag="outer_step")
        for f in range(len(self.fragments)):
            if not self._fresh[f]:
                self._send(f, tag="final", apply_step=self.step, seed_offset=self.FINAL_SEED_OFFSET)
                self._land(tag="final", local_weight=0.0)

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            "outer_lr": float(self.outer_optimizers[0].param_groups[0]["lr"]),
            "pseudo_gradient_norm": self.last_pseudo_gradient_norm,
        }

    def extra_state(self) -> dict[str, Any]:
        """Anchors, outer optimizers and schedulers, error residuals and the fragment in flight (its mean
        waited for now: it is complete in the checkpoint and lands at its step after a resume)."""
        in_flight = None
        if self.in_flight is not None:
            arrived = self.in_flight.wait()
            flight = self.in_flight
            self.in_flight = _InFlight(flight.fragment, flight.apply_step, lambda: arrived, flight.skipped)
            in_flight = {
                "fragment": flight.fragment,
                "apply_step": flight.apply_step,
                "mean": arrived.detach().cpu().clone(),
                "skipped": flight.skipped,
            }
        return {
            "anchors": [a.detach().cpu().clone() for a in self.anchors],
            "outer_optimizers": [opt.state_dict() for opt in self.outer_optimizers],
            "outer_schedulers": [None if s is None else s.state_dict() for s in self.outer_schedulers],
            "residuals": [None if r is None else r.detach().cpu().clone() for r in self.residuals],
            "in_flight": in_flight,
            "fresh": list(self._fresh),
            "last_pseudo_gradient_norm": self.last_pseudo_gradient_norm,
        }

    def load_resized_state_dict(self, state: dict[str, Any]) -> None:
        """Rank 0's state of a run on another world size: anchors, outer optimizers, schedulers and the
        fragment in flight (a complete mean) carry over; error residuals, which are per rank, start at 0;
        the replicas (the consensus model) differ from the anchors until each fragment's next outer step."""
        state = dict(state)
        state["residuals"] = [None] * len(self.fragments)
        state["fresh"] = [False] * len(self.fragments)
        super().load_resized_state_dict(state)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for anchor, saved in zip(self.anchors, state["anchors"]):
                anchor.copy_(saved)
        for opt, saved in zip(self.outer_optimizers, state["outer_optimizers"]):
            opt.load_state_dict(saved)
        for scheduler, saved in zip(self.outer_schedulers, state["outer_schedulers"]):
            if scheduler is not None and saved is not None:
                scheduler.load_state_dict(saved)
        self.residuals = [None if r is None else r.to(self.device) for r in state["residuals"]]
        saved_flight = state["in_flight"]
        self.in_flight = None
        if saved_flight is not None:
            mean = saved_flight["mean"].to(self.device)
            fragment, apply_step = int(saved_flight["fragment"]), int(saved_flight["apply_step"])
            self.in_flight = _InFlight(fragment, apply_step, lambda: mean, bool(saved_flight["skipped"]))
        self._fresh = [bool(x) for x in state["fresh"]]
        self.last_pseudo_gradient_norm = float(state["last_pseudo_gradient_norm"])


def check_streaming_period(schedule: PeriodSchedule, fragments: int, sync_delay: int) -> None:
    """Streaming (F > 1 or a delay) needs a constant H that F divides, and d < H / F."""
    if fragments == 1 and sync_delay == 0:
        return
    if not isinstance(schedule, ConstantPeriod):
        raise ValueError(
            "Arg `tau`: a period schedule works with one fragment and sync_delay=0 only (Streaming DiLoCo's "
            "fragments sync at fixed offsets of a constant H)."
        )
    if schedule.tau % fragments:
        raise ValueError(f"Arg `tau` ({schedule.tau}) must be a multiple of the fragments ({fragments}).")
    if sync_delay >= schedule.tau // fragments:
        raise ValueError(
            f"Arg `sync_delay` ({sync_delay}) must be below tau / fragments ({schedule.tau // fragments}): "
            "one fragment is in flight at a time."
        )


def check_nonfinite_policy(on_nonfinite: Any, compressor: Any) -> str:
    policy = check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
    if policy == "skip" and compressor is not None:
        raise ValueError(
            'Arg `on_nonfinite="skip"` needs exact means (compressor=None): the finite flags cannot ride in '
            "a compressed payload."
        )
    return policy


def check_sync_delay(sync_delay: Any) -> int:
    if isinstance(sync_delay, bool) or not isinstance(sync_delay, int) or sync_delay < 0:
        raise ValueError(
            f"Arg `sync_delay` must be an int >= 0 (d, inner steps a sync travels), got {sync_delay!r}."
        )
    return sync_delay


def check_local_weight(local_weight: Any) -> float:
    if (
        isinstance(local_weight, bool)
        or not isinstance(local_weight, (int, float))
        or not 0 <= local_weight <= 1
    ):
        raise ValueError(f"Arg `local_weight` must be a number in [0, 1] (w), got {local_weight!r}.")
    return float(local_weight)


def check_outer_compressor(compressor: Any, error_feedback: Any) -> tuple[Compressor | None, bool]:
    """The pseudo-gradients' codec, and whether error feedback runs: a biased codec needs it."""
    codec = as_compressor(compressor, "compressor", allow_none=True)
    if not isinstance(error_feedback, bool):
        raise TypeError(f"Arg `error_feedback` must be a bool, got {error_feedback!r}.")
    if error_feedback and codec is None:
        raise ValueError("Arg `error_feedback=True` needs a `compressor`.")
    if codec is not None and not (codec.unbiased or isinstance(codec, Cast)) and not error_feedback:
        raise ValueError(
            f"Arg `compressor` {codec!r} is biased: its error would shift every outer step; set "
            "error_feedback=True (each rank adds its last compression error to its next pseudo-gradient)."
        )
    return codec, error_feedback


class DiLoCo(AlgorithmConfig):
    """DiLoCo (Douillard et al. 2023): local steps with the inner optimizer; every ``tau`` (H) steps the
    outer optimizer steps the anchor with the mean pseudo-gradient, and every replica restarts from it.

    Args:
        tau: H, inner steps between outer steps (the paper: 500); an int >= 1 or a schedule such as
            ``AdaComm`` (asked after every outer step).
        outer_optimizer: builds the outer optimizer from the anchor's tensors, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)`` (the default, the
            paper's) or, from YAML, ``class_path: torch.optim.SGD`` with ``init_args``.
        outer_lr_scheduler: builds an LR scheduler for the outer optimizer, stepped after every outer step
            (e.g. ``functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=100)``); ``None``:
            a constant outer lr.
        compressor: Q for the pseudo-gradients: ``None`` (exact fp32 mean), a codec name (``"bf16"``,
            ``"fp16"``, ``"int8"``, ``"int4"``) or a compressor; a biased one (``TopK``, ``ScaledSign``)
            needs ``error_feedback=True``.
        error_feedback: e_i, each rank adds its last compression error to its next pseudo-gradient.
        momentum: the inner optimizer state at an outer step: ``"local"`` (default, the paper: kept) or
            ``"zero"`` (reset).
        average_buffers: floating buffers (BatchNorm statistics) are averaged, as values, at each outer step.
        backup_device: where the anchor and the outer optimizer's state live, e.g. ``"cpu"`` (pinned when
            the model is on CUDA) so the extra copy costs no accelerator memory; ``None``: the model's device.
        on_nonfinite: NaN or Inf in a replica (parameters, inner optimizer state, buffers) at an outer step:
            ``"raise"`` (default: every rank raises ``NonFiniteError`` naming the ranks and the step) or
            ``"skip"`` (exact means only: the pseudo-gradient is the finite replicas' mean, and the poisoned
            replica takes the new global model and forgets its inner optimizer state).
    """

    name = "diloco"
    #: SlowMo's 1/gamma scaling of the outer step (see :class:`OuterStepAverager`)
    scale_by_inner_lr: bool = False

    def __init__(
        self,
        tau: int | PeriodSchedule = 500,
        outer_optimizer: OuterOptimizerFactory | None = None,
        outer_lr_scheduler: SchedulerFactory | None = None,
        compressor: str | Compressor | None = None,
        error_feedback: bool = False,
        momentum: str = "local",
        average_buffers: bool = True,
        backup_device: str | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        self.outer_optimizer = check_factory(outer_optimizer, "outer_optimizer") or paper_outer_optimizer
        self.outer_lr_scheduler = check_factory(outer_lr_scheduler, "outer_lr_scheduler")
        self.compressor, self.error_feedback = check_outer_compressor(compressor, error_feedback)
        self.momentum = check_choice(momentum, "momentum", OUTER_MOMENTUM_MODES)
        self.average_buffers = bool(average_buffers)
        self.backup_device = None if backup_device is None else str(torch.device(backup_device))
        self.on_nonfinite = check_nonfinite_policy(on_nonfinite, self.compressor)
        self.fragments: int | list[list[str]] = 1
        self.sync_delay, self.local_weight = 0, 0.0

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> OuterStepAverager:
        return OuterStepAverager(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),  # a fresh schedule per run
            outer_optimizer=self.outer_optimizer,
            outer_lr_scheduler=self.outer_lr_scheduler,
            fragments=self.fragments,
            sync_delay=self.sync_delay,
            local_weight=self.local_weight,
            compressor=self.compressor,
            error_feedback=self.error_feedback,
            momentum=self.momentum,
            average_buffers=self.average_buffers,
            backup_device=self.backup_device,
            scale_by_inner_lr=self.scale_by_inner_lr,
            on_nonfinite=self.on_nonfinite,
        )


class StreamingDiLoCo(DiLoCo):
    """Streaming DiLoCo (Douillard et al. 2025): DiLoCo with the model in F fragments synchronised at
    staggered times, each sync overlapped with ``sync_delay`` inner steps and merged with weight
    ``local_weight`` on arrival (see :mod:`lightning_commsgd.algorithms.diloco`). Peak bytes per round: one
    fragment's.

    Args:
        tau: H, inner steps between two outer steps of the same fragment (the paper: 100); a multiple of
            the number of fragments. Constant (schedules need one fragment and no delay: :class:`DiLoCo`).
        fragments: F, the model's layers dealt out in turn (layer j to fragment j mod F, the paper's strided
            pattern), or a list of fragments, each a list of parameter-name prefixes.
        sync_delay: d (the paper's tau), inner steps a fragment's mean travels before its outer step;
            0 <= d < H / F.
        local_weight: w (the paper's alpha, torchft's ``fragment_update_alpha``): on arrival
            x_f <- (1 - w) * global + w * local, the local value being the replica's at arrival. The
            paper's 0.5 by default; 0 takes the global value (torchft's default).
        outer_optimizer: as for :class:`DiLoCo`; one outer optimizer per fragment.
        outer_lr_scheduler: as for :class:`DiLoCo`; one scheduler per fragment's outer optimizer.
        compressor: Q for the pseudo-gradients, as for :class:`DiLoCo` (the paper: 4 bits, e.g. ``"int4"``).
        error_feedback: e_i, as for :class:`DiLoCo`.
        momentum: the inner optimizer state: ``"local"`` (default) or ``"zero"`` (reset at the fragment's
            outer step, for its parameters).
        average_buffers: floating buffers travel with their module's fragment, as values.
        backup_device: where the anchors and the outer optimizers' state live, as for :class:`DiLoCo`.
        on_nonfinite: ``"raise"`` or ``"skip"`` at each fragment's sync, as for :class:`DiLoCo`.
    """

    name = "streaming_diloco"

    def __init__(
        self,
        tau: int = 100,
        fragments: int | list[list[str]] = 2,
        sync_delay: int = 1,
        local_weight: float = 0.5,
        outer_optimizer: OuterOptimizerFactory | None = None,
        outer_lr_scheduler: SchedulerFactory | None = None,
        compressor: str | Compressor | None = None,
        error_feedback: bool = False,
        momentum: str = "local",
        average_buffers: bool = True,
        backup_device: str | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(
            tau, outer_optimizer, outer_lr_scheduler, compressor, error_feedback, momentum, average_buffers,
            backup_device, on_nonfinite,
        )  # fmt: skip
        self.fragments = check_fragments(fragments)
        self.sync_delay = check_sync_delay(sync_delay)
        self.local_weight = check_local_weight(local_weight)
        count = self.fragments if isinstance(self.fragments, int) else len(self.fragments)
        check_streaming_period(as_schedule(self.tau), count, self.sync_delay)


class SlowMo(DiLoCo):
    """SlowMo (Wang, Tantia, Ballas, Rabbat, ICLR 2020) over exact periodic averaging: every ``tau`` steps
    x_bar = mean_i x_i, then u <- beta u + (x_anchor - x_bar) / gamma and
    x_anchor <- x_anchor - alpha gamma u,
    gamma the inner optimizer's learning rate at that step. That is DiLoCo's outer heavy-ball SGD (lr alpha,
    momentum beta, no Nesterov) on the pseudo-gradient Delta scaled by 1/gamma with outer lr alpha gamma, so
    a changing inner lr is followed exactly (with a constant gamma: outer SGD(lr=alpha, momentum=beta)).

    Args:
        tau: the base algorithm's period (fairscale's ``slowmo_frequency`` default 48).
        slow_lr: alpha, the slow learning rate (default 1.0, fairscale's).
        slow_momentum: beta, the slow momentum (default 0.5, fairscale's).
        momentum: the inner optimizer state at a round: ``"local"`` (default) or ``"zero"`` (reset).
        average_buffers: floating buffers (BatchNorm statistics) are averaged, as values, at each round.
        backup_device: where the anchor and the slow momentum live, as for :class:`DiLoCo`.
        on_nonfinite: ``"raise"`` or ``"skip"``, as for :class:`DiLoCo`.
    """

    name = "slowmo"
    scale_by_inner_lr = True

    def __init__(
        self,
        tau: int | PeriodSchedule = 48,
        slow_lr: float = 1.0,
        slow_momentum: float = 0.5,
        momentum: str = "local",
        average_buffers: bool = True,
        backup_device: str | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        if isinstance(slow_lr, bool) or not isinstance(slow_lr, (int, float)) or not slow_lr > 0:
            raise ValueError(f"Arg `slow_lr` must be a number > 0 (alpha), got {slow_lr!r}.")
        if (
            isinstance(slow_momentum, bool)
            or not isinstance(slow_momentum, (int, float))
            or not 0 <= slow_momentum < 1
        ):
            raise ValueError(f"Arg `slow_momentum` must be a number in [0, 1) (beta), got {slow_momentum!r}.")
        self.slow_lr, self.slow_momentum = float(slow_lr), float(slow_momentum)
        outer = functools.partial(torch.optim.SGD, lr=self.slow_lr, momentum=self.slow_momentum)
        super().__init__(
            tau, outer, None, None, False, momentum, average_buffers, backup_device, on_nonfinite
        )


def check_factory(factory: Any, name: str) -> Any:
    if factory is not None and not callable(factory):
        raise TypeError(
            f"Arg `{name}` must be a callable that builds it (e.g. "
            "functools.partial(torch.optim.SGD, lr=0.7)), "
            f"got {type(factory).__name__}."
        )
    return factory
