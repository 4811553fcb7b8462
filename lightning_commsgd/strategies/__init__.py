"""Thin Lightning layer: a base strategy that owns synchronisation, one small subclass per family."""

from lightning_commsgd.strategies.base import CommunicationStrategy
from lightning_commsgd.strategies.compressed import (
    CompressedSGDStrategy,
    DianaStrategy,
    DoubleResidualStrategy,
)
from lightning_commsgd.strategies.decentralized import DecentralizedSGDStrategy, ElasticAveragingStrategy
from lightning_commsgd.strategies.local_sgd import LocalSGDStrategy
from lightning_commsgd.strategies.overlap import OverlapLocalSGDStrategy
from lightning_commsgd.strategies.parameter_server import (
    AsyncSGDStrategy,
    KSyncSGDStrategy,
    ParameterServerStrategy,
)

__all__ = [
    "AsyncSGDStrategy",
    "CommunicationStrategy",
    "CompressedSGDStrategy",
    "DianaStrategy",
    "DoubleResidualStrategy",
    "DecentralizedSGDStrategy",
    "ElasticAveragingStrategy",
    "KSyncSGDStrategy",
    "LocalSGDStrategy",
    "OverlapLocalSGDStrategy",
    "ParameterServerStrategy",
]
