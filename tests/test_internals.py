"""lightning_commsgd.internals: each private Lightning name it uses exists in the installed Lightning and is
patched as documented, and where it is missing (faked with monkeypatch.delattr) the entry fails loudly,
naming the version and the supported range, or is the documented no-op. Importing the module does not
import Lightning."""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning
import pytest
import torch
from conftest import REPO_ROOT
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities import distributed as fabric_distributed
from lightning.fabric.utilities import optimizer as fabric_optimizer
from lightning.pytorch import Trainer
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_commsgd import internals
from lightning_commsgd.strategies.launcher import ReportingScriptLauncher

pytestmark = pytest.mark.lightning_smoke

OLDEST, NEWEST = (re.escape(v) for v in internals.LIGHTNING_RANGE)
LOUD = rf"Lightning {re.escape(lightning.__version__)} is not supported \(verified: {OLDEST} - {NEWEST}"
HAS_BROADCAST = hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor")


def _trainer() -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip


def _ddp(**kwargs) -> DDPStrategy:
    return DDPStrategy(
        cluster_environment=LightningEnvironment(), parallel_devices=[torch.device("cpu")] * 2, **kwargs
    )


def test_the_supported_range_is_the_one_pyproject_declares():
    oldest, newest = internals.LIGHTNING_RANGE
    assert f'"lightning>={oldest},<={newest}"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert internals._version_tuple(oldest) <= internals._version_tuple(lightning.__version__)
    assert internals._version_tuple(lightning.__version__) <= internals._version_tuple(newest)
    assert internals._version_tuple("2.5.1.post0") == (2, 5, 1) < internals.SIGTERM_BROADCAST_SINCE


def test_importing_internals_does_not_import_lightning():
    """In a process where importing lightning / pytorch_lightning fails. The package's ``__init__`` registers
    the strategies with Lightning, so a bare package object stands in for it: what runs is internals' own
    imports, and defining a strategy class with the mixin."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys, types

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Block())
        package = types.ModuleType("lightning_commsgd")
        package.__path__ = [{str(REPO_ROOT / "lightning_commsgd")!r}]
        sys.modules["lightning_commsgd"] = package
        import lightning_commsgd.internals as internals

        class Parent:
            def _setup_model(self, model): raise AssertionError
            def _register_ddp_hooks(self): raise AssertionError
            def _configure_launcher(self): self.calls.append("parent")

        class Strategy(internals.DDPWithoutWrapperHooks, Parent):
            calls = []
            def check_before_launch(self): self.calls.append("check")

        Strategy()._configure_launcher()
        assert Strategy.calls == ["check", "parent"], Strategy.calls
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not loaded, loaded
        print("NO LIGHTNING")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(REPO_ROOT)}
    if os.environ.get("PYTHONPATH"):  # an older Lightning under test (make test-oldest-lightning)
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and "NO LIGHTNING" in proc.stdout, proc.stderr[-3000:]


# -- torch -------------------------------------------------------------------------------------------------
def test_missing_torch_names_warn_or_fail_loudly(monkeypatch):
    import torch.distributed.distributed_c10d as c10d

    monkeypatch.delattr(c10d, "_set_pg_timeout")
    with pytest.warns(UserWarning, match="timeout of 5 s could not be set"):
        internals.set_group_timeout(None, 5.0)
    monkeypatch.delattr(c10d, "_get_default_store")
    with pytest.raises(RuntimeError, match=rf"torch {re.escape(torch.__version__)} has no .*_default_store"):
        internals.default_store()


# -- the SIGTERM patches -----------------------------------------------------------------------------------
def test_sigterm_handling_becomes_rank_local():
    trainer = _trainer()
    internals.remove_per_step_collectives(trainer)
    epoch_loop, connector = trainer.fit_loop.epoch_loop, trainer._signal_connector
    assert connector._sigterm_notifier_fn.__name__ == "local_sigterm_notifier"
    if HAS_BROADCAST:  # Lightning >= 2.5.2
        assert epoch_loop._broadcast_sigterm_tensor.__name__ == "local_sigterm_check"
    else:
        assert not hasattr(epoch_loop, "_broadcast_sigterm_tensor")
    connector._sigterm_notifier_fn(signal.SIGTERM, None)
    assert trainer.received_sigterm
    error = SIGTERMException()
    message = internals.explain_sigterm(error, trainer)
    assert message.startswith("rank 0 received signal 15 (SIGTERM) at step 0, stopped at step 0;")
    assert error.code == 143 and str(error) == message


def test_a_missing_sigterm_broadcast_is_a_no_op_before_2_5_2_and_loud_after(monkeypatch):
    monkeypatch.delattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", raising=False)
    monkeypatch.setattr(internals, "lightning_version", lambda: "2.5.1.post0")
    trainer = _trainer()
    internals.remove_per_step_collectives(trainer)  # nothing to remove; the handler is still replaced
    assert trainer._signal_connector._sigterm_notifier_fn.__name__ == "local_sigterm_notifier"
    monkeypatch.setattr(internals, "lightning_version", lambda: "2.6.6")
    with pytest.raises(RuntimeError, match=r"_broadcast_sigterm_tensor.*Lightning 2\.6\.6 is not supported"):
        internals.remove_per_step_collectives(_trainer())


def test_a_missing_sigterm_handler_is_loud(monkeypatch):
    monkeypatch.delattr(_SignalConnector, "_sigterm_notifier_fn")
    with pytest.raises(RuntimeError, match=rf"_sigterm_notifier_fn.*{LOUD}"):
        internals.remove_per_step_collectives(_trainer())


# -- the resume warning, the checkpoint path --------------------------------------------------------------
def test_the_resume_warning_filter_wraps_reset_and_is_a_no_op_without_the_combined_loader(monkeypatch):
    trainer = _trainer()
    internals.quiet_exact_resume_warning(trainer, lambda loaders: True)
    assert trainer.fit_loop.epoch_loop.reset._commsgd_quiet
    trainer = _trainer()
    reset = trainer.fit_loop.epoch_loop.reset
    monkeypatch.delattr(trainer.fit_loop, "_combined_loader")
    internals.quiet_exact_resume_warning(trainer, lambda loaders: True)
    assert trainer.fit_loop.epoch_loop.reset == reset  # untouched: Lightning's warning stays


def test_the_selected_checkpoint_path_is_reported_or_missing_loudly(monkeypatch):
    trainer, reported = _trainer(), []
    connector = trainer._checkpoint_connector
    monkeypatch.setattr(connector, "_select_ckpt_path", lambda *args, **kwargs: "last.ckpt")
    internals.report_selected_ckpt_path(trainer, reported.append)
    internals.report_selected_ckpt_path(trainer, reported.append)  # once per Trainer
    assert connector._select_ckpt_path("fit", None) == "last.ckpt" and reported == ["last.ckpt"]
    monkeypatch.delattr(_CheckpointConnector, "_select_ckpt_path")
    with pytest.raises(RuntimeError, match=rf"_select_ckpt_path.*{LOUD}"):
        internals.report_selected_ckpt_path(_trainer(), reported.append)


# -- a training state in memory (replica groups healing) --------------------------------------------------
def test_a_training_state_taken_at_a_batch_end_resumes_another_trainer_there(monkeypatch):
    from lightning.pytorch import Callback
    from lightning.pytorch.demos.boring_classes import BoringModel

    taken: dict = {}

    class Take(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                taken.update(internals.training_state(trainer))

    def trainer(*callbacks: Callback) -> Trainer:
        return Trainer(
            accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
            limit_val_batches=0,
        )  # fmt: skip

    trainer(Take()).fit(BoringModel())
    assert taken["global_step"] == 3 and "loops" in taken and "optimizer_states" in taken
    first: list[int] = []

    class Resume(Callback):
        def setup(self, trainer, pl_module, stage):  # before the strategy's setup and the restore after it
            internals.resume_from_state(trainer, taken)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            first.append(trainer.global_step)

    resumed = trainer(Resume())
    resumed.fit(BoringModel())
    assert first[0] == 3 and resumed.global_step == 5  # went on from the taken state's step

    connector = _trainer()._checkpoint_connector
    monkeypatch.setattr(connector, "_loaded_checkpoint", None)
    with pytest.raises(RuntimeError, match=rf"_loaded_checkpoint.*{LOUD}"):
        internals.resume_from_state(SimpleNamespace(_checkpoint_connector=connector), taken)
    monkeypatch.delattr(_CheckpointConnector, "dump_checkpoint")
    with pytest.raises(RuntimeError, match=rf"dump_checkpoint.*{LOUD}"):
        internals.training_state(_trainer())


# -- the popen launcher --------------------------------------------------------------------------------------
def test_the_popen_launcher_is_recognised_and_replaced():
    strategy = _ddp()
    strategy._configure_launcher()
    assert internals.popen_launcher_class() is subprocess_script._SubprocessScriptLauncher
    assert internals.is_popen_launcher(strategy.launcher)
    ours = ReportingScriptLauncher(strategy.cluster_environment, 2, 1, watchdog=lambda: None)
    assert not internals.is_popen_launcher(ours) and ours.end_job
    internals.replace_launcher(strategy, ours)
    assert strategy.launcher is ours
    with pytest.raises(RuntimeError, match=rf"Strategy\._launcher.*{LOUD}"):
        internals.replace_launcher(SimpleNamespace(), ours)


@pytest.mark.parametrize("name", ["_SubprocessScriptLauncher", "_call_children_scripts"])
def test_a_missing_popen_launcher_is_loud(monkeypatch, name):
    owner = subprocess_script if name.startswith("_Sub") else subprocess_script._SubprocessScriptLauncher
    monkeypatch.delattr(owner, name)
    with pytest.raises(RuntimeError, match=rf"_SubprocessScriptLauncher.*{LOUD}"):
        internals.popen_launcher_class()
    if name == "_call_children_scripts":
        with pytest.raises(RuntimeError, match=rf"_call_children_scripts.*{LOUD}"):
            internals.start_child_scripts(SimpleNamespace())


def test_a_missing_thread_helper_is_a_no_op(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    internals.set_num_threads_if_needed(2)  # Lightning's: OMP_NUM_THREADS is set, nothing to do
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delattr(fabric_distributed, "_set_num_threads_if_needed")
    internals.set_num_threads_if_needed(2)
    assert "OMP_NUM_THREADS" not in os.environ


# -- strategy internals --------------------------------------------------------------------------------------
def test_optimizers_to_device_or_missing_loudly(monkeypatch):
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([weight])
    weight.sum().backward()
    optimizer.step()
    internals.optimizers_to_device([optimizer], torch.device("cpu"))
    assert optimizer.state[weight]["exp_avg"].device.type == "cpu"
    monkeypatch.delattr(fabric_optimizer, "_optimizers_to_device")
    with pytest.raises(RuntimeError, match=rf"_optimizers_to_device.*{LOUD}"):
        internals.optimizers_to_device([optimizer], torch.device("cpu"))


def test_sync_batchnorm_and_backend_or_missing_loudly(monkeypatch):
    strategy = _ddp(process_group_backend="gloo")
    assert not internals.sync_batchnorm_requested(strategy)
    assert internals.process_group_backend(strategy) == "gloo"
    strategy._layer_sync = object()
    assert internals.sync_batchnorm_requested(strategy)
    monkeypatch.delattr(strategy, "_layer_sync")
    with pytest.raises(RuntimeError, match=rf"_layer_sync.*{LOUD}"):
        internals.sync_batchnorm_requested(strategy)
    monkeypatch.delattr(DDPStrategy, "_get_process_group_backend")
    with pytest.raises(RuntimeError, match=rf"_get_process_group_backend.*{LOUD}"):
        internals.process_group_backend(strategy)


def test_weights_only_is_passed_on_where_lightning_takes_it(monkeypatch):
    assert internals.weights_only_kwargs(None) == {}
    takes = "weights_only" in inspect.signature(TorchCheckpointIO.load_checkpoint).parameters  # 2.6.0+
    assert internals.weights_only_kwargs(False) == ({"weights_only": False} if takes else {})
    # Lightning before 2.6: no such argument, and it always loads with weights_only=False
    monkeypatch.setattr(TorchCheckpointIO, "load_checkpoint", lambda self, path, map_location=None: None)
    assert internals.weights_only_kwargs(False) == {}
    with pytest.raises(RuntimeError, match="weights_only=True needs Lightning 2.6.0 or later"):
        internals.weights_only_kwargs(True)


# -- the mixin -----------------------------------------------------------------------------------------------
class _Recording(internals.DDPWithoutWrapperHooks, DDPStrategy):
    def __init__(self) -> None:
        super().__init__(
            cluster_environment=LightningEnvironment(), parallel_devices=[torch.device("cpu")] * 2
        )
        self.calls: list[str] = []

    def check_before_launch(self) -> None:
        self.calls.append(f"check, launcher {self.launcher}")

    def after_launcher_configured(self) -> None:
        self.calls.append(f"after, launcher {type(self.launcher).__name__}")


def test_the_mixin_delegates_the_private_hooks_to_public_methods():
    strategy = _Recording()
    model = torch.nn.Linear(2, 2)
    assert strategy._setup_model(model) is model  # no DistributedDataParallel
    assert strategy._register_ddp_hooks() is None
    strategy._configure_launcher()
    assert strategy.calls == ["check, launcher None", "after, launcher _SubprocessScriptLauncher"]


@pytest.mark.parametrize("hook", internals.DDPWithoutWrapperHooks.WRAPPER_HOOKS)
def test_the_mixin_refuses_a_parent_without_the_hook(monkeypatch, hook):
    for klass in DDPStrategy.__mro__:  # Strategy defines _setup_model and _configure_launcher too
        if hook in vars(klass):
            monkeypatch.delattr(klass, hook)
    with pytest.raises(RuntimeError, match=rf"DDPStrategy\.{hook}.*{LOUD}"):

        class _Strategy(internals.DDPWithoutWrapperHooks, DDPStrategy):
            pass


def test_the_mixin_refuses_the_wrong_order_of_bases():
    with pytest.raises(TypeError, match="put DDPWithoutWrapperHooks before DDPStrategy"):

        class _Strategy(DDPStrategy, internals.DDPWithoutWrapperHooks):
            pass
