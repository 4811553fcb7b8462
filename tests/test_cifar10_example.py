"""examples/cifar10 without torchvision and without the data set: the data module on a tiny folder in the
real pickle format, the missing-folder error, the synthetic set, the model's torchvision error, and every
configs/cifar10/*.yaml through LightningCLI (with a stand-in torchvision)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_commsgd import CommunicationStrategy

CIFAR_DIR = REPO_ROOT / "examples" / "cifar10"
CONFIGS = sorted((REPO_ROOT / "configs" / "cifar10").glob("*.yaml"))
# The configs name the classes as the script sees them (its folder first on sys.path): data.*, model.*.
# Stays: the configs parsed below must resolve to these very modules (tests/conftest.py's digits_example
# fixture swaps in the digits example's modules of the same names for its tests, and back).
sys.path.insert(0, str(CIFAR_DIR))
import data as cifar_data  # noqa: E402
import model as cifar_model  # noqa: E402
import train as cifar_train  # noqa: E402

assert Path(cifar_data.__file__).parent == CIFAR_DIR and Path(cifar_model.__file__).parent == CIFAR_DIR


def _write_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    # As the official files: bytes keys, (n, 3072) uint8 rows of red, green, blue planes, a label list.
    entry = {
        b"batch_label": b"fake",
        b"labels": labels,
        b"data": images,
        b"filenames": [b"x.png"] * len(labels),
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture
def fake_cifar(tmp_path) -> tuple[Path, np.ndarray, list[int]]:
    """A cifar-10-batches-py folder: 5 training files of 4 images, a test file of 3; returns the folder,
    all training rows and labels in file order."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for name in cifar_data.TRAIN_FILES:
        images, targets = rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 10, 4).tolist()
        _write_batch(root / name, images, targets)
        rows.append(images)
        labels += targets
    _write_batch(root / cifar_data.TEST_FILE, rng.integers(0, 256, (3, 3072), dtype=np.uint8), [0, 1, 9])
    return root, np.concatenate(rows), labels


def test_reads_the_pickle_folder(fake_cifar):
    root, rows, labels = fake_cifar
    dm = cifar_data.CIFAR10DataModule(data_dir=root, batch_size=8)
    dm.setup("fit")
    train_x, train_y = dm.train_dataset.tensors
    val_x, val_y = dm.val_dataset.tensors
    assert train_x.shape == (20, 3, 32, 32) and val_x.shape == (3, 3, 32, 32)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert train_y.tolist() == labels and val_y.tolist() == [0, 1, 9]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    assert torch.equal(train_x[5, 1], torch.from_numpy(rows[5, 1024:2048].reshape(32, 32)))
    # Training drops the incomplete batch (BatchNorm never sees a batch of one); validation keeps it.
    assert [len(y) for _, y in dm.train_dataloader()] == [8, 8]
    assert [len(y) for _, y in dm.val_dataloader()] == [3]


def test_normalisation_and_augmentation(fake_cifar):
    dm = cifar_data.CIFAR10DataModule(data_dir=fake_cifar[0])
    dm.setup("fit")
    images, labels = dm.train_dataset.tensors
    x = dm.transform(images, augment=False)
    mean = torch.tensor(cifar_data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar_data.CIFAR10_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, (images.float() / 255 - mean) / std)
    # Outside a training loop (no trainer here) the hook never augments.
    hooked, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(hooked, x) and same_labels is labels
    # Every augmented image is a crop of the zero-padded image (offsets 0..8), maybe mirrored.
    torch.manual_seed(0)
    source = images[:6].float()
    out = cifar_data.random_crop_flip(source)
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4))
    for i in range(6):
        crops = [padded[i, :, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    assert not torch.equal(out, source)


def test_missing_folder_names_the_path_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        cifar_data.CIFAR10DataModule()  # default data_dir, relative to the working directory
    message = str(info.value)
    assert isinstance(info.value, cifar_data.CIFAR10NotFoundError)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in message and "does not exist" in message
    assert "data_batch_1" in message and "test_batch" in message and "cifar-10-python.tar.gz" in message
    assert "--data.synthetic=true" in message
    # No files needed in synthetic mode.
    cifar_data.CIFAR10DataModule(synthetic=True)


def test_missing_file_is_named(fake_cifar):
    root = fake_cifar[0]
    (root / "data_batch_3").unlink()
    with pytest.raises(cifar_data.CIFAR10NotFoundError, match=r"lacks data_batch_3\.") as info:
        cifar_data.CIFAR10DataModule(data_dir=root)
    assert str(root.resolve()) in str(info.value)


def test_synthetic_set_is_deterministic_and_has_class_structure():
    x, y = cifar_data.make_synthetic_cifar(2000, seed=3, split="train")
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    again = cifar_data.make_synthetic_cifar(2000, seed=3, split="train")
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x[:100], cifar_data.make_synthetic_cifar(100, seed=4)[0])
    val_x, val_y = cifar_data.make_synthetic_cifar(500, seed=3, split="val")
    assert not torch.equal(val_x, x[:500])
    # Nearest class mean on raw pixels, fitted on the training samples, on held-out ones: chance is 10%.
    features, val_features = x.flatten(1).float(), val_x.flatten(1).float()
    means = torch.stack([features[y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(val_features, means).argmin(1) == val_y).float().mean().item()
    assert accuracy > 0.6, accuracy


def test_synthetic_data_module_sizes():
    dm = cifar_data.CIFAR10DataModule(
        data_dir="/nonexistent", synthetic=True, synthetic_size=60, batch_size=16
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == 60 and len(dm.val_dataset) == 12
    assert torch.equal(dm.train_dataset.tensors[0], cifar_data.make_synthetic_cifar(60)[0])


def test_model_without_torchvision_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError) as info:
        cifar_model.ResNetClassifier()
    message = str(info.value)
    assert isinstance(info.value, cifar_model.TorchvisionMissingError)
    assert "torchvision" in message and "lightning_commsgd[cifar10]" in message
    assert "torch==2.14.1 torchvision==0.29.1" in message and "2.13.0+cpu" in message


class _BrokenTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A torchvision whose import fails as one built for another torch does."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "torchvision" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("operator torchvision::nms does not exist")


def test_model_with_a_mismatched_torchvision_says_what_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    with pytest.raises(cifar_model.TorchvisionMissingError, match="torchvision::nms does not exist"):
        cifar_model.ResNetClassifier()


class _StandInResNet(nn.Module):
    """torchvision's ResNet interface as far as ResNetClassifier uses it: conv1, maxpool, a classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.maxpool(self.conv1(x)).mean(dim=(2, 3)))


@pytest.fixture
def stand_in_torchvision(monkeypatch) -> list[tuple[str, object, int]]:
    """A torchvision module whose ResNet constructors build :class:`_StandInResNet`; records the calls."""
    calls: list[tuple[str, object, int]] = []

    def constructor(arch: str):
        def build(weights=None, num_classes: int = 1000) -> nn.Module:
            calls.append((arch, weights, num_classes))
            return _StandInResNet(num_classes)

        return build

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(**{arch: constructor(arch) for arch in cifar_model.ARCHS})
    monkeypatch.setitem(sys.modules, "torchvision", module)
    return calls


def test_model_gets_the_cifar_stem(stand_in_torchvision):
    model = cifar_model.ResNetClassifier(arch="resnet50", num_classes=10)
    assert stand_in_torchvision == [("resnet50", None, 10)]  # random init: no weights downloaded
    conv = model.net.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.out_channels) == ((3, 3), (1, 1), (1, 1), 8)
    assert isinstance(model.net.maxpool, nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="arch must be one of"):
        cifar_model.ResNetClassifier(arch="vgg11")


def test_learning_rate_schedules():
    factor = cifar_model.lr_factor
    assert factor(0, 100, "cosine") == 1.0 and factor(50, 100, "cosine") == pytest.approx(0.5)
    assert factor(99, 100, "cosine") < 1e-3
    assert [factor(s, 100, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert [factor(s, 100, "constant", warmup_steps=4) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1, 1, 1]
    # Cosine starts after the warm-up and still ends at the last step.
    assert factor(4, 100, "cosine", warmup_steps=4) == 1.0 and factor(99, 100, "cosine", 4) < 1e-3


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=args,
    )  # fmt: skip


def test_there_is_a_cifar10_config_per_strategy_family():
    assert {c.stem for c in CONFIGS} == {
        "ddp_baseline", "local_sgd", "overlap_local_sgd", "local_sgd_adacomm", "gossip_torus",
        "elastic_averaging", "dore", "diana", "qsgd", "mem_sgd", "double_squeeze",
    }  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_cifar10_config_instantiates(config, stand_in_torchvision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CSV logger's folder is relative
    cli = _cli(["--config", str(config), "--data.synthetic=true"])
    strategy = cli.trainer.strategy
    if config.stem == "ddp_baseline":
        assert type(strategy) is DDPStrategy
    else:
        assert isinstance(strategy, CommunicationStrategy)
    assert isinstance(cli.model, cifar_model.ResNetClassifier) and cli.model.hparams.lr == 0.1
    assert isinstance(cli.datamodule, cifar_data.CIFAR10DataModule) and cli.datamodule.batch_size == 128


def test_cli_without_the_data_set_exits_with_the_message(stand_in_torchvision, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cifar_train.main(["fit", "--config", str(REPO_ROOT / "configs" / "cifar10" / "local_sgd.yaml")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 not found: " + str(tmp_path / "data" / "cifar-10-batches-py"))
    assert "--data.synthetic=true" in err and "Traceback" not in err
