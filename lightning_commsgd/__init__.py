"""lightning_commsgd: communication-efficient distributed SGD as PyTorch Lightning strategies.

Importing the package registers the strategy names with Lightning's ``StrategyRegistry``, so
``Trainer(strategy="local_sgd")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_commsgd.algorithms import PeriodicAverager
from lightning_commsgd.algorithms.parameter_server import StalenessAwareLR
from lightning_commsgd.callbacks import CommunicationMonitor
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
from lightning_commsgd.schedules import (
    AdaComm,
    ConstantPeriod,
    IncreasingPeriod,
    PeriodSchedule,
    PostLocalSGD,
)
from lightning_commsgd.strategies import (
    AsyncSGDStrategy,
    CommunicationStrategy,
    CompressedSGDStrategy,
    DecentralizedSGDStrategy,
    DianaStrategy,
    DoubleResidualStrategy,
    ElasticAveragingStrategy,
    KSyncSGDStrategy,
    LocalSGDStrategy,
    OverlapLocalSGDStrategy,
    ParameterServerStrategy,
)
from lightning_commsgd.topology import Topology, make_topology

__all__ = [
    "QSGD",
    "AdaComm",
    "AsyncSGDStrategy",
    "CommLedger",
    "CommunicationMonitor",
    "CommunicationStrategy",
    "Communicator",
    "CompressedSGDStrategy",
    "Compressor",
    "DianaStrategy",
    "DoubleResidualStrategy",
    "ConstantPeriod",
    "DecentralizedSGDStrategy",
    "ElasticAveragingStrategy",
    "Identity",
    "IncreasingPeriod",
    "KSyncSGDStrategy",
    "LocalSGDStrategy",
    "OverlapLocalSGDStrategy",
    "PNormQuantizer",
    "ParameterServerStrategy",
    "PeriodSchedule",
    "PeriodicAverager",
    "PostLocalSGD",
    "RandomK",
    "ScaledSign",
    "StalenessAwareLR",
    "TopK",
    "Topology",
    "make_topology",
    "register_strategies",
]

__version__ = "0.1.0"


def register_strategies() -> None:
    """Register this package's strategy names with Lightning (idempotent; done on import)."""
    entries = {
        "local_sgd": (LocalSGDStrategy, "Local SGD, averaging params + momentum every 8 steps", {"tau": 8}),
        "elastic_averaging": (ElasticAveragingStrategy, "EASGD, tau=4, alpha=2/(m+2)", {"tau": 4}),
        "overlap_local_sgd": (
            OverlapLocalSGDStrategy,
            "Overlap Local-SGD: tau=8, the average runs behind the next 8 local steps, pull alpha=0.5",
            {"tau": 8},
        ),
        "dore": (
            DoubleResidualStrategy,
            "DORE: inf-norm ternary quantization (blocks of 256) both ways, rank 0 as master, the paper's "
            "rates alpha=0.1, beta=1, eta=1 (rates='theory' for the theorems')",
            {"compressor": PNormQuantizer(float("inf"), 256)},
        ),
        "diana": (
            DianaStrategy,
            "DIANA: inf-norm quantized gradient residuals, uncompressed model",
            {"compressor": PNormQuantizer(float("inf"), 256)},
        ),
        "qsgd": (
            CompressedSGDStrategy,
            "QSGD gradients, 4 levels, buckets of 512",
            {"compressor": QSGD(4, 512)},
        ),
        "mem_sgd": (
            CompressedSGDStrategy,
            "MEM-SGD: top-1% gradients with error feedback",
            {"compressor": TopK(0.01), "error_feedback": True},
        ),
        "double_squeeze": (
            CompressedSGDStrategy,
            "DoubleSqueeze: scaled sign (blocks of 256) with error feedback on workers and on rank 0",
            {
                "compressor": ScaledSign(256),
                "error_feedback": True,
                "server_compressor": ScaledSign(256),
                "server": "rank0",
            },
        ),
    }
    entries["sync_sgd_ps"] = (KSyncSGDStrategy, "Synchronous SGD through a parameter server on rank 0", {})
    entries["async_sgd"] = (
        AsyncSGDStrategy,
        "Asynchronous SGD (k=1) through a parameter server on rank 0",
        {},
    )
    for topology in ("ring", "torus", "exponential", "one_peer_exponential", "complete", "star"):
        entries[f"gossip_{topology}"] = (
            DecentralizedSGDStrategy,
            f"Decentralized SGD (D-PSGD, tau=1) gossiping over a {topology.replace('_', ' ')} graph",
            {"topology": topology, "tau": 1},
        )
    for name, (cls, description, init_params) in entries.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description, **init_params)


register_strategies()
