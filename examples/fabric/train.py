"""Local SGD under Lightning Fabric: an MLP on scikit-learn's digits, on 2 CPU processes.

    python examples/fabric/train.py
    python examples/fabric/train.py --tau 4 --epochs 10 --devices 4

A plain Fabric training loop; what local SGD changes is the strategy, ``LocalSGDStrategy(tau=...)`` (every
rank steps its own replica, and every tau optimizer steps the replicas and their momentum are averaged, one
all-reduce instead of one per step), and one call when training ends, ``fabric.strategy.finalize()`` (the
last average: every rank then holds the same model). Validation during training runs on the average of the
replicas, inside ``fabric.strategy.consensus_model()``. Rank 0 prints the final validation loss and the bytes
this rank sent, from the strategy's ledger.

Fabric starts the other ranks by re-running this script, so everything below runs on every rank.
"""

from __future__ import annotations

import argparse

import torch

# One intra-op thread per rank: N ranks with N threads each would oversubscribe a small machine's cores.
torch.set_num_threads(1)

from lightning.fabric import Fabric  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_commsgd.fabric import LocalSGDStrategy  # noqa: E402

VALIDATION_SAMPLES = 360  # of 1797 digits; divisible by 2, 4 and 8 ranks


class MLP(nn.Module):
    """8x8 grey images -> 10 classes."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The training and validation sets (the same split on every rank: it depends on ``seed`` only)."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = order[:VALIDATION_SAMPLES], order[VALIDATION_SAMPLES:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def evaluate(fabric: Fabric, model: nn.Module, loader: DataLoader) -> float:
    """Mean cross-entropy over the validation set: each rank its shard, summed over ranks."""
    model.eval()
    sums = torch.zeros(2)
    with torch.no_grad():
        for x, y in loader:
            sums += torch.stack([F.cross_entropy(model(x), y, reduction="sum"), torch.tensor(float(len(y)))])
    model.train()
    total, count = fabric.all_reduce(sums, reduce_op="sum").tolist()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes")
    parser.add_argument("--tau", type=int, default=8, help="optimizer steps between averaging rounds")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights, the split and the shuffling"
    )
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=LocalSGDStrategy(tau=args.tau))
    fabric.launch()
    fabric.seed_everything(args.seed, verbose=False)

    train_set, val_set = digits(args.seed)
    train_loader, val_loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=128)
    )
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # rank 0's initial weights are broadcast to every rank here; the model is not wrapped in DDP
    model, optimizer = fabric.setup(model, optimizer)

    steps = 0
    for epoch in range(args.epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            fabric.backward(F.cross_entropy(model(x), y))
            optimizer.step()  # every tau-th step also averages the replicas
            steps += 1
        with fabric.strategy.consensus_model():  # the replicas' average, put back after the block
            loss = evaluate(fabric, model, val_loader)
        fabric.print(f"epoch {epoch}: validation loss of the averaged model {loss:.4f}")

    fabric.strategy.finalize()  # the last average: every rank holds the same model from here on
    val_loss = evaluate(fabric, model, val_loader)
    ledger = fabric.strategy.communicator.ledger
    fabric.print(
        f"{fabric.world_size} processes, {steps} optimizer steps, {ledger.tag('average').rounds} rounds"
    )
    fabric.print(f"val_loss {val_loss:.4f}")
    fabric.print(f"bytes_sent {ledger.bytes_sent}")


if __name__ == "__main__":
    main()
