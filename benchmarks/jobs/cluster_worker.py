"""One process of the emulated-cluster benchmark (``bench_cluster`` starts one per emulated node, as
``python -m benchmarks.jobs.cluster_worker ...`` with the repository root on ``PYTHONPATH``).

Trains the benchmark's MLP on scikit-learn's digits with Lightning under one named configuration (see
:data:`CONFIGS`), one process per node (``Trainer(num_nodes=N, devices=1)``, rendezvous from the
``MASTER_ADDR``/``NODE_RANK``/``WORLD_SIZE`` environment the cluster sets), and rank 0 writes a JSON with:

- ``train_seconds``: wall-clock from the first training step's start (``on_train_start``) to the end of
  ``fit`` (final averaging included), on rank 0;
- ``steps``: per step, the wall-clock since ``on_train_start`` and the training loss, averaged over the
  ranks (each rank's loss of its own replica on its own batch), and rank 0's payload bytes sent so far;
- ``bytes_sent`` / ``bytes_received`` / ``rounds`` per rank from the ledger (``by_tag`` too);
- the consensus model's loss on the whole training set and its validation accuracy (computed after the
  timed part: ranks that end fit with different replicas, e.g. Lightning's post-local SGD, are averaged
  first).

``--no-communication`` runs the same steps without any process group (the compute floor: each node
trains alone). Everything a configuration does is in :func:`build_strategy`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# One intra-op thread per process: the emulated nodes share this machine's cores. The environment
# variable too: Lightning's DDP setup (which our strategies inherit) otherwise sets torch's threads to
# cores / processes per node = 2 when OMP_NUM_THREADS is unset, so every configuration with a process group
# would run its steps on two oversubscribed threads while the compute floor (no process group) ran on one.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, Strategy  # noqa: E402

from benchmarks.jobs import BARE_TRAINER  # noqa: E402
from benchmarks.jobs.digits import CompressionOptions  # noqa: E402
from benchmarks.jobs.digits import build_strategy as build_digits_strategy  # noqa: E402
from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.model import MLPClassifier  # noqa: E402
from lightning_commsgd import (  # noqa: E402
    CommunicationMonitor,
    CommunicationStrategy,
    Communicator,
    create_strategy,
)
from lightning_commsgd.compression import CODEC_NAMES  # noqa: E402

__all__ = ["CONFIGS", "build_strategy", "main"]

# name -> what it runs (the table's description); tau is the benchmark's --tau
CONFIGS: dict[str, str] = {
    "ddp": "Lightning DDPStrategy (gradient all-reduce every step)",
    "post_local_sgd": "Lightning DDPStrategy(model_averaging_period=tau) with PostLocalSGDState",
    "local_sgd": "LocalSGDStrategy(tau): params + momentum, fp32, blocking",
    "local_sgd_params": 'LocalSGDStrategy(tau, momentum="local"): params only, fp32, blocking',
    "local_sgd_params_int8": (
        'LocalSGDStrategy(tau, momentum="local", compressor="int8"): params only, 8-bit, blocking'
    ),
    "local_sgd_params_int4": (
        'LocalSGDStrategy(tau, momentum="local", compressor="int4"): params only, 4-bit, blocking'
    ),
    "local_sgd_bf16": 'LocalSGDStrategy(tau, compressor="bf16"): params + momentum, bf16, blocking',
    "local_sgd_int8": 'LocalSGDStrategy(tau, compressor="int8"): params + momentum, 8-bit, blocking',
    "local_sgd_int4": 'LocalSGDStrategy(tau, compressor="int4"): params + momentum, 4-bit, blocking',
    "hierarchical": "LocalSGDStrategy(tau, global_every=4): rounds within a node, every 4th over all",
    "overlap": "OverlapLocalSGDStrategy(tau, alpha=0.5): params, fp32, in the background",
    "overlap_bf16": 'OverlapLocalSGDStrategy(tau, alpha=0.5, compressor="bf16"): in the background',
    "overlap_momentum_bf16": (
        'OverlapLocalSGDStrategy(tau, alpha=0.3, anchor_momentum=0.9, compressor="bf16"): the paper\'s'
        " momentum variant"
    ),
    "overlap_int8": 'OverlapLocalSGDStrategy(tau, alpha=0.5, compressor="int8"): in the background',
    "overlap_momentum_int8": (
        'OverlapLocalSGDStrategy(tau, alpha=0.3, anchor_momentum=0.9, compressor="int8"): 8-bit changes'
    ),
    "overlap_int4": 'OverlapLocalSGDStrategy(tau, alpha=0.5, compressor="int4"): in the background',
    "overlap_momentum_int4": (
        'OverlapLocalSGDStrategy(tau, alpha=0.3, anchor_momentum=0.9, compressor="int4"): 4-bit changes'
    ),
    "overlap_cocod": 'OverlapLocalSGDStrategy(tau, correction="cocod"): params, fp32, in the background',
    "overlap_cocod_bf16": 'OverlapLocalSGDStrategy(tau, correction="cocod", compressor="bf16")',
    "overlap_cocod_int4": (
        'OverlapLocalSGDStrategy(tau, correction="cocod", compressor="int4"): 4-bit changes'
    ),
    "gossip": "DecentralizedSGDStrategy(ring, tau)",
    "elastic": "ElasticAveragingStrategy(tau)",
    "dore": "DoubleResidualStrategy (2-bit inf-norm quantizer both ways), every step",
    "diana": "DianaStrategy (2-bit inf-norm quantizer up), every step",
    "qsgd": "CompressedSGDStrategy(QSGD(4 levels)), every step",
    "mem_sgd": "CompressedSGDStrategy(TopK(1%), error feedback), every step",
    "double_squeeze": "CompressedSGDStrategy(ScaledSign both ways, error feedback), every step",
    **{
        f"{name}_entropy": f'{name}, wire="entropy": entropy-coded payloads (the same trajectory)'
        for name in ("dore", "diana", "qsgd", "mem_sgd", "double_squeeze")
    },
    "dore_replicated": (
        'dore, master="replicated": every rank all-gathers the workers\' payloads and runs the master\'s step'
        " itself (the same trajectory; no model payload goes down)"
    ),
    "dore_replicated_entropy": 'dore_replicated, wire="entropy"',
}


def build_strategy(name: str, tau: int) -> Strategy:
    """The strategy of configuration ``name`` (one of :data:`CONFIGS`) with period ``tau``."""
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "post_local_sgd":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )

        # Lightning's documented recipe. On CPU Lightning does not register DDP comm hooks (CUDA only), so
        # the gradients are still all-reduced every step and the averaging comes on top.
        state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=tau)
        return DDPStrategy(
            process_group_backend="gloo",
            ddp_comm_state=state,
            ddp_comm_hook=post_localSGD_hook,
            model_averaging_period=tau,
        )
    if name not in CONFIGS:
        raise ValueError(f"Arg `config` must be one of {sorted(CONFIGS)}, got {name!r}.")
    # "<family>_<payload>": the compressor is the name's suffix
    # a compressed one: "<name>[_replicated][_entropy]" (master's step on every rank; entropy-coded payloads)
    base = name.removesuffix("_entropy")
    wire = "entropy" if base != name else "packed"
    compressed = base.removesuffix("_replicated")
    if compressed != name:
        server = "replicated" if compressed != base else None
        options = CompressionOptions(server=server, wire=wire)
        return build_digits_strategy(compressed, tau, compression=options)
    family, _, suffix = name.rpartition("_")
    payload = suffix if suffix in CODEC_NAMES else None
    family = family if payload else name
    if family == "local_sgd_params":
        return create_strategy("local_sgd", tau=tau, momentum="local", compressor=payload)
    if family == "local_sgd" and payload:
        return create_strategy("local_sgd", tau=tau, compressor=payload)
    if family == "hierarchical":
        return create_strategy("local_sgd", tau=tau, global_every=4)
    if family == "overlap":
        return create_strategy("overlap_local_sgd", tau=tau, compressor=payload)
    if family == "overlap_momentum":
        return create_strategy(
            "overlap_local_sgd", tau=tau, alpha=0.3, anchor_momentum=0.9, compressor=payload
        )
    if family == "overlap_cocod":
        return create_strategy("overlap_local_sgd", tau=tau, correction="cocod", compressor=payload)
    # local_sgd, gossip, elastic and the compressed ones: as the digits job builds them
    return build_digits_strategy(name, tau)


class StepTrace(Callback):
    """Per step: wall-clock since ``on_train_start``, this rank's training loss and the payload bytes it
    has sent so far (from ``monitor``'s ledger; 0 without one)."""

    def __init__(self, monitor: CommunicationMonitor | None = None) -> None:
        self.monitor = monitor
        self.start = 0.0
        self.rows: list[tuple[int, float, float, int]] = []

    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        sent = self.monitor.ledger.bytes_sent if self.monitor is not None else 0
        self.rows.append((trainer.global_step, time.perf_counter() - self.start, float(loss), sent))


class _AveragingCounter:
    """Counts Lightning's post-local SGD model averaging (``PeriodicModelAverager`` calls
    ``torch.distributed`` itself, outside any DDP hook) into the monitor's ledger, tag ``model_averaging``."""

    def __init__(self, averager: Any, ledger: Any, nbytes: int) -> None:
        self.averager, self.ledger, self.nbytes = averager, ledger, nbytes
        self.original = averager.average_parameters

    def __call__(self, params: Any) -> None:
        step = self.averager.step
        averages = (
            step >= self.averager.warmup_steps
            and (step - self.averager.warmup_steps) % self.averager.period == 0
        )
        start = time.perf_counter()
        self.original(params)
        if averages:
            seconds = time.perf_counter() - start
            self.ledger.record("model_averaging", sent=self.nbytes, received=self.nbytes, seconds=seconds)


class _CountLightningAveraging(Callback):
    def __init__(self, monitor: CommunicationMonitor) -> None:
        self.monitor = monitor

    def on_train_start(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        averager = getattr(trainer.strategy, "_model_averager", None)
        if averager is not None:
            nbytes = sum(p.numel() * p.element_size() for p in pl_module.parameters())
            averager.average_parameters = _AveragingCounter(averager, self.monitor.ledger, nbytes)


def consensus_and_traces(
    trainer: Trainer, model: torch.nn.Module, rows: list[Any]
) -> list[list[Any]] | None:
    """After fit, untimed: the replicas of a strategy that keeps them equal only up to rounding (DDP,
    post-local SGD) averaged into the consensus model (ours end equal), and every rank's step trace rows
    gathered to rank 0 (``None`` elsewhere)."""
    communicator = Communicator()
    if not isinstance(trainer.strategy, CommunicationStrategy):
        for p in model.parameters():
            communicator.all_reduce_(p.data, "mean", tag="eval_consensus")
    return communicator.gather_object(rows, tag="eval_consensus")


def mean_step_rows(traces: list[list[Any]]) -> list[list[float]]:
    """Per step: (mean wall-clock, mean loss over ranks, rank 0's bytes sent so far)."""
    return [
        [sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows), rows[0][3]]
        for rows in zip(*traces)
    ]


@torch.no_grad()
def _evaluate(model: MLPClassifier, data: DigitsDataModule) -> dict[str, float]:
    """Loss on the whole training set (one copy of it) and validation accuracy / loss."""
    model.eval()
    out = {}
    for split, dataset in (("train", data.train_dataset), ("val", data.val_dataset)):
        if split == "train" and hasattr(dataset, "datasets"):  # repeated: one copy is enough
            dataset = dataset.datasets[0]
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        logits = model(x)
        out[f"{split}_loss"] = float(torch.nn.functional.cross_entropy(logits, y))
        out[f"{split}_acc"] = float((logits.argmax(1) == y).float().mean())
    return out


#: a folder: each rank runs fit under cProfile and writes its statistics there (benchmarks.profile_cluster)
PROFILE_ENV = "COMMSGD_PROFILE_DIR"


def _profiled_fit(trainer: Trainer, model: L.LightningModule, data: Any, folder: Path) -> None:
    """``trainer.fit`` under cProfile; the rank's ``rank<r>.prof`` (pstats) and ``rank<r>.txt`` (the top
    functions by own time and by cumulative time) go into ``folder``."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    trainer.fit(model, datamodule=data)
    profiler.disable()
    folder.mkdir(parents=True, exist_ok=True)
    rank = trainer.global_rank
    profiler.dump_stats(folder / f"rank{rank}.prof")
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(40)
    (folder / f"rank{rank}.txt").write_text(text.getvalue())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="local_sgd")
    parser.add_argument("--no-communication", action="store_true", help="the compute floor: no process group")
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1, help="processes per node")
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1100)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=6, help="training set copies per epoch")
    parser.add_argument("--max-steps", type=int, required=True, help="optimizer steps per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="rank 0 writes the results here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    model = MLPClassifier(hidden=args.hidden, depth=args.depth, lr=args.lr, momentum=0.9)
    data = DigitsDataModule(batch_size=args.batch_size, repeat=args.repeat, seed=args.seed)
    monitor = CommunicationMonitor()
    trace = StepTrace(None if args.no_communication else monitor)
    common: dict[str, Any] = dict(accelerator="cpu", max_steps=args.max_steps, max_epochs=-1, **BARE_TRAINER)
    if args.no_communication:
        trainer = Trainer(devices=1, callbacks=[trace], **common)
    else:
        strategy = build_strategy(args.config, args.tau)
        callbacks = [monitor, trace, _CountLightningAveraging(monitor)]
        trainer = Trainer(
            devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, callbacks=callbacks, **common
        )
    profile_dir = os.environ.get(PROFILE_ENV)
    if profile_dir:
        _profiled_fit(trainer, model, data, Path(profile_dir))
    else:
        trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - trace.start
    results: dict[str, Any] = {
        "config": "compute_floor" if args.no_communication else args.config,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_seconds": train_seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.no_communication:
        results.update(steps=[[t, loss, 0] for _, t, loss, _ in trace.rows], **_evaluate(model, data))
        args.json.write_text(json.dumps(results))
        return
    ledger = monitor.ledger
    results.update(
        bytes_sent=ledger.bytes_sent,
        bytes_received=ledger.bytes_received,
        rounds=ledger.rounds,
        by_tag={tag: vars(stats) for tag, stats in ledger.by_tag.items()},
    )
    # untimed, outside the ledger read above: the consensus model and the ranks' loss curves
    traces = consensus_and_traces(trainer, model, trace.rows)
    if traces is not None:  # rank 0
        results["steps"] = mean_step_rows(traces)
        results["seconds_per_rank"] = [rows[-1][1] for rows in traces]
        results.update(_evaluate(model, data))
        args.json.write_text(json.dumps(results))
    from lightning_commsgd.comm import shutdown_process_group

    shutdown_process_group()
    # Results are written and the process group is destroyed. Interpreter finalization still tears down
    # torch's native threads, which here intermittently aborts the process ("terminate called without an
    # active exception", about 1 run in 30, destroy_process_group or not; the race is discussed in
    # pytorch/pytorch#179291): skip it, so that a finished run never reports a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
