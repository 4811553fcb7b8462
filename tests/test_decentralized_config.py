"""Decentralized and elastic strategies: registry names, YAML configs, and bad input caught while the
Trainer is built (before any process or process group exists)."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from lightning_commsgd import DecentralizedSGDStrategy, ElasticAveragingStrategy


def _trainer(strategy, devices):
    return Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False)


@pytest.mark.parametrize("name", ["ring", "torus", "exponential", "one_peer_exponential", "complete", "star"])
def test_registered_gossip_names(name):
    trainer = _trainer(f"gossip_{name}", 4)
    assert isinstance(trainer.strategy, DecentralizedSGDStrategy)
    assert trainer.strategy.topology == name and trainer.strategy.tau == 1


def test_registered_elastic_name():
    trainer = _trainer("elastic_averaging", 2)
    assert isinstance(trainer.strategy, ElasticAveragingStrategy) and trainer.strategy.tau == 4


def test_user_matrix_is_resolved_for_the_world_size():
    strategy = _trainer(DecentralizedSGDStrategy(topology=[[0.5, 0.5], [0.5, 0.5]]), 2).strategy
    assert strategy.world.size == 2
    assert strategy.algorithm_config.resolve_topology(strategy.world).world_size == 2


@pytest.mark.parametrize(
    ("kwargs", "devices", "error", "match"),
    [
        ({"topology": "torus"}, 3, ValueError, "square world size"),
        ({"topology": "hexagon"}, 2, ValueError, "ring"),  # the message lists the valid names
        ({"topology": [[0.5, 0.5], [0.5, 0.5]]}, 3, ValueError, "world size"),
        ({"topology": [[0.9, 0.5], [0.1, 0.5]]}, 2, ValueError, "doubly stochastic"),
        ({"topology": [[1.0, 0.0], [0.0, 1.0]]}, 2, ValueError, "not connected"),
        ({"topology": "star", "edge_weights": "uniform"}, 4, ValueError, "regular"),
    ],
)
def test_bad_topology_fails_while_the_trainer_is_built(kwargs, devices, error, match):
    with pytest.raises(error, match=match):
        _trainer(DecentralizedSGDStrategy(**kwargs), devices)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau": 0}, ValueError, "tau"),
        ({"tau": 1.5}, TypeError, "tau"),
        ({"momentum": "zero"}, ValueError, "momentum"),
        ({"momentum": "mix"}, ValueError, "momentum"),  # 0.1's name of "average"
        ({"weights": "uniform"}, TypeError, "unexpected argument 'weights'"),
    ],
)
def test_bad_decentralized_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DecentralizedSGDStrategy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"alpha": "0.1"}, TypeError, "alpha"),
        ({"alpha": float("nan")}, TypeError, "alpha"),
        ({"tau": 0}, ValueError, "tau"),
        ({"momentum": "average"}, ValueError, "momentum"),
    ],
)
def test_bad_elastic_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ElasticAveragingStrategy(**kwargs)


def test_elastic_alpha_outside_the_stable_range_for_the_world_size():
    _trainer(ElasticAveragingStrategy(alpha=0.35), 4)  # 2/(m+1) = 0.4: fine
    with pytest.raises(ValueError, match=r"2/\(m\+1\)"):
        _trainer(ElasticAveragingStrategy(alpha=0.45), 4)


@pytest.mark.parametrize(
    ("config", "override", "check"),
    [
        ("gossip_torus.yaml", "--trainer.strategy.topology=exponential",
         lambda s: isinstance(s, DecentralizedSGDStrategy) and s.topology == "exponential" and s.tau == 4),
        ("elastic_averaging.yaml", "--trainer.strategy.alpha=0.3",
         lambda s: isinstance(s, ElasticAveragingStrategy) and s.alpha == 0.3),
    ],
)  # fmt: skip
def test_yaml_configs_instantiate(config, override, check, digits_example):
    cli = LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(REPO_ROOT / "configs" / config), override],
    )  # fmt: skip
    assert check(cli.trainer.strategy)
