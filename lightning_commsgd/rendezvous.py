"""The process group's rendezvous, bounded and with a message that names the ranks that did not come.

torch's ``env://`` rendezvous (what Lightning's ``_init_dist_connection`` uses) waits for every rank for the
process-group timeout, 30 minutes by default, and then says only "1/2 clients joined": when one rank dies
before the group forms (a SLURM task that fails at import, a node that never starts), the others sit idle
for half an hour without saying who is missing. :func:`init_process_group` forms the same default group
(same store, same ``default_pg`` prefix, so everything built on ``torch.distributed`` works as before) in
three bounded steps:

1. every rank but the store's host waits for the store's port (``MASTER_ADDR:MASTER_PORT``) to accept
   connections; rank 0 hosts the store (or torchrun's agent does, when the workers share it);
2. every rank checks in under its rank number (key ``lightning_commsgd/rendezvous/<restart>/<rank>``, the
   value its host name and process id), then waits for every other rank's key;
3. ``torch.distributed.init_process_group`` on that store: every rank is known to be alive, so this is
   quick.

The three share one deadline, ``timeout`` seconds after the start. When it passes, every waiting rank raises
:class:`RendezvousError` naming the missing ranks (or the unreachable store's host), e.g. ``rank 0: the
process group did not form within 30 s: rank(s) [1] of 2 never joined``.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["RendezvousError", "init_process_group"]

_PREFIX = "lightning_commsgd/rendezvous"


class RendezvousError(RuntimeError):
    """The default process group did not form in time; the message names the ranks that did not join."""


def init_process_group(
    backend: str,
    *,
    address: str,
    port: int,
    rank: int,
    world_size: int,
    timeout: float,
    device_id: Any = None,
) -> None:
    """Form the default process group of ``world_size`` ranks with ``rank`` as this process's rank, waiting at
    most ``timeout`` seconds for the others (see the module docstring). The group's own timeout is
    ``timeout`` too (the strategies set ``sync_timeout`` on it afterwards).

    Raises:
        RendezvousError: the store's host could not be reached, or some ranks did not check in, within
            ``timeout`` seconds; the message names them.
    """
    deadline = time.monotonic() + timeout
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts_store = rank == 0 and not agent_store
    if not hosts_store:
        _wait_for_port(address, port, deadline, rank, timeout, agent_store)
    remaining = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
    store = dist.TCPStore(
        host_name=address,
        port=port,
        world_size=world_size,
        is_master=hosts_store,
        timeout=remaining,
        wait_for_workers=False,  # the check-in below waits, and knows who is missing
        multi_tenant=not agent_store,
    )
    _check_in(store, rank, world_size, deadline, timeout, f"{address}:{port}")
    store.set_timeout(timedelta(seconds=timeout))
    kwargs: dict[str, Any] = {"device_id": device_id} if device_id is not None else {}
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("default_pg", store),  # as torch's own env:// path does
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
        **kwargs,
    )


def _wait_for_port(address: str, port: int, deadline: float, rank: int, timeout: float, agent: bool) -> None:
    """Until ``deadline``, try to open a TCP connection to the store (closed at once)."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                host = "torchrun's agent on node 0" if agent else "rank 0"
                raise RendezvousError(
                    f"rank {rank}: the process group did not form within {timeout:g} s: the rendezvous store "
                    f"at {address}:{port}, hosted by {host}, never accepted a connection ({error}); {host} "
                    "did not start, or failed before the process group formed (look at its output), starts "
                    "later than this bound (raise the strategy's `rendezvous_timeout`), or MASTER_ADDR / "
                    "MASTER_PORT point elsewhere."
                ) from error
            time.sleep(0.2)


def _check_in(store: Any, rank: int, world_size: int, deadline: float, timeout: float, where: str) -> None:
    """Publish this rank under its number and wait until every rank did, or raise naming the missing ones."""
    prefix = f"{_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    keys = [f"{prefix}/{r}" for r in range(world_size)]
    store.set(keys[rank], f"{socket.gethostname()} pid {os.getpid()}")
    try:
        store.wait(keys, timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        return
    except Exception as error:  # DistStoreError (timeout) or a network error (the store's host died)
        cause = error
    try:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
    except Exception as error:
        raise RendezvousError(
            f"rank {rank}: the process group did not form within {timeout:g} s: the rendezvous store at "
            f"{where} (rank 0 or torchrun's agent) went away during the rendezvous ({error})."
        ) from cause
    if not missing:  # the last one came just as the wait ended
        return
    joined = [r for r in range(world_size) if r not in missing]
    raise RendezvousError(
        f"rank {rank}: the process group did not form within {timeout:g} s: rank(s) {missing} of "
        f"{world_size} never joined the rendezvous at {where} (ranks {joined} did). Their processes failed "
        "before the Trainer started (an import error, a crash at start: look at their output), never "
        "started, or start later than this bound (raise the strategy's `rendezvous_timeout`)."
    ) from cause
