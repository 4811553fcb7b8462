"""One call from a model to a connected replica group: the torchft manager, the rounds between groups and
the algorithm, registered for healing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.comm import Communicator
from lightning_commsgd.ft.connect import (
    GroupConnection,
    ReplicaGroupSettings,
    advertised_hostname,
    host_group_store,
)
from lightning_commsgd.ft.groups import GroupOuterStep
from lightning_commsgd.ft.quorum import QuorumRounds

__all__ = ["connect_replica_group"]


def connect_replica_group(
    module: nn.Module,
    optimizers: Sequence[Optimizer],
    settings: ReplicaGroupSettings,
    *,
    communicator: Communicator | None = None,
    **options: Any,
) -> GroupOuterStep:
    """This process's replica group, connected to the others: a :class:`GroupConnection` (the torchft
    manager), :class:`QuorumRounds` recorded in ``communicator``'s ledger, and a :class:`GroupOuterStep`
    built with ``options`` (``tau``, ``outer_optimizer``, ``start_groups``, ...) and registered with the
    manager, so that a restarted peer can heal from it.

    Call ``join()`` before the first step, ``after_optimizer_step()`` after each, ``finalize()`` and
    ``close()`` at the end.

    Args:
        module: the group's model.
        optimizers: its inner optimizers.
        settings: where the group meets the others (see :class:`ReplicaGroupSettings`).
        communicator: the communicator inside the group (default: a one-process one).
        **options: keyword arguments of :class:`GroupOuterStep`.
    """
    communicator = communicator if communicator is not None else Communicator()
    if communicator.world_size == 1:
        connection = GroupConnection(settings)
    else:  # the group's rank 0 hosts its store; every process of the group runs its own manager on it
        store = host_group_store(settings) if communicator.rank == 0 else None
        address = (advertised_hostname(settings), store.port) if store is not None else None
        host, port = communicator.broadcast_object(address, src=0, tag="ft_store")
        connection = GroupConnection(
            settings,
            rank=communicator.rank,
            world_size=communicator.world_size,
            store_addr=host,
            store_port=port,
            store=store,
        )
    built: list[GroupOuterStep] = []
    rounds = QuorumRounds(
        connection.manager,
        communicator.ledger,
        quorum_timeout=settings.quorum_timeout,
        step=lambda: built[0].step if built else 0,
    )
    options.setdefault("group", settings.group if settings.group < options.get("start_groups", 1) else None)
    algorithm = GroupOuterStep(module, optimizers, communicator, rounds, **options)
    built.append(algorithm)
    algorithm.connection = connection  # its store must live as long as the group: the others connect to it
    algorithm.register_with(connection.manager)
    return algorithm
