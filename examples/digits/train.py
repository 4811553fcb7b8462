"""Train the digits MLP on CPU processes under any strategy; only ``--strategy`` changes between runs.

    python examples/digits/train.py --strategy ddp
    python examples/digits/train.py --strategy local_sgd
    python examples/digits/train.py --strategy dore --devices 2 --epochs 5

``--strategy`` takes ``ddp`` or any name this package registers with Lightning (``local_sgd``,
``overlap_local_sgd``, ``gossip_ring``, ``elastic_averaging``, ``dore``, ``diana``, ``qsgd``, ``mem_sgd``,
``double_squeeze``, ...; ``--help`` lists them), each with its registered defaults. Rank 0 prints the
validation accuracy of the model every rank holds after ``fit`` (the consensus model) and the bytes rank 0
put into collectives during ``fit``.

Lightning starts the extra ranks by re-running this script (with ``LOCAL_RANK`` etc. set), so everything
below runs on every rank.
"""

from __future__ import annotations

import argparse

import torch

# One intra-op thread per rank: N ranks with N threads each would oversubscribe a small machine's cores.
# At import time, because every rank re-runs this file.
torch.set_num_threads(1)

# data.py and model.py sit next to this script: Python puts the script's folder first on its search path.
import lightning  # noqa: E402
from data import DigitsDataModule  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402
from model import MLPClassifier  # noqa: E402

import lightning_commsgd  # noqa: E402  (importing it registers the strategy names)
from lightning_commsgd import CommunicationMonitor  # noqa: E402
from lightning_commsgd.comm import shutdown_process_group  # noqa: E402


def strategy_names() -> list[str]:
    """``ddp`` followed by every strategy name this package registered with Lightning."""
    ours = [
        name
        for name, entry in StrategyRegistry.items()
        if entry["strategy"].__module__.startswith(lightning_commsgd.__name__)
    ]
    return ["ddp", *sorted(ours)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="local_sgd", choices=strategy_names(), help="how ranks talk")
    parser.add_argument("--devices", type=int, default=2, help="CPU processes")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights, the split and the shuffling"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, validate the consensus model, print the results on rank 0."""
    args = parse_args(argv)
    # The same seed on every rank: identical initial weights (the strategies also broadcast rank 0's).
    lightning.seed_everything(args.seed, verbose=False)
    # Counts our strategies' traffic and, through a counting DDP hook, DDP's: both are measured alike.
    monitor = CommunicationMonitor()
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.epochs,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = MLPClassifier(hidden=128, depth=2, lr=0.05, momentum=0.9)
    data = DigitsDataModule(batch_size=32, seed=args.seed)
    trainer.fit(model, datamodule=data)
    # Read now: the ledger then holds fit's traffic only (validate's metric reductions come after).
    bytes_sent, rounds = monitor.ledger.bytes_sent, monitor.ledger.rounds
    # After fit every rank holds the same model (DDP's replicas never differ; our strategies end with an
    # exact average or EASGD's centre), so this is the consensus model's accuracy on the validation set.
    val_acc = trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]
    if trainer.is_global_zero:
        print(f"strategy {args.strategy}: {args.devices} processes, {trainer.global_step} optimizer steps")
        print(f"val_acc {val_acc:.4f}  (consensus model after fit)")
        print(
            f"bytes_sent {bytes_sent}  (rank 0 during fit: {bytes_sent / 1e6:.2f} MB, {rounds} collectives)"
        )
    # Every rank leaves together, so that none exits while a peer still talks to it.
    shutdown_process_group()


if __name__ == "__main__":
    main()
