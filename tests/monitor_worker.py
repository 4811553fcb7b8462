"""One short Lightning run on 2 CPU processes, recording what a user sees: the monitor's figures after every
step (logged and on the progress bar), the warnings each rank gave, and the ledgers after fit and after a
later ``trainer.test()``.

Launched by tests/test_monitor.py as ``python tests/monitor_worker.py --out DIR ...``; with the popen launcher
Lightning re-runs this script for rank 1. Each rank writes ``DIR/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from toy_problem import BATCH_SIZE, make_dataset, make_net, mse  # noqa: E402

from lightning_commsgd import CommunicationMonitor, LocalSGDStrategy  # noqa: E402


class ToyModule(L.LightningModule):
    def __init__(self, sync_dist: bool) -> None:
        super().__init__()
        self.net = make_net(0)
        self.sync_dist = sync_dist

    def training_step(self, batch, batch_idx):
        loss = mse(self.net, batch)
        self.log("train_loss", loss, sync_dist=self.sync_dist)  # what a new user writes
        return loss

    def test_step(self, batch, batch_idx):
        self.log("test_loss", mse(self.net, batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=True)

    def test_dataloader(self):
        return DataLoader(make_dataset(), batch_size=BATCH_SIZE)


class Tap(Callback):
    """After each step: the monitor's logged values and the progress bar's (the monitor runs first)."""

    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}
        self.bar: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.logged[step] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")
        }
        self.bar[step] = {k: float(v) for k, v in trainer.progress_bar_metrics.items()}


class Poison(Callback):
    """Rank 1's parameters turn Inf after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters())[0, 0] = float("inf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=16)
    ap.add_argument("--sync-dist", action="store_true")
    ap.add_argument("--poison-step", type=int, default=0, help="rank 1 turns Inf after this step (skip)")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--test", action="store_true", help="trainer.test() after fit")
    args = ap.parse_args()

    L.seed_everything(0, verbose=False)
    tap, monitor = Tap(), CommunicationMonitor(1)  # prog_bar by default
    callbacks = [monitor, tap]
    if args.poison_step:
        callbacks.append(Poison(args.poison_step))
    if args.ckpt_every:
        ckpt_dir = os.path.join(args.out, "ckpt")
        callbacks.append(
            ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=args.ckpt_every, save_top_k=-1)
        )
    strategy = LocalSGDStrategy(tau=args.tau, on_nonfinite="skip" if args.poison_step else "raise")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=args.out,
    )
    model = ToyModule(args.sync_dist)
    record: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the tests' runner sets PYTHONWARNINGS=ignore
        trainer.fit(model, ckpt_path=args.resume)
        record["fit_warnings"] = [str(w.message) for w in caught]
        record["ledger_after_fit"] = monitor.ledger.as_dict()
        if args.test:
            trainer.test(model, verbose=False)
            record["ledger_after_test"] = monitor.ledger.as_dict()
    record.update(
        logged=tap.logged,
        bar=tap.bar,
        ledgers={stage: ledger.as_dict() for stage, ledger in getattr(strategy, "ledgers", {}).items()},
    )
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
