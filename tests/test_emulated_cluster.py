"""The emulated cluster of the benchmarks: /proc/net/dev parsing, bad input, and (as root) a rate-limited
gloo all-reduce between two network namespaces, with every namespace gone afterwards, also when the
owning process is killed by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

# the repository root is on the path in-process (pytest's pythonpath in pyproject.toml)
from benchmarks import emulated_cluster
from benchmarks.emulated_cluster import (
    SBIN_DIRS,
    ClusterUnavailable,
    EmulatedCluster,
    check_available,
    find_tool,
    parse_proc_net_dev,
)

PROC_NET_DEV = "\n".join(
    [
        "Inter-|   Receive                            |  Transmit",
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop",
        "    lo:    1200      10    0    0    0     0          0         0     1200      10    0    0",
        "cnab12340: 20795992   11995    0    0    0     0          0         0 20858518   12957    0    0",
    ]
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def require_emulated_cluster() -> None:
    """Skip the calling test, with the reason, when this machine cannot emulate a cluster (not root, no
    ``ip``/``tc`` on PATH or in the sbin folders, no network namespaces): a slim container without iproute2
    must skip these tests under ``make test``, not fail them."""
    try:
        check_available()
    except ClusterUnavailable as err:
        pytest.skip(f"cannot emulate a cluster here: {err}")


def test_parse_proc_net_dev():
    assert parse_proc_net_dev(PROC_NET_DEV, "cnab12340") == (20795992, 20858518)
    assert parse_proc_net_dev(PROC_NET_DEV, "lo") == (1200, 1200)
    with pytest.raises(KeyError, match="eth9"):
        parse_proc_net_dev(PROC_NET_DEV, "eth9")


def test_bad_node_count():
    with pytest.raises(ValueError, match="nodes"):
        EmulatedCluster(nodes=1)


def test_tools_are_found_in_the_sbin_folders_when_path_lacks_them(monkeypatch):
    """A root shell whose PATH has no sbin folder (``sudo`` without ``secure_path``, a minimal container):
    ``ip`` and ``tc`` are still found where iproute2 installs them."""
    in_sbin = {t: [d for d in SBIN_DIRS if os.access(os.path.join(d, t), os.X_OK)] for t in ("ip", "tc")}
    if not all(in_sbin.values()):
        pytest.skip(f"iproute2 is not installed in {SBIN_DIRS} here")
    stripped = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and "sbin" not in d]
    monkeypatch.setenv("PATH", os.pathsep.join(stripped))
    for tool, folders in in_sbin.items():
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in stripped):  # really off PATH now
            assert find_tool(tool) == os.path.join(folders[0], tool)
    if os.geteuid() == 0:
        check_available()  # the whole probe (a namespace added and removed) runs with that PATH


def test_missing_tc_is_reported_and_the_cluster_tests_skip_with_the_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # as root: the tool is the only thing missing
    monkeypatch.setattr(emulated_cluster, "find_tool", lambda name: None if name == "tc" else f"/sbin/{name}")
    missing = r"`tc` \(iproute2\) is not installed: not on PATH nor in /usr/sbin, /sbin, /usr/local/sbin"
    with pytest.raises(ClusterUnavailable, match=missing):
        check_available()
    with pytest.raises(pytest.skip.Exception, match=f"cannot emulate a cluster here: {missing}"):
        require_emulated_cluster()


@root_only
@pytest.mark.multiprocess
def test_rate_limited_allreduce_between_namespaces_and_cleanup():
    require_emulated_cluster()
    script = str(REPO_ROOT / "tests" / "netns_allreduce.py")
    with EmulatedCluster(nodes=2, rate="100mbit") as cluster:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            cluster.popen(
                i,
                [sys.executable, script, str(i), "2", cluster.address(0)],
                env={**env, "GLOO_SOCKET_IFNAME": cluster.node_links[i]},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        seconds = [float(out.split()[0]) for out, _ in outputs]
        assert all(float(out.split()[1]) == 2.0 for out, _ in outputs)
        # 4 MB each way through a 100 Mbit/s (12.5 MB/s) link takes >= ~0.3 s; loopback is ~100x faster
        assert min(seconds) > 0.25, seconds
        rx, tx = cluster.interface_bytes(0)
        assert rx > 4_000_000 and tx > 4_000_000  # the payload crossed node 0's link, counted by the kernel
    assert not cluster.exists()


@root_only
def test_namespaces_are_removed_when_the_owner_gets_sigterm():
    require_emulated_cluster()
    code = (
        "import time\n"
        "from benchmarks.emulated_cluster import EmulatedCluster\n"
        "c = EmulatedCluster(nodes=2).__enter__()\n"
        "print(' '.join(c.namespaces), flush=True)\n"
        "time.sleep(60)\n"
    )
    # run from the repository root: a -c program has the working directory first on its path
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    listed = subprocess.run([find_tool("ip") or "ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n in listed for n in names)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    time.sleep(0.2)
    listed = subprocess.run([find_tool("ip") or "ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
