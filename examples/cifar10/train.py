"""ResNet on CIFAR-10 under any strategy: LightningCLI with one YAML per strategy in configs/cifar10/.

    python examples/cifar10/train.py fit --config configs/cifar10/local_sgd.yaml
    python examples/cifar10/train.py fit --config configs/cifar10/local_sgd.yaml --data.synthetic=true
    python examples/cifar10/train.py fit --config configs/cifar10/dore.yaml \
        --trainer.accelerator=gpu --trainer.devices=8 --trainer.num_nodes=2

The CLI is ``commsgd``'s (:func:`lightning_commsgd.cli.main`); the configs name this folder's classes as
``data.CIFAR10DataModule`` and ``model.ResNetClassifier``, importable because Python puts the folder of
the script it runs first on its module search path (Lightning re-runs this script for every extra local
rank).
A missing CIFAR-10 folder or a missing torchvision ends the run with its message alone and exit status 2.
"""

from __future__ import annotations

import sys

from data import CIFAR10NotFoundError
from model import TorchvisionMissingError

from lightning_commsgd.cli import main as cli_main

_SETUP_ERRORS = (CIFAR10NotFoundError, TorchvisionMissingError)


def _setup_error(err: BaseException | None) -> BaseException | None:
    """The data module's or the model's setup error behind ``err``, if any: jsonargparse re-raises what a
    constructor raised as a ValueError, chained to the original."""
    while err is not None and not isinstance(err, _SETUP_ERRORS):
        err = err.__cause__ or err.__context__
    return err


def main(args: list[str] | None = None) -> None:
    """Run the CLI on ``args`` (default: the command line)."""
    try:
        cli_main(args)
    except Exception as err:
        cause = _setup_error(err)
        if cause is None:
            raise
        # The message says what to do; jsonargparse's wrapping and a traceback would bury it.
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
