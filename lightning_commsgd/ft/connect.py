"""A replica group's connection to the others: its torchft ``Manager`` (quorums through the Lighthouse,
collectives between groups on a gloo group torchft reconfigures per quorum, and the HTTP server a healing
peer fetches state from), and a Lighthouse for jobs that start their own.

Settings are checked before anything connects, with errors that name the argument.
"""

from __future__ import annotations

import math
import os
import socket
import urllib.parse
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_commsgd.ft._torchft import require_torchft
from lightning_commsgd.ft.quorum import QuorumUnavailableError

__all__ = ["GroupConnection", "ReplicaGroupSettings", "start_lighthouse"]


@dataclass(frozen=True)
class ReplicaGroupSettings:
    """Where a replica group meets the others, checked when built.

    Attributes:
        lighthouse: the Lighthouse's address, ``"http://host:port"``.
        group: this group's index, an int >= 0 (distinct per group; a restarted group keeps its index).
        min_groups: the fewest live groups a round may run with (torchft's ``min_replica_size``).
        timeout: seconds for one collective between groups, a commit, or fetching a peer's state.
        quorum_timeout: seconds a quorum may take to form (a round waits this long for the Lighthouse and the
            other groups; longer than the time between rounds, or a slow group is dropped).
        hostname: the address the other groups reach this group at (its key-value store, its manager and the
            server a healing peer fetches state from); ``None``: this machine's host name.
    """

    lighthouse: str
    group: int
    min_groups: int = 1
    timeout: float = 60.0
    quorum_timeout: float = 300.0
    hostname: str | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> ReplicaGroupSettings:
        """Settings from the environment, as torchft's launchers set it: the Lighthouse from
        ``TORCHFT_LIGHTHOUSE``, the group index from ``REPLICA_GROUP_ID``; ``overrides`` win (e.g.
        ``min_groups=2``). A missing variable is a ValueError naming it."""
        values: dict[str, Any] = {}
        for field, variable, convert in (
            ("lighthouse", "TORCHFT_LIGHTHOUSE", str),
            ("group", "REPLICA_GROUP_ID", int),
        ):
            if field in overrides:
                continue
            raw = os.environ.get(variable)
            if raw is None:
                raise ValueError(
                    f"Replica group settings: set `{field}` or the environment variable {variable}."
                )
            try:
                values[field] = convert(raw)
            except ValueError as err:
                raise ValueError(f"{variable} must be an int >= 0, got {raw!r}.") from err
        return cls(**{**values, **overrides})

    def __post_init__(self) -> None:
        if not isinstance(self.lighthouse, str) or not self.lighthouse.startswith(("http://", "https://")):
            raise ValueError(
                f"Arg `lighthouse` must be an address 'http://host:port', got {self.lighthouse!r}."
            )
        for name, low in (("group", 0), ("min_groups", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Arg `{name}` must be an int >= {low}, got {value!r}.")
        if self.hostname is not None and (not isinstance(self.hostname, str) or not self.hostname):
            raise ValueError(
                f"Arg `hostname` must be a non-empty host name or address, got {self.hostname!r}."
            )
        for name in ("timeout", "quorum_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"Arg `{name}` must be a number of seconds > 0, got {value!r}.")


class GroupConnection:
    """This process's torchft ``Manager`` for its group (``rank`` of ``world_size`` processes in the group).

    A one-process group (the default) hosts its own key-value store; the processes of a larger group share
    one at ``store_addr:store_port`` (:func:`host_group_store` on the group's rank 0, whose ``store`` this
    object then keeps). Every address this group hands to the others uses ``settings.hostname``. Keep this
    object alive while the group runs: it owns the group's store, which the other groups connect to.
    """

    def __init__(
        self,
        settings: ReplicaGroupSettings,
        *,
        rank: int = 0,
        world_size: int = 1,
        store_addr: str | None = None,
        store_port: int | None = None,
        store: Any = None,
    ) -> None:
        manager_module = require_torchft("torchft.manager")
        process_group = require_torchft("torchft.process_group")
        checkpointing = require_torchft("torchft.checkpointing")
        self.settings = settings
        hostname = advertised_hostname(settings)
        timeout = timedelta(seconds=settings.timeout)
        self.store: Any = store
        if store_addr is None:
            if world_size != 1:
                raise ValueError(
                    "Args `store_addr` / `store_port` are needed for a group of several processes."
                )
            self.store = host_group_store(settings)
            store_addr, store_port = hostname, self.store.port
        options: dict[str, Any] = {
            "load_state_dict": None,  # the group's algorithm registers its own (GroupOuterStep.register_with)
            "state_dict": None,
            "min_replica_size": settings.min_groups,
            "use_async_quorum": False,  # a round needs its quorum (and any healing) before it sends
            "timeout": timeout,
            "quorum_timeout": timedelta(seconds=settings.quorum_timeout),
            "connect_timeout": timeout,
            "rank": rank,
            "world_size": world_size,
            "store_addr": store_addr,
            "store_port": store_port,
            "lighthouse_addr": settings.lighthouse,
            "replica_id": f"commsgd_group_{settings.group}",  # torchft reads the group index from the digits
            "port": 0,
            "hostname": hostname,
            "init_sync": False,  # the groups start from the same seeded model; a late one heals instead
            "max_retries": None,  # the rounds count their own attempts
            "checkpoint_transport": _advertised_transport(checkpointing.HTTPTransport, hostname, timeout),
        }
        try:
            self.manager = manager_module.Manager(
                pg=process_group.ProcessGroupGloo(timeout=timeout), **options
            )
        except (
            RuntimeError
        ) as err:  # torchft's servers raise RuntimeError when the Lighthouse does not answer
            raise QuorumUnavailableError(
                f"Replica group {settings.group} cannot reach the Lighthouse at {settings.lighthouse} within "
                f"{settings.timeout:g} s (is it running, and is the address right?): {err}"
            ) from err

    def close(self) -> None:
        """Shut the manager's servers and threads down."""
        self.manager.shutdown(wait=False)


def advertised_hostname(settings: ReplicaGroupSettings) -> str:
    """The address the other groups reach this group at: ``settings.hostname``, else this machine's name."""
    return settings.hostname or socket.gethostname()


def host_group_store(settings: ReplicaGroupSettings) -> Any:
    """A new key-value store for this group (a TCPStore on a free port of :func:`advertised_hostname`): the
    group's processes and the torchft managers of the other groups connect to it."""
    torch_dist = require_torchft("torch.distributed")
    return torch_dist.TCPStore(
        host_name=advertised_hostname(settings),
        port=0,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=settings.timeout),
    )


def _advertised_transport(http_transport: type, hostname: str, timeout: timedelta) -> Any:
    """torchft's HTTP checkpoint transport (what a healing peer fetches this group's state from), advertising
    ``hostname`` instead of ``socket.gethostname()``, which other machines or network namespaces may not
    resolve to this one."""

    class AdvertisedHTTPTransport(http_transport):  # type: ignore[misc, valid-type]
        def address(self) -> str:
            url = urllib.parse.urlsplit(super().address())
            return url._replace(netloc=f"{hostname}:{url.port}").geturl()

    return AdvertisedHTTPTransport(timeout=timeout, num_chunks=0)


def start_lighthouse(
    port: int = 0,
    *,
    min_groups: int = 1,
    join_timeout_ms: int = 1000,
    heartbeat_timeout_ms: int = 5000,
    bind_host: str = "[::]",
) -> Any:
    """Start a torchft Lighthouse in this process (``.address()`` gives what the groups connect to;
    ``.shutdown()`` stops it).

    Args:
        port: the port to listen on (0: any free one).
        min_groups: the fewest groups a quorum may have.
        join_timeout_ms: how long a quorum waits for groups beyond the minimum to join.
        heartbeat_timeout_ms: a group silent this long is taken for dead and left out of the next quorum.
        bind_host: the address to listen on (``"[::]"``: every interface).
    """
    for name, value, low in (
        ("port", port, 0),
        ("min_groups", min_groups, 1),
        ("join_timeout_ms", join_timeout_ms, 0),
        ("heartbeat_timeout_ms", heartbeat_timeout_ms, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Arg `{name}` must be an int >= {low}, got {value!r}.")
    coordination = require_torchft("torchft.coordination")  # the public re-export
    return coordination.LighthouseServer(
        bind=f"{bind_host}:{port}",
        min_replicas=min_groups,
        join_timeout_ms=join_timeout_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )
