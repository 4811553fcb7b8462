"""DecentralizedSGDStrategy (gossip / D-PSGD) and ElasticAveragingStrategy (EASGD)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_commsgd.algorithms.base import as_schedule, check_choice
from lightning_commsgd.algorithms.elastic import ELASTIC_MOMENTUM_MODES, ElasticAverager, validate_alpha
from lightning_commsgd.algorithms.gossip import GOSSIP_MOMENTUM_MODES, GossipMixer
from lightning_commsgd.comm import Communicator
from lightning_commsgd.schedules import PeriodSchedule
from lightning_commsgd.strategies.base import CommunicationStrategy
from lightning_commsgd.topology import Topology, make_topology

__all__ = ["DecentralizedSGDStrategy", "ElasticAveragingStrategy"]

TopologySpec = str | Topology | torch.Tensor | Sequence[Sequence[float]]


def _period(tau: Any) -> int | PeriodSchedule:
    return tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau


class DecentralizedSGDStrategy(CommunicationStrategy):
    """Decentralized SGD: every ``tau`` steps each worker averages with its graph neighbours only,
    ``x_i <- sum_j W[j, i] x_j`` (Cooperative SGD A(tau, W, 0); tau = 1 is D-PSGD, Lian et al. 2017).

    Args:
        topology: the mixing matrix W: a name (``"ring"``, ``"torus"``, ``"complete"``, ``"star"``,
            ``"exponential"``, ``"one_peer_exponential"``), a :class:`~lightning_commsgd.topology.Topology`,
            or a doubly stochastic m x m matrix (tensor or nested list; column i holds node i's weights).
            Checked against the world size when the Trainer is built, before any process starts.
        tau: local steps between gossip rounds (int >= 1 or a schedule such as ``AdaComm``).
        momentum: ``"mix"`` (default; momentum buffers mixed with the same W, Yu et al. Alg. 2) or
            ``"local"``.
        weights: edge weights of named undirected graphs, ``"metropolis"`` (Metropolis-Hastings, default)
            or ``"uniform"`` (regular graphs only).
        average_buffers: mix floating-point buffers (BatchNorm statistics) too.
        final_average: one exact all-reduce average at the end of fit, so the model after ``fit`` is the
            consensus model (the only all-reduce of a run; turn off to keep each rank's own model).
        **kwargs: see :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`.
    """

    strategy_name = "decentralized_sgd"

    def __init__(
        self,
        topology: TopologySpec = "ring",
        tau: int | PeriodSchedule = 1,
        momentum: Literal["mix", "local"] = "mix",
        weights: Literal["metropolis", "uniform"] = "metropolis",
        average_buffers: bool = True,
        final_average: bool = True,
        **kwargs: Any,
    ) -> None:
        check_choice(momentum, "momentum", GOSSIP_MOMENTUM_MODES)
        self.topology = topology
        self.tau = _period(tau)
        self.momentum = momentum
        self.weights = weights
        self.average_buffers = bool(average_buffers)
        self.final_average = bool(final_average)
        self._resolved_topology: Topology | None = None
        super().__init__(**kwargs)

    @override
    def _configure_launcher(self) -> None:
        # The world size is known here, before any process exists: a bad W or a torus on a non-square
        # world size fails while the Trainer is being built.
        self._resolved_topology = make_topology(self.topology, self.world_size, weights=self.weights)
        super()._configure_launcher()

    @override
    def build_algorithm(
        self, module: Module, optimizers: list[Optimizer], communicator: Communicator
    ) -> GossipMixer:
        topology = self._resolved_topology or make_topology(
            self.topology, communicator.world_size, weights=self.weights
        )
        rank_zero_info(f"{type(self).__name__}: {topology!r}, zeta = {topology.zeta:.4f}")
        return GossipMixer(
            module,
            optimizers,
            communicator,
            topology,
            tau=copy.deepcopy(self.tau),
            momentum=self.momentum,
            average_buffers=self.average_buffers,
            final_average=self.final_average,
        )


class ElasticAveragingStrategy(CommunicationStrategy):
    """Elastic averaging SGD (EASGD): every ``tau`` steps, ``x_i <- (1 - alpha) x_i + alpha z`` and
    ``z <- (1 - m alpha) z + alpha sum_i x_i`` with a centre variable z replicated on every rank
    (Cooperative SGD A(tau, W_alpha, 1)); see :mod:`lightning_commsgd.algorithms.elastic`.

    Args:
        tau: local steps between elastic rounds (int >= 1 or a schedule).
        alpha: moving rate; stable for 0 < alpha < 2/(m+1); ``None`` (default) picks alpha* = 2/(m+2),
            the rate with the smallest zeta = m/(m+2).
        momentum: ``"local"`` (default) or ``"zero"``.
        average_buffers: floating-point buffers take part in the update like parameters.
        **kwargs: see :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`.

    At the end of fit every replica is set to z, the model EASGD outputs.
    """

    strategy_name = "elastic_averaging"

    def __init__(
        self,
        tau: int | PeriodSchedule = 4,
        alpha: float | None = None,
        momentum: Literal["local", "zero"] = "local",
        average_buffers: bool = True,
        **kwargs: Any,
    ) -> None:
        check_choice(momentum, "momentum", ELASTIC_MOMENTUM_MODES)
        self.tau = _period(tau)
        self.alpha = validate_alpha(alpha)
        self.momentum = momentum
        self.average_buffers = bool(average_buffers)
        super().__init__(**kwargs)

    @override
    def _configure_launcher(self) -> None:
        validate_alpha(self.alpha, self.world_size)  # the stable range depends on m
        super()._configure_launcher()

    @override
    def build_algorithm(
        self, module: Module, optimizers: list[Optimizer], communicator: Communicator
    ) -> ElasticAverager:
        averager = ElasticAverager(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),
            alpha=self.alpha,
            momentum=self.momentum,
            average_buffers=self.average_buffers,
        )
        rank_zero_info(f"{type(self).__name__}: m = {communicator.world_size}, alpha = {averager.alpha:.4g}")
        return averager
