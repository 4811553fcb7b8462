"""Registry name, YAML config, CLI overrides, and the errors users get for bad input."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import REPO_ROOT, TESTS_DIR, run_script
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry

from lightning_commsgd import CommunicationMonitor, LocalSGDStrategy, OverlapLocalSGDStrategy
from lightning_commsgd.data import DigitsDataModule
from lightning_commsgd.models import MLPClassifier

CONFIG = REPO_ROOT / "configs" / "local_sgd.yaml"


def test_registry_name_gives_local_sgd_with_default_tau():
    assert "local_sgd" in StrategyRegistry
    trainer = Trainer(strategy="local_sgd", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, LocalSGDStrategy)
    assert trainer.strategy.tau == 8 and trainer.strategy.momentum == "average"


def test_cli_override_reaches_the_strategy():
    out = run_script(
        [
            "-m",
            "lightning_commsgd.cli",
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.strategy.tau=16",
            "--print_config",
        ]
    ).stdout
    assert "class_path: lightning_commsgd.LocalSGDStrategy" in out
    assert "tau: 16" in out and "tau: 8" not in out


@pytest.mark.multiprocess
def test_cli_fit_runs_two_processes_with_overridden_tau(tmp_path):
    run_script(
        [
            "-m", "lightning_commsgd.cli", "fit", "--config", str(CONFIG),
            "--trainer.strategy.tau=16", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        ]
    )  # fmt: skip
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    taus = {float(r["comm/tau"]) for r in rows if r.get("comm/tau")}
    assert taus == {16.0}
    assert any(r.get("val_acc") for r in rows)
    # a round happened at step 16 and bytes were counted
    assert max(float(r["comm/bytes_sent"]) for r in rows if r.get("comm/bytes_sent")) > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau": 0}, ValueError, "tau"),
        ({"tau": -3}, ValueError, "tau"),
        ({"tau": 2.5}, TypeError, "tau"),
        ({"tau": "8"}, TypeError, "tau"),
        ({"tau": True}, TypeError, "tau"),
        ({"momentum": "nesterov"}, ValueError, "momentum"),
        ({"eval_on": "global"}, ValueError, "eval_on"),
        ({"weights": "batch"}, ValueError, "weights"),
        ({"check_replicas": "yes"}, TypeError, "check_replicas"),
        ({"payload_dtype": "int2"}, ValueError, "payload_dtype"),
        ({"payload_dtype": torch.bfloat16}, ValueError, "payload_dtype"),
        ({"global_every": 0}, ValueError, "global_every"),
        ({"global_every": 2, "group_size": 0}, ValueError, "group_size"),
        ({"global_every": 2, "payload_dtype": "bf16"}, ValueError, "payload_dtype"),
        ({"payload_dtype": "bf16", "weights": "samples"}, ValueError, "payload_dtype"),
        ({"redundancy": -0.1}, ValueError, "redundancy"),
        ({"redundancy": 1.0}, ValueError, "redundancy"),
        ({"redundancy": float("nan")}, ValueError, "redundancy"),
        ({"redundancy": "0.25"}, ValueError, "redundancy"),
        ({"sampling": "random"}, ValueError, "sampling"),
        ({"min_coverage": 1.5}, ValueError, "min_coverage"),
        ({"original_world_size": 0}, ValueError, "original_world_size"),
        ({"batch_sizes": []}, ValueError, "batch_sizes"),
        ({"batch_sizes": [4, 0]}, ValueError, "batch_sizes"),
        ({"batch_sizes": [4, 2.5]}, ValueError, "batch_sizes"),
    ],
)
def test_bad_strategy_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LocalSGDStrategy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logging_interval": 0}, "logging_interval"),
        ({"consensus_every_n_rounds": 0}, "consensus_every_n_rounds"),
    ],
)
def test_bad_monitor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CommunicationMonitor(**kwargs)


class _LogCounter(MLPClassifier):
    """Records the global step of every ``log_dict`` call (the monitor's)."""

    def __init__(self) -> None:
        super().__init__(hidden=8, depth=1)
        self.logged_at: list[int] = []

    def log_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.logged_at.append(self.trainer.global_step)
        return super().log_dict(*args, **kwargs)


@pytest.mark.parametrize(("interval", "expected"), [(None, [3, 6]), (2, [2, 4, 6])])
def test_monitor_logs_at_the_trainers_interval_by_default(interval, expected):
    """Each logged metric costs Lightning about a millisecond: by default the monitor logs every
    log_every_n_steps optimizer steps (3 here), as the Trainer's loggers write; an explicit interval wins."""
    model = _LogCounter()
    trainer = Trainer(
        accelerator="cpu", max_steps=7, log_every_n_steps=3, callbacks=[CommunicationMonitor(interval)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert model.logged_at == expected


def test_sync_batchnorm_refused_when_the_trainer_is_built():
    with pytest.raises(ValueError, match="sync_batchnorm"):
        Trainer(strategy=LocalSGDStrategy(), sync_batchnorm=True, accelerator="cpu", devices=2, logger=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"redundancy": 0.75}, r"\[0, 1 - 1/p\] = \[0, 0.5\]"),  # p = 2
        ({"batch_sizes": [4, 4, 4]}, "3 per-rank batch sizes, but this run has 2"),
        ({"original_world_size": 3, "failed_workers": [0, 1]}, "leaves 1 workers, but this run has 2"),
        ({"original_world_size": 3, "failed_workers": [3]}, "failed_workers"),
        ({"global_every": 2, "group_size": 3}, r"`group_size` \(3\) must divide the world size \(2\)"),
    ],
)
def test_bad_redundancy_for_the_world_size_fails_when_the_trainer_is_built(kwargs, match):
    """Checked at Trainer construction, before any process or process group exists."""
    with pytest.raises(ValueError, match=match):
        Trainer(strategy=LocalSGDStrategy(**kwargs), accelerator="cpu", devices=2, logger=False)


@pytest.mark.multiprocess
def test_unaverageable_optimizer_state_fails_on_every_rank_without_hanging(tmp_path):
    with pytest.raises(AssertionError) as failure:
        run_script(
            [str(TESTS_DIR / "lightning_worker.py"), "--out", str(tmp_path), "--optimizer", "rmsprop"],
            timeout=120,
        )
    assert "momentum='average' knows how to average the state of torch.optim.SGD" in str(failure.value)
    assert "RMSprop" in str(failure.value)


def test_state_dict_checkpoint_helpers_average_floats_only():
    from lightning_commsgd.strategies.checkpointing import consensus_state_dict

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    out = consensus_state_dict([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and int(out["n"]) == 5


def test_yaml_schedule_is_instantiated_with_overrides():
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_commsgd import AdaComm

    cli = LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(REPO_ROOT / "configs" / "local_sgd_adacomm.yaml"),
              "--trainer.strategy.tau.init_args.tau0=32"],
    )  # fmt: skip
    schedule = cli.trainer.strategy.tau
    assert isinstance(cli.trainer.strategy, LocalSGDStrategy) and isinstance(schedule, AdaComm)
    assert (schedule.tau0, schedule.interval_steps, schedule.tau) == (32, 20, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "overlap_alpha"),
        ({"alpha": 1.5}, "overlap_alpha"),
        ({"alpha": 1.0}, "overlap_alpha"),
        ({"alpha": float("nan")}, "overlap_alpha"),
        ({"anchor_momentum": 1.0}, "anchor_momentum"),
        ({"anchor_momentum": -0.1}, "anchor_momentum"),
        ({"tau": 0}, "tau"),
        ({"payload_dtype": "int2"}, "payload_dtype"),
        ({"correction": "average"}, "correction"),
        ({"correction": "cocod", "anchor_momentum": 0.5}, "anchor_momentum"),
    ],
)
def test_bad_overlap_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverlapLocalSGDStrategy(**kwargs)


def test_overlap_registered_name():
    strategy = Trainer(strategy="overlap_local_sgd", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(strategy, OverlapLocalSGDStrategy) and strategy.tau == 8 and strategy.alpha == 0.5
