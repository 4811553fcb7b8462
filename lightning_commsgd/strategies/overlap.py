"""OverlapLocalSGDStrategy: local SGD whose averaging all-reduce runs behind the next tau local steps."""

from __future__ import annotations

import copy
from typing import Any

from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.algorithms.base import as_schedule
from lightning_commsgd.algorithms.overlap import (
    OverlapLocalSGD,
    validate_correction,
    validate_overlap_momentum,
    validate_pull,
)
from lightning_commsgd.comm import Communicator
from lightning_commsgd.payload import validate_payload_dtype
from lightning_commsgd.schedules import PeriodSchedule
from lightning_commsgd.strategies.base import CommunicationStrategy

__all__ = ["OverlapLocalSGDStrategy"]


class OverlapLocalSGDStrategy(CommunicationStrategy):
    """Overlap Local-SGD (Wang, Liang, Joshi 2020): every ``tau`` steps each worker is pulled towards the
    anchor (the average started one round earlier, which had ``tau`` local steps to arrive) and starts the
    next average in the background; no rank waits for the network unless it is slower than ``tau`` local
    steps. See :mod:`lightning_commsgd.algorithms.overlap`.

    Args:
        tau: local steps between rounds (an int >= 1 or a schedule).
        alpha: pull strength alpha in (0, 1): x_i <- (1 - alpha) x_i + alpha z. Default 0.5. (At 1 every
            worker would send the anchor back unchanged and training would stand still.)
        anchor_momentum: beta in [0, 1), the paper's momentum variant on the anchor; 0 (default) averages
            the pulled models.
        average_buffers: BatchNorm statistics ride with the parameters.
        payload_dtype: ``None`` (default, fp32), ``"bf16"`` / ``"fp16"``, ``"int8"`` or ``"int4"``: each
            rank's change since the anchor travels in that format, summed in fp32 (half the bytes in 16 bits,
            about a quarter in int8 and a seventh in int4, which round stochastically and without bias; only
            the change is rounded, and every rank decodes the same messages; see
            :mod:`lightning_commsgd.payload`). The messages run on a helper thread over a second process
            group, so they hide behind the next ``tau`` local steps as the fp32 all-reduce does. Fit's last
            average uses the same format.
        correction: ``"pull"`` (default, the paper) or ``"cocod"``: apply the arrived average as CoCoD-SGD
            does, x <- x + (z_k - x^(k)) (swap the model sent at round k for the average, keep the local
            progress since), which leaves the mean model where the local steps took it; alpha and
            anchor_momentum are then unused (anchor_momentum must be 0).
        momentum: the optimizer state (momentum, Adam's moments) at a round: ``"local"`` (default, the
            paper: never touched) or ``"zero"`` (reset after every round). ``"average"`` is refused at
            construction: the average arrives a round late and is folded into a replica that moved on,
            which gives optimizer state no defined meaning; use ``LocalSGDStrategy`` for PR-SGD-Momentum.
        **kwargs: see :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`.

    The optimizer state (momentum) stays local by default, as in the paper. The trajectory does not depend
    on timing (the average started at round k is applied at round k+1); after fit one blocking average
    leaves every rank with the same model.
    """

    strategy_name = "overlap_local_sgd"

    def __init__(
        self,
        tau: int | PeriodSchedule = 8,
        alpha: float = 0.5,
        anchor_momentum: float = 0.0,
        average_buffers: bool = True,
        payload_dtype: str | None = None,
        correction: str = "pull",
        momentum: str = "local",
        **kwargs: Any,
    ) -> None:
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        self.alpha, self.anchor_momentum = validate_pull(
            alpha, anchor_momentum, names=("alpha", "anchor_momentum")
        )
        self.average_buffers = bool(average_buffers)
        self.payload_dtype = validate_payload_dtype(payload_dtype)
        self.correction = validate_correction(correction, self.anchor_momentum)
        self.momentum = validate_overlap_momentum(momentum)
        super().__init__(**kwargs)

    @override
    def build_algorithm(
        self, module: Module, optimizers: list[Optimizer], communicator: Communicator
    ) -> OverlapLocalSGD:
        return OverlapLocalSGD(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),
            alpha=self.alpha,
            beta=self.anchor_momentum,
            average_buffers=self.average_buffers,
            payload_dtype=self.payload_dtype,
            correction=self.correction,
            momentum=self.momentum,
        )
