"""Framework-independent algorithms: pure torch on flat buffers plus a Communicator."""

from lightning_commsgd.algorithms.base import PeriodicAlgorithm
from lightning_commsgd.algorithms.compressed import CompressedAlgorithm, NonFiniteError
from lightning_commsgd.algorithms.compressed_sgd import CompressedGradientSGD
from lightning_commsgd.algorithms.dore import DoubleResidualCompression
from lightning_commsgd.algorithms.overlap import OverlapLocalSGD
from lightning_commsgd.algorithms.parameter_server import (
    ParameterServer,
    StalenessAwareLR,
    TooFewWorkersError,
)
from lightning_commsgd.algorithms.periodic import PeriodicAverager
from lightning_commsgd.algorithms.replica import MOMENTUM_MODES, ReplicaState

__all__ = [
    "MOMENTUM_MODES",
    "CompressedAlgorithm",
    "CompressedGradientSGD",
    "DoubleResidualCompression",
    "NonFiniteError",
    "OverlapLocalSGD",
    "ParameterServer",
    "PeriodicAlgorithm",
    "PeriodicAverager",
    "ReplicaState",
    "StalenessAwareLR",
    "TooFewWorkersError",
]
