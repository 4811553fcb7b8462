"""``commsgd``: LightningCLI with this package's strategies, models and data modules importable."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_commsgd  # noqa: F401  (registers strategy names)

__all__ = ["main"]


def main(args: list[str] | None = None) -> None:
    """Entry point: ``commsgd fit --config configs/local_sgd.yaml [--trainer.strategy.tau=16]``."""
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
