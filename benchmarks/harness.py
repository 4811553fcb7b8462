"""Run ``examples/train_digits.py`` (or ``examples/synthetic_cnn.py``, which takes the same options) in a
subprocess and collect its JSON results.

Shared by ``examples/demo.py`` and the ``benchmarks/bench_*.py`` scripts so that all of them measure
runs the same way. Each call starts a fresh interpreter, which then launches its own ranks: no process
group, thread pool or allocator state leaks from one measured run into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BARE_TRAINER",
    "add_training_args",
    "CNN_SCRIPT",
    "REPO_ROOT",
    "TRAIN_SCRIPT",
    "TrainRunError",
    "format_bytes",
    "machine_description",
    "matplotlib_missing",
    "plots_note",
    "markdown_table",
    "run_example",
    "run_synthetic_cnn",
    "run_train_digits",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_digits.py"
CNN_SCRIPT = REPO_ROOT / "examples" / "synthetic_cnn.py"


# Trainer options of a measured run: nothing but the training steps (no logger, checkpoint, progress bar,
# summary or validation) so that timings measure the strategy, not Lightning's extras.
BARE_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


class TrainRunError(RuntimeError):
    """A ``train_digits.py`` (or ``synthetic_cnn.py``) run exited non-zero, timed out, or wrote no results."""


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    """Environment of the run: the repo root on ``PYTHONPATH`` so an uninstalled clone works too."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # One OpenMP thread per rank, matching torch.set_num_threads(1) in the script, so the ranks do
    # not fight over the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train_digits(
    args: Sequence[str],
    *,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
    stderr_tail_lines: int = 40,
) -> dict[str, Any]:
    """Run ``train_digits.py`` with ``args`` (``--json`` is added) and return the JSON rank 0 wrote.

    See :func:`run_example` for the arguments and errors.
    """
    return run_example(
        TRAIN_SCRIPT, args, timeout_s=timeout_s, workdir=workdir, stderr_tail_lines=stderr_tail_lines
    )


def run_synthetic_cnn(
    args: Sequence[str],
    *,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
    stderr_tail_lines: int = 40,
) -> dict[str, Any]:
    """Run ``synthetic_cnn.py`` (the small CNN on synthetic 32x32x3 images, same options and results as
    ``train_digits.py``) with ``args``; see :func:`run_example`."""
    return run_example(
        CNN_SCRIPT, args, timeout_s=timeout_s, workdir=workdir, stderr_tail_lines=stderr_tail_lines
    )


def run_example(
    script: Path,
    args: Sequence[str],
    *,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
    stderr_tail_lines: int = 40,
) -> dict[str, Any]:
    """Run a training ``script`` that takes ``train_digits.py``'s ``--json`` option with ``args`` (``--json``
    is added) and return the JSON its rank 0 wrote.

    Args:
        script: the script, e.g. :data:`TRAIN_SCRIPT` or :data:`CNN_SCRIPT`.
        args: command-line arguments for the script, e.g. ``["--strategy", "ddp", "--epochs", "3"]``.
        timeout_s: seconds before the whole run (every rank) is killed.
        workdir: directory for the JSON file and the run's working directory; a temporary directory
            (deleted afterwards) when ``None``.
        stderr_tail_lines: how many trailing lines of the run's stderr a failure message includes.

    Raises:
        TrainRunError: non-zero exit status, timeout, or no results file; the message holds the command
            and the tail of stderr.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="commsgd_run_") as tmp:
            return run_example(
                script, args, timeout_s=timeout_s, workdir=Path(tmp), stderr_tail_lines=stderr_tail_lines
            )

    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh name per run: rank 0 creates the file, so its existence afterwards proves the run got
    # that far, even when several runs share one workdir.
    json_path = workdir / f"result_{uuid.uuid4().hex}.json"
    cmd = [sys.executable, str(script), *args, "--json", str(json_path)]
    printable = " ".join(cmd)

    # A new session makes the run's ranks one process group: on timeout we kill all of them, not just
    # rank 0, whose orphaned peers would otherwise sit in a collective until gloo's own timeout.
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise TrainRunError(
            f"timed out after {timeout_s:.0f} s: {printable}\n--- stderr (tail) ---\n"
            f"{_tail(stderr, stderr_tail_lines)}"
        ) from None
    if proc.returncode != 0:
        raise TrainRunError(
            f"exit status {proc.returncode}: {printable}\n--- stderr (tail) ---\n"
            f"{_tail(stderr, stderr_tail_lines)}"
        )
    if not json_path.exists():
        raise TrainRunError(
            f"no results written to {json_path}: {printable}\n--- stderr (tail) ---\n"
            f"{_tail(stderr, stderr_tail_lines)}"
        )
    return json.loads(json_path.read_text())


def add_training_args(parser: argparse.ArgumentParser, *, devices: int, max_steps: int) -> None:
    """The options every benchmark passes on to ``train_digits.py`` (model, data, budget, repeats)."""
    parser.add_argument("--devices", type=int, default=devices, help="CPU processes per run")
    parser.add_argument("--hidden", type=int, default=512, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (constant)")
    parser.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps per run")
    parser.add_argument(
        "--repeat-data",
        type=int,
        default=16,
        help="repeat the training set per epoch (train_digits --repeat), so the step budget binds",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by all runs")


def format_bytes(num_bytes: float) -> str:
    """Human-readable size in decimal units (``1 MB = 10**6 B``), e.g. ``"12.35 MB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are converted with ``str``."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    """One line for a results file: platform, CPU count, Python and torch versions."""
    import torch  # only for the version; the measured runs import it in their own processes

    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" torch {torch.__version__}"
    )


def matplotlib_missing(script: str, plots: bool) -> bool:
    """True (after telling the user on stderr) when plots are wanted and matplotlib is not installed."""
    import importlib.util

    if plots and importlib.util.find_spec("matplotlib") is None:
        print(
            f"{script}: the plots need matplotlib: pip install -e '.[examples]' (or pass --no-plots for the"
            " tables alone)",
            file=sys.stderr,
        )
        return True
    return False


def plots_note(plots: Sequence[Path]) -> list[str]:
    """The results file's line naming the PNGs next to it (none when there are none)."""
    if not plots:
        return []
    return ["", "Plots (regenerated, not tracked): " + ", ".join(f"`{path.name}`" for path in plots)]
