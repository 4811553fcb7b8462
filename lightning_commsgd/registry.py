"""One table of every strategy name, and the one factory that examples, benchmarks and tests use.

Each entry names an algorithm (an :class:`~lightning_commsgd.algorithms.protocol.AlgorithmConfig` subclass,
or ``None`` for the parameter-server strategies, which are strategies of their own), the class name its
adapters give it (``LocalSGDStrategy`` in :mod:`lightning_commsgd.strategies` for the Trainer and in
:mod:`lightning_commsgd.fabric` for Fabric), and preset arguments. A *preset* (``qsgd``, ``gossip_ring``) is a
registered name whose entry fixes some arguments of another strategy. The Lightning and Fabric adapters
register every name of this table in their frameworks' strategy registries, so
``Trainer(strategy="local_sgd")`` and ``Fabric(strategy="local_sgd")`` work after
``import lightning_commsgd``. Adding an algorithm: its file (algorithm + config) and one entry here.

No Lightning import here: the table is read by the adapters, which import Lightning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_commsgd.algorithms.compressed_sgd import CompressedSGD
from lightning_commsgd.algorithms.diloco import DiLoCo, SlowMo, StreamingDiLoCo
from lightning_commsgd.algorithms.dore import DIANA, DORE
from lightning_commsgd.algorithms.elastic import ElasticAveraging
from lightning_commsgd.algorithms.gossip import DecentralizedSGD
from lightning_commsgd.algorithms.overlap import OverlapLocalSGD
from lightning_commsgd.algorithms.periodic import LocalSGD
from lightning_commsgd.algorithms.protocol import AlgorithmConfig
from lightning_commsgd.compression import QSGD, PNormQuantizer, ScaledSign, TopK
from lightning_commsgd.topology import TOPOLOGY_NAMES

__all__ = ["ENTRIES", "Framework", "StrategyEntry", "create_strategy", "entry", "strategy_class"]

Framework = Literal["lightning", "fabric"]
_ADAPTER_MODULES = {"lightning": "lightning_commsgd.strategies", "fabric": "lightning_commsgd.fabric"}


@dataclass(frozen=True)
class StrategyEntry:
    """One registered name.

    Attributes:
        name: the registry name (``Trainer(strategy=name)``); for a class's own entry, its ``strategy_name``.
        class_name: the adapters' class for it (``"LocalSGDStrategy"``).
        description: one line for the registry listing.
        algorithm: the algorithm's config class; ``None`` for strategies that are not protocol-driven.
        presets: a callable returning the arguments this name fixes (fresh objects per call): a required
            argument's default for the class's own name (DORE's compressor), or a preset's settings.
        preset: whether this name is a preset of another entry's class (``qsgd``), not the class's own
            name (its ``strategy_name``).
    """

    name: str
    class_name: str
    description: str
    algorithm: type[AlgorithmConfig] | None = None
    presets: Callable[[], Mapping[str, Any]] = field(default=dict)
    preset: bool = False


def _inf_norm() -> PNormQuantizer:
    return PNormQuantizer(float("inf"), 256)


_E = StrategyEntry
_ENTRIES: list[StrategyEntry] = [
    _E("local_sgd", "LocalSGDStrategy",
       "Local SGD / PR-SGD-Momentum: params + momentum averaged every 8 steps", LocalSGD),
    _E("decentralized_sgd", "DecentralizedSGDStrategy", "Decentralized SGD (D-PSGD, tau=1) over a ring",
       DecentralizedSGD),
    _E("elastic_averaging", "ElasticAveragingStrategy", "EASGD, tau=4, alpha=2/(m+2)", ElasticAveraging),
    _E("overlap_local_sgd", "OverlapLocalSGDStrategy",
       "Overlap Local-SGD: tau=8, the average runs behind the next 8 local steps, pull alpha=0.5",
       OverlapLocalSGD),
    _E("diloco", "DiLoCoStrategy",
       "DiLoCo: an outer Nesterov SGD (lr 0.7, momentum 0.9) on the mean pseudo-gradient every 500 steps",
       DiLoCo),
    _E("streaming_diloco", "StreamingDiLoCoStrategy",
       "Streaming DiLoCo: 2 strided fragments, H=100, each sync overlapped with 1 step, merged 50/50",
       StreamingDiLoCo),
    _E("slowmo", "SlowMoStrategy", "SlowMo: slow momentum 0.5, slow lr 1 over exact averaging every 48 steps",
       SlowMo),
    _E("dore", "DoubleResidualStrategy",
       "DORE: inf-norm ternary quantization (blocks of 256) both ways, rank 0 as master, the paper's rates",
       DORE, lambda: {"compressor": _inf_norm()}),
    _E("diana", "DianaStrategy", "DIANA: inf-norm quantized gradient residuals, uncompressed model",
       DIANA, lambda: {"compressor": _inf_norm()}),
    _E("compressed_sgd", "CompressedSGDStrategy",
       "Compressed-gradient SGD (QSGD, 4 levels, buckets of 512, by default)",
       CompressedSGD, lambda: {"compressor": QSGD(4, 512)}),
    _E("ksync_sgd", "KSyncSGDStrategy", "Synchronous (K-sync) SGD through a parameter server on rank 0"),
    _E("async_sgd", "AsyncSGDStrategy", "Asynchronous SGD (k=1) through a parameter server on rank 0"),
    # presets
    _E("qsgd", "CompressedSGDStrategy", "QSGD gradients, 4 levels, buckets of 512", CompressedSGD,
       lambda: {"compressor": QSGD(4, 512)}, preset=True),
    _E("mem_sgd", "CompressedSGDStrategy", "MEM-SGD: top-1% gradients with error feedback", CompressedSGD,
       lambda: {"compressor": TopK(0.01), "error_feedback": True}, preset=True),
    _E("double_squeeze", "CompressedSGDStrategy",
       "DoubleSqueeze: scaled sign (blocks of 256) with error feedback on workers and on rank 0",
       CompressedSGD,
       lambda: {"compressor": ScaledSign(256), "error_feedback": True, "server_compressor": ScaledSign(256),
                "master": "rank0"}, preset=True),
    *(
        _E(f"gossip_{t}", "DecentralizedSGDStrategy",
           f"Decentralized SGD (D-PSGD, tau=1) gossiping over a {t.replace('_', ' ')} graph",
           DecentralizedSGD,
           (lambda t=t: {"topology": t, "tau": 1}), preset=True)
        for t in TOPOLOGY_NAMES
    ),
]  # fmt: skip

#: every registered name, in listing order
ENTRIES: dict[str, StrategyEntry] = {e.name: e for e in _ENTRIES}


def entry(name: str) -> StrategyEntry:
    """The entry of ``name``; a KeyError listing the valid names otherwise."""
    try:
        return ENTRIES[name]
    except KeyError:
        raise KeyError(f"Unknown strategy name {name!r}; registered: {', '.join(ENTRIES)}.") from None


def strategy_class(name: str, framework: Framework = "lightning") -> type:
    """The adapter class of ``name`` for ``framework`` (imports that adapter, hence Lightning)."""
    if framework not in _ADAPTER_MODULES:
        raise ValueError(f"Arg `framework` must be one of {tuple(_ADAPTER_MODULES)}, got {framework!r}.")
    module = importlib.import_module(_ADAPTER_MODULES[framework])
    class_name = entry(name).class_name
    if not hasattr(module, class_name):
        raise ValueError(f"{class_name} ({name!r}) has no {framework} adapter.")
    return getattr(module, class_name)


def create_strategy(name: str, framework: Framework = "lightning", **kwargs: Any) -> Any:
    """A new strategy of the registered ``name`` for ``framework``: its presets, overridden by ``kwargs``.

    The one factory of the examples, benchmarks and tests, e.g. ``create_strategy("qsgd", tau=...)``.
    """
    return strategy_class(name, framework)(**{**entry(name).presets(), **kwargs})
