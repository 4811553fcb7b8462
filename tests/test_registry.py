"""One registry, one naming table (issue 19): every strategy is registered under its own name, one factory
builds any of them, and an argument name means one thing everywhere."""

from __future__ import annotations

import inspect

import pytest
from conftest import REPO_ROOT
from docstring_parser import parse
from lightning.pytorch.strategies import StrategyRegistry

import lightning_commsgd as lc
import lightning_commsgd.strategies as trainer_strategies
from lightning_commsgd.naming import (
    ARGUMENTS,
    FRAMEWORK_ARGUMENTS,
    naming_table,
    registered_classes,
    strategy_arguments,
)
from lightning_commsgd.registry import ENTRIES, create_strategy, entry, strategy_class

OWN_ENTRIES = [e for e in ENTRIES.values() if not e.preset]


@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_name_is_registered_with_lightning_as_the_registry_says(name):
    registered = StrategyRegistry[name]
    assert registered["strategy"] is strategy_class(name)
    assert registered["init_params"].keys() == ENTRIES[name].presets().keys()


@pytest.mark.parametrize("entry_", OWN_ENTRIES, ids=lambda e: e.name)
def test_each_class_is_registered_under_its_own_strategy_name(entry_):
    cls = strategy_class(entry_.name)
    assert cls.strategy_name == entry_.name
    assert getattr(lc, entry_.class_name) is cls  # public at the package root


def test_the_factory_applies_presets_and_overrides():
    qsgd = create_strategy("qsgd")
    assert type(qsgd) is lc.CompressedSGDStrategy and repr(qsgd.compressor) == repr(lc.QSGD(4, 512))
    ring = create_strategy("gossip_torus", tau=3)
    assert (ring.topology, ring.tau) == ("torus", 3)
    with pytest.raises(KeyError, match="registered: local_sgd, decentralized_sgd"):
        entry("local-sgd")


@pytest.mark.parametrize("entry_", [e for e in OWN_ENTRIES if e.algorithm is not None], ids=lambda e: e.name)
def test_a_named_strategy_is_its_config_plus_the_adapter(entry_):
    """The named class's signature is the config's followed by the adapter's; every argument documented."""
    cls = strategy_class(entry_.name)
    config_args = [n for n in inspect.signature(entry_.algorithm).parameters]
    args = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    assert args[: len(config_args)] == config_args
    assert {"eval_on", "redundancy", "check_replicas", "sync_timeout", "start_method"} <= set(args)
    documented = {p.arg_name for p in parse(cls.__doc__).params}
    assert set(config_args) | {"eval_on", "redundancy", "check_replicas"} <= documented
    strategy = create_strategy(entry_.name)
    assert type(strategy.algorithm_config) is entry_.algorithm


@pytest.mark.parametrize("cls", registered_classes(trainer_strategies), ids=lambda c: c.__name__)
def test_every_argument_is_in_the_naming_table(cls):
    unknown = [a for a in strategy_arguments(cls) if a not in ARGUMENTS and a not in FRAMEWORK_ARGUMENTS]
    assert not unknown, f"{cls.__name__} takes arguments the naming table does not define: {unknown}"


def test_the_readme_shows_the_current_naming_table():
    table = naming_table(registered_classes(trainer_strategies))
    assert table in (REPO_ROOT / "README.md").read_text(), "regenerate with lightning_commsgd.naming"


def test_one_nonfinite_error():
    from lightning_commsgd.algorithms import compressed, finite

    assert lc.NonFiniteError is finite.NonFiniteError
    assert compressed.NonFiniteError is finite.NonFiniteError  # imported, not a second class
    assert not hasattr(finite, "NonFiniteReplicaError")


class _CountingRounds(lc.CommAlgorithm):
    """A new algorithm written against the protocol only: a round (here: nothing sent) every `every` steps."""

    round_tags = ("counting",)

    def __init__(self, communicator: lc.Communicator, every: int) -> None:
        self.communicator, self.every = communicator, every
        self.steps, self.rounds, self.finalized = 0, 0, False

    def after_optimizer_step(self) -> bool:
        self.steps += 1
        if self.steps % self.every:
            return False
        self.rounds += 1
        return True

    @property
    def in_sync(self) -> bool:
        return self.steps % self.every == 0

    def finalize(self) -> None:
        self.finalized = True

    def state_dict(self) -> dict:
        return {"steps": self.steps, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.rounds = state["steps"], state["rounds"]


class _CountingConfig(lc.AlgorithmConfig):
    name = "counting"

    def __init__(self, every: int = 2) -> None:
        self.every = every

    def build(self, module, optimizers, communicator, world):
        return _CountingRounds(communicator, self.every)


def test_a_new_algorithm_needs_no_adapter_change(tmp_path):
    """The adapter drives an algorithm it has never seen, through the protocol only; the named form comes
    from the config's signature (what a registry entry makes)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_commsgd.named import named_strategy

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    named = named_strategy(_CountingConfig, lc.CommunicationStrategy, "Counting", __name__, "counting")
    for strategy in (lc.CommunicationStrategy(_CountingConfig(every=3)), named(every=3)):
        trainer = L.Trainer(
            strategy=strategy, accelerator="cpu", devices=1, max_steps=7, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(Net(), DataLoader(TensorDataset(torch.randn(32, 3)), batch_size=4))
        algorithm = trainer.strategy.algorithm
        assert (algorithm.steps, algorithm.rounds, algorithm.finalized) == (7, 2, True)
    assert named(every=5).every == 5 and "every" in inspect.signature(named.__init__).parameters


@pytest.mark.parametrize("cls", [lc.KSyncSGDStrategy, lc.AsyncSGDStrategy], ids=lambda c: c.__name__)
def test_an_argument_a_strategy_fixes_is_refused_by_name(cls):
    """K-sync and async SGD choose the parameter server's `mode` themselves: passing it is an unexpected
    argument (with the accepted list), not Python's "got multiple values"."""
    message = rf"{cls.__name__} got an unexpected argument 'mode'; it accepts: .*\bk\b"
    with pytest.raises(TypeError, match=message):
        cls(mode="async")
    assert "mode" not in strategy_arguments(cls)
