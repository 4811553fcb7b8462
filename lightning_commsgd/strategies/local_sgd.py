"""LocalSGDStrategy: periodic model averaging (Stich 2019) with PR-SGD-Momentum (Yu et al. 2019)."""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.utilities.data import extract_batch_size
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.algorithms.base import check_choice, validate_period
from lightning_commsgd.algorithms.finite import NONFINITE_POLICIES
from lightning_commsgd.algorithms.periodic import (
    WEIGHT_MODES,
    PeriodicAverager,
    as_schedule,
    validate_momentum_mode,
)
from lightning_commsgd.algorithms.replica import MomentumMode, check_averageable
from lightning_commsgd.comm import Communicator
from lightning_commsgd.payload import validate_payload_dtype
from lightning_commsgd.schedules import PeriodSchedule
from lightning_commsgd.strategies.base import CommunicationStrategy

__all__ = ["LocalSGDStrategy"]


class LocalSGDStrategy(CommunicationStrategy):
    """Local SGD: each worker steps its own replica; every ``tau`` optimizer steps all replicas are
    replaced by their average (one all-reduce of one flat buffer). No gradient is ever all-reduced.

    Args:
        tau: communication period tau (H in Stich, I in Yu et al.): optimizer steps between rounds,
            an int >= 1, or a :mod:`~lightning_commsgd.schedules` schedule (``AdaComm``,
            ``PostLocalSGD``, ``IncreasingPeriod``) asked after every round; each fit works on a copy.
            Counts calls of the optimizer step on every rank, including steps the closure skipped, so
            all ranks agree; with gradient accumulation it counts optimizer steps, not batches.
        momentum: what happens to the optimizer state u_i at a round:
            ``"average"`` (default, PR-SGD-Momentum: u_i <- mean_j u_j in the same buffer, doubling the
            bytes of a round for SGD with momentum; for Adam/AdamW both moments are averaged),
            ``"local"`` (never touched, torch's ``PeriodicModelAverager`` behaviour, any optimizer),
            ``"zero"`` (state reset after each round, any optimizer).
        average_buffers: average floating-point module buffers (BatchNorm running statistics) at each
            round; integer buffers are equal on all ranks and left alone.
        weights: ``"uniform"`` (default, the plain mean) or ``"samples"``: each replica (and its optimizer
            state and buffers) weighted by the samples n_j its rank processed since the latest round,
            x <- sum_j n_j x_j / sum_j n_j (RI-SGD's heterogeneous mini-batch extension; use with per-rank
            ``batch_sizes``). n_j is the batch size Lightning infers from each training batch. Costs no
            extra round: the count rides in the averaged buffer (4 more bytes). Validation's consensus
            model (``eval_on="consensus"``) stays the plain mean.
        payload_dtype: ``None`` (exact fp32 mean), ``"bf16"`` / ``"fp16"``, ``"int8"`` or ``"int4"``: each
            rank sends its change since the latest round in that format, accumulated in fp32 (half the bytes
            of a round in 16 bits, about a quarter in int8 and a seventh in int4, which round stochastically
            and without bias; the change, not the model, is rounded; see
            :class:`~lightning_commsgd.algorithms.PeriodicAverager` and :mod:`lightning_commsgd.payload`).
        global_every: hierarchical local SGD (Lin et al. 2020): every ``global_every``-th round averages
            over all ranks, the others only within a block of ``group_size`` ranks; 1 (default) is flat.
        group_size: ranks per block (consecutive global ranks); default: the devices per node, so the
            frequent rounds stay on a node's fast links. Must divide the world size.
        on_nonfinite: NaN or Inf in any rank's parameters, optimizer state or buffers before a round:
            ``"raise"`` (default: every rank raises ``NonFiniteReplicaError`` in that round, naming the ranks
            and the step) or ``"skip"`` (average the finite replicas only; the poisoned ones continue from
            that average). The flags ride in the round's buffer (4 bytes per rank more, no extra round);
            see :mod:`lightning_commsgd.algorithms.finite`.
        **kwargs: see :class:`~lightning_commsgd.strategies.base.CommunicationStrategy` (``eval_on``,
            ``start_method``, ``timeout``, ...).

    Raises:
        TypeError: ``tau`` not an int; at setup, right after ``configure_optimizers`` and before the first
            collective, ``momentum="average"`` with an optimizer whose state layout is unknown (anything but
            SGD, Adam, AdamW: e.g. RMSprop), naming it and the alternatives ``"local"`` and ``"zero"``.
        ValueError: ``tau < 1``; unknown ``momentum``.
    """

    strategy_name = "local_sgd"

    def __init__(
        self,
        tau: int | PeriodSchedule = 8,
        momentum: MomentumMode = "average",
        average_buffers: bool = True,
        weights: str = "uniform",
        payload_dtype: str | None = None,
        global_every: int = 1,
        group_size: int | None = None,
        on_nonfinite: str = "raise",
        **kwargs: Any,
    ) -> None:
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        self.momentum = validate_momentum_mode(momentum)
        self.average_buffers = bool(average_buffers)
        self.weights = check_choice(weights, "weights", WEIGHT_MODES)
        self.payload_dtype = validate_payload_dtype(payload_dtype)
        if self.payload_dtype is not None and self.weights != "uniform":
            raise ValueError('Arg `payload_dtype` works with weights="uniform" only.')
        self.global_every = validate_period(global_every, "global_every")
        self.group_size = None if group_size is None else validate_period(group_size, "group_size")
        if self.global_every > 1 and self.payload_dtype is not None:
            raise ValueError(
                "Arg `payload_dtype` does not combine with hierarchical averaging (global_every > 1)."
            )
        self.on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
        if self.payload_dtype is not None and self.on_nonfinite == "skip":
            raise ValueError('Arg `on_nonfinite="skip"` needs exact rounds (payload_dtype=None).')
        super().__init__(**kwargs)

    @override
    def _configure_launcher(self) -> None:
        if self.global_every > 1 and self.world_size % self._block_size():
            raise ValueError(
                f"Arg `group_size` ({self._block_size()}) must divide the world size ({self.world_size})."
            )
        super()._configure_launcher()

    def _block_size(self) -> int:
        """Ranks per hierarchical block: ``group_size``, else the devices of one node."""
        return self.group_size or self.num_processes

    @override
    def check_optimizers(self, optimizers: list[Optimizer]) -> None:
        if self.momentum == "average":
            check_averageable(optimizers)  # e.g. RMSprop: TypeError naming it and the alternatives

    @override
    def build_algorithm(
        self, module: Module, optimizers: list[Optimizer], communicator: Communicator
    ) -> PeriodicAverager:
        return PeriodicAverager(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),  # a fresh schedule per fit; resume restores its state
            momentum=self.momentum,
            average_buffers=self.average_buffers,
            weights=self.weights,
            payload_dtype=self.payload_dtype,
            group_size=self._block_size() if self.global_every > 1 else None,
            global_every=self.global_every,
            on_nonfinite=self.on_nonfinite,
        )

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        algorithm = self.algorithm
        if isinstance(algorithm, PeriodicAverager) and algorithm.weights == "samples":
            batch = args[0] if args else kwargs.get("batch")
            algorithm.record_samples(extract_batch_size(batch))
        return output
