"""Train an MLP on scikit-learn's digits with several CPU processes under DDP, local SGD, gossip or EASGD.

Examples::

    python examples/train_digits.py --strategy ddp --epochs 3
    python examples/train_digits.py --strategy local_sgd --tau 8 --epochs 3 --json /tmp/local_sgd.json
    python examples/train_digits.py --strategy local_sgd --schedule adacomm --tau0 16 --interval-steps 50 \
        --max-steps 600 --trace --json /tmp/adacomm.json
    python examples/train_digits.py --strategy gossip --topology torus --devices 4 --tau 4 --trace
    python examples/train_digits.py --strategy elastic --tau 4 --alpha 0.2 --devices 4
    python examples/train_digits.py --strategy local_sgd --devices 4 --non-iid --redundancy 0.5 \
        --max-steps 600 --val-every-steps 25 --json /tmp/ri_sgd.json

``gossip`` is ``DecentralizedSGDStrategy`` (each rank mixes with its graph neighbours every ``--tau``
steps by point-to-point messages, then one exact all-reduce average at the end of fit); ``elastic`` is
``ElasticAveragingStrategy`` (EASGD: one all-reduce per round, each rank ends with the centre variable).
After ``fit`` every rank holds the same consensus model, which the final ``trainer.validate`` evaluates.

``--redundancy MU`` is RI-SGD (Haddadpour et al., ICML 2019): each rank also holds a fraction ``MU`` of the
whole training set from its neighbours' strided shards; with ``--sampling stratified`` every batch takes
``--batch-size`` samples from each shard held, so a rank's batch grows to about ``b (1 + MU p)``.
``--non-iid`` sorts the training set by label into one contiguous block per rank's shard (see
``DigitsDataModule(label_skew_shards=...)``); the strided placement is then used even at ``MU = 0``.

Lightning's default launcher for ``devices > 1`` on CPU re-runs *this script* once per extra rank (with
``LOCAL_RANK`` etc. set), so everything at module level and in :func:`main` runs on every rank. Only
global rank 0 prints the summary and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn

from lightning_commsgd import (
    CommunicationMonitor,
    DecentralizedSGDStrategy,
    ElasticAveragingStrategy,
    LocalSGDStrategy,
    make_topology,
)
from lightning_commsgd.algorithms.elastic import validate_alpha
from lightning_commsgd.data import DigitsDataModule
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.models import MLPClassifier
from lightning_commsgd.strategies.redundancy import SAMPLING_MODES
from lightning_commsgd.topology import TOPOLOGY_NAMES

if TYPE_CHECKING:
    from lightning_commsgd.schedules import PeriodSchedule

__all__ = [
    "GOSSIP_MOMENTUM",
    "ROUND_TAGS",
    "SCHEDULES",
    "STRATEGIES",
    "StepTrace",
    "ValidationTrace",
    "build_period",
    "build_strategy",
    "main",
    "parse_args",
    "run",
    "traffic_split",
]

# Every rank is its own process on a small machine: one intra-op thread each avoids oversubscribing the
# cores (N ranks x N threads), which would make wall-clock comparisons between strategies meaningless.
# Done at import time because every rank re-executes this file.
torch.set_num_threads(1)

STRATEGIES = ("ddp", "local_sgd", "gossip", "elastic")
# The strategies with a communication period (everything but DDP); --tau and --schedule apply to them.
PERIODIC_STRATEGIES = ("local_sgd", "gossip", "elastic")
SCHEDULES = ("constant", "adacomm")
GOSSIP_MOMENTUM = ("mix", "local")
DEFAULT_TOPOLOGY = "ring"
DEFAULT_GOSSIP_MOMENTUM = "mix"
# The ledger tag of each strategy's training rounds (for DDP: the counting hook's gradient buckets).
# Everything else a rank sends is either the end-of-fit average (tag "final") or overhead: the initial
# broadcast of x_0, consensus models for validation, Lightning's own reductions and barriers.
ROUND_TAGS = {"ddp": "ddp_gradients", "local_sgd": "average", "gossip": "gossip", "elastic": "elastic"}
FINAL_TAG = "final"
# AdaComm's interval when neither --interval-steps nor --interval-s is given.
DEFAULT_INTERVAL_STEPS = 50


class _TrainLoopTimer(Callback):
    """Wall-clock time of the training loop alone (``on_train_start`` to ``on_train_end``).

    On rank 0, the time of ``trainer.fit`` also includes starting the other ranks (a fresh Python
    interpreter importing torch) and joining the process group; this figure excludes that fixed cost.
    """

    def __init__(self) -> None:
        self.seconds = float("nan")
        self._start = float("nan")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def _step_loss(outputs: Any) -> float | None:
    """The training loss in ``on_train_batch_end``'s ``outputs`` (a dict with ``"loss"`` or a tensor)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss) if isinstance(loss, torch.Tensor) else None


class StepTrace(Callback):
    """Rank 0's record of every optimizer step: time, loss, period, rounds and bytes so far.

    One dict per step in :attr:`rows`: ``step``, ``time_s`` (since ``on_train_start``, the same origin
    as the train loop timer), ``loss`` (rank 0's loss on its own batch, not averaged over ranks: an
    average would cost an all-reduce per step and show up in the byte counts being compared), ``tau``
    (the strategy's current period after this step, ``None`` for DDP), ``rounds`` (communication
    rounds so far: averages, gossip or elastic rounds; for DDP, which all-reduces gradients every step,
    the step count), ``bytes_sent`` (this rank's ledger so far, so it includes Lightning's own reductions
    routed through the communicator and any consensus evaluation) and ``round_bytes_sent`` (the part of
    it sent by the training rounds themselves, ledger tag ``round_tag``).

    Args:
        monitor: the run's :class:`CommunicationMonitor`, whose ledger gives the bytes; it must come
            before this callback in the trainer's list so that its ``on_fit_start`` has run.
        round_tag: the ledger tag of the strategy's rounds (see :data:`ROUND_TAGS`).
    """

    def __init__(self, monitor: CommunicationMonitor, round_tag: str) -> None:
        self.monitor = monitor
        self.round_tag = round_tag
        self.rows: list[dict[str, Any]] = []
        self._start = float("nan")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation this hook runs for every batch, but a row is one optimizer step.
        step = int(trainer.global_step)
        if not trainer.is_global_zero or (self.rows and self.rows[-1]["step"] == step):
            return
        elapsed = time.perf_counter() - self._start
        algorithm = getattr(trainer.strategy, "algorithm", None)
        self.rows.append(
            {
                "step": step,
                "time_s": elapsed,
                "loss": _step_loss(outputs),
                "tau": None if algorithm is None else int(algorithm.tau),
                "rounds": step if algorithm is None else int(algorithm.rounds),
                "bytes_sent": int(self.monitor.ledger.bytes_sent),
                "round_bytes_sent": int(self.monitor.ledger.tag(self.round_tag).bytes_sent),
            }
        )


class ValidationTrace(Callback):
    """Rank 0's record of every validation inside ``fit`` (``--val-every-steps``).

    One dict per validation in :attr:`rows`: ``step`` (optimizer steps done), ``rounds`` (communication
    rounds so far; for DDP the step count), ``val_loss`` and ``val_acc`` (averaged over the ranks'
    parts of the validation set). Our strategies validate the consensus model (``eval_on="consensus"``,
    the average of the replicas) inside ``fit``, so the rows follow the model a round would produce
    now, not rank 0's replica. The sanity check and the ``trainer.validate`` after ``fit`` are left out.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        algorithm = getattr(trainer.strategy, "algorithm", None)
        step = int(trainer.global_step)
        metrics = trainer.callback_metrics
        self.rows.append(
            {
                "step": step,
                "rounds": step if algorithm is None else int(algorithm.rounds),
                "val_loss": _metric(metrics, "val_loss"),
                "val_acc": _metric(metrics, "val_acc"),
            }
        )


class _BatchSizeProbe(Callback):
    """The largest training batch rank 0 took: b (1 + floor(mu p)) + int(b r) in stratified RI-SGD,
    ``--batch-size`` otherwise (measured rather than recomputed from the sampler's rule)."""

    def __init__(self) -> None:
        self.samples = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The digits batches are (features, labels); the last batch of a DistributedSampler epoch
        # may be short, hence the max.
        self.samples = max(self.samples, len(batch[-1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument(
        "--redundancy",
        type=float,
        default=0.0,
        metavar="MU",
        help="RI-SGD: each rank also holds this fraction of the whole training set from its neighbours'"
        " shards, in [0, 1 - 1/devices] (not with ddp; default 0)",
    )
    parser.add_argument(
        "--sampling",
        choices=SAMPLING_MODES,
        default="stratified",
        help="RI-SGD batches: stratified (--batch-size from every shard held) or union (batches of"
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
    args = parser.parse_args(argv)
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
    """Refuse options of another strategy, fill in the gossip defaults, and check the topology and
    alpha against ``--devices`` with the package's own checks, before any process is started."""
    for flag, value, owner in (
        ("--topology", args.topology, "gossip"),
        ("--gossip-momentum", args.gossip_momentum, "gossip"),
        ("--alpha", args.alpha, "elastic"),
    ):
        if value is not None and args.strategy != owner:
            parser.error(f"{flag} applies to --strategy {owner} only, not {args.strategy}")
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
    own rule, before any process is started."""
    if args.strategy == "ddp":
        # DDP keeps Lightning's DistributedSampler, which shuffles the whole set globally: neither the
        # redundant placement nor the label skew would reach the ranks.
        if args.redundancy > 0:
            parser.error("--redundancy applies to local_sgd, gossip and elastic, not ddp")
        if args.non_iid:
            parser.error("--non-iid applies to local_sgd, gossip and elastic, not ddp")
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
    redundancy: float = 0.0,
    sampling: str = "stratified",
    strided_placement_for: int | None = None,
) -> Strategy:
    """Lightning's own ``DDPStrategy`` (the baseline) or one of ours with period ``tau``:
    ``LocalSGDStrategy`` (``local_sgd``), ``DecentralizedSGDStrategy`` over ``topology`` with
    ``gossip_momentum`` (``gossip``), or ``ElasticAveragingStrategy`` with ``alpha`` (``elastic``).

    Ours take RI-SGD's ``redundancy`` (mu) and ``sampling``. ``strided_placement_for=p`` makes them use
    the strided placement of ``p`` workers even at mu = 0 (``original_world_size=p``), where Lightning's
    globally shuffled ``DistributedSampler`` would otherwise undo a label skew of the shards.

    Raises:
        ValueError: RI-SGD options with ``ddp``, or an unknown ``name``.
    """
    if name == "ddp":
        if redundancy > 0 or strided_placement_for is not None:
            raise ValueError("DDPStrategy takes no RI-SGD options (redundancy, strided placement)")
        return DDPStrategy()
    ri_sgd: dict[str, Any] = {"redundancy": redundancy, "sampling": sampling}
    if strided_placement_for is not None:
        ri_sgd["original_world_size"] = strided_placement_for
    if name == "local_sgd":
        return LocalSGDStrategy(tau=tau, **ri_sgd)
    if name == "gossip":
        return DecentralizedSGDStrategy(topology=topology, tau=tau, momentum=gossip_momentum, **ri_sgd)
    if name == "elastic":
        return ElasticAveragingStrategy(tau=tau, alpha=alpha, **ri_sgd)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


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


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    """A logged metric as a plain float (``None`` when it was never logged)."""
    value = metrics.get(key)
    return None if value is None else float(value)


def traffic_split(ledger: CommLedger, round_tag: str) -> dict[str, int]:
    """This rank's bytes sent, split by purpose (from ``ledger.by_tag``); the three parts add up to
    ``ledger.bytes_sent``.

    ``round_bytes_sent``: the training rounds (tag ``round_tag``); ``final_bytes_sent``: the exact
    average at the end of fit (tag ``final``; zero for DDP and EASGD, whose replicas end equal anyway);
    ``other_bytes_sent``: the rest (initial broadcast, consensus evaluation, Lightning's reductions and
    barriers). ``round_wire_bytes_estimate`` is what the rounds put on this rank's link: a ring
    all-reduce of ``n`` payload bytes sends ``2 (p-1)/p n``, point-to-point messages exactly their
    payload (the ledger's ``wire_bytes_estimate`` rule, applied to the round tag alone).
    """
    rounds, final = ledger.tag(round_tag), ledger.tag(FINAL_TAG)
    p = ledger.world_size
    ring = 2 * (p - 1) * rounds.allreduce_bytes // p if p > 1 else 0
    return {
        "round_bytes_sent": int(rounds.bytes_sent),
        "final_bytes_sent": int(final.bytes_sent),
        "other_bytes_sent": int(ledger.bytes_sent - rounds.bytes_sent - final.bytes_sent),
        "round_wire_bytes_estimate": int(ring + rounds.bytes_sent - rounds.allreduce_bytes),
    }


def _algorithm_config(args: argparse.Namespace, algorithm: Any) -> dict[str, Any]:
    """Strategy-specific settings for the results: the gossip graph and its zeta, EASGD's alpha
    (``None`` where they do not apply)."""
    topology = getattr(algorithm, "topology", None) if args.strategy == "gossip" else None
    return {
        "topology": args.topology if args.strategy == "gossip" else None,
        "gossip_momentum": args.gossip_momentum if args.strategy == "gossip" else None,
        # The contraction of one mixing (one cycle for a time-varying graph): 0 is the exact average.
        "zeta": None if topology is None else float(topology.zeta),
        "max_degree": None if topology is None else int(topology.max_degree()),
        # The rate in force (the default 2/(m+2) resolved), not just the flag.
        "alpha": float(algorithm.alpha) if args.strategy == "elastic" and algorithm is not None else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and validate; return the results on global rank 0 and ``None`` on the other ranks."""
    # Same seed on every rank: identical initial weights, and Lightning's DistributedSampler takes its
    # shuffling seed from here too.
    lightning.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(
        batch_size=args.batch_size,
        seed=args.seed,
        repeat=args.repeat,
        label_skew_shards=args.devices if args.non_iid else 0,
    )
    model = MLPClassifier(hidden=args.hidden, depth=args.depth, lr=args.lr)
    # Works for our strategies (reads their communicator's ledger) and for plain DDPStrategy (installs a
    # counting DDP comm hook), so both sides of the comparison are measured the same way.
    monitor = CommunicationMonitor()
    loop_timer = _TrainLoopTimer()
    batch_probe = _BatchSizeProbe()
    callbacks: list[Callback] = [monitor, loop_timer, batch_probe]
    round_tag = ROUND_TAGS[args.strategy]
    trace = StepTrace(monitor, round_tag) if args.trace else None
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
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=build_strategy(
            args.strategy,
            build_period(args),
            topology=args.topology or DEFAULT_TOPOLOGY,
            gossip_momentum=args.gossip_momentum or DEFAULT_GOSSIP_MOMENTUM,
            alpha=args.alpha,
            redundancy=args.redundancy,
            sampling=args.sampling,
            strided_placement_for=args.devices if args.non_iid else None,
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
    train_loss = _metric(trainer.callback_metrics, "train_loss")
    ledger = monitor.ledger
    comm = {
        "bytes_sent_per_rank": int(ledger.bytes_sent),
        "bytes_received_per_rank": int(ledger.bytes_received),
        "rounds": int(ledger.rounds),
        "comm_s": float(ledger.seconds),
        "round_tag": round_tag,
        **{f"{key}_per_rank": value for key, value in traffic_split(ledger, round_tag).items()},
        "ledger": ledger.as_dict(),
    }
    # Read after fit, so they include the final round; validate() below does not change them.
    algorithm = getattr(trainer.strategy, "algorithm", None)
    period = {
        "final_tau": None if algorithm is None else int(algorithm.tau),
        # Communication rounds of the training loop: averages, gossip or elastic rounds (local SGD's
        # end-of-fit average counts as one; gossip's does not, see final_bytes_sent_per_rank).
        "averaging_rounds": None if algorithm is None else int(algorithm.rounds),
        # True when every rank holds the same (consensus) model after fit, the one validated below.
        "in_sync_after_fit": None if algorithm is None else bool(algorithm.in_sync),
    }

    # After fit every rank holds the consensus model (the strategy's final exact average, EASGD's centre
    # variable), so this evaluates that model.
    val = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return None
    results = {
        "strategy": args.strategy,
        # The constant period; None for DDP and for adaptive schedules (see "schedule" and "final_tau").
        "tau": args.tau if args.strategy in PERIODIC_STRATEGIES and args.schedule == "constant" else None,
        **_algorithm_config(args, algorithm),
        "schedule": _schedule_config(args),
        "devices": args.devices,
        "wall_s": wall_s,
        "train_loop_s": loop_timer.seconds,
        **comm,
        **period,
        "final_val_acc": _metric(val, "val_acc"),
        "final_val_loss": _metric(val, "val_loss"),
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
        },
    }
    if trace is not None:
        results["trace"] = trace.rows
    if val_trace is not None:
        results["val_trace"] = val_trace.rows
    return results


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) with ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    results = run(args)
    if results is None:  # not global rank 0
        return 0
    results = _json_safe(results)
    summary = {
        key: value for key, value in results.items() if key not in ("ledger", "config", "trace", "val_trace")
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
