"""The algorithm protocol: what every algorithm offers, and what every adapter may ask of it.

Adapters (the Lightning ``Trainer`` strategies, the Fabric strategies, a plain PyTorch loop) drive an
algorithm through this protocol only; none of them probes an algorithm's attributes. Two objects:

- an :class:`AlgorithmConfig` (``LocalSGD(tau=8)``, ``DORE(compressor=...)``): the user's choices, checked
  when it is built (before any process exists), plus the checks that need the world size
  (:meth:`AlgorithmConfig.check_world`) or the optimizers (:meth:`AlgorithmConfig.check_optimizers`), and
  :meth:`AlgorithmConfig.build`, which makes the algorithm for one run;
- a :class:`CommAlgorithm`: one run's state, driven around every optimizer step::

      algorithm.record_batch(loss, samples)   # per training batch (several with gradient accumulation)
      loss.backward()
      algorithm.after_backward()              # compressed exchanges; periodic algorithms: nothing
      if algorithm.should_step:               # False on ranks that do not run the update now (DORE)
          optimizer.step()
      algorithm.after_optimizer_step()        # a round when one is due; returns whether one ran
      ...
      algorithm.finalize()                    # end of training: every replica holds the output model

(``algorithm.start()`` once before the first step and ``algorithm.close()`` at the end: algorithms that meet
peers outside the job, the replica groups of :mod:`lightning_commsgd.ft`, connect and leave there.)

Every collective goes through the algorithm's :class:`~lightning_commsgd.comm.Communicator`, which counts
it; the tags of the algorithm's own rounds are :attr:`CommAlgorithm.round_tags`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_commsgd.comm import Communicator
from lightning_commsgd.flat import FlatBuffer

__all__ = [
    "AlgorithmConfig",
    "CommAlgorithm",
    "World",
    "average_for_evaluation",
    "broadcast_module_state",
    "float_state",
]


@dataclass(frozen=True)
class World:
    """The job's shape, known before any process group exists.

    Attributes:
        size: p (m in the decentralized papers), the number of workers.
        devices_per_node: ranks on one node (the default block of hierarchical averaging).
    """

    size: int
    devices_per_node: int = 1


class CommAlgorithm(ABC):
    """One run of a communication-efficient algorithm on this rank (see the module docstring).

    Attributes:
        communicator: carries and counts every collective of the run.
        consensus_every: measure the consensus distance every this many rounds (``None``: never); set by
            a monitor. Algorithms that cannot measure it ignore it.
        last_consensus: ``(step, (1/p) sum_i ||x_i - x_bar||^2)`` of the latest measurement, or ``None``.
        on_nonfinite: ``"raise"`` or ``"skip"``: what a round does with a replica holding NaN/Inf.
    """

    #: tags of the algorithm's own rounds in the ledger (the others are framework collectives)
    round_tags: ClassVar[tuple[str, ...]] = ()
    #: True when :meth:`after_backward` exchanges gradients: adapters then call it inside the optimizer's
    #: closure (after backward, before the step) and step only where :attr:`should_step`
    exchanges_gradients: ClassVar[bool] = False

    communicator: Communicator
    consensus_every: int | None = None
    last_consensus: tuple[int, float] | None = None
    on_nonfinite: str = "raise"

    # -- around an optimizer step --------------------------------------------------------------------
    def record_batch(self, loss: Tensor | float | None = None, samples: int | None = None) -> None:  # noqa: B027
        """Note one training batch of the coming optimizer step: its loss (for schedules that adapt to
        it) and its number of samples (for sample-weighted rounds). Default: ignored."""

    @property
    def counts_samples(self) -> bool:
        """Whether :meth:`record_batch` needs the batch's sample count (sample-weighted rounds)."""
        return False

    def after_backward(self) -> None:  # noqa: B027 (optional hook)
        """Between ``backward`` and the optimizer step (compressed-gradient exchanges). Default: nothing."""

    @property
    def should_step(self) -> bool:
        """Whether this rank steps its optimizer now (asked after :meth:`after_backward`). Default: yes."""
        return True

    @abstractmethod
    def after_optimizer_step(self) -> bool:
        """Count one optimizer step on every rank (skipped steps too, so all ranks decide alike) and run a
        round when one is due. Returns whether a round ran."""

    # -- replicas -----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def in_sync(self) -> bool:
        """True when every replica is known to hold the same model."""

    @abstractmethod
    def finalize(self) -> None:
        """End of training: bring every replica to the model the algorithm outputs."""

    def start(self) -> None:  # noqa: B027 (optional hook)
        """Once, after the build and before the first step: meet peers that live outside this job (replica
        groups join the others here, and a late one takes a live peer's state). Default: nothing."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Once, when the adapter is done with the algorithm (after :meth:`finalize`, or after a failure):
        release what :meth:`start` connected to. Default: nothing."""

    def average_for_evaluation(self, tensors: Sequence[Tensor]) -> None:
        """Replace ``tensors`` (the module's floating-point state) by the model to evaluate while replicas
        differ: their exact mean (one all-reduce, tag ``eval_consensus``)."""
        average_for_evaluation(tensors, self.communicator)

    # -- figures ------------------------------------------------------------------------------------
    @property
    def period(self) -> int | None:
        """tau, the optimizer steps between rounds now; ``None`` when rounds are not periodic."""
        return None

    @property
    def adaptive_period(self) -> bool:
        """Whether tau changes during training (a schedule such as AdaComm)."""
        return False

    @property
    def uncompressed_bytes_per_step(self) -> int | None:
        """For compressing algorithms: what one rank would send per step uncompressed (else ``None``)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Figures to log under ``comm/`` (the period, a schedule's values); default none."""
        return {}

    # -- checkpoints --------------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This rank's state that a resumed run needs (counters, schedules, residuals, random streams)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output of the same rank of a run with the same world size."""

    def restore(self, state: dict[str, Any], resized: bool = False) -> None:
        """Restore a checkpoint entry: :meth:`load_state_dict`, or with ``resized`` (written by another world
        size) :meth:`load_resized_state_dict`. The entry is not modified."""
        if resized:
            self.load_resized_state_dict(dict(state))
        else:
            self.load_state_dict(dict(state))

    def load_resized_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rank 0's :meth:`state_dict` output of a run with another world size: the replicas start
        equal (from the consensus model), so per-rank state starts afresh. Default: refused."""
        raise ValueError(f"{type(self).__name__} cannot resume on a different world size.")


class AlgorithmConfig(ABC):
    """An algorithm's settings, checked when constructed; :meth:`build` makes one run's algorithm.

    Subclasses take the algorithm's arguments (with their paper symbols in the docstring) and set
    :attr:`name`, the registry name of the algorithm.
    """

    #: the registry name (``Trainer(strategy=name)``, ``Fabric(strategy=name)``)
    name: ClassVar[str] = ""
    #: whether fp16 loss scaling is compatible (a scaler rescales gradients that residual states absorb)
    supports_loss_scaling: ClassVar[bool] = True
    #: the Lightning Trainer strategy class this config needs instead of the generic one (an algorithm whose
    #: start can move the training loop, e.g. a replica group healing from a peer), as "module:Class"
    trainer_strategy: ClassVar[str | None] = None

    def check_world(self, world: World) -> None:  # noqa: B027 (optional hook)
        """Raise if the settings do not fit ``world`` (called before any process group exists)."""

    def check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:  # noqa: B027 (optional hook)
        """Raise if the algorithm cannot work with ``optimizers`` (called before the first collective)."""

    def data_shard(self, world_size: int, rank: int) -> tuple[int, int]:
        """``(shards, shard)``: the training data is split in ``shards`` and this rank reads ``shard`` (the
        sampler the adapter puts in place). Default: one shard per rank; replica groups split over groups
        too."""
        return world_size, rank

    def describe(self, world: World) -> str | None:
        """A line for the log at setup (e.g. the topology and its spectral gap); ``None``: nothing."""
        return None

    @abstractmethod
    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> CommAlgorithm:
        """The algorithm for one run of ``module`` stepped by ``optimizers`` (a fresh schedule each time)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def float_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s floating-point parameters and buffers by state-dict key (integer buffers such as
    ``num_batches_tracked`` are equal on all ranks and stay out)."""
    return {k: t for k, t in module.state_dict(keep_vars=True).items() if torch.is_floating_point(t)}


def broadcast_module_state(module: nn.Module, communicator: Communicator) -> None:
    """x_0 identical on every rank: rank 0's floating-point parameters and buffers, one broadcast (tag
    ``setup_broadcast``). Without DDP's constructor nobody else does it."""
    tensors = list(float_state(module).values())
    if not tensors or not communicator.is_distributed:
        return
    flat = FlatBuffer(tensors)
    with torch.no_grad():
        communicator.broadcast_(flat.pack(tensors), src=0, tag="setup_broadcast")
        flat.unpack(tensors)


def average_for_evaluation(tensors: Sequence[Tensor], communicator: Communicator) -> None:
    """Replace ``tensors`` by their exact mean over the ranks (one all-reduce, tag ``eval_consensus``)."""
    if not tensors or not communicator.is_distributed:
        return
    flat = FlatBuffer(list(tensors))
    with torch.no_grad():
        communicator.all_reduce_(flat.pack(list(tensors)), "mean", tag="eval_consensus")
        flat.unpack(list(tensors))
