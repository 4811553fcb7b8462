"""Elastic averaging SGD (EASGD; Zhang, Choromanska, LeCun 2015) as Cooperative SGD A(tau, W_alpha, 1).

m workers and one auxiliary centre variable z (x_0 at the start). Every tau steps, with the x_i from
before the update (docs/ALGORITHMS.md section 4; the Cooperative SGD authors' code)::

    x_i <- (1 - alpha) x_i + alpha z
    z   <- (1 - m alpha) z + alpha sum_i x_i

The sum is one all-reduce; every rank holds its own copy of z and updates it from the same all-reduced
sum, so the copies stay bitwise equal without anyone sending z.

Stability: W_alpha has eigenvalues 1, 1 - alpha (m - 1 times) and 1 - (m + 1) alpha, so
zeta = max(|1 - alpha|, |1 - (m + 1) alpha|) < 1 exactly when 0 < alpha < 2 / (m + 1). zeta is smallest,
m / (m + 2), at alpha = 2 / (m + 2): the default. (Summaries of Wang & Joshi's Cooperative SGD analysis
quote "alpha = m/(m+2)"; with this update that alpha leaves the stable range for every m > 2, e.g. m = 4
gives 1 - 5 * 4/6 = -7/3: m/(m+2) is the minimal zeta, not the alpha.) The original paper's
beta = m alpha = 0.9 is alpha = 0.9/m.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, as_schedule, check_choice
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.algorithms.replica import ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.schedules import PeriodSchedule

__all__ = ["ELASTIC_MOMENTUM_MODES", "ElasticAverager", "ElasticAveraging", "default_alpha", "validate_alpha"]

ELASTIC_MOMENTUM_MODES: tuple[str, ...] = ("local", "zero")


def default_alpha(world_size: int) -> float:
    """alpha* = 2 / (m + 2), the moving rate with the smallest zeta (m / (m + 2))."""
    return 2.0 / (world_size + 2)


def validate_alpha(alpha: Any, world_size: int | None = None) -> float | None:
    """``None`` (use :func:`default_alpha`) or a float in the stable range (0, 2 / (m + 1))."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"Arg `alpha` must be a finite float or None, got {alpha!r}.")
    upper = 1.0 if world_size is None else 2.0 / (world_size + 1)
    if not 0 < alpha < upper:
        where = "(0, 1)" if world_size is None else f"(0, 2/(m+1)) = (0, {upper:.4g}) for m = {world_size}"
        raise ValueError(f"Arg `alpha` must lie in {where} for elastic averaging to be stable, got {alpha}.")
    return float(alpha)


class ElasticAverager(PeriodicAlgorithm):
    """EASGD with a replicated centre variable z.

    Args:
        module: this worker's model x_i.
        optimizers: the optimizers stepping ``module`` (their state stays local).
        communicator: carries the all-reduce of sum_i x_i (payload: the model, once per round).
        tau: local steps between elastic rounds (an int or a schedule).
        alpha: moving rate alpha in (0, 2/(m+1)); ``None`` for alpha* = 2/(m+2).
        momentum: ``"local"`` (default; EASGD keeps each worker's momentum) or ``"zero"`` (reset after
            each round).
        average_buffers: floating-point buffers take part in the elastic update like parameters.

    :meth:`finalize` loads z into every replica: the centre variable is the model EASGD outputs.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        *,
        tau: int | PeriodSchedule = 4,
        alpha: float | None = None,
        momentum: Literal["local", "zero"] = "local",
        average_buffers: bool = True,
    ) -> None:
        check_choice(momentum, "momentum", ELASTIC_MOMENTUM_MODES)
        m = communicator.world_size
        self.alpha = validate_alpha(alpha, m) or default_alpha(m)
        super().__init__(ReplicaState(module, optimizers, momentum, average_buffers), communicator, tau)
        self.momentum = momentum
        tensors = self.replica.averaged_tensors()
        self.center: Tensor = self._pack(tensors).clone()  # z_0 = x_0 (identical on all ranks)
        self._center_at_step: int | None = 0

    round_tags = ("average", "final")

    @property
    def in_sync(self) -> bool:
        """Replicas are equal only at the start and after :meth:`finalize`."""
        return self._center_at_step == self.step

    def communicate(self, tag: str) -> None:
        tensors = self.replica.averaged_tensors()
        m = self.communicator.world_size
        # sum_i x_i, with the finite flags riding behind it (a poisoned replica raises on every rank here)
        total = self._flagged_sum_(tensors, "elastic", self.communicator)[0].clone()
        local = self._pack(tensors)
        if self._consensus_due():
            head = self.replica.param_numel
            self._record_consensus(local[:head], total[:head] / m)
        new_local = local * (1 - self.alpha) + self.center * self.alpha
        self.center.mul_(1 - m * self.alpha).add_(total, alpha=self.alpha)
        self._unpack(tensors, new_local)
        if self.momentum == "zero":
            self.replica.reset_optimizer_state()

    def finalize(self) -> None:
        """Every replica <- z (no communication: z is replicated)."""
        tensors = self.replica.averaged_tensors()
        self._pack(tensors)
        self._unpack(tensors, self.center)
        self._center_at_step = self.step

    def extra_state(self) -> dict[str, Any]:
        return {"center": self.center.detach().cpu().clone(), "center_at_step": self._center_at_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.center = state["center"].to(device=self.center.device, dtype=self.center.dtype).clone()
        self._center_at_step = state["center_at_step"]


class ElasticAveraging(AlgorithmConfig):
    """Elastic averaging SGD (EASGD, Zhang, Choromanska, LeCun 2015): every ``tau`` steps,
    ``x_i <- (1 - alpha) x_i + alpha z`` and ``z <- (1 - m alpha) z + alpha sum_i x_i`` with a centre
    variable z replicated on every rank (Cooperative SGD A(tau, W_alpha, 1)). At the end of training every
    replica is set to z, the model EASGD outputs.

    Args:
        tau: local steps between elastic rounds (int >= 1 or a schedule).
        alpha: the pull towards the centre (EASGD's moving rate alpha), stable for 0 < alpha < 2/(m+1);
            ``None`` (default) picks alpha* = 2/(m+2), the rate with the smallest zeta = m/(m+2).
        momentum: ``"local"`` (default) or ``"zero"``.
        average_buffers: floating-point buffers take part in the update like parameters.
    """

    name = "elastic_averaging"

    def __init__(
        self,
        tau: int | PeriodSchedule = 4,
        alpha: float | None = None,
        momentum: Literal["local", "zero"] = "local",
        average_buffers: bool = True,
    ) -> None:
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        self.alpha = validate_alpha(alpha)
        self.momentum = check_choice(momentum, "momentum", ELASTIC_MOMENTUM_MODES)
        self.average_buffers = bool(average_buffers)

    def check_world(self, world: World) -> None:
        validate_alpha(self.alpha, world.size)  # the stable range depends on m

    def describe(self, world: World) -> str:
        alpha = self.alpha if self.alpha is not None else default_alpha(world.size)
        return f"m = {world.size}, alpha = {alpha:.4g}"

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> ElasticAverager:
        return ElasticAverager(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),
            alpha=self.alpha,
            momentum=self.momentum,  # type: ignore[arg-type]
            average_buffers=self.average_buffers,
        )
