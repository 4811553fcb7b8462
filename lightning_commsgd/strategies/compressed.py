"""Compressed-communication strategies: DORE, DIANA, QSGD, MEM-SGD and DoubleSqueeze under Lightning.

Where the algorithm sits in Lightning's optimizer step: the strategy hands the precision plugin a closure
that runs the user's forward/backward and then ``algorithm.after_backward()`` (the compressed exchange,
which writes the aggregate gradient g_hat into ``p.grad``); Lightning's ``on_before_optimizer_step``
hooks and gradient clipping then see g_hat, as they see the all-reduced gradient under DDP. The user's
optimizer steps on the ranks that run the master update (every rank, or rank 0 only for DORE with
``server="rank0"``), and ``algorithm.after_optimizer_step()`` brings the model (x_hat) to every rank.
Every step is one communication round.

Not supported: ``precision="16-mixed"`` (its GradScaler rescales gradients each step, which the residual
states h_i, e and the error memory would absorb) and optimizers that call their closure several times
(LBFGS). BatchNorm running statistics stay per rank during training (they are not part of x) and are
averaged once at the end of fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.algorithms.compressed import CompressedAlgorithm, check_compressor
from lightning_commsgd.algorithms.compressed_sgd import CompressedGradientSGD
from lightning_commsgd.algorithms.dore import (
    RATES,
    SERVER_MODES,
    DoubleResidualCompression,
    Rates,
    resolve_dore_rates,
)
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression.base import Compressor, Identity
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.strategies.base import CommunicationStrategy

__all__ = ["CompressedSGDStrategy", "DianaStrategy", "DoubleResidualStrategy"]

_LARGE = 1 << 30  # a tensor size larger than any block: the compressor's constant C for a full block


class _DeferredStep:
    """Stands in for the optimizer inside Lightning's precision plugin: ``step(closure)`` runs the closure
    (forward, backward, compressed exchange), then steps the real optimizer only where the algorithm says
    this rank runs the master update now. Everything else is the real optimizer's."""

    def __init__(self, optimizer: Optimizer, algorithm: CompressedAlgorithm) -> None:
        self._optimizer, self._algorithm = optimizer, algorithm

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        result = closure() if closure is not None else None
        if self._algorithm.should_step:
            self._optimizer.step(**kwargs)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class _CompressedStrategy(CommunicationStrategy):
    """Shared Lightning plumbing of the step-wise compressed algorithms (see the module docstring)."""

    @override
    def _configure_launcher(self) -> None:
        if getattr(self.precision_plugin, "precision", None) == "16-mixed":
            raise ValueError(
                f"{type(self).__name__} does not support precision='16-mixed': its GradScaler rescales the "
                "gradients every step and the residual states would absorb the scale. Use 'bf16-mixed' or "
                "'32-true'."
            )
        super()._configure_launcher()

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        algorithm = self.algorithm
        if not isinstance(algorithm, CompressedAlgorithm):
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_exchange() -> Any:
            result = closure()
            algorithm.after_backward()
            return result

        deferred = _DeferredStep(optimizer, algorithm)
        return super().optimizer_step(deferred, closure_then_exchange, model, **kwargs)  # type: ignore[arg-type]

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self.algorithm is not None:
            self._average_float_buffers()

    def _average_float_buffers(self) -> None:
        """BatchNorm statistics were per rank during training: one mean at the end (tag ``final``)."""
        assert self.model is not None
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if buffers and self.communicator.is_distributed:
            flat = FlatBuffer(buffers)
            self.communicator.all_reduce_(flat.pack(buffers), "mean", tag="final")
            flat.unpack(buffers)

    @override
    def _resized_algorithm_state(self, state: dict[str, Any]) -> dict[str, Any]:
        # residuals, memories and random streams belong to ranks that no longer exist: start them afresh
        return {"step": state["step"]}


class DoubleResidualStrategy(_CompressedStrategy):
    """DORE (Liu, Li, Tang, Yan, AISTATS 2020): compressed gradient residuals up, compressed model
    residuals with error compensation down (see :mod:`lightning_commsgd.algorithms.dore`).

    Args:
        compressor: Q for the workers' gradient residuals Delta_i, e.g. ``PNormQuantizer(p=inf, 256)``.
        model_compressor: Q_m for the master's model residual q; default: the same as ``compressor``.
        server: ``"rank0"`` (rank 0 is the master: a gather up and a broadcast down each step, the paper's
            topology; rank 0 holds the optimizer state) or ``"replicated"`` (an all-gather each step; every
            rank runs the master step with a shared random stream, so all x_hat agree; nothing is sent
            down).
        alpha: h's step alpha, in [0, 1]; ``None`` (default): from ``rates``, 0.1 or 1/(2(C+1)) (C the
            compressor's variance constant).
        beta: x_hat's step beta, in (0, 1]; ``None`` (default): from ``rates``, 1 or 1/(C_m+1).
        eta: weight eta of the fed-back compression error e; default 1.0 (the paper's experiments). >= 0.
        rates: the one switch for unset alpha / beta. ``"paper"`` (default): the paper's experimental
            rates alpha = 0.1, beta = 1 (x_hat takes the whole compressed step; beta = 1 is outside the
            convergence theorems, not warned about). ``"theory"``: the theorems' 1/(2(C+1)), 1/(C_m+1)
            (unbiased compressors only; x_hat moves by beta of each step, 0.118 for inf-norm blocks of 256,
            so training is about that much slower); explicit alpha / beta above 1/(C+1), 1/(C_m+1) warn.
        seed: base of the compressors' random streams (rank r: seed + 1 + r; master: seed).
        **kwargs: see :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`.

    The user's optimizer is the master's update: x_{k+1} = optimizer step from x_hat_k with gradient
    g_hat (the paper's prox step with R = 0 for plain SGD; momentum and weight decay act on g_hat).
    """

    strategy_name = "dore"

    def __init__(
        self,
        compressor: Compressor,
        model_compressor: Compressor | None = None,
        server: Literal["rank0", "replicated"] = "rank0",
        alpha: float | None = None,
        beta: float | None = None,
        eta: float = 1.0,
        rates: Rates = "paper",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.compressor = check_compressor(compressor)
        self.model_compressor = check_compressor(
            compressor if model_compressor is None else model_compressor, "model_compressor"
        )
        self.server = check_choice(server, "server", SERVER_MODES)
        self.rates = check_choice(rates, "rates", RATES)
        # checked now, before any process starts (the theory's rates are computed for the model's size)
        resolve_dore_rates(self.compressor, self.model_compressor, _LARGE, alpha, beta, eta, rates)
        self.alpha, self.beta, self.eta, self.seed = alpha, beta, eta, int(seed)
        super().__init__(**kwargs)

    @override
    def build_algorithm(
        self, module: Module, optimizers: list[Optimizer], communicator: Communicator
    ) -> DoubleResidualCompression:
        return DoubleResidualCompression(
            optimizers,
            communicator,
            self.compressor,
            model_compressor=self.model_compressor,
            server=self.server,  # type: ignore[arg-type]
            alpha=self.alpha,
            beta=self.beta,
            eta=self.eta,
            rates=self.rates,  # type: ignore[arg-type]
            seed=self.seed,
        )


class DianaStrategy(DoubleResidualStrategy):
    """DIANA (Mishchenko, Gorbunov, Takac, Richtarik 2019): compressed gradient residuals with learned
    shifts h_i, and an uncompressed model: DORE with ``model_compressor=Identity()``, beta = 1, eta = 0.

    Args:
        compressor: Q for the gradient residuals, e.g. ``PNormQuantizer(p=inf, 256)``.
        server: ``"rank0"`` (the master broadcasts the fp32 model change each step) or ``"replicated"``.
        alpha: h's step; default 1/(2(C+1)), DIANA's theory (DORE's ``rates`` switch is not needed here:
            DIANA's model step beta is 1 already). Above 1/(C+1) warns.
        seed, **kwargs: as for :class:`DoubleResidualStrategy`.
    """

    strategy_name = "diana"

    def __init__(
        self,
        compressor: Compressor,
        server: Literal["rank0", "replicated"] = "rank0",
        alpha: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            compressor,
            Identity(),
            server=server,
            alpha=alpha,
            beta=1.0,
            eta=0.0,
            rates="theory",
            seed=seed,
            **kwargs,
        )


class CompressedSGDStrategy(_CompressedStrategy):
    """Compressed-gradient SGD baselines: QSGD (unbiased Q, no memory), MEM-SGD (top-k with error
    feedback) and DoubleSqueeze (error feedback on both sides: ``server_compressor``), see
    :mod:`lightning_commsgd.algorithms.compressed_sgd`. Every rank applies the same aggregate with the
    user's optimizer.

    Args:
        compressor: Q, e.g. ``QSGD(levels=4)`` or ``TopK(0.01)``.
        error_feedback: keep each rank's compression error and add it to its next gradient (needed for
            biased compressors: top-k, sign).
        server_compressor: Q_s, compress the aggregate too, with its own error feedback (DoubleSqueeze);
            ``None`` leaves it uncompressed.
        server: ``"replicated"`` (default: one all-gather a step, every rank aggregates) or ``"rank0"``
            (a gather to rank 0 and a broadcast of the (compressed) aggregate, the parameter-server form).
        seed: base of the compressors' random streams (rank r draws from seed + 1 + r; Q_s from seed).
        **kwargs: see :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`.
    """

    strategy_name = "compressed_sgd"

    def __init__(
        self,
        compressor: Compressor,
        error_feedback: bool = False,
        server_compressor: Compressor | None = None,
        server: Literal["rank0", "replicated"] = "replicated",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.compressor = check_compressor(compressor)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"Arg `error_feedback` must be a bool, got {error_feedback!r}.")
        self.server_compressor = (
            None if server_compressor is None else check_compressor(server_compressor, "server_compressor")
        )
        self.server = check_choice(server, "server", SERVER_MODES)
        self.error_feedback, self.seed = error_feedback, int(seed)
        super().__init__(**kwargs)

    @override
    def build_algorithm(
        self, module: Module, optimizers: list[Optimizer], communicator: Communicator
    ) -> CompressedGradientSGD:
        return CompressedGradientSGD(
            optimizers,
            communicator,
            self.compressor,
            error_feedback=self.error_feedback,
            server_compressor=self.server_compressor,
            server=self.server,  # type: ignore[arg-type]
            seed=self.seed,
        )
