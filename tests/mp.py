"""Run a worker function on N gloo CPU processes, and count the ``torch.distributed`` calls a worker makes.

``run_workers(fn, world_size, out_dir, *args)`` spawns ``world_size`` processes; each one sets
``torch.set_num_threads(1)``, joins a gloo process group over ``tcp://127.0.0.1:<free port>`` (60 s
timeout), calls ``fn(rank, world_size, *args)``, writes the return value with ``torch.save`` into
``out_dir`` and destroys the group. The helper returns the loaded values as a list indexed by rank.

``fn`` must live in an importable module (``spawn`` pickles it by name), e.g. ``tests/mp_workers.py``;
the tests directory is on ``sys.path`` in the children because ``spawn`` hands the parent's path over.

``CountingPatch`` replaces, while active, every collective / point-to-point function *attribute* of the
``torch.distributed`` module with a wrapper that records ``(label, function name, payload bytes)``,
``label`` being whatever the worker last assigned to ``patch.label`` (e.g. the optimizer step).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

__all__ = ["CALL_NAMES", "CountingPatch", "free_port", "run_workers"]

# The functions patched, and which argument carries the payload ("" = none, e.g. barrier / objects).
_PAYLOAD_ARG: dict[str, str] = {
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "all_gather": "tensor",
    "gather": "tensor",
    "scatter": "tensor",
    "reduce": "tensor",
    "barrier": "",
    "send": "tensor",
    "recv": "tensor",
    "isend": "tensor",
    "irecv": "tensor",
    "batch_isend_irecv": "p2p_op_list",
    "all_gather_object": "",
    "broadcast_object_list": "",
    "gather_object": "",
    "all_to_all": "input_tensor_list",
    "all_to_all_single": "input",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "all_gather_into_tensor": "input_tensor",
}
CALL_NAMES: tuple[str, ...] = tuple(_PAYLOAD_ARG)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dist.P2POp):
        return _nbytes(value.tensor)
    return 0


class CountingPatch:
    """Context manager recording every ``torch.distributed`` collective / p2p call as
    ``(label, name, payload_bytes)`` in :attr:`calls` (``payload_bytes`` is ``None`` for object calls)."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        # skip: functions to leave alone, e.g. isend/irecv, which P2POp checks by identity
        self._skip = skip
        self.label: Any = None
        self.calls: list[tuple[Any, str, int | None]] = []
        self._originals: dict[str, Callable[..., Any]] = {}

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        import inspect

        signature = inspect.signature(original)
        arg = _PAYLOAD_ARG[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            payload: int | None = None
            if arg:
                bound = signature.bind(*args, **kwargs)
                payload = _nbytes(bound.arguments.get(arg))
            elif name == "barrier":
                payload = 0
            self.calls.append((self.label, name, payload))
            return original(*args, **kwargs)

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    def __enter__(self) -> CountingPatch:
        for name in CALL_NAMES:
            original = None if name in self._skip else getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def by_label(self, label: Any) -> list[tuple[str, int | None]]:
        """``(name, payload_bytes)`` of the calls made under ``label``, in call order."""
        return [(name, nbytes) for lab, name, nbytes in self.calls if lab == label]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int, out_dir: str | os.PathLike, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return their results by rank."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    torch_mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
