"""The worker of ``test_torchft_parity.py``: our :class:`OuterStepAverager` on gloo processes with exactly the
model, data and optimizers of the torchft reference harness (``tests/reference/torchft_diloco_run.py``, whose
``build_model`` and ``batch`` are loaded here from its file, so both sides share one definition).

torchft itself is never imported here (it lives in ``.venv/torchft-ref``, seen only by the reference
subprocesses)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_commsgd.algorithms.diloco import OuterStepAverager
from lightning_commsgd.comm import Communicator

__all__ = ["HARNESS", "run_torchft_configs"]

HARNESS = Path(__file__).resolve().parent / "reference" / "torchft_diloco_run.py"


def _harness() -> Any:
    """``torchft_diloco_run`` loaded from its file (its torchft imports are inside ``main``), without putting
    ``tests/reference`` on ``sys.path`` (its ``diloco_simulation.py`` would shadow ``tests/``'s)."""
    spec = importlib.util.spec_from_file_location("_torchft_diloco_run_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fragments(num_fragments: int) -> int | list[list[str]]:
    """The harness's fragments (``split_fragments``: F contiguous groups of the Linear layers) as prefixes."""
    return 1 if num_fragments == 1 else [["0"], ["2"]]


def _count(counter: list[int], *_: Any) -> None:
    counter[0] += 1


def run_torchft_configs(rank: int, world_size: int, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each config ``{"sync_every", "fragments", "delay", "alpha", "steps"}``: the harness's model (rank r
    is torchft's replica group r), inner SGD(lr 0.1, momentum 0.9), outer SGD(lr 0.7, momentum 0.9, Nesterov)
    per fragment, ``steps`` inner steps and no ``finalize`` (torchft has none). Returns per config the
    parameters by name after every inner step and the number of outer steps run so far (torchft's manager
    step counts fragment syncs)."""
    torch.set_num_threads(1)
    harness = _harness()
    out = []
    for config in configs:
        model: nn.Sequential = harness.build_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        algorithm = OuterStepAverager(
            model,
            [inner],
            Communicator(),
            tau=config["sync_every"],
            outer_optimizer=functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True),
            fragments=_fragments(config["fragments"]),
            sync_delay=config["delay"],
            local_weight=config["alpha"],
            backup_device="cpu",
        )
        outer_steps = [0]  # torchft's manager step: one per fragment sync
        for opt in algorithm.outer_optimizers:
            opt.register_step_post_hook(functools.partial(_count, outer_steps))
        record: dict[str, Any] = {"initial": harness.snapshot(model), "params": [], "outer_steps": []}
        for s in range(config["steps"]):
            x, y = harness.batch(rank, s)
            inner.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            inner.step()
            algorithm.after_optimizer_step()
            record["params"].append(harness.snapshot(model))
            record["outer_steps"].append(outer_steps[0])
        # ours runs without torchft: nothing in this worker (our algorithm included) imported it
        record["torchft_imported"] = "torchft" in sys.modules
        out.append(record)
    return out
