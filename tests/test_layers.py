"""The package's layers: the core imports no Lightning and no adapter, and works where Lightning is missing.

Layers, bottom up (docs/architecture.md): the core (algorithms and their protocol, the communicator,
compression, payloads, schedules, topology, samplers, RI-SGD placement, the registry table), then the adapters
(the Lightning Trainer strategies, the Fabric strategies, the callback and the CLI). An arrow upward would be
a core module importing Lightning or an adapter at module level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_commsgd"

#: the adapter layer: modules that may import Lightning (paths relative to the package)
ADAPTERS = ("strategies", "fabric", "callbacks.py", "cli.py", "checkpoint_io.py")
FRAMEWORKS = ("lightning", "pytorch_lightning")


def _layer(path: Path) -> str:
    relative = path.relative_to(PACKAGE).as_posix()
    if relative == "__init__.py":
        return "root"
    if relative.startswith(ADAPTERS):
        return "adapter"
    return "core"


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Names imported by statements that run at import time (not inside functions, not under
    ``if TYPE_CHECKING``)."""
    names: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.append(node.module)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return names


def _upward(name: str) -> bool:
    top = name.split(".")[0]
    if top in FRAMEWORKS:
        return True
    if top != "lightning_commsgd":
        return False
    rest = name.split(".")[1:]
    return bool(rest) and (rest[0] in ("strategies", "fabric", "callbacks", "cli", "checkpoint_io"))


def test_no_core_module_imports_lightning_or_an_adapter():
    arrows = []
    core = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        if _layer(path) != "core":
            continue
        core += 1
        for name in _module_level_imports(ast.parse(path.read_text())):
            if _upward(name):
                arrows.append(f"{path.relative_to(PACKAGE)} -> {name}")
    assert core >= 30, core  # the walk found the core
    assert not arrows, "upward imports:\n" + "\n".join(arrows)


def test_the_adapters_do_import_lightning():
    """The check above can fail: the adapter modules it skips are the ones that import Lightning."""
    importing = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if _layer(path) == "adapter"
        and any(_upward(n) for n in _module_level_imports(ast.parse(path.read_text())))
    }
    assert {"strategies/base.py", "callbacks.py"} <= importing


BLOCK_LIGHTNING = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoLightning())
    """
)


@pytest.mark.parametrize(
    "module",
    [
        "lightning_commsgd",
        "lightning_commsgd.algorithms",
        "lightning_commsgd.algorithms.protocol",
        "lightning_commsgd.comm",
        "lightning_commsgd.compression",
        "lightning_commsgd.payload",
        "lightning_commsgd.schedules",
        "lightning_commsgd.topology",
        "lightning_commsgd.samplers",
        "lightning_commsgd.redundancy",
        "lightning_commsgd.registry",
        "lightning_commsgd.named",
        "lightning_commsgd.internals",
        "lightning_commsgd.watchdog",
        "lightning_commsgd.ft",
    ],
)
def test_the_core_imports_where_lightning_is_not_installed(module):
    code = BLOCK_LIGHTNING + textwrap.dedent(
        f"""
        import {module}
        assert not any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules), sorted(
            m for m in sys.modules if m.startswith(("lightning.", "pytorch_lightning"))
        )
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_plain_pytorch_run_needs_no_lightning():
    """Without Lightning: the algorithm runs from a plain loop, and an adapter name says what it needs."""
    code = BLOCK_LIGHTNING + textwrap.dedent(
        """
        import torch
        import lightning_commsgd as lc
        from lightning_commsgd.algorithms.protocol import World

        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        algorithm = lc.LocalSGD(tau=2).build(model, [opt], lc.Communicator(), World(1))
        for _ in range(4):
            model(torch.ones(3, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            algorithm.after_optimizer_step()
        algorithm.finalize()
        assert algorithm.state_dict()["rounds"] == 2
        try:
            lc.LocalSGDStrategy
        except ImportError as error:
            assert "needs Lightning" in str(error), error
        else:
            raise AssertionError("LocalSGDStrategy imported without Lightning")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_package_ships_no_demo_models_or_data():
    """The examples' models and data live with the examples (examples/digits/model.py, data.py), not here."""
    assert not (PACKAGE / "models").exists() and not (PACKAGE / "data").exists()
