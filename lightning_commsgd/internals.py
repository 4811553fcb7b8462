"""Every private name of torch and Lightning this package relies on, in one place.

Each entry says which versions it was verified on and what happens where the name is missing: a loud
``RuntimeError`` naming the Lightning/torch version when running on would silently change behaviour, or
a documented no-op (with a warning where useful) where skipping it is safe. Nothing here imports Lightning
at module level, so the pure layer (``comm``, ``watchdog``) can use the torch part where Lightning is not
installed.

torch (verified on 2.13.0 and 2.14.1):

- ``torch.distributed.distributed_c10d._set_pg_timeout``: :func:`set_group_timeout`. Missing: warns, the
  group keeps its own timeout (safe: collectives still end, later).
- ``torch.distributed.distributed_c10d._get_default_store``: :func:`default_store`. Missing: RuntimeError.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.distributed_c10d as c10d

__all__ = ["default_store", "set_group_timeout"]


def set_group_timeout(group: Any, seconds: float) -> None:
    """Bound every later operation of ``group`` by ``seconds`` (torch's private ``_set_pg_timeout``, the only
    way to shorten a group's timeout after its rendezvous; warns where it is missing)."""
    setter = getattr(c10d, "_set_pg_timeout", None)
    try:
        if setter is None:
            raise AttributeError("torch.distributed has no _set_pg_timeout")
        setter(timedelta(seconds=seconds), group)
    except (AttributeError, RuntimeError, ValueError) as error:  # an older torch, or a backend without it
        warnings.warn(
            f"The collective timeout of {seconds:g} s could not be set ({error}): collectives keep the "
            "process group's own timeout (the strategy's `timeout`).",
            stacklevel=3,
        )


def default_store() -> Any:
    """The key-value store of the default process group (torch's private ``_get_default_store``)."""
    getter = getattr(c10d, "_get_default_store", None)
    if getter is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.distributed.distributed_c10d._get_default_store, which "
            "lightning_commsgd's failure watchdog needs; use torch 2.13 - 2.14."
        )
    return getter()
