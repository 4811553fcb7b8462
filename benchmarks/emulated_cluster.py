"""An emulated cluster on one machine: one network namespace per node, a veth pair per node into a
bridge, and ``tc ... tbf`` rate limiting on both ends of every link, so gloo traffic between "nodes"
crosses a link of the chosen bandwidth (measured here: ~11.4 MB/s of all-reduce payload at 100mbit).

Needs root (``ip netns``, ``ip link``, ``tc``); :func:`check_available` says what is missing and why. The two
tools are looked up on ``PATH``, then in the standard sbin folders (:data:`SBIN_DIRS`): a root shell whose
``PATH`` lacks them (``sudo`` without ``secure_path``, a minimal container) still finds them.
Every namespace, link and bridge it creates is removed when the ``with`` block ends, when the process
gets SIGINT/SIGTERM, or at interpreter exit, whichever comes first::

    with EmulatedCluster(nodes=2, rate="100mbit") as cluster:
        procs = [cluster.popen(i, [sys.executable, "train.py"], env=cluster.node_env(i)) for i in range(2)]
        ...
        cluster.interface_bytes(0)   # (rx, tx) bytes of node 0's link, from its /proc/net/dev
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

__all__ = [
    "SBIN_DIRS",
    "ClusterUnavailable",
    "EmulatedCluster",
    "check_available",
    "find_tool",
    "parse_proc_net_dev",
]

#: Where iproute2's ``ip`` and ``tc`` live when ``PATH`` does not list the folder.
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

_LIVE: set[EmulatedCluster] = set()


class ClusterUnavailable(RuntimeError):
    """The machine cannot emulate a cluster (no root, no ``ip``/``tc``, no network namespaces)."""


def find_tool(name: str) -> str | None:
    """The absolute path of ``name`` (``"ip"``, ``"tc"``): from ``PATH``, else from :data:`SBIN_DIRS`;
    ``None`` when it is in neither."""
    found = shutil.which(name)
    if found is not None:
        return os.path.abspath(found)
    return shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def _tool(name: str) -> str:
    """``name``'s path for a command line (the bare name when it cannot be found: the command then fails
    with the shell's own message)."""
    return find_tool(name) or name


def check_available() -> None:
    """Raise :class:`ClusterUnavailable` explaining what is missing; return quietly when all is there."""
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            "The emulated cluster needs root: it creates network namespaces, veth links and tc qdiscs. "
            "Run the benchmark as root (e.g. in a container with CAP_NET_ADMIN)."
        )
    for tool in ("ip", "tc"):
        if find_tool(tool) is None:
            raise ClusterUnavailable(
                f"`{tool}` (iproute2) is not installed: not on PATH nor in {', '.join(SBIN_DIRS)}; the "
                "emulated cluster needs it (e.g. `apt-get install iproute2`)."
            )
    probe = f"cprobe{uuid.uuid4().hex[:6]}"
    result = subprocess.run([_tool("ip"), "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterUnavailable(f"Cannot create a network namespace: {result.stderr.strip()}")
    subprocess.run([_tool("ip"), "netns", "del", probe], capture_output=True)


def parse_proc_net_dev(text: str, interface: str) -> tuple[int, int]:
    """``(rx_bytes, tx_bytes)`` of ``interface`` from the text of ``/proc/net/dev``."""
    for line in text.splitlines():
        name, sep, counters = line.partition(":")
        if sep and name.strip() == interface:
            fields = counters.split()
            return int(fields[0]), int(fields[8])
    raise KeyError(f"interface {interface!r} not in /proc/net/dev")


def _run(*args: str) -> None:
    """Run ``ip ...`` / ``tc ...`` (the tool found by :func:`find_tool`); raise with its stderr."""
    args = (_tool(args[0]), *args[1:]) if args[0] in ("ip", "tc") else args
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {result.stderr.strip()}")


class EmulatedCluster:
    """``nodes`` network namespaces joined by rate-limited links (see the module docstring).

    Args:
        nodes: number of emulated nodes (>= 2).
        rate: link bandwidth in ``tc`` syntax (``"100mbit"``, ``"1gbit"``); ``None`` for no limit.
        burst: the token bucket's burst (``tc tbf burst``).
        latency: the longest a packet may wait in the bucket (``tc tbf latency``).
        subnet: the first three octets of the nodes' addresses (node i is ``<subnet>.<i + 1>``).
    """

    def __init__(
        self,
        nodes: int = 2,
        rate: str | None = "100mbit",
        burst: str = "64kb",
        latency: str = "50ms",
        subnet: str = "10.77.0",
    ) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
            raise ValueError(f"Arg `nodes` must be an int >= 2, got {nodes!r}.")
        self.nodes, self.rate, self.burst, self.latency, self.subnet = nodes, rate, burst, latency, subnet
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"cbr{tag}"
        self.namespaces = [f"cnode{tag}{i}" for i in range(nodes)]
        self.host_links = [f"ch{tag}{i}" for i in range(nodes)]
        self.node_links = [f"cn{tag}{i}" for i in range(nodes)]
        self._up = False

    # -- set-up and tear-down -------------------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        check_available()
        _LIVE.add(self)
        _install_cleanup_handlers()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _create(self) -> None:
        self._up = True
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for i, (ns, host, node) in enumerate(zip(self.namespaces, self.host_links, self.node_links)):
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", node)
            _run("ip", "link", "set", node, "netns", ns)
            _run("ip", "link", "set", host, "master", self.bridge)
            _run("ip", "link", "set", host, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", node)
            _run("ip", "-n", ns, "link", "set", node, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.rate is not None:
                # both directions: the node's egress, and the bridge's egress towards the node
                shape = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]
                _run("tc", "qdisc", "add", "dev", host, *shape)
                _run("ip", "netns", "exec", ns, _tool("tc"), "qdisc", "add", "dev", node, *shape)

    def close(self) -> None:
        """Remove every namespace, link and the bridge (idempotent; errors ignored: best effort)."""
        if self._up:
            ip = _tool("ip")
            for ns, host in zip(self.namespaces, self.host_links):
                subprocess.run([ip, "link", "del", host], capture_output=True)
                subprocess.run([ip, "netns", "del", ns], capture_output=True)
            subprocess.run([ip, "link", "del", self.bridge], capture_output=True)
            self._up = False
        _LIVE.discard(self)

    def exists(self) -> bool:
        """Whether any of this cluster's namespaces still exists (for tests of the clean-up)."""
        listed = subprocess.run([_tool("ip"), "netns", "list"], capture_output=True, text=True).stdout
        return any(ns in listed for ns in self.namespaces)

    # -- using it -------------------------------------------------------------------------------------
    def address(self, node: int) -> str:
        """Node ``node``'s IP address."""
        return f"{self.subnet}.{node + 1}"

    def node_env(self, node: int, base: Mapping[str, str] | None = None, port: int = 29555) -> dict[str, str]:
        """Environment for a Lightning multi-node run on ``node`` (one process per node): the master is
        node 0, gloo binds to the node's link."""
        env = dict(os.environ if base is None else base)
        env.update(
            MASTER_ADDR=self.address(0),
            MASTER_PORT=str(port),
            NODE_RANK=str(node),
            WORLD_SIZE=str(self.nodes),
            LOCAL_RANK="0",
            GLOO_SOCKET_IFNAME=self.node_links[node],
        )
        return env

    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``node``'s namespace."""
        return [_tool("ip"), "netns", "exec", self.namespaces[node], *argv]

    def popen(self, node: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``node``'s namespace (``subprocess.Popen`` keyword arguments pass on)."""
        return subprocess.Popen(self.command(node, argv), **kwargs)

    def interface_bytes(self, node: int) -> tuple[int, int]:
        """``(rx, tx)`` bytes of ``node``'s link so far, from ``/proc/net/dev`` inside its namespace."""
        text = subprocess.run(
            self.command(node, ["cat", "/proc/net/dev"]), capture_output=True, text=True, check=True
        ).stdout
        return parse_proc_net_dev(text, self.node_links[node])


def _cleanup_all(*_: Any) -> None:
    for cluster in list(_LIVE):
        cluster.close()


_HANDLERS_INSTALLED = False


def _install_cleanup_handlers() -> None:
    """Close every live cluster at exit and on SIGINT/SIGTERM (then re-raise the signal's default)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_cleanup_all)
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
            _cleanup_all()
            if callable(previous):
                previous(sig, frame)
            else:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)
