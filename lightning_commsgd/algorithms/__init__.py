"""Framework-independent algorithms: pure torch on flat buffers plus a Communicator; no Lightning import.

Each algorithm file holds the algorithm (a :class:`~lightning_commsgd.algorithms.protocol.CommAlgorithm`)
and its config (an :class:`~lightning_commsgd.algorithms.protocol.AlgorithmConfig`: ``LocalSGD``, ``DORE``,
...), which the Lightning and Fabric adapters, or a plain PyTorch loop, turn into a run.
"""

from lightning_commsgd.algorithms.base import PeriodicAlgorithm
from lightning_commsgd.algorithms.compressed import CompressedAlgorithm
from lightning_commsgd.algorithms.compressed_sgd import CompressedGradientSGD, CompressedSGD
from lightning_commsgd.algorithms.diloco import DiLoCo, OuterStepAverager, SlowMo, StreamingDiLoCo
from lightning_commsgd.algorithms.dore import DIANA, DORE, DoubleResidualCompression
from lightning_commsgd.algorithms.elastic import ElasticAverager, ElasticAveraging
from lightning_commsgd.algorithms.finite import NonFiniteError
from lightning_commsgd.algorithms.gossip import DecentralizedSGD, GossipMixer
from lightning_commsgd.algorithms.overlap import OverlapAverager, OverlapLocalSGD
from lightning_commsgd.algorithms.parameter_server import (
    ParameterServer,
    StalenessAwareLR,
    TooFewWorkersError,
)
from lightning_commsgd.algorithms.periodic import LocalSGD, PeriodicAverager
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, CommAlgorithm, World
from lightning_commsgd.algorithms.replica import MOMENTUM_MODES, ReplicaState

__all__ = [
    "DIANA",
    "DORE",
    "MOMENTUM_MODES",
    "AlgorithmConfig",
    "CommAlgorithm",
    "CompressedAlgorithm",
    "CompressedGradientSGD",
    "CompressedSGD",
    "DecentralizedSGD",
    "DiLoCo",
    "DoubleResidualCompression",
    "ElasticAverager",
    "ElasticAveraging",
    "GossipMixer",
    "LocalSGD",
    "NonFiniteError",
    "OverlapAverager",
    "OuterStepAverager",
    "OverlapLocalSGD",
    "ParameterServer",
    "PeriodicAlgorithm",
    "PeriodicAverager",
    "ReplicaState",
    "SlowMo",
    "StalenessAwareLR",
    "StreamingDiLoCo",
    "TooFewWorkersError",
    "World",
]
