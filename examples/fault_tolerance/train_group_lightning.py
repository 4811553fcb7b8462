"""One replica group of the fault-tolerance example under the Lightning Trainer: the MLP of ``train_group.py``
on scikit-learn's digits, DiLoCo between the groups with ``ReplicaGroupStrategy`` (torchft underneath).

The script is an ordinary Lightning script; only the strategy names the group. Group g trains on shard g of
the training set (the strategy's sampler). A restarted group heals from a live peer at setup and Lightning's
loop goes on at the peer's step, epoch and batch. Prints one line per round and writes a JSON summary.

    python examples/fault_tolerance/train_group_lightning.py --group 0 --groups 3 --lighthouse http://localhost:29510
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.fault_tolerance.train_group import (  # noqa: E402
    BATCH,
    build_model,
    finish,
    group_data,
    quiet_torchft,
)
from lightning_commsgd import DiLoCo  # noqa: E402
from lightning_commsgd.ft import ReplicaGroupSettings, ReplicaGroupStrategy  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor) -> None:
        super().__init__()
        self.net = build_model()
        self.train_x, self.train_y = train_x, train_y

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)  # DiLoCo's inner optimizer

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train_x, self.train_y), batch_size=BATCH, shuffle=True)


class RoundPrinter(pl.Callback):
    """One line per round between groups; its state (the group index) reaches a group that heals from us."""

    def __init__(self, group: int, step_sleep: float) -> None:
        self.group, self.step_sleep = group, step_sleep
        self.healed_from: int | None = None
        self.rounds_seen, self.loss_sum, self.seen = 0, 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"group": self.group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.healed_from = state["group"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        algorithm = trainer.strategy.algorithm
        self.rounds_seen = algorithm.rounds
        if algorithm.membership.healed:
            print(
                f"[group {self.group}] healed from group {self.healed_from}: joins at step "
                f"{trainer.global_step}, epoch {trainer.current_epoch}",
                flush=True,
            )
        else:
            print(f"[group {self.group}] started with {algorithm.membership.groups} groups", flush=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.loss_sum, self.seen = self.loss_sum + float(outputs["loss"]), self.seen + 1
        time.sleep(self.step_sleep)  # a bigger model's compute
        algorithm = trainer.strategy.algorithm  # its round ran before this callback, at this batch's end
        if algorithm.rounds == self.rounds_seen:
            return
        self.rounds_seen = algorithm.rounds
        _, groups, _ = algorithm.round_history[-1] if algorithm.round_history else (0, 0, False)
        missed = " (no quorum: trained on locally)" if algorithm.missed_rounds else ""
        print(
            f"[group {self.group}] step {trainer.global_step:4d}  loss {self.loss_sum / self.seen:.3f}  "
            f"round with {groups} groups{missed}",
            flush=True,
        )
        self.loss_sum, self.seen = 0.0, 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group_env = os.environ.get("REPLICA_GROUP_ID")  # what torchft's launchers and slurm.sbatch set
    ap.add_argument(
        "--group",
        type=int,
        default=None if group_env is None else int(group_env),
        required=group_env is None,
        help="this group's index, kept when it restarts (default: $REPLICA_GROUP_ID)",
    )
    ap.add_argument("--groups", type=int, default=3, help="groups the job starts with")
    ap.add_argument("--min-groups", type=int, default=2, help="fewest groups a round may run with")
    lighthouse_env = os.environ.get("TORCHFT_LIGHTHOUSE")
    ap.add_argument(
        "--lighthouse",
        default=lighthouse_env,
        required=lighthouse_env is None,
        help="the Lighthouse's address, http://host:port (default: $TORCHFT_LIGHTHOUSE)",
    )
    ap.add_argument("--hostname", default=None, help="address the other groups reach this one at")
    ap.add_argument("--tau", type=int, default=8, help="H, inner steps between outer steps")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of the run")
    ap.add_argument("--step-sleep", type=float, default=0.01, help="seconds added to each step")
    ap.add_argument("--out", type=Path, default=None, help="JSON summary")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet_torchft()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    features, labels, train_x, train_y, _ = group_data(args.group, args.groups)
    settings = ReplicaGroupSettings(
        lighthouse=args.lighthouse,
        group=args.group,
        min_groups=args.min_groups,
        timeout=30,
        quorum_timeout=60,
        hostname=args.hostname,
    )
    strategy = ReplicaGroupStrategy(DiLoCo(tau=args.tau), settings, start_groups=args.groups)
    printer = RoundPrinter(args.group, args.step_sleep)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        callbacks=[printer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier(train_x, train_y)
    start = time.perf_counter()
    trainer.fit(model)
    algorithm = strategy.algorithm
    healed = algorithm.membership.healed
    finish(
        args,
        algorithm,
        model.net,
        features,
        labels,
        healed=healed,
        healed_from=printer.healed_from,
        joined_at_step=algorithm.round_history[0][0] if healed else 0,
        seconds=time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
