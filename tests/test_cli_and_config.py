"""Registry name, YAML config, CLI overrides, and the errors users get for bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import DIGITS_CLI, REPO_ROOT, TESTS_DIR, run_script
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import StrategyRegistry

from examples.digits.data import DigitsDataModule
from examples.digits.model import MLPClassifier
from lightning_commsgd import (
    CommunicationMonitor,
    LocalSGDStrategy,
    OverlapLocalSGDStrategy,
    RedundancyInfusion,
)
from lightning_commsgd.compression import TopK

CONFIG = REPO_ROOT / "configs" / "local_sgd.yaml"
# The configs name the digits example's classes as model.MLPClassifier and data.DigitsDataModule: the
# in-process CLI runs below see them as examples/digits/cli.py does.
pytestmark = pytest.mark.usefixtures("digits_example")


@pytest.mark.lightning_smoke
def test_registry_name_gives_local_sgd_with_default_tau():
    assert "local_sgd" in StrategyRegistry
    trainer = Trainer(strategy="local_sgd", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, LocalSGDStrategy)
    assert trainer.strategy.tau == 8 and trainer.strategy.momentum == "average"


def test_cli_override_reaches_the_strategy():
    # a codec name where the strategy also takes a Compressor object (one vocabulary, from YAML too)
    overrides = ["--trainer.strategy.tau=16", "--trainer.strategy.compressor=int4"]
    out = run_script([str(DIGITS_CLI), "fit", "--config", str(CONFIG), *overrides, "--print_config"]).stdout
    assert "class_path: lightning_commsgd.LocalSGDStrategy" in out
    assert "tau: 16" in out and "tau: 8" not in out
    assert "compressor: int4" in out


@pytest.mark.multiprocess
@pytest.mark.lightning_smoke
def test_cli_fit_runs_two_processes_with_overridden_tau(tmp_path):
    run_script(
        [
            str(DIGITS_CLI), "fit", "--config", str(CONFIG),
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
        ({"replica_weights": "batch"}, ValueError, "replica_weights"),
        ({"weights": "samples"}, TypeError, "unexpected argument 'weights'; did you mean 'replica_weights'"),
        ({"check_replicas": "yes"}, TypeError, "check_replicas"),
        ({"compressor": "int2"}, ValueError, "compressor"),
        ({"compressor": torch.bfloat16}, TypeError, "compressor"),
        ({"compressor": TopK(0.1)}, ValueError, "compressor"),
        ({"global_every": 0}, ValueError, "global_every"),
        ({"global_every": 2, "group_size": 0}, ValueError, "group_size"),
        ({"global_every": 2, "compressor": "bf16"}, ValueError, "compressor"),
        ({"compressor": "bf16", "replica_weights": "samples"}, ValueError, "compressor"),
        ({"redundancy": -0.1}, ValueError, "redundancy"),
        ({"redundancy": 1.0}, ValueError, "redundancy"),
        ({"redundancy": float("nan")}, ValueError, "redundancy"),
        ({"redundancy": "0.25"}, TypeError, "redundancy"),
        # the RI-SGD options are one argument now: the old names are refused, naming it
        ({"sampling": "union"}, TypeError, "unexpected argument 'sampling'"),
        ({"batch_sizes": [4, 4]}, TypeError, "unexpected argument 'batch_sizes'"),
    ],
)
def test_bad_strategy_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LocalSGDStrategy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mu": -0.1}, "redundancy"),
        ({"mu": 1.0}, "redundancy"),
        ({"sampling": "random"}, "sampling"),
        ({"min_coverage": 1.5}, "min_coverage"),
        ({"original_world_size": 0}, "original_world_size"),
        ({"batch_sizes": []}, "batch_sizes"),
        ({"batch_sizes": [4, 0]}, "batch_sizes"),
        ({"batch_sizes": [4, 2.5]}, "batch_sizes"),
    ],
)
def test_bad_redundancy_arguments_fail_at_construction(kwargs, match):
    """RI-SGD's options, one ``RedundancyInfusion``: checked when it is made, before any strategy."""
    with pytest.raises(ValueError, match=match):
        LocalSGDStrategy(redundancy=RedundancyInfusion(**kwargs))


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


@pytest.mark.lightning_smoke
def test_sync_batchnorm_refused_when_the_trainer_is_built():
    with pytest.raises(ValueError, match="sync_batchnorm"):
        Trainer(strategy=LocalSGDStrategy(), sync_batchnorm=True, accelerator="cpu", devices=2, logger=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"redundancy": 0.75}, r"\[0, 1 - 1/p\] = \[0, 0.5\]"),  # p = 2
        (
            {"redundancy": RedundancyInfusion(batch_sizes=[4, 4, 4])},
            "3 per-rank batch sizes, but this run has 2",
        ),
        (
            {"redundancy": RedundancyInfusion(original_world_size=3, failed_workers=[0, 1])},
            "leaves 1 workers, but this run has 2",
        ),
        ({"redundancy": RedundancyInfusion(original_world_size=3, failed_workers=[3])}, "failed_workers"),
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


def test_unaverageable_optimizer_is_refused_before_the_first_collective(monkeypatch, tmp_path):
    """RMSprop with momentum='average': the TypeError comes right after configure_optimizers, before the
    setup broadcast (the first collective), naming the optimizer and the two alternatives."""
    broadcasts = []
    # the strategy's setup broadcast of x_0 (the first collective)
    monkeypatch.setattr(
        "lightning_commsgd.strategies.process.broadcast_module_state",
        lambda module, communicator: broadcasts.append(1),
    )

    class RMSpropModel(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    trainer = Trainer(
        strategy=LocalSGDStrategy(tau=2), accelerator="cpu", devices=1, max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"RMSprop.*momentum='local'.*momentum='zero'"):
        trainer.fit(RMSpropModel(), datamodule=DigitsDataModule(batch_size=32))
    assert broadcasts == []


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
        ({"alpha": 0.0}, r"`alpha`.*at 0 the replicas would never synchronise"),
        ({"alpha": 1.5}, r"`alpha`.*strictly between 0 and 1"),
        ({"alpha": 1.0}, r"`alpha`.*at 1 every round's local progress would be discarded"),
        ({"alpha": float("nan")}, "`alpha`"),
        ({"anchor_momentum": 1.0}, "anchor_momentum"),
        ({"anchor_momentum": -0.1}, "anchor_momentum"),
        ({"tau": 0}, "tau"),
        ({"compressor": "int2"}, "compressor"),
        ({"correction": "average"}, "correction"),
        ({"correction": "cocod", "anchor_momentum": 0.5}, "anchor_momentum"),
        ({"momentum": "average"}, r"`momentum`.*'local'.*'zero'.*LocalSGDStrategy"),
        ({"momentum": "nesterov"}, "`momentum`"),
    ],
)
def test_bad_overlap_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverlapLocalSGDStrategy(**kwargs)


def test_overlap_registered_name():
    strategy = Trainer(strategy="overlap_local_sgd", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(strategy, OverlapLocalSGDStrategy) and strategy.tau == 8 and strategy.alpha == 0.5


# -- the CLI: where a run writes, and what a bad value prints ---------------------------------------------
def _cli_subprocess(args: list[str], cwd) -> subprocess.CompletedProcess:  # noqa: ANN001
    """``python examples/digits/cli.py *args`` in ``cwd``, whatever its exit status; without the rendezvous
    variables an in-process Trainer of an earlier test may have left in ``os.environ`` (its port in use)."""
    launch = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(DIGITS_CLI), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=cwd,
    )  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("extra", "log_dir"),
    [
        ([], "lightning_logs/local_sgd/version_0"),
        pytest.param(["--trainer.logger=false"], "lightning_logs/version_0", marks=pytest.mark.extended),
    ],
    ids=["config_logger", "no_logger"],
)
def test_cli_writes_config_yaml_to_the_log_dir_not_the_cwd(tmp_path, extra, log_dir):
    """Lightning's SaveConfigCallback writes to trainer.log_dir, the cwd without a logger: with the shipped
    config the run's folder holds metrics.csv (with the monitor's columns) and config.yaml; without a
    logger config.yaml goes to lightning_logs/version_N, and nothing else lands in the cwd either way."""
    proc = _cli_subprocess(
        ["fit", "--config", str(CONFIG), "--trainer.max_steps=5", "--trainer.limit_val_batches=0",
         "--trainer.enable_progress_bar=false", *extra],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["lightning_logs"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert f"{log_dir}/config.yaml" in written
    assert "tau: 8" in (tmp_path / log_dir / "config.yaml").read_text()
    if not extra:
        rows = list(csv.DictReader((tmp_path / log_dir / "metrics.csv").open()))
        assert any(r.get("comm/bytes_sent") for r in rows)  # logged every 5 steps by the config
    else:
        assert written == [f"{log_dir}/config.yaml"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--trainer.strategy.tau=0", "LocalSGDStrategy: Arg `tau` must be an int >= 1"),
        ("--trainer.strategy.compressor=int3",
         "LocalSGDStrategy: Arg `compressor` must be one of ('bf16', 'fp16', 'int8', 'int4') or a "
         "Compressor, got 'int3'."),
    ],
    ids=["tau", "compressor"],
)  # fmt: skip
def test_cli_bad_value_prints_one_line_and_exits_2(tmp_path, override, expected):
    proc = _cli_subprocess(["fit", "--config", str(CONFIG), override], cwd=tmp_path)
    assert proc.returncode == 2
    # Lightning's own "Seed set to 0" info line comes first (the seed is set before anything is built)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Seed set to" not in line]
    assert len(lines) == 1 and lines[0].startswith("commsgd: error: ") and expected in lines[0], proc.stderr
    assert len(proc.stderr.splitlines()) <= 2 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


@pytest.mark.parametrize(
    ("config", "override", "expected"),
    [
        # nested: the compressor inside the strategy refuses; the message names the compressor
        ("dore.yaml", "--trainer.strategy.compressor.init_args.block_size=0",
         "PNormQuantizer: Arg `block_size` must be an int >= 1"),
        # the model, built by Lightning's own instantiator
        ("local_sgd.yaml", "--model.init_args.depth=-1", "depth must be >= 0, got -1"),
        # the Trainer's check of the strategy against the world size
        ("local_sgd.yaml", "--trainer.strategy.redundancy=0.75",
         "Arg `redundancy` (mu) must lie in [0, 1 - 1/p]"),
    ],
)  # fmt: skip
def test_cli_argument_errors_end_in_one_line(capsys, tmp_path, monkeypatch, config, override, expected):
    from lightning_commsgd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["commsgd"])  # pytest's own arguments would make Lightning warn
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO_ROOT / "configs" / config), override])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("commsgd: error: ") and expected in err, err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--trainer.strategy.momentum=nesterov",
         "--trainer.strategy.momentum: Expected a typing.Literal['average', 'local', 'zero']. "
         "Got value: nesterov"),
        ("--trainer.max_epochs=abc", "--trainer.max_epochs: Expected a <class 'int'>. Got value: abc"),
        ("--trainer.strategy.tauu=3", "--trainer.strategy: Option 'tauu' is not accepted"),
    ],
)  # fmt: skip
def test_cli_parse_errors_end_in_a_usage_line_and_one_error_line(capsys, monkeypatch, override, expected):
    """What the parser itself refuses (a type, a Literal choice, a key): jsonargparse would print its
    60-line usage and a nested message."""
    from lightning_commsgd.cli import main

    monkeypatch.setattr(sys, "argv", ["commsgd"])

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIG), override])
    assert info.value.code == 2
    usage, error = capsys.readouterr().err.splitlines()
    assert usage.startswith("usage: ") and len(usage) < 120
    assert error == f"commsgd: error: {expected}"


class _BrokenCallback(Callback):
    """A constructor bug (not a refused argument) while the CLI builds its objects."""

    def __init__(self) -> None:
        raise RuntimeError("a bug in a constructor")


def test_cli_keeps_the_traceback_of_a_constructor_bug(monkeypatch, tmp_path):
    from lightning_commsgd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["commsgd"])
    with pytest.raises(ValueError) as info:  # jsonargparse's wrapping, unchanged: not a SystemExit
        main(["fit", "--config", str(CONFIG), f"--trainer.callbacks+={__name__}._BrokenCallback"])
    assert "a bug in a constructor" in str(info.value)
