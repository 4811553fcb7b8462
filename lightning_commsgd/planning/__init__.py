"""A scaling model and planner: predicted time per epoch of every strategy for 2 to thousands of workers,
and a recommended averaging period tau and payload format (pure Python, no torch).

From the link rate B, the latency alpha, the compute time per step t_c and the model size P, it predicts one
epoch of DDP, periodic averaging (local SGD, DiLoCo, Overlap Local-SGD, Streaming DiLoCo) in each payload
format, gossip on each topology, the parameter server (sync, K-sync, async, K-async, K-batch-async) and
compressed SGD / DORE with a master on rank 0, on a star network (every worker one link to a switch)::

    from lightning_commsgd.planning import Link, Workload, default_strategies, plan, recommend
    link = Link(bits_per_second=100e6, latency=0.2e-3)
    work = Workload(params=1_300_000, step_seconds=5e-3, samples_per_epoch=50_000, batch_size=32)
    for p in plan(work, link, [2, 8, 64], default_strategies(tau=8)):
        print(p.workers, p.strategy, p.epoch_seconds, p.bottleneck)
    print(recommend(work, link, 8).describe())

or ``commsgd plan --params 1.3M --link 100mbit --latency 0.2ms --step-time 5ms --workers 2 8 64
--samples-per-epoch 50000 --batch-size 32``. The formulas are in :mod:`~lightning_commsgd.planning.model`
(collectives), :mod:`~lightning_commsgd.planning.strategies` and :mod:`~lightning_commsgd.planning.servers`
(one class per strategy family); the recommendation's rule in :mod:`~lightning_commsgd.planning.recommend`.
"""

from __future__ import annotations

from lightning_commsgd.planning.formats import (
    BF16,
    FP16,
    FP32,
    INT2,
    INT4,
    INT8,
    PAYLOAD_FORMATS,
    PayloadFormat,
    custom_format,
    payload_format,
)
from lightning_commsgd.planning.model import Link, Prediction, Workload, lowp_mean, ring_allreduce
from lightning_commsgd.planning.plan import FAMILIES, default_strategies, format_table, plan
from lightning_commsgd.planning.recommend import RULE, Recommendation, recommend
from lightning_commsgd.planning.servers import CompressedSGD, ParameterServer, dore
from lightning_commsgd.planning.strategies import (
    DDP,
    GOSSIP_TOPOLOGIES,
    Averaging,
    Gossip,
    StrategyModel,
    diloco,
    gossip_degree,
    local_sgd,
    overlap_local_sgd,
    streaming_diloco,
)
from lightning_commsgd.planning.units import parse_count, parse_duration, parse_rate

__all__ = [
    "BF16",
    "DDP",
    "FAMILIES",
    "FP16",
    "FP32",
    "GOSSIP_TOPOLOGIES",
    "INT2",
    "INT4",
    "INT8",
    "PAYLOAD_FORMATS",
    "RULE",
    "Averaging",
    "CompressedSGD",
    "Gossip",
    "Link",
    "ParameterServer",
    "PayloadFormat",
    "Prediction",
    "Recommendation",
    "StrategyModel",
    "Workload",
    "custom_format",
    "default_strategies",
    "diloco",
    "dore",
    "format_table",
    "gossip_degree",
    "local_sgd",
    "lowp_mean",
    "overlap_local_sgd",
    "parse_count",
    "payload_format",
    "parse_duration",
    "parse_rate",
    "plan",
    "recommend",
    "ring_allreduce",
    "streaming_diloco",
]
