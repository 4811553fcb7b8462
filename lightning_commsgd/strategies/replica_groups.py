"""The Lightning Trainer as one replica group: ``ReplicaGroupStrategy(DiLoCo(tau=16), settings)``.

Each group runs its own ``Trainer.fit``; the rounds between groups go through torchft
(:class:`~lightning_commsgd.ft.config.ReplicaGroups`). What differs from
:class:`~lightning_commsgd.strategies.CommunicationStrategy`:

- The data: the training set is split in ``start_groups`` shards and group g reads shard g (the sampler
  Lightning puts in place takes the group into its rank), so the groups see different samples as DDP's ranks
  would.
- When rounds run: at the end of the batch whose optimizer step made one due, not inside the optimizer step.
  A group healing from a peer takes the peer's whole training state at that moment, which is then the same
  as a checkpoint ``ModelCheckpoint`` saves there (the loop is between batches, the LR schedulers stepped).
- RI-SGD across groups (``redundancy=mu``): the placement spans every process of every group; when the
  live groups change, the fraction of the data they still hold and the shards none holds whole are logged
  and go to the monitor (``ft_data_coverage``, ``ft_lost_shards``).
- Healing: a group that (re)starts while the others train joins at the strategy's setup, takes a live peer's
  model, optimizer and algorithm state (:class:`~lightning_commsgd.ft.groups.GroupOuterStep`) and its
  Lightning training state (loops, LR schedulers, callbacks, the sampler's place in the epoch), which
  Lightning then restores as it restores a ``ckpt_path``: the group goes on from the peer's step and epoch,
  on its own shard, at the batch the peer is at.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_commsgd.algorithms.protocol import AlgorithmConfig, CommAlgorithm
from lightning_commsgd.comm import Communicator
from lightning_commsgd.ft.config import ReplicaGroups
from lightning_commsgd.ft.connect import ReplicaGroupSettings
from lightning_commsgd.ft.groups import GroupOuterStep
from lightning_commsgd.ft.quorum import ReplicaGroupError
from lightning_commsgd.internals import resume_from_state, training_state
from lightning_commsgd.samplers import RedundantPlacement
from lightning_commsgd.strategies.base import CommunicationStrategy

__all__ = ["ReplicaGroupStrategy"]

#: the key of the group's Lightning state in its healing state (GroupOuterStep.register_extra_state)
TRAINING_STATE_KEY = "lightning"
#: where the sampler's position rides inside that state
SAMPLER_KEY = "lightning_commsgd_sampler"


class _RoundsBetweenBatches(Callback):
    """Runs the round the optimizer step made due at the end of its batch (first of the callbacks, so that a
    ``ModelCheckpoint`` saving there sees the round done), and tells when the fit loop runs."""

    def __init__(self, algorithm: GroupOuterStep) -> None:
        self.algorithm = algorithm
        self.training = False  # between on_train_start and the strategy's teardown: a peer may heal from us
        self.healed_mid_run = False  # this group took a peer's state while its loop ran

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.algorithm.run_due_round()
        if self.healed_mid_run:
            raise ReplicaGroupError(
                f"Replica group healed from a live group at step {self.algorithm.step}, mid-run: it had "
                "fallen behind (the others completed rounds it missed). The Trainer's loop cannot move to "
                "the peer's position while it runs; restart this group and it rejoins at setup (a launcher "
                "that restarts failed groups, such as examples/fault_tolerance/slurm.sbatch, does so)."
            )


class ReplicaGroupStrategy(CommunicationStrategy):
    """One replica group under the Lightning Trainer (see the module docstring).

    Args:
        algorithm: what runs between the groups: ``LocalSGD(tau, momentum)`` (PR-SGD-Momentum by default) or
            ``DiLoCo(tau, ...)`` (tau: H, inner steps between rounds); or a ready
            :class:`~lightning_commsgd.ft.config.ReplicaGroups`, with the arguments below left out.
        replica_group: where this group meets the others (Lighthouse address, group index, ...); ``None``:
            from ``TORCHFT_LIGHTHOUSE`` and ``REPLICA_GROUP_ID``.
        start_groups: G, the groups the job launches; the training data is split in G shards.
        start_timeout: seconds a group waits at the start for the others.
        round_attempts: attempts of one round before the group stops.
        max_missed_rounds: rounds in a row without a quorum the group trains through locally before it stops.
        **kwargs: as for :class:`~lightning_commsgd.strategies.CommunicationStrategy` (``eval_on``,
            ``sync_timeout``, ``checkpoint_io``, ...).
    """

    strategy_name = "replica_groups"

    def __init__(
        self,
        algorithm: AlgorithmConfig,
        replica_group: ReplicaGroupSettings | None = None,
        *,
        start_groups: int = 1,
        start_timeout: float = 60.0,
        round_attempts: int = 3,
        max_missed_rounds: int = 3,
        **kwargs: Any,
    ) -> None:
        if isinstance(algorithm, ReplicaGroups):
            group_arguments = (start_groups, start_timeout, round_attempts, max_missed_rounds)
            given = replica_group is not None or group_arguments != (1, 60.0, 3, 3)
            if given:
                raise ValueError(
                    "ReplicaGroupStrategy takes either a ReplicaGroups config or the algorithm with the "
                    "group arguments (replica_group, start_groups, ...), not both."
                )
            config = algorithm
        else:
            config = ReplicaGroups(
                algorithm,
                replica_group,
                start_groups=start_groups,
                start_timeout=start_timeout,
                round_attempts=round_attempts,
                max_missed_rounds=max_missed_rounds,
            )
        super().__init__(config, **kwargs)
        self._rounds: _RoundsBetweenBatches | None = None
        self._callbacks: list[Any] | None = None  # the Trainer's callback list the rounds' callback is in
        self._peer_state: dict[str, Any] | None = None  # a live peer's training state, while healing
        self._healed_checkpoint: dict[str, Any] | None = None  # what this fit resumed from, when it healed

    @property
    def replica_groups(self) -> ReplicaGroups:
        """The config of the rounds between groups."""
        assert isinstance(self.algorithm_config, ReplicaGroups)
        return self.algorithm_config

    # -- setup: join the other groups, heal from a live one ---------------------------------------------
    @override
    def before_start(self, algorithm: CommAlgorithm) -> None:
        assert isinstance(algorithm, GroupOuterStep)
        algorithm.defer_rounds = True  # rounds at the end of a batch, where the training state is whole
        if self.data.redundancy is not None:  # RI-SGD across groups: what the live groups still hold
            algorithm.coverage = self._coverage_without
        algorithm.register_extra_state(
            TRAINING_STATE_KEY, save=self._state_for_peer, load=self._take_peer_state
        )
        trainer = self.lightning_module.trainer
        self._rounds = _RoundsBetweenBatches(algorithm)
        self._callbacks = trainer.callbacks
        self._callbacks.insert(0, self._rounds)  # before ModelCheckpoint (Lightning puts it last)

    @override
    def start_training(self, trainer: pl.Trainer, communicator: Communicator) -> None:
        self._peer_state = self._healed_checkpoint = None
        super().start_training(trainer, communicator)  # builds, then start(): joins (and maybe heals)
        algorithm = self.algorithm
        assert isinstance(algorithm, GroupOuterStep) and algorithm.membership is not None
        if not algorithm.membership.healed:
            return
        if self._peer_state is None:
            raise ReplicaGroupError(
                "This group healed from a live group whose training loop had not started; restart it."
            )
        self._resume_from_peer(trainer, algorithm, self._peer_state)
        self._peer_state = None

    def _coverage_without(self, missing_groups: list[int]) -> tuple[float, list[int]] | None:
        """RI-SGD's placement over every process of every group, without the missing groups' processes:
        the fraction of the training data the live groups hold, and the shards none holds completely."""
        if not missing_groups:
            return 1.0, []
        batches = self.data.batches
        placement = getattr(getattr(batches, "sampler", None), "placement", None)
        if placement is None:  # the training loader is not built yet
            return None
        n = self.world_size
        failed = [g * n + r for g in missing_groups for r in range(n)]
        if len(failed) >= placement.p:
            return 0.0, list(range(placement.p))
        left = RedundantPlacement(placement.num_samples, placement.p, placement.mu, failed)
        return left.coverage, left.lost_shards()

    def _state_for_peer(self) -> dict[str, Any] | None:
        """This group's Lightning training state for a peer healing from it (``None`` before the fit loop
        runs: a peer joining then starts with the others instead)."""
        if self._rounds is None or not self._rounds.training:
            return None
        trainer = self.lightning_module.trainer
        state = training_state(trainer)
        # GroupOuterStep's own healing state carries the module and the optimizers: not twice over the wire
        state.pop("state_dict", None)
        state.pop("optimizer_states", None)
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        state[SAMPLER_KEY] = self.data.state(progress.ready)
        return state

    def _take_peer_state(self, state: dict[str, Any] | None) -> None:
        if self._rounds is not None and self._rounds.training:
            # torchft heals a group that fell behind; its model is the peer's now, its loop is not
            self._rounds.healed_mid_run = True
        self._peer_state = state

    def _resume_from_peer(
        self, trainer: pl.Trainer, algorithm: GroupOuterStep, state: dict[str, Any]
    ) -> None:
        """Hand the peer's training state to Lightning, which restores it after this setup as it restores a
        ``ckpt_path`` (module and optimizers: this group's, healed already)."""
        checkpoint = dict(state)
        sampler = checkpoint.pop(SAMPLER_KEY, None)
        self.data.load(sampler)
        checkpoint["state_dict"] = self.lightning_module_state_dict()
        checkpoint["optimizer_states"] = [self.optimizer_state(opt) for opt in self.optimizers]
        resume_from_state(trainer, checkpoint)
        self._healed_checkpoint = checkpoint
        where = f" ({sampler['position']} batches into epoch {sampler['epoch']})" if sampler else ""
        rank_zero_info(
            f"{type(self).__name__}: replica group {self.replica_groups.replica_group.group} healed from a "
            f"live group: it goes on after the peer's step {checkpoint.get('global_step')}{where}."
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self._healed_checkpoint is not None:  # the live groups' state is newer than any file of ours
            rank_zero_warn(
                f"Replica group {self.replica_groups.replica_group.group} healed from a live group at step "
                f"{self._healed_checkpoint.get('global_step')}: {checkpoint_path} is not loaded."
            )
            return self._healed_checkpoint
        return super().load_checkpoint(checkpoint_path, weights_only)

    @override
    def teardown(self) -> None:
        super().teardown()  # closes the algorithm: no peer heals from this group after it
        if self._callbacks is not None and self._rounds in self._callbacks:
            self._callbacks.remove(self._rounds)
        self._callbacks = self._rounds = None
        self._healed_checkpoint = None
