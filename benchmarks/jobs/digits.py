"""The digits benchmark job: an MLP on scikit-learn's digits, CPU processes, any strategy, JSON results.

It trains with several CPU processes under DDP, local SGD, gossip, EASGD or a compressed-communication
strategy (DORE, DIANA, QSGD, MEM-SGD, DoubleSqueeze), every option a flag, and writes the results (bytes,
rounds, times, accuracy, step and validation traces) as JSON.

The benchmarks run it through :mod:`benchmarks.runner`; by hand, from the repository root::

    python -m benchmarks.jobs.digits --strategy ddp --epochs 3
    python -m benchmarks.jobs.digits --strategy local_sgd --tau 8 --epochs 3 --json /tmp/local_sgd.json
    python -m benchmarks.jobs.digits --strategy local_sgd --schedule adacomm --tau0 16 --interval-steps 50 \
        --max-steps 600 --trace --json /tmp/adacomm.json
    python -m benchmarks.jobs.digits --strategy gossip --topology torus --devices 4 --tau 4 --trace
    python -m benchmarks.jobs.digits --strategy elastic --tau 4 --alpha 0.2 --devices 4
    python -m benchmarks.jobs.digits --strategy local_sgd --devices 4 --non-iid --redundancy 0.5 \
        --max-steps 600 --val-every-steps 25 --json /tmp/ri_sgd.json
    python -m benchmarks.jobs.digits --strategy dore --compressor-block 256 --server rank0 --trace
    python -m benchmarks.jobs.digits --strategy mem_sgd --topk-ratio 0.01 --max-steps 300

``gossip`` is ``DecentralizedSGDStrategy`` (each rank mixes with its graph neighbours every ``--tau``
steps by point-to-point messages, then one exact all-reduce average at the end of fit); ``elastic`` is
``ElasticAveragingStrategy`` (EASGD: one all-reduce per round, each rank ends with the centre variable).
After ``fit`` every rank holds the same consensus model, which the final ``trainer.validate`` evaluates.

The compressed strategies communicate at every optimizer step (no ``--tau``): ``dore`` is
``DoubleResidualStrategy`` with the inf-norm ternary quantizer (``--compressor-block`` values per norm) on
both sides, ``diana`` is ``DianaStrategy`` (the same quantizer, an uncompressed model), ``qsgd`` is
``CompressedSGDStrategy(QSGD(--qsgd-levels, --qsgd-bucket))``, ``mem_sgd`` is top-``--topk-ratio`` with
error feedback and ``double_squeeze`` is scaled sign (blocks of ``--compressor-block``) with error feedback
on the workers and on the server. ``--server`` (the strategies' ``master``) picks rank 0 as master or a
replicated master. With ``master="rank0"`` the ranks send different amounts (rank 0 broadcasts, the
others send up), so the results and the ``--trace`` rows also hold the mean over the ranks (``mean_*``
keys), collected after fit outside the ledger.

``--redundancy MU`` is RI-SGD (Haddadpour et al., ICML 2019): each rank also holds a fraction ``MU`` of the
whole training set from its neighbours' strided shards; with ``--sampling stratified`` every batch takes
``--batch-size`` samples from each shard held, so a rank's batch grows to about ``b (1 + MU p)``.
``--non-iid`` sorts the training set by label into one contiguous block per rank's shard (see
``DigitsDataModule(label_skew_shards=...)``); the strided placement is then used even at ``MU = 0``.
``--redundancy 0`` (like any RI-SGD option) also selects the fixed strided shards, so a sweep over ``MU``
compares one placement; only without ``--redundancy``/``--sampling``/``--non-iid`` do the ranks get
Lightning's globally reshuffled ``DistributedSampler``.

The model and data are the digits example's (``examples/digits/model.py`` and ``data.py``, imported as
``examples.digits.*`` from the repository root). Lightning's default launcher for ``devices > 1`` on CPU
re-runs the command line (``python -m benchmarks.jobs.digits ...``) once per extra rank (with
``LOCAL_RANK`` etc. set), so everything at module level and in :func:`main` runs on every rank. Only
global rank 0 prints the summary and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, Strategy

from benchmarks.results import json_safe
from benchmarks.tracing import (
    BatchSizeProbe,
    StepTrace,
    TrainLoopTimer,
    ValidationTrace,
    metric,
    period_of,
    rounds_done,
)
from examples.digits.data import DigitsDataModule
from examples.digits.model import MLPClassifier
from lightning_commsgd import (
    QSGD,
    CommunicationMonitor,
    Communicator,
    PNormQuantizer,
    RedundancyInfusion,
    ScaledSign,
    TopK,
    create_strategy,
    make_topology,
)
from lightning_commsgd.algorithms.dore import SERVER_MODES
from lightning_commsgd.algorithms.elastic import validate_alpha
from lightning_commsgd.comm import shutdown_process_group
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.redundancy import SAMPLING_MODES
from lightning_commsgd.topology import TOPOLOGY_NAMES

if TYPE_CHECKING:
    from lightning_commsgd.schedules import PeriodSchedule

__all__ = [
    "COMPRESSED_STRATEGIES",
    "DIGITS_WORKLOAD",
    "GOSSIP_MOMENTUM",
    "PERIODIC_STRATEGIES",
    "ROUND_TAGS",
    "SCHEDULES",
    "STRATEGIES",
    "CompressionOptions",
    "Workload",
    "build_parser",
    "build_period",
    "build_strategy",
    "check_args",
    "main",
    "parse_args",
    "run",
    "traffic_split",
]

# Every rank is its own process on a small machine: one intra-op thread each avoids oversubscribing the
# cores (N ranks x N threads), which would make wall-clock comparisons between strategies meaningless.
# Done at import time because every rank re-executes this module.
torch.set_num_threads(1)

# The step-wise compressed strategies: one compressed exchange at every optimizer step, no period.
COMPRESSED_STRATEGIES = ("dore", "diana", "qsgd", "mem_sgd", "double_squeeze")
STRATEGIES = ("ddp", "local_sgd", "gossip", "elastic", *COMPRESSED_STRATEGIES)
# The strategies with a communication period; --tau and --schedule apply to them (not to DDP nor to the
# compressed strategies, which communicate at every step).
PERIODIC_STRATEGIES = ("local_sgd", "gossip", "elastic")
SCHEDULES = ("constant", "adacomm")
GOSSIP_MOMENTUM = ("average", "local")
DEFAULT_TOPOLOGY = "ring"
DEFAULT_GOSSIP_MOMENTUM = "average"
# The ledger tags of each strategy's training rounds (for DDP: the counting hook's gradient buckets); the
# first is the main one (the results' "round_tag"). The compressed strategies use two: the workers'
# payloads up and the master's (model or aggregate) payload down, the latter only with master="rank0".
# Everything else a rank sends is either the end-of-fit average (tag "final") or overhead: the initial
# broadcast of x_0, consensus models for validation, Lightning's own reductions and barriers.
_DORE_TAGS = ("dore_gradient", "dore_model")
_COMPRESSED_SGD_TAGS = ("compressed_gradient", "server_gradient")
ROUND_TAGS: dict[str, tuple[str, ...]] = {
    "ddp": ("ddp_gradients",),
    "local_sgd": ("average",),
    "gossip": ("gossip",),
    "elastic": ("elastic",),
    "dore": _DORE_TAGS,
    "diana": _DORE_TAGS,
    "qsgd": _COMPRESSED_SGD_TAGS,
    "mem_sgd": _COMPRESSED_SGD_TAGS,
    "double_squeeze": _COMPRESSED_SGD_TAGS,
}
FINAL_TAG = "final"
# AdaComm's interval when neither --interval-steps nor --interval-s is given.
DEFAULT_INTERVAL_STEPS = 50
# Compressor defaults: the DORE paper's inf-norm quantizer over blocks of 256 (also DoubleSqueeze's sign
# blocks), QSGD's 4 levels over buckets of 512 as in its paper, and MEM-SGD's top 1%.
DEFAULT_COMPRESSOR_BLOCK = 256
DEFAULT_QSGD_LEVELS = 4
DEFAULT_QSGD_BUCKET = 512
DEFAULT_TOPK_RATIO = 0.01
# The paper's topology for the two-sided methods (a server that sends compressed data down); the
# one-sided baselines all-gather, so every rank aggregates and nothing is sent down.
DEFAULT_SERVER = {
    "dore": "rank0",
    "diana": "rank0",
    "qsgd": "replicated",
    "mem_sgd": "replicated",
    "double_squeeze": "rank0",
}


@dataclass(frozen=True)
class CompressionOptions:
    """The compressed strategies' settings (``None``: the strategy's own default).

    Attributes:
        server: the strategies' ``master``: ``"rank0"`` or ``"replicated"``; ``None`` takes
            :data:`DEFAULT_SERVER`.
        block: values per norm of the inf-norm quantizer (dore, diana) and per scale of the scaled sign
            (double_squeeze).
        qsgd_levels: QSGD's s.
        qsgd_bucket: QSGD's bucket size.
        topk_ratio: MEM-SGD's fraction of coordinates sent.
        alpha: DORE/DIANA's h step, their ``shift_rate`` (default: DORE's from ``rates``, DIANA's
            1/(2(C+1))).
        beta: DORE's x_hat step, its ``model_rate`` (default: from ``rates``).
        eta: DORE's error-compensation weight, its ``error_weight`` (default 1).
        rates: DORE's default alpha/beta: ``"paper"`` (0.1, 1) or ``"theory"`` (1/(2(C+1)), 1/(C_m+1)).
        seed: base of the compressors' random streams.
        wire: how the payloads travel: ``"packed"`` or ``"entropy"`` (entropy-coded).
    """

    server: str | None = None
    block: int = DEFAULT_COMPRESSOR_BLOCK
    qsgd_levels: int = DEFAULT_QSGD_LEVELS
    qsgd_bucket: int = DEFAULT_QSGD_BUCKET
    topk_ratio: float = DEFAULT_TOPK_RATIO
    alpha: float | None = None
    beta: float | None = None
    eta: float | None = None
    rates: str = "paper"
    seed: int = 0
    wire: str = "packed"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompressionOptions:
        """The options of the command line, unset flags replaced by the defaults."""

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        return cls(
            server=args.server,
            block=given(args.compressor_block, DEFAULT_COMPRESSOR_BLOCK),
            qsgd_levels=given(args.qsgd_levels, DEFAULT_QSGD_LEVELS),
            qsgd_bucket=given(args.qsgd_bucket, DEFAULT_QSGD_BUCKET),
            topk_ratio=given(args.topk_ratio, DEFAULT_TOPK_RATIO),
            alpha=args.dore_alpha,
            beta=args.dore_beta,
            eta=args.dore_eta,
            rates=args.dore_rates or "paper",
            seed=args.seed,
            wire=args.wire or "packed",
        )


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command-line options of this job (shared with ``synthetic_cnn``, which adds its own)."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="distributed strategy")
    parser.add_argument(
        "--tau",
        type=int,
        default=8,
        help="local steps between communication rounds (local_sgd, gossip and elastic)",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="period of local_sgd, gossip or elastic: constant (--tau) or AdaComm (--tau0 and an interval)",
    )
    parser.add_argument("--tau0", type=int, default=16, help="AdaComm's initial period")
    interval = parser.add_mutually_exclusive_group()
    interval.add_argument(
        "--interval-steps",
        type=int,
        default=None,
        help=f"AdaComm re-decides tau every this many steps (default {DEFAULT_INTERVAL_STEPS})",
    )
    interval.add_argument(
        "--interval-s", type=float, default=None, help="AdaComm re-decides tau every this many seconds"
    )
    parser.add_argument(
        "--no-lr-aware",
        dest="lr_aware",
        action="store_false",
        help="AdaComm without the eta_0/eta_l factor (the learning rate is constant here anyway)",
    )
    parser.add_argument(
        "--topology",
        choices=TOPOLOGY_NAMES,
        default=None,
        help=f"gossip graph (gossip only; default {DEFAULT_TOPOLOGY}; torus needs a square --devices)",
    )
    parser.add_argument(
        "--gossip-momentum",
        choices=GOSSIP_MOMENTUM,
        default=None,
        help=f"gossip: mix the momentum buffers with the models, or keep them local"
        f" (default {DEFAULT_GOSSIP_MOMENTUM})",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="EASGD moving rate in (0, 2/(devices+1)) (elastic only; default 2/(devices+2))",
    )
    compression = parser.add_argument_group(
        "compressed strategies (" + ", ".join(COMPRESSED_STRATEGIES) + ")"
    )
    compression.add_argument(
        "--server",
        choices=SERVER_MODES,
        default=None,
        help="rank0 (a parameter server: gather up, broadcast down) or replicated (all-gather, every rank"
        " aggregates); default rank0 for dore, diana and double_squeeze, replicated for qsgd and mem_sgd",
    )
    compression.add_argument(
        "--wire",
        choices=("packed", "entropy"),
        default=None,
        help="how the payloads travel: packed (fixed size; default) or entropy (entropy-coded)",
    )
    compression.add_argument(
        "--compressor-block",
        type=int,
        default=None,
        help="values per norm of the inf-norm quantizer (dore, diana) or per scale of the scaled sign"
        f" (double_squeeze); default {DEFAULT_COMPRESSOR_BLOCK}",
    )
    compression.add_argument(
        "--qsgd-levels", type=int, default=None, help=f"QSGD's levels s (qsgd; default {DEFAULT_QSGD_LEVELS})"
    )
    compression.add_argument(
        "--qsgd-bucket",
        type=int,
        default=None,
        help=f"values per QSGD bucket norm (qsgd; default {DEFAULT_QSGD_BUCKET})",
    )
    compression.add_argument(
        "--topk-ratio",
        type=float,
        default=None,
        help=f"fraction of the gradient entries sent (mem_sgd; default {DEFAULT_TOPK_RATIO})",
    )
    compression.add_argument(
        "--dore-alpha",
        type=float,
        default=None,
        help="step of the gradient shifts h (dore, diana; default: dore 0.1, or 1/(2(C+1)) of the quantizer"
        " with --dore-rates theory; diana 1/(2(C+1)))",
    )
    compression.add_argument(
        "--dore-beta",
        type=float,
        default=None,
        help="step of the model estimate x_hat (dore; default 1, or 1/(C+1) of the quantizer with"
        " --dore-rates theory)",
    )
    compression.add_argument(
        "--dore-eta",
        type=float,
        default=None,
        help="weight of the model-side error feedback (dore; default 1)",
    )
    compression.add_argument(
        "--dore-rates",
        choices=("paper", "theory"),
        default=None,
        help="where dore's unset alpha/beta come from: paper (default; the paper's experiments, alpha 0.1,"
        " beta 1) or theory (1/(2(C+1)), 1/(C+1): x_hat moves by beta of each step, slow)",
    )
    parser.add_argument(
        "--redundancy",
        type=float,
        default=None,
        metavar="MU",
        help="RI-SGD: each rank also holds this fraction of the whole training set from its neighbours'"
        " shards, in [0, 1 - 1/devices] (not with ddp; default 0). Given at all (0 included), or with"
        " --sampling/--non-iid, the data lives in fixed strided shards, the same for every MU; without"
        " any of them Lightning's DistributedSampler reshuffles globally",
    )
    parser.add_argument(
        "--sampling",
        choices=SAMPLING_MODES,
        default=None,
        help="RI-SGD batches: stratified (default; --batch-size from every shard held) or union (batches of"
        " --batch-size from the held samples)",
    )
    parser.add_argument(
        "--non-iid",
        action="store_true",
        help="label-skewed training data: each rank's shard is one block of the label-sorted set"
        " (not with ddp)",
    )
    parser.add_argument(
        "--val-every-steps",
        type=int,
        default=0,
        metavar="N",
        help="validate the consensus model every N optimizer steps during fit and record a val_trace"
        " (default 0: once per epoch, no trace)",
    )
    parser.add_argument("--devices", type=int, default=2, help="number of CPU processes")
    parser.add_argument("--epochs", type=int, default=3, help="maximum number of epochs")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer step budget (-1: epochs only)")
    parser.add_argument("--hidden", type=int, default=128, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=2, help="number of hidden layers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the training set this many times")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the split and the sampler")
    parser.add_argument("--json", type=Path, default=None, help="rank 0 writes the results here")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="add a per-step trace (time, loss, tau, rounds, bytes) to the JSON",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check parsed options (``parser.error`` on the first bad one) and fill in the defaults that depend
    on other options; returns ``args``."""
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    if args.tau < 1:
        parser.error(f"--tau must be >= 1, got {args.tau}")
    if args.val_every_steps < 0:
        parser.error(f"--val-every-steps must be >= 0, got {args.val_every_steps}")
    _check_strategy_options(parser, args)
    _check_redundancy_options(parser, args)
    if args.schedule == "adacomm":
        if args.strategy not in PERIODIC_STRATEGIES:
            parser.error(f"--schedule adacomm needs --strategy {'/'.join(PERIODIC_STRATEGIES)}")
        if args.tau0 < 1:
            parser.error(f"--tau0 must be >= 1, got {args.tau0}")
        if args.interval_steps is not None and args.interval_steps < 1:
            parser.error(f"--interval-steps must be >= 1, got {args.interval_steps}")
        if args.interval_s is not None and not args.interval_s > 0:
            parser.error(f"--interval-s must be > 0, got {args.interval_s}")
        if args.interval_steps is None and args.interval_s is None:
            args.interval_steps = DEFAULT_INTERVAL_STEPS
    return args


def _check_strategy_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options of another strategy, fill in the gossip and compression defaults, and check the
    topology, alpha and the compressors' settings with the package's own checks, before any process is
    started."""
    for flag, value, owners in (
        ("--topology", args.topology, ("gossip",)),
        ("--gossip-momentum", args.gossip_momentum, ("gossip",)),
        ("--alpha", args.alpha, ("elastic",)),
        ("--server", args.server, COMPRESSED_STRATEGIES),
        ("--wire", args.wire, COMPRESSED_STRATEGIES),
        ("--compressor-block", args.compressor_block, ("dore", "diana", "double_squeeze")),
        ("--qsgd-levels", args.qsgd_levels, ("qsgd",)),
        ("--qsgd-bucket", args.qsgd_bucket, ("qsgd",)),
        ("--topk-ratio", args.topk_ratio, ("mem_sgd",)),
        ("--dore-alpha", args.dore_alpha, ("dore", "diana")),
        ("--dore-beta", args.dore_beta, ("dore",)),
        ("--dore-eta", args.dore_eta, ("dore",)),
        ("--dore-rates", args.dore_rates, ("dore",)),
    ):
        if value is not None and args.strategy not in owners:
            parser.error(f"{flag} applies to --strategy {'/'.join(owners)} only, not {args.strategy}")
    if args.strategy in COMPRESSED_STRATEGIES:
        args.server = args.server or DEFAULT_SERVER[args.strategy]
        # The strategy's constructor checks the compressor's settings and DORE's rates; its warnings
        # (rates outside the theory) come again, once per rank, when the run builds it.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_strategy(args.strategy, args.tau, compression=CompressionOptions.from_args(args))
        except (TypeError, ValueError) as err:
            parser.error(f"--strategy {args.strategy}: {err}")
    if args.strategy == "gossip":
        args.topology = args.topology or DEFAULT_TOPOLOGY
        args.gossip_momentum = args.gossip_momentum or DEFAULT_GOSSIP_MOMENTUM
        try:
            make_topology(args.topology, args.devices)
        except ValueError as err:
            parser.error(f"--topology {args.topology} with --devices {args.devices}: {err}")
    if args.strategy == "elastic":
        try:
            validate_alpha(args.alpha, args.devices)
        except (TypeError, ValueError) as err:
            parser.error(f"--alpha: {err}")


def _check_redundancy_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse RI-SGD options DDP cannot honour, and check mu against ``--devices`` with the sampler's
    own rule, before any process is started. Sets ``args.ri_sgd`` (an RI-SGD option was given: the strided
    placement, as the strategies' rule) and fills in the defaults mu = 0, ``"stratified"``."""
    args.ri_sgd = args.redundancy is not None or args.sampling is not None or args.non_iid
    args.redundancy = 0.0 if args.redundancy is None else args.redundancy
    args.sampling = args.sampling or "stratified"
    if args.strategy == "ddp":
        # DDP keeps Lightning's DistributedSampler, which shuffles the whole set globally: neither the
        # redundant placement nor the label skew would reach the ranks.
        if args.redundancy > 0:
            parser.error("--redundancy applies to the strategies of lightning_commsgd, not ddp")
        if args.non_iid:
            parser.error("--non-iid applies to the strategies of lightning_commsgd, not ddp")
        return
    from lightning_commsgd.samplers import RedundantPlacement

    try:
        RedundantPlacement(args.devices, args.devices, args.redundancy)
    except ValueError as err:
        parser.error(f"--redundancy with --devices {args.devices}: {err}")


def build_period(args: argparse.Namespace) -> int | PeriodSchedule:
    """The ``tau`` argument of ``LocalSGDStrategy``: ``--tau``, or an ``AdaComm`` schedule."""
    if args.schedule == "constant":
        return args.tau
    if args.schedule == "adacomm":
        # Imported here, not at the top: the constant-period runs must not depend on the schedules module.
        from lightning_commsgd.schedules import AdaComm

        return AdaComm(
            tau0=args.tau0,
            interval_steps=args.interval_steps,
            interval_s=args.interval_s,
            lr_aware=args.lr_aware,
        )
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {args.schedule!r}")


def build_strategy(
    name: str,
    tau: int | PeriodSchedule,
    *,
    topology: str = DEFAULT_TOPOLOGY,
    gossip_momentum: str = DEFAULT_GOSSIP_MOMENTUM,
    alpha: float | None = None,
    redundancy: float | None = None,
    sampling: str | None = None,
    strided_placement_for: int | None = None,
    compression: CompressionOptions | None = None,
) -> Strategy:
    """Lightning's own ``DDPStrategy`` (the baseline) or one of ours with period ``tau``:
    ``LocalSGDStrategy`` (``local_sgd``), ``DecentralizedSGDStrategy`` over ``topology`` with
    ``gossip_momentum`` (``gossip``), or ``ElasticAveragingStrategy`` with ``alpha`` (``elastic``); or a
    compressed strategy (``tau`` unused) set up by ``compression`` (default :class:`CompressionOptions`):
    ``DoubleResidualStrategy`` (``dore``) and ``DianaStrategy`` (``diana``) with the inf-norm quantizer,
    ``CompressedSGDStrategy`` with QSGD (``qsgd``), top-k and error feedback (``mem_sgd``), or scaled
    sign with error feedback on both sides (``double_squeeze``).

    Ours take RI-SGD's ``redundancy`` (mu) and ``sampling``, passed on as one
    ``RedundancyInfusion(mu=..., sampling=...)`` only when one of them is given (not ``None``): any of them,
    ``redundancy=0.0`` included, puts the data in the fixed strided shards (the strategies' rule), none
    keeps Lightning's globally shuffled ``DistributedSampler``. ``strided_placement_for=p`` also sets
    ``original_world_size=p`` (the strided placement of ``p`` workers, which a label skew of the shards
    needs). Every strategy of ours comes from ``lightning_commsgd.registry.create_strategy``.

    Raises:
        ValueError: RI-SGD options with ``ddp``, or an unknown ``name``.
    """
    if name == "ddp":
        if (redundancy or 0) > 0 or strided_placement_for is not None:
            raise ValueError("DDPStrategy takes no RI-SGD options (redundancy, strided placement)")
        return DDPStrategy()
    ri_sgd: dict[str, Any] = {}
    if redundancy is not None or sampling is not None or strided_placement_for is not None:
        placement: dict[str, Any] = {"mu": redundancy or 0.0, "original_world_size": strided_placement_for}
        if sampling is not None:
            placement["sampling"] = sampling
        ri_sgd["redundancy"] = RedundancyInfusion(**placement)
    if name == "local_sgd":
        return create_strategy("local_sgd", tau=tau, **ri_sgd)
    if name == "gossip":
        return create_strategy(
            "decentralized_sgd", topology=topology, tau=tau, momentum=gossip_momentum, **ri_sgd
        )
    if name == "elastic":
        return create_strategy("elastic_averaging", tau=tau, alpha=alpha, **ri_sgd)
    if name in COMPRESSED_STRATEGIES:
        return _build_compressed(name, compression or CompressionOptions(), ri_sgd)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _build_compressed(name: str, options: CompressionOptions, ri_sgd: dict[str, Any]) -> Strategy:
    """One of :data:`COMPRESSED_STRATEGIES` from ``options`` (see :func:`build_strategy`)."""
    server = options.server or DEFAULT_SERVER[name]
    common: dict[str, Any] = {"master": server, "seed": options.seed, "wire": options.wire, **ri_sgd}
    if name in ("dore", "diana"):
        quantizer = PNormQuantizer(p=float("inf"), block_size=options.block)
        if name == "diana":
            return create_strategy("diana", compressor=quantizer, shift_rate=options.alpha, **common)
        eta = 1.0 if options.eta is None else options.eta
        return create_strategy(
            "dore",
            compressor=quantizer,
            shift_rate=options.alpha,
            model_rate=options.beta,
            error_weight=eta,
            rates=options.rates,
            **common,
        )
    if name == "qsgd":
        return create_strategy("qsgd", compressor=QSGD(options.qsgd_levels, options.qsgd_bucket), **common)
    if name == "mem_sgd":
        return create_strategy("mem_sgd", compressor=TopK(options.topk_ratio), error_feedback=True, **common)
    # double_squeeze: the aggregate is compressed too, with the server's own error memory
    sign = ScaledSign(options.block)
    return create_strategy(
        "double_squeeze",
        compressor=sign,
        error_feedback=True,
        server_compressor=ScaledSign(options.block),
        **common,
    )


def _schedule_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The period options of the run, for the results (``None`` for DDP, which has no period)."""
    if args.strategy not in PERIODIC_STRATEGIES:
        return None
    if args.schedule == "constant":
        return {"name": "constant", "tau": args.tau}
    return {
        "name": "adacomm",
        "tau0": args.tau0,
        "interval_steps": args.interval_steps,
        "interval_s": args.interval_s,
        "lr_aware": args.lr_aware,
    }


def traffic_split(ledger: CommLedger, round_tag: str | Sequence[str]) -> dict[str, int]:
    """This rank's bytes sent, split by purpose (from ``ledger.by_tag``); the three parts add up to
    ``ledger.bytes_sent``.

    ``round_bytes_sent``: the training rounds (tag ``round_tag``, or the sum over several tags);
    ``final_bytes_sent``: the exact average at the end of fit (tag ``final``; zero for DDP and EASGD,
    whose replicas end equal anyway); ``other_bytes_sent``: the rest (initial broadcast, consensus
    evaluation, Lightning's reductions and barriers). ``round_wire_bytes_estimate`` is what the rounds put
    on this rank's link: a ring all-reduce of ``n`` payload bytes sends ``2 (p-1)/p n``, point-to-point
    messages and (all-)gathers exactly their payload (the ledger's ``wire_bytes_estimate`` rule, applied
    to the round tags alone).
    """
    tags = (round_tag,) if isinstance(round_tag, str) else tuple(round_tag)
    final = ledger.tag(FINAL_TAG)
    round_sent = sum(ledger.tag(tag).bytes_sent for tag in tags)
    allreduce = sum(ledger.tag(tag).allreduce_bytes for tag in tags)
    p = ledger.world_size
    ring = 2 * (p - 1) * allreduce // p if p > 1 else 0
    return {
        "round_bytes_sent": int(round_sent),
        "final_bytes_sent": int(final.bytes_sent),
        "other_bytes_sent": int(ledger.bytes_sent - round_sent - final.bytes_sent),
        "round_wire_bytes_estimate": int(ring + round_sent - allreduce),
    }


def _compression_config(args: argparse.Namespace, algorithm: Any) -> dict[str, Any] | None:
    """The compressed strategies' settings in force (DORE's default rates resolved for this model), and
    what one step costs: the payload a worker sends up and what it would be uncompressed (fp32)."""
    if args.strategy not in COMPRESSED_STRATEGIES or algorithm is None:
        return None
    numel = int(algorithm.numel)
    compressor = algorithm.compressor
    down = getattr(algorithm, "model_compressor", None) or getattr(algorithm, "server_compressor", None)
    config: dict[str, Any] = {
        "server": algorithm.server,
        "compressor": repr(compressor),
        "down_compressor": None if down is None else repr(down),
        "error_feedback": bool(getattr(algorithm, "error_feedback", False)),
        # payload bytes of one worker's message up (the status byte that travels with it left out)
        "up_payload_bytes_per_step": int(compressor.payload_nbytes(numel)),
        "uncompressed_bytes_per_step": int(algorithm.uncompressed_bytes_per_step),
    }
    for key in ("alpha", "beta", "eta"):
        if hasattr(algorithm, key):
            config[key] = float(getattr(algorithm, key))
    return config


def _algorithm_config(args: argparse.Namespace, algorithm: Any) -> dict[str, Any]:
    """Strategy-specific settings for the results: the gossip graph and its zeta, EASGD's alpha, the
    compression settings (``None`` where they do not apply)."""
    topology = getattr(algorithm, "topology", None) if args.strategy == "gossip" else None
    return {
        "topology": args.topology if args.strategy == "gossip" else None,
        "gossip_momentum": args.gossip_momentum if args.strategy == "gossip" else None,
        # The contraction of one mixing (one cycle for a time-varying graph): 0 is the exact average.
        "zeta": None if topology is None else float(topology.zeta),
        "max_degree": None if topology is None else int(topology.max_degree()),
        # The rate in force (the default 2/(m+2) resolved), not just the flag.
        "alpha": float(algorithm.alpha) if args.strategy == "elastic" and algorithm is not None else None,
        "compression": _compression_config(args, algorithm),
    }


def _gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on global rank 0, ``None`` on the others (``[obj]`` without a
    process group). Through a communicator of its own (the package's one door to torch.distributed), whose
    ledger is thrown away: this is bookkeeping of the measurement, after the strategy's ledger was read,
    and must not count as the strategy's traffic."""
    return Communicator().gather_object(obj, dst=0, tag="benchmark_results")


def _per_rank_traffic(per_rank: list[dict[str, int]]) -> dict[str, Any]:
    """Bytes sent by every rank, and their means: with a parameter server on rank 0 the ranks differ, and
    rank 0's own ledger (the rest of the results) is then not what a typical rank sends."""
    count = len(per_rank)
    return {
        "bytes_sent_by_rank": [entry["bytes_sent"] for entry in per_rank],
        "round_bytes_sent_by_rank": [entry["round_bytes_sent"] for entry in per_rank],
        "mean_bytes_sent_per_rank": sum(entry["bytes_sent"] for entry in per_rank) / count,
        "mean_round_bytes_sent_per_rank": sum(entry["round_bytes_sent"] for entry in per_rank) / count,
        "max_round_bytes_sent_per_rank": max(entry["round_bytes_sent"] for entry in per_rank),
    }


@dataclass(frozen=True)
class Workload:
    """What :func:`run` trains: the model and data built from the parsed options, a name for the results
    and the workload's own settings for the results' ``config``.

    Attributes:
        name: recorded as the results' ``workload``.
        make_model: the LightningModule to train (it must log ``train_loss``, ``val_loss`` and ``val_acc``
            as ``examples.digits.model.MLPClassifier`` does).
        make_datamodule: its data; it must honour ``label_skew_shards`` semantics for ``--non-iid``.
        config: extra entries for the results' ``config``.
    """

    name: str
    make_model: Callable[[argparse.Namespace], LightningModule]
    make_datamodule: Callable[[argparse.Namespace], LightningDataModule]
    config: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}


DIGITS_WORKLOAD = Workload(
    name="digits_mlp",
    make_model=lambda args: MLPClassifier(hidden=args.hidden, depth=args.depth, lr=args.lr),
    make_datamodule=lambda args: DigitsDataModule(
        batch_size=args.batch_size,
        seed=args.seed,
        repeat=args.repeat,
        label_skew_shards=args.devices if args.non_iid else 0,
    ),
)


def run(args: argparse.Namespace, workload: Workload | None = None) -> dict[str, Any] | None:
    """Train and validate ``workload`` (default: the digits MLP); return the results on global rank 0
    and ``None`` on the other ranks."""
    workload = workload or DIGITS_WORKLOAD
    # Same seed on every rank: identical initial weights, and Lightning's DistributedSampler takes its
    # shuffling seed from here too.
    lightning.seed_everything(args.seed, verbose=False)
    datamodule = workload.make_datamodule(args)
    model = workload.make_model(args)
    # Works for our strategies (reads their communicator's ledger) and for plain DDPStrategy (installs a
    # counting DDP comm hook), so both sides of the comparison are measured the same way.
    monitor = CommunicationMonitor()
    loop_timer = TrainLoopTimer()
    batch_probe = BatchSizeProbe()
    callbacks: list[Callback] = [monitor, loop_timer, batch_probe]
    round_tags = ROUND_TAGS[args.strategy]
    trace = StepTrace(monitor, round_tags) if args.trace else None
    if trace is not None:
        callbacks.append(trace)  # after the monitor, whose ledger it reads
    val_trace = ValidationTrace() if args.val_every_steps else None
    if val_trace is not None:
        callbacks.append(val_trace)
    # Validation every N steps across epoch boundaries (check_val_every_n_epoch=None makes
    # val_check_interval count batches over the whole fit) and no sanity check, whose numbers for the
    # initial model would not be a point of the trace; otherwise Lightning's defaults, unchanged.
    validation: dict[str, Any] = (
        {
            "val_check_interval": args.val_every_steps,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
        }
        if args.val_every_steps
        else {}
    )
    compressed = args.strategy in COMPRESSED_STRATEGIES
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=build_strategy(
            args.strategy,
            build_period(args),
            topology=args.topology or DEFAULT_TOPOLOGY,
            gossip_momentum=args.gossip_momentum or DEFAULT_GOSSIP_MOMENTUM,
            alpha=args.alpha,
            redundancy=args.redundancy if args.ri_sgd else None,
            sampling=args.sampling if args.ri_sgd else None,
            strided_placement_for=args.devices if args.non_iid else None,
            compression=CompressionOptions.from_args(args) if compressed else None,
        ),
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        callbacks=callbacks,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **validation,
    )

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall_s = time.perf_counter() - start
    # Read before validate(): it resets trainer.callback_metrics, and validation traffic (sync_dist)
    # is not part of the training communication we compare.
    train_loss = metric(trainer.callback_metrics, "train_loss")
    ledger = monitor.ledger
    split = traffic_split(ledger, round_tags)
    comm = {
        "bytes_sent_per_rank": int(ledger.bytes_sent),
        "bytes_received_per_rank": int(ledger.bytes_received),
        "rounds": int(ledger.rounds),
        "comm_s": float(ledger.seconds),
        "round_tag": round_tags[0],
        "round_tags": list(round_tags),
        **{f"{key}_per_rank": value for key, value in split.items()},
        "ledger": ledger.as_dict(),
    }
    # Every rank's totals (and trace) to rank 0, once the ledger has been read: see _gather_to_rank0.
    mine = {
        "bytes_sent": int(ledger.bytes_sent),
        "round_bytes_sent": split["round_bytes_sent"],
        "trace": None if trace is None else trace.local_bytes,
    }
    gathered = _gather_to_rank0(mine)
    # Read after fit, so they include the final round; validate() below does not change them.
    algorithm = getattr(trainer.strategy, "algorithm", None)
    period = {
        "final_tau": period_of(algorithm),
        # Communication rounds of the training loop: averages, gossip or elastic rounds (local SGD's
        # end-of-fit average counts as one; gossip's does not, see final_bytes_sent_per_rank); for the
        # compressed strategies the optimizer steps.
        "averaging_rounds": None if algorithm is None else rounds_done(algorithm, int(trainer.global_step)),
        # True when every rank holds the same (consensus) model after fit, the one validated below.
        "in_sync_after_fit": None if algorithm is None else bool(algorithm.in_sync),
    }

    # After fit every rank holds the consensus model (the strategy's final exact average, EASGD's centre
    # variable), so this evaluates that model.
    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return None
    assert gathered is not None
    if trace is not None:
        trace.add_rank_means([entry["trace"] for entry in gathered])
    results = {
        "workload": workload.name,
        "strategy": args.strategy,
        # The constant period; None for DDP, the compressed strategies and adaptive schedules (see
        # "schedule" and "final_tau").
        "tau": args.tau if args.strategy in PERIODIC_STRATEGIES and args.schedule == "constant" else None,
        **_algorithm_config(args, algorithm),
        "schedule": _schedule_config(args),
        "devices": args.devices,
        "wall_s": wall_s,
        "train_loop_s": loop_timer.seconds,
        **comm,
        **_per_rank_traffic(gathered),
        **period,
        "final_val_acc": metric(val, "val_acc"),
        "final_val_loss": metric(val, "val_loss"),
        "final_train_loss": train_loss,
        "steps": int(trainer.global_step),
        # Rank 0's largest training batch, so runs with different mu (stratified batches grow with it)
        # can be compared at equal samples per step.
        "samples_per_rank_batch": batch_probe.samples,
        "num_params": sum(p.numel() for p in model.parameters()),
        "config": {
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "hidden": args.hidden,
            "depth": args.depth,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "repeat": args.repeat,
            "seed": args.seed,
            "redundancy": args.redundancy,
            "sampling": args.sampling,
            "non_iid": args.non_iid,
            "val_every_steps": args.val_every_steps,
            **workload.config(args),
        },
    }
    if trace is not None:
        results["trace"] = trace.rows
    if val_trace is not None:
        results["val_trace"] = val_trace.rows
    return results


def main(
    argv: list[str] | None = None,
    workload: Workload | None = None,
    parse: Callable[[list[str] | None], argparse.Namespace] = parse_args,
) -> int:
    """Entry point; returns the process exit status. ``workload`` and ``parse`` let another job (see
    :mod:`benchmarks.jobs.synthetic_cnn`) train its own model with this job's strategies, options and
    results."""
    args = parse(argv)
    results = run(args, workload)
    if results is not None:  # global rank 0
        _report(args, results)
    # every rank leaves together: a rank that exits while rank 0 still writes can abort rank 0's
    # process-group teardown ("terminate called without an active exception", seen once in CI)
    shutdown_process_group()
    return 0


def _report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Print the summary and write ``--json`` (rank 0)."""
    results = json_safe(results)
    summary = {
        key: value for key, value in results.items() if key not in ("ledger", "config", "trace", "val_trace")
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
