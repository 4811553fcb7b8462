"""Every YAML in configs/ parses with the CLI and builds its strategy; every SLURM template and the
launcher-free recipe call the CLI (``examples/digits/cli.py``) with a config that exists and flags that
parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from lightning_commsgd import CommunicationStrategy, ParameterServerStrategy

# the package's strategies: the named ones and the parameter-server family (siblings on the process base)
OURS = (CommunicationStrategy, ParameterServerStrategy)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
ALL_CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))  # configs/cifar10/ too
SBATCH = sorted((REPO_ROOT / "examples" / "slurm").glob("*.sbatch"))
# how the launcher scripts run the configs: commsgd's CLI with the digits example's model and data
CLI_FIT = "python examples/digits/cli.py fit"


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=args,
    )  # fmt: skip


def test_there_is_a_config_per_strategy_family():
    names = {c.stem for c in CONFIGS}
    expected = {"local_sgd", "local_sgd_adacomm", "gossip_torus", "elastic_averaging", "dore", "diana"}
    assert expected | {"qsgd", "mem_sgd", "double_squeeze", "ddp_baseline"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_instantiates_its_strategy(config, digits_example):
    trainer = _cli(["--config", str(config)]).trainer
    strategy = trainer.strategy
    assert isinstance(trainer.logger, CSVLogger) and trainer.logger.name == config.stem
    if config.stem == "ddp_baseline":
        assert type(strategy) is DDPStrategy
    else:
        assert isinstance(strategy, OURS)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_every_config_logs_to_a_csv_logger_under_lightning_logs(config):
    """`commsgd fit --config ...` shows its communication figures somewhere: lightning_logs/<name>/version_N/
    metrics.csv (config.yaml beside it), written every few steps."""
    trainer = yaml.safe_load(config.read_text())["trainer"]
    logger = trainer["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    name = config.stem if config.parent.name == "configs" else f"{config.parent.name}_{config.stem}"
    assert logger["init_args"] == {"save_dir": "lightning_logs", "name": name}
    callbacks = [c["class_path"] for c in trainer["callbacks"] if isinstance(c, dict)]
    assert "lightning_commsgd.CommunicationMonitor" in callbacks


def _srun_args(text: str) -> list[str]:
    """The arguments after ``python examples/digits/cli.py fit`` of a launcher script, on a CPU test
    machine: 1 node, 4 devices (a square, for the torus), accelerator cpu."""
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next(
        line for line in joined.splitlines() if CLI_FIT in line and not line.lstrip().startswith("#")
    )
    args = shlex.split(line.split(CLI_FIT, 1)[1])
    out = []
    for arg in args:
        if arg == "$@":  # the recipe forwards extra flags
            continue
        arg = arg.replace("$NODES", "1").replace("$NUM_NODES", "1").replace("$GPUS_PER_NODE", "4")
        arg = (
            arg.replace("$DEVICES", "4")
            .replace("$ACCELERATOR", "cpu")
            .replace("$CONFIG", "configs/local_sgd.yaml")
        )
        out.append(arg.replace("accelerator=gpu", "accelerator=cpu"))
    return out


@pytest.mark.parametrize(
    "script", [*SBATCH, REPO_ROOT / "examples" / "slurm" / "multinode_without_slurm.sh"], ids=lambda p: p.name
)
def test_launcher_scripts_call_the_cli_with_flags_that_parse(script, digits_example):
    text = script.read_text()
    assert text.startswith("#!/bin/bash")
    args = _srun_args(text)
    config = REPO_ROOT / args[args.index("--config") + 1]
    assert config.exists(), config
    args[args.index("--config") + 1] = str(config)
    cli = _cli(args)
    assert isinstance(cli.trainer.strategy, OURS)
    if script.suffix == ".sbatch":
        assert f"srun {CLI_FIT}" in text and "#SBATCH --ntasks-per-node" in text
