"""The digits MLP under any strategy through LightningCLI, one YAML per strategy family in configs/.

    python examples/digits/cli.py fit --config configs/local_sgd.yaml
    python examples/digits/cli.py fit --config configs/local_sgd.yaml --trainer.strategy.tau=16
    python examples/digits/cli.py fit --config configs/dore.yaml --trainer.devices=4

The CLI is ``commsgd``'s (:func:`lightning_commsgd.cli.main`); the configs name this folder's classes as
``model.MLPClassifier`` and ``data.DigitsDataModule``, importable because Python puts the folder of the
script it runs first on its module search path (Lightning re-runs this script for every extra local rank).
For your own model and data, name their import paths in a config and run ``commsgd fit --config ...``.
"""

from lightning_commsgd.cli import main

if __name__ == "__main__":
    main()
