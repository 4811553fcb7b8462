"""Decentralized SGD: local steps, then gossip with neighbours through a mixing matrix W.

Cooperative SGD A(tau, W, 0) (Wang & Joshi): every tau steps ``X <- X W_k``, i.e. worker i replaces
its model by ``sum_j W_k[j, i] x_j`` over itself and its in-neighbours. tau = 1 is D-PSGD (Lian et al.
2017); with ``momentum="mix"`` the momentum buffers are mixed with the same W (Yu, Jin, Yang 2019,
Alg. 2). Each round is one batch of point-to-point messages with the neighbours of the current phase,
never an all-reduce: a worker sends ``out-degree x payload`` bytes. W doubly stochastic keeps the
average of the models unchanged by a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, check_choice
from lightning_commsgd.algorithms.finite import NonFiniteReplicaError, gossip_nonfinite_message
from lightning_commsgd.algorithms.replica import ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.schedules import PeriodSchedule
from lightning_commsgd.topology import Topology

__all__ = ["GOSSIP_MOMENTUM_MODES", "GossipMixer"]

GossipMomentum = Literal["mix", "local"]
GOSSIP_MOMENTUM_MODES: tuple[str, ...] = ("mix", "local")


class GossipMixer(PeriodicAlgorithm):
    """Gossip averaging over a (possibly time-varying) topology.

    Args:
        module: this worker's model x_i (parameters and floating buffers).
        optimizers: the optimizers stepping ``module``; their state is u_i.
        communicator: carries and counts the point-to-point messages.
        topology: W (see :mod:`lightning_commsgd.topology`); its world size must be the communicator's.
        tau: local steps between gossip rounds (an int or a schedule); 1 is D-PSGD.
        momentum: ``"mix"`` (default: u_i <- sum_j W[j, i] u_j in the same message, Yu et al. Alg. 2) or
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
        momentum: GossipMomentum = "mix",
        average_buffers: bool = True,
        final_average: bool = True,
    ) -> None:
        check_choice(momentum, "momentum", GOSSIP_MOMENTUM_MODES)
        if topology.world_size != communicator.world_size:
            raise ValueError(
                f"The topology has {topology.world_size} nodes but the world size is "
                f"{communicator.world_size}."
            )
        travelling_state = "average" if momentum == "mix" else "local"  # which u_i join the message
        replica = ReplicaState(module, optimizers, travelling_state, average_buffers)
        super().__init__(replica, communicator, tau)
        self.topology = topology
        self.momentum = momentum
        self.final_average = final_average
        self.mix_rounds = 0
        self._exact_at_step: int | None = 0  # all replicas equal x_0 before the first step

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
            raise NonFiniteReplicaError(gossip_nonfinite_message(ranks, self.step))
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
