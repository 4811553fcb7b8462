"""The algorithm between replica groups as an algorithm config: ``ReplicaGroups(DiLoCo(tau=16), settings)``.

The config takes what runs between the groups (:class:`~lightning_commsgd.algorithms.LocalSGD` as plain
averaging, or :class:`~lightning_commsgd.algorithms.DiLoCo`), checks that it can run between groups, and
builds a connected :class:`~lightning_commsgd.ft.groups.GroupOuterStep` (:func:`connect_replica_group`).
Adapters call ``start()`` before the first step (the group meets the others, or heals from a live one) and
``close()`` at the end. Under the Lightning Trainer it runs with
:class:`~lightning_commsgd.strategies.replica_groups.ReplicaGroupStrategy` (a healing group's training loop
moves to its peer's position); under Fabric with its ``CommunicationStrategy``, the user's loop reading
``algorithm.step`` after setup.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.diloco import DiLoCo
from lightning_commsgd.algorithms.periodic import LocalSGD
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.comm import Communicator
from lightning_commsgd.ft.connect import ReplicaGroupSettings
from lightning_commsgd.ft.groups import GroupOuterStep, averaging_outer_optimizer, check_group_options
from lightning_commsgd.ft.replica_group import connect_replica_group

__all__ = ["ReplicaGroups", "group_options"]


def _refuse(config: AlgorithmConfig, what: str) -> ValueError:
    return ValueError(f"ReplicaGroups cannot run {type(config).__name__} with {what} between replica groups.")


def group_options(config: AlgorithmConfig) -> dict[str, Any]:
    """The :class:`GroupOuterStep` options that run ``config`` between groups; a ValueError naming the setting
    it cannot run (and a TypeError for an algorithm it does not run at all)."""
    if isinstance(config, LocalSGD):
        for name, default in (("compressor", None), ("replica_weights", "uniform"), ("global_every", 1)):
            if getattr(config, name) != default:
                raise _refuse(config, f"{name}={getattr(config, name)!r} (only {default!r})")
        if config.on_nonfinite != "raise":
            raise _refuse(config, f"on_nonfinite={config.on_nonfinite!r} (only 'raise')")
        return {
            "tau": config.tau,
            "outer_optimizer": averaging_outer_optimizer,  # outer SGD with lr 1: the mean of the replicas
            "momentum": config.momentum,
            "average_buffers": config.average_buffers,
        }
    if isinstance(config, DiLoCo):
        if config.scale_by_inner_lr:
            raise _refuse(config, "SlowMo's 1/gamma scaling")
        if config.compressor is not None:
            raise _refuse(config, f"compressor={config.compressor!r} (only exact means)")
        if config.on_nonfinite != "raise":
            raise _refuse(config, f"on_nonfinite={config.on_nonfinite!r} (only 'raise')")
        return {
            "tau": config.tau,
            "outer_optimizer": config.outer_optimizer,
            "outer_lr_scheduler": config.outer_lr_scheduler,
            "momentum": config.momentum,
            "average_buffers": config.average_buffers,
            "backup_device": config.backup_device,
            # Streaming DiLoCo: each fragment's sync is a round between groups of its own
            "fragments": config.fragments,
            "sync_delay": config.sync_delay,
            "local_weight": config.local_weight,
        }
    raise TypeError(
        f"ReplicaGroups runs LocalSGD or DiLoCo between replica groups, got {type(config).__name__}."
    )


class ReplicaGroups(AlgorithmConfig):
    """Local SGD or DiLoCo between replica groups that fail and rejoin (torchft underneath).

    Each group is its own job of one or more processes (which average their gradients every step, as DDP,
    and hold one replica); every ``tau`` steps the live groups run one round (see
    :mod:`lightning_commsgd.ft.groups`), each process carrying its slice of it. A group that dies is left
    out; a restarted one heals from a live peer and joins the next round.

    Args:
        algorithm: what runs between the groups: ``LocalSGD(tau, momentum)`` (plain model averaging;
            ``momentum="average"``, PR-SGD-Momentum, averages the inner optimizer state too) or
            ``DiLoCo(tau, outer_optimizer, outer_lr_scheduler, momentum, ...)`` or ``StreamingDiLoCo(tau,
            fragments, sync_delay, local_weight, ...)`` (each fragment's sync a round of its own); tau is H,
            the inner steps between rounds (an int or a schedule).
        replica_group: where this group meets the others; ``None``: from the environment
            (:meth:`ReplicaGroupSettings.from_env`: ``TORCHFT_LIGHTHOUSE``, ``REPLICA_GROUP_ID``).
        start_groups: G, the groups the job launches: they start together (up to ``start_timeout`` seconds),
            and the training data is split in G shards, group g taking shard g (so ``group < start_groups``).
        start_timeout: seconds a group waits at the start for the others.
        round_attempts: attempts of one round (a group dying inside it fails one) before the group stops.
        max_missed_rounds: rounds in a row without a quorum (Lighthouse lost, fewer than ``min_groups`` live)
            the group trains through locally before it stops with ``QuorumUnavailableError``.
    """

    name = "replica_groups"
    trainer_strategy = "lightning_commsgd.strategies.replica_groups:ReplicaGroupStrategy"

    def __init__(
        self,
        algorithm: AlgorithmConfig,
        replica_group: ReplicaGroupSettings | None = None,
        *,
        start_groups: int = 1,
        start_timeout: float = 60.0,
        round_attempts: int = 3,
        max_missed_rounds: int = 3,
    ) -> None:
        if not isinstance(algorithm, AlgorithmConfig):
            raise TypeError(
                "Arg `algorithm` must be an algorithm config (LocalSGD or DiLoCo), got "
                f"{type(algorithm).__name__}."
            )
        self.options = group_options(algorithm)
        if replica_group is None:
            replica_group = ReplicaGroupSettings.from_env()
        if not isinstance(replica_group, ReplicaGroupSettings):
            raise TypeError(
                f"Arg `replica_group` must be a ReplicaGroupSettings, got {type(replica_group).__name__}."
            )
        # checked now, before any process or connection (GroupOuterStep checks the same on its own)
        check_group_options(round_attempts, max_missed_rounds, start_groups, start_timeout)
        if replica_group.group >= start_groups:
            raise ValueError(
                f"Arg `start_groups` ({start_groups}) must exceed the group index ({replica_group.group}): "
                "the groups are 0 .. start_groups - 1, each training on its shard of the data."
            )
        self.algorithm = algorithm
        self.replica_group = replica_group
        self.start_groups = start_groups
        self.start_timeout = start_timeout
        self.round_attempts = round_attempts
        self.max_missed_rounds = max_missed_rounds

    def check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        self.algorithm.check_optimizers(optimizers)

    def data_shard(self, world_size: int, rank: int) -> tuple[int, int]:
        # shard g of start_groups x (processes per group): the groups read different samples, as DDP's ranks
        return self.start_groups * world_size, self.replica_group.group * world_size + rank

    def describe(self, world: World) -> str | None:
        return (
            f"replica group {self.replica_group.group} of {self.start_groups}, "
            f"{type(self.algorithm).__name__} between groups, Lighthouse {self.replica_group.lighthouse}"
        )

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> GroupOuterStep:
        options = {**self.options, "tau": copy.deepcopy(self.options["tau"])}  # a fresh schedule per run
        return connect_replica_group(
            module,
            optimizers,
            self.replica_group,
            communicator=communicator,
            start_groups=self.start_groups,
            start_timeout=self.start_timeout,
            round_attempts=self.round_attempts,
            max_missed_rounds=self.max_missed_rounds,
            **options,
        )
