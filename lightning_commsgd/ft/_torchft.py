"""The one place that imports torchft, the optional engine under replica groups (``pip install
lightning_commsgd[ft]``): a missing install fails with the command that fixes it, not a bare ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["TORCHFT_VERSION", "require_torchft"]

#: the torchft release the replica groups are verified on
TORCHFT_VERSION = "0.2.0"


def require_torchft(module: str = "torchft") -> ModuleType:
    """Import ``module`` (``"torchft"``, ``"torchft.manager"``, ...), or raise an ImportError that says how
    to install the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"Replica groups need torchft {TORCHFT_VERSION} ({module} failed to import: {err}). Install the "
            "extra: pip install 'lightning_commsgd[ft]'."
        ) from err
