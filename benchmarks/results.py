"""How the benchmarks report: markdown tables, human-readable byte counts, JSON without NaN, the one-line
machine description every results file carries, and the plots' optional matplotlib."""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "format_bytes",
    "json_safe",
    "machine_description",
    "markdown_table",
    "matplotlib_missing",
    "plots_note",
]


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


def json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) with ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
