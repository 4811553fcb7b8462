"""lightning_commsgd: communication-efficient distributed SGD for PyTorch Lightning, Fabric and plain PyTorch.

Layers (each imports only the ones below it):

1. the pure core: ``algorithms`` (the protocol, every algorithm and its config), ``comm`` (the one place
   that calls torch.distributed, counting bytes and rounds), ``compression``, ``payload``, ``schedules``,
   ``topology``, ``samplers``, ``redundancy``, ``registry``; no Lightning import;
2. the adapters: ``strategies`` (Lightning Trainer), ``fabric`` (Lightning Fabric), ``callbacks``, ``cli``.

Importing the package registers every strategy name with Lightning's and Fabric's strategy registries when
Lightning is installed (``Trainer(strategy="local_sgd")``); without Lightning the pure core still imports,
and the adapter names raise an ImportError that says so.
"""

from __future__ import annotations

from typing import Any

from lightning_commsgd.algorithms import (
    DIANA,
    DORE,
    AlgorithmConfig,
    CommAlgorithm,
    CompressedSGD,
    DecentralizedSGD,
    DiLoCo,
    ElasticAveraging,
    LocalSGD,
    NonFiniteError,
    OverlapLocalSGD,
    PeriodicAverager,
    SlowMo,
    StalenessAwareLR,
    StreamingDiLoCo,
)
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression import (
    QSGD,
    Compressor,
    Identity,
    PNormQuantizer,
    RandomK,
    ScaledSign,
    TopK,
)
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.redundancy import RedundancyInfusion
from lightning_commsgd.registry import create_strategy
from lightning_commsgd.schedules import (
    AdaComm,
    ConstantPeriod,
    IncreasingPeriod,
    PeriodSchedule,
    PostLocalSGD,
)
from lightning_commsgd.topology import Topology, make_topology

__version__ = "0.2.0"

__all__ = [
    "DIANA",
    "DORE",
    "QSGD",
    "AdaComm",
    "AlgorithmConfig",
    "CommAlgorithm",
    "CommLedger",
    "Communicator",
    "CompressedSGD",
    "Compressor",
    "ConstantPeriod",
    "DecentralizedSGD",
    "DiLoCo",
    "ElasticAveraging",
    "Identity",
    "IncreasingPeriod",
    "LocalSGD",
    "NonFiniteError",
    "OverlapLocalSGD",
    "PNormQuantizer",
    "PeriodSchedule",
    "PeriodicAverager",
    "PostLocalSGD",
    "RandomK",
    "RedundancyInfusion",
    "ScaledSign",
    "SlowMo",
    "StalenessAwareLR",
    "StreamingDiLoCo",
    "TopK",
    "Topology",
    "create_strategy",
    "make_topology",
    "AsyncSGDStrategy",
    "CommunicationMonitor",
    "CommunicationStrategy",
    "CompressedSGDStrategy",
    "DecentralizedSGDStrategy",
    "DiLoCoStrategy",
    "DianaStrategy",
    "DoubleResidualStrategy",
    "ElasticAveragingStrategy",
    "KSyncSGDStrategy",
    "LocalSGDStrategy",
    "OverlapLocalSGDStrategy",
    "ParameterServerStrategy",
    "SlowMoStrategy",
    "StreamingDiLoCoStrategy",
]

try:
    import lightning  # noqa: F401  (the adapters need it; the core does not)
except ImportError:
    LIGHTNING_AVAILABLE = False
else:
    LIGHTNING_AVAILABLE = True

if LIGHTNING_AVAILABLE:
    # registers the names with Lightning's registries (Trainer(strategy="local_sgd")) as a side effect
    import lightning_commsgd.fabric  # noqa: F401  (registers the Fabric strategies)
    from lightning_commsgd.callbacks import CommunicationMonitor
    from lightning_commsgd.strategies import (
        AsyncSGDStrategy,
        CommunicationStrategy,
        CompressedSGDStrategy,
        DecentralizedSGDStrategy,
        DianaStrategy,
        DiLoCoStrategy,
        DoubleResidualStrategy,
        ElasticAveragingStrategy,
        KSyncSGDStrategy,
        LocalSGDStrategy,
        OverlapLocalSGDStrategy,
        ParameterServerStrategy,
        SlowMoStrategy,
        StreamingDiLoCoStrategy,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:  # a public name not defined here: one of the adapters', without Lightning
        raise ImportError(
            f"lightning_commsgd.{name} needs Lightning (pip install 'lightning>=2.5'); the pure core "
            "(lightning_commsgd.algorithms, comm, compression, ...) works without it."
        )
    raise AttributeError(f"module 'lightning_commsgd' has no attribute {name!r}")
