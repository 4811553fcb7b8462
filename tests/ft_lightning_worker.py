"""One replica group (one process) of a fault-tolerance test under the Lightning Trainer:
``Trainer(strategy=ReplicaGroupStrategy(DiLoCo(...), ...))``, with an optional self-inflicted death.

The run is deterministic given its membership history (``ft_simulation.py`` replays it with :func:`batch`):
  * model, inner and outer optimizer: as ``ft_group_worker.py`` (SGD lr 0.1 momentum 0.9; DiLoCo's outer SGD
    or plain averaging with --outer average), MSE loss;
  * data: ``SAMPLES`` fixed samples in a shuffled DataLoader of batch ``BATCH``; Lightning's sampler gives
    group g shard g of ``--start-groups`` (seed 0, a new order per epoch).

Writes (torch.save) to --out: the final parameters, the rounds' history, the state after every round, the
first batch the group trained on (step, epoch, index in the epoch), its last global step and, for a group
that healed, the group it took its state from (a callback's state, which Lightning restores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from ft_group_worker import build_model, snapshot
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_commsgd import CommunicationMonitor, DiLoCo, LocalSGD, StreamingDiLoCo  # noqa: E402
from lightning_commsgd.ft import ReplicaGroupSettings, ReplicaGroupStrategy  # noqa: E402

# 3 shards: 40 samples, 5 batches per shard and epoch: rounds (tau 4) fall mid-epoch; 4 shards: --samples 96
SAMPLES, BATCH = 120, 8


def dataset(samples: int = SAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    return TensorDataset(
        torch.randn(samples, 8, generator=generator), torch.randn(samples, 4, generator=generator)
    )


def batch(group: int, step: int, groups: int, samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """What shard g of ``groups`` gives at optimizer step s: batch s mod E of epoch s // E."""
    data = dataset(samples)
    sampler = DistributedSampler(data, num_replicas=groups, rank=group, shuffle=True, seed=0)
    per_epoch = len(sampler) // BATCH
    epoch, offset = divmod(step, per_epoch)
    sampler.set_epoch(epoch)
    index = list(sampler)[offset * BATCH : (offset + 1) * BATCH]
    return data.tensors[0][index], data.tensors[1][index]


class Regression(pl.LightningModule):
    def __init__(self, samples: int = SAMPLES, indexed: bool = False) -> None:
        super().__init__()
        self.net = build_model()
        self.samples, self.indexed = samples, indexed

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]  # (with --redundancy, the samples' indices follow)
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = dataset(self.samples)
        if self.indexed:  # which samples each group saw, for the coverage test
            data = TensorDataset(*data.tensors, torch.arange(self.samples))
        return DataLoader(data, batch_size=BATCH, shuffle=True)


class Recorder(pl.Callback):
    """Records what the test checks; its state (this group's index) travels to a group that heals."""

    def __init__(self, group: int, die_at_step: int | None) -> None:
        self.group, self.die_at_step = group, die_at_step
        self.healed_from: int | None = None
        self.first_batch: tuple[int, int, int] | None = None
        self.after_round: list[dict] = []
        self.seen: dict[int, list[int]] = {}  # epoch -> sample indices trained on (indexed data only)
        self._rounds_seen = 0

    def state_dict(self) -> dict:
        return {"group": self.group}

    def load_state_dict(self, state: dict) -> None:
        self.healed_from = state["group"]

    def _algorithm(self, trainer: pl.Trainer):  # noqa: ANN202
        return trainer.strategy.algorithm

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        algorithm = self._algorithm(trainer)
        self._rounds_seen = algorithm.rounds
        if algorithm.membership.healed:
            self.after_round.append(snapshot(pl_module.net, trainer.optimizers[0], algorithm))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        if self.first_batch is None:
            self.first_batch = (trainer.global_step, trainer.current_epoch, batch_idx)
        if len(batch) == 3:
            self.seen.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())
        if self.die_at_step is not None and trainer.global_step + 1 == self.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        algorithm = self._algorithm(trainer)  # the strategy's round ran before this callback
        if algorithm.rounds != self._rounds_seen:
            self._rounds_seen = algorithm.rounds
            self.after_round.append(snapshot(pl_module.net, trainer.optimizers[0], algorithm))
            print(f"round at step {algorithm.step}, missed in a row {algorithm.missed_rounds}", flush=True)


def run_fabric(args: argparse.Namespace, algorithm, settings: ReplicaGroupSettings) -> tuple[dict, object]:  # noqa: ANN001
    """The same group as a Fabric loop: the group joins (or heals) in ``fabric.setup``, and the loop starts
    at ``algorithm.step``, at the batch of its epoch that step falls on, on shard g of the data.
    """
    from lightning.fabric import Fabric

    from lightning_commsgd.fabric import CommunicationStrategy as FabricStrategy
    from lightning_commsgd.ft import ReplicaGroups

    strategy = FabricStrategy(
        ReplicaGroups(algorithm, settings, start_groups=args.start_groups, start_timeout=60)
    )
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy)
    fabric.launch()
    net = build_model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(net, optimizer)  # joins the other groups; a late one heals here
    group = strategy.algorithm
    # Fabric's own loader would set the sampler's epoch to the times it was iterated, which a healed group's
    # loop does not know: the sampler is built from the strategy's shard (group g of G) and set here instead
    sampler = DistributedSampler(dataset(), shuffle=True, seed=0, **strategy.distributed_sampler_kwargs)
    loader = DataLoader(dataset(), batch_size=BATCH, sampler=sampler)
    first_batch, after_round = None, []
    if group.membership.healed:
        after_round.append(snapshot(net, optimizer.optimizer, group))
    rounds_seen = group.rounds
    while group.step < args.steps:
        epoch, offset = divmod(group.step, len(loader))
        loader.sampler.set_epoch(epoch)
        for index, (x, y) in enumerate(loader):
            if index < offset:
                continue
            if first_batch is None:
                first_batch = (group.step, epoch, index)
            if args.die_at_step is not None and group.step + 1 == args.die_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            fabric.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()  # the strategy counts it, and runs the round when one is due
            if group.rounds != rounds_seen:
                rounds_seen = group.rounds
                after_round.append(snapshot(net, optimizer.optimizer, group))
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if group.step >= args.steps:
                break
    strategy.finalize()
    strategy.close()
    record = {
        "first_batch": first_batch,
        "global_step": group.step,
        "after_round": after_round,
        "final": [p.detach().clone() for p in net.parameters()],
        "healed_from": None,
    }
    return record, group


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--group", type=int, default=None, help="default: $REPLICA_GROUP_ID")
    ap.add_argument("--lighthouse", default=None, help="default: $TORCHFT_LIGHTHOUSE")
    ap.add_argument("--min-groups", type=int, default=1)
    ap.add_argument("--start-groups", type=int, default=3)
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--outer", choices=["diloco", "average"], default="diloco")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--die-at-step", type=int, default=None, help="SIGKILL itself during this optimizer step")
    ap.add_argument("--die-group", type=int, default=None, help="with --die-at-step: only this group dies")
    ap.add_argument(
        "--die-once", default=None, help="with --die-at-step: only if this file does not exist yet"
    )
    ap.add_argument("--fragments", type=int, default=1, help="Streaming DiLoCo's F (> 1: StreamingDiLoCo)")
    ap.add_argument("--sync-delay", type=int, default=0, help="Streaming DiLoCo's d")
    ap.add_argument("--local-weight", type=float, default=0.0, help="Streaming DiLoCo's w")
    ap.add_argument("--devices", type=int, default=1, help="processes in the group (Trainer only)")
    ap.add_argument("--redundancy", type=float, default=None, help="RI-SGD's mu across groups (Trainer)")
    ap.add_argument("--samples", type=int, default=SAMPLES, help="size of the data set")
    ap.add_argument("--max-missed-rounds", type=int, default=3)
    ap.add_argument("--quorum-timeout", type=float, default=60.0)
    ap.add_argument("--fabric", action="store_true", help="a Fabric loop instead of the Trainer")
    ap.add_argument("--out", required=True, help="may hold {group}")
    args = ap.parse_args(argv)
    if args.group is None:
        args.group = int(os.environ["REPLICA_GROUP_ID"])
    if args.lighthouse is None:
        args.lighthouse = os.environ["TORCHFT_LIGHTHOUSE"]
    args.out = args.out.format(group=args.group)
    if args.die_group is not None and args.die_group != args.group:
        args.die_at_step = None
    if args.die_once is not None and args.die_at_step is not None:
        if os.path.exists(args.die_once):
            args.die_at_step = None  # died once already: this is the restart
        else:
            Path(args.die_once).touch()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging: not what is tested

    if args.outer == "average":
        algorithm = LocalSGD(tau=args.tau, momentum="local")
    else:
        outer = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
        algorithm = DiLoCo(tau=args.tau, outer_optimizer=outer)
        if args.fragments > 1:
            algorithm = StreamingDiLoCo(
                tau=args.tau,
                fragments=args.fragments,
                sync_delay=args.sync_delay,
                local_weight=args.local_weight,
                outer_optimizer=outer,
            )
    settings = ReplicaGroupSettings(
        lighthouse=args.lighthouse,
        group=args.group,
        min_groups=args.min_groups,
        timeout=30,
        quorum_timeout=args.quorum_timeout,
    )
    if args.fabric:
        start = time.perf_counter()
        record, group = run_fabric(args, algorithm, settings)
        return _save(args, record, start, group)
    strategy = ReplicaGroupStrategy(
        algorithm,
        settings,
        start_groups=args.start_groups,
        start_timeout=60,
        max_missed_rounds=args.max_missed_rounds,
        redundancy=args.redundancy,
    )
    recorder = Recorder(args.group, args.die_at_step)
    callbacks: list[pl.Callback] = [recorder, CommunicationMonitor(logging_interval=1)]
    if args.step_sleep:
        callbacks.append(_Sleep(args.step_sleep))
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    model = Regression(args.samples, indexed=args.redundancy is not None)
    trainer.fit(model)
    group = strategy.algorithm
    record = {
        "healed_from": recorder.healed_from,
        "first_batch": recorder.first_batch,
        "global_step": trainer.global_step,
        "after_round": recorder.after_round,
        "seen": recorder.seen,
        "final": [p.detach().clone() for p in model.net.parameters()],
        # what the monitor logged last (replica groups' figures included)
        "monitor": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")},
    }
    if trainer.global_rank > 0:  # the group's other processes: each its own record
        args.out = f"{args.out}.rank{trainer.global_rank}"
    return _save(args, record, start, strategy.algorithm)


def _save(args: argparse.Namespace, record: dict, start: float, group) -> int:  # noqa: ANN001
    """Adds what both loops report (the rounds, the ledger, whether the group healed) and writes --out."""
    from lightning_commsgd.ft import GroupOuterStep

    assert isinstance(group, GroupOuterStep)
    record.update(
        group=args.group,
        joined={"healed": group.membership.healed, "step": record["first_batch"][0]},
        history=list(group.round_history),
        events=[dataclasses.asdict(e) for e in group.rounds_between_groups.events],
        ledger={tag: (s.rounds, s.bytes_sent) for tag, s in group.communicator.ledger.by_tag.items()},
        seconds=time.perf_counter() - start,
    )
    tmp = args.out + ".tmp"
    torch.save(record, tmp)
    os.replace(tmp, args.out)
    print(f"group {args.group}: done at step {record['global_step']}", flush=True)
    return 0


class _Sleep(pl.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


if __name__ == "__main__":
    sys.exit(main())
