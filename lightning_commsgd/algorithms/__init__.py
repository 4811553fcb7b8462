"""Framework-independent algorithms: pure torch on flat buffers plus a Communicator."""

from lightning_commsgd.algorithms.base import PeriodicAlgorithm
from lightning_commsgd.algorithms.periodic import PeriodicAverager
from lightning_commsgd.algorithms.replica import MOMENTUM_MODES, ReplicaState

__all__ = ["MOMENTUM_MODES", "PeriodicAlgorithm", "PeriodicAverager", "ReplicaState"]
