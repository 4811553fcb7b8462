"""Decentralized SGD: local steps, then gossip with neighbours through a mixing matrix W.

Cooperative SGD A(tau, W, 0) (Wang & Joshi): every tau steps ``X <- X W_k``, i.e. worker i replaces
its model by ``sum_j W_k[j, i] x_j`` over itself and its in-neighbours. tau = 1 is D-PSGD (Lian et al.
2017); with ``momentum="average"`` the momentum buffers are mixed with the same W (Yu, Jin, Yang 2019,
Alg. 2). Each round is one batch of point-to-point messages with the neighbours of the current phase,
never an all-reduce: a worker sends ``out-degree x payload`` bytes. W doubly stochastic keeps the
average of the models unchanged by a round.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, as_schedule, check_choice
from lightning_commsgd.algorithms.finite import NonFiniteError, gossip_nonfinite_message
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.algorithms.replica import ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.schedules import PeriodSchedule
from lightning_commsgd.topology import Topology, make_topology

__all__ = ["GOSSIP_MOMENTUM_MODES", "DecentralizedSGD", "GossipMixer", "TopologySpec"]

GossipMomentum = Literal["average", "local"]
GOSSIP_MOMENTUM_MODES: tuple[str, ...] = ("average", "local")


class GossipMixer(PeriodicAlgorithm):
    """Gossip averaging over a (possibly time-varying) topology.

    Args:
        module: this worker's model x_i (parameters and floating buffers).
        optimizers: the optimizers stepping ``module``; their state is u_i.
        communicator: carries and counts the point-to-point messages.
        topology: W (see :mod:`lightning_commsgd.topology`); its world size must be the communicator's.
        tau: local steps between gossip rounds (an int or a schedule); 1 is D-PSGD.
        momentum: ``"average"`` (default: u_i <- sum_j W[j, i] u_j in the same message, Yu et al. Alg. 2) or
            ``"local"`` (never touched).
        average_buffers: mix floating-point buffers (BatchNorm statistics) with the same W.
        final_average: at :meth:`finalize`, replace every replica by the exact average (one all-reduce),
            so the model after training is the consensus model; ``False`` leaves each rank its own.

    Attributes:
        mix_rounds: gossip rounds run; the phase of a time-varying W is ``mix_rounds % num_phases``.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        topology: Topology,
        *,
        tau: int | PeriodSchedule = 1,
        momentum: GossipMomentum = "average",
        average_buffers: bool = True,
        final_average: bool = True,
    ) -> None:
        check_choice(momentum, "momentum", GOSSIP_MOMENTUM_MODES)
        if topology.world_size != communicator.world_size:
            raise ValueError(
                f"The topology has {topology.world_size} nodes but the world size is "
                f"{communicator.world_size}."
            )
        travelling_state = momentum  # which u_i join the message
        replica = ReplicaState(module, optimizers, travelling_state, average_buffers)
        super().__init__(replica, communicator, tau)
        self.topology = topology
        self.momentum = momentum
        self.final_average = final_average
        self.mix_rounds = 0
        self._exact_at_step: int | None = 0  # all replicas equal x_0 before the first step

    round_tags = ("gossip", "final")

    @property
    def in_sync(self) -> bool:
        """Gossip leaves replicas different; they are equal only at the start and after an exact average."""
        return self._exact_at_step == self.step

    def communicate(self, tag: str) -> None:
        tensors = self.replica.averaged_tensors()
        if not tensors or not self.communicator.is_distributed:
            self.mix_rounds += 1
            return
        rank, phase = self.communicator.rank, self.mix_rounds % self.topology.num_phases
        if self._consensus_due():
            self._measure_consensus(tensors)
        # the message ends with this rank's finite flag (4 bytes); a poisoned replica sends zeros and the flag
        finite = self._replica_finite(tensors)
        flag = torch.tensor([0.0 if finite else 1.0], dtype=torch.float32, device=tensors[0].device)
        own = self._pack([*tensors, flag])
        if not finite:
            own[:-1].zero_()
        incoming = self.topology.in_neighbours(rank, phase)
        receivers, senders = self.topology.out_neighbours(rank, phase), [j for j, _ in incoming]
        received = self.communicator.exchange(own, receivers, senders, tag="gossip")
        poisoned = ([] if finite else [rank]) + [j for j, m in zip(senders, received) if float(m[-1]) > 0.5]
        if poisoned:  # neither this replica nor its neighbours' reach a mix
            ranks = sorted(self.communicator.global_rank(r) for r in poisoned)
            raise NonFiniteError(gossip_nonfinite_message(ranks, self.step))
        mixed = own * self.topology.self_weight(rank, phase)
        for (_, weight), message in zip(incoming, received):
            mixed.add_(message, alpha=weight)
        self._unpack(tensors, mixed)  # the flag's slot, after the tensors, is left out
        self.mix_rounds += 1

    def _measure_consensus(self, tensors: Sequence[Any]) -> None:
        # The mean is not a by-product of gossip: it costs an all-reduce of the parameters.
        head = self.replica.param_numel
        local = self._pack(tensors)[:head].clone()
        mean = local.clone()
        self.communicator.all_reduce_(mean, "mean", tag="consensus")
        self._record_consensus(local, mean)

    def finalize(self) -> None:
        """With ``final_average``: the exact average of every replica (one all-reduce, tag ``final``)."""
        if self.final_average and not self.in_sync:
            self._exact_mean_(self.replica.averaged_tensors(), tag="final")
            self._exact_at_step = self.step

    def extra_state(self) -> dict[str, Any]:
        return {"mix_rounds": self.mix_rounds, "exact_at_step": self._exact_at_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.mix_rounds = int(state["mix_rounds"])
        self._exact_at_step = state["exact_at_step"]


#: what ``topology`` accepts: a graph name, a Topology, or a doubly stochastic matrix W
TopologySpec = str | Topology | torch.Tensor | Sequence[Sequence[float]]


class DecentralizedSGD(AlgorithmConfig):
    """Decentralized SGD: every ``tau`` steps each worker averages with its graph neighbours only,
    ``x_i <- sum_j W[j, i] x_j`` (Cooperative SGD A(tau, W, 0); tau = 1 is D-PSGD, Lian et al. 2017).

    Args:
        topology: the mixing matrix W: a name (``"ring"``, ``"torus"``, ``"complete"``, ``"star"``,
            ``"exponential"``, ``"one_peer_exponential"``), a :class:`~lightning_commsgd.topology.Topology`,
            or a doubly stochastic m x m matrix (tensor or nested list; column i holds node i's weights).
            Checked against the world size before any process starts.
        tau: local steps between gossip rounds (int >= 1 or a schedule such as ``AdaComm``); 1 (default)
            is D-PSGD.
        momentum: ``"average"`` (default; momentum buffers mixed with the same W as the model, Yu et al.
            Alg. 2) or ``"local"``.
        edge_weights: weights of named undirected graphs, ``"metropolis"`` (Metropolis-Hastings, default) or
            ``"uniform"`` (regular graphs only).
        average_buffers: mix floating-point buffers (BatchNorm statistics) too.
        final_average: one exact all-reduce average at the end of training, so the output is the consensus
            model (the only all-reduce of a run; turn off to keep each rank's own model).
    """

    name = "decentralized_sgd"

    def __init__(
        self,
        topology: TopologySpec = "ring",
        tau: int | PeriodSchedule = 1,
        momentum: GossipMomentum = "average",
        edge_weights: Literal["metropolis", "uniform"] = "metropolis",
        average_buffers: bool = True,
        final_average: bool = True,
    ) -> None:
        self.topology = topology
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        self.momentum = check_choice(momentum, "momentum", GOSSIP_MOMENTUM_MODES)
        self.edge_weights = check_choice(edge_weights, "edge_weights", ("metropolis", "uniform"))
        self.average_buffers = bool(average_buffers)
        self.final_average = bool(final_average)

    def resolve_topology(self, world: World) -> Topology:
        """W for ``world`` (a bad matrix, or a torus on a non-square world size, raises here)."""
        return make_topology(self.topology, world.size, weights=self.edge_weights)

    def check_world(self, world: World) -> None:
        self.resolve_topology(world)

    def describe(self, world: World) -> str:
        topology = self.resolve_topology(world)
        return f"{topology!r}, zeta = {topology.zeta:.4f}"

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> GossipMixer:
        return GossipMixer(
            module,
            optimizers,
            communicator,
            self.resolve_topology(world),
            tau=copy.deepcopy(self.tau),
            momentum=self.momentum,  # type: ignore[arg-type]
            average_buffers=self.average_buffers,
            final_average=self.final_average,
        )
