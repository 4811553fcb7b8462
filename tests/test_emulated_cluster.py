"""The emulated cluster of the benchmarks: /proc/net/dev parsing, bad input, and (as root) a rate-limited
gloo all-reduce between two network namespaces, with every namespace gone afterwards, also when the
owning process is killed by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.emulated_cluster import EmulatedCluster, parse_proc_net_dev  # noqa: E402

PROC_NET_DEV = "\n".join(
    [
        "Inter-|   Receive                            |  Transmit",
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop",
        "    lo:    1200      10    0    0    0     0          0         0     1200      10    0    0",
        "cnab12340: 20795992   11995    0    0    0     0          0         0 20858518   12957    0    0",
    ]
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_parse_proc_net_dev():
    assert parse_proc_net_dev(PROC_NET_DEV, "cnab12340") == (20795992, 20858518)
    assert parse_proc_net_dev(PROC_NET_DEV, "lo") == (1200, 1200)
    with pytest.raises(KeyError, match="eth9"):
        parse_proc_net_dev(PROC_NET_DEV, "eth9")


def test_bad_node_count():
    with pytest.raises(ValueError, match="nodes"):
        EmulatedCluster(nodes=1)


@root_only
@pytest.mark.multiprocess
def test_rate_limited_allreduce_between_namespaces_and_cleanup():
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
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from benchmarks.emulated_cluster import EmulatedCluster\n"
        "c = EmulatedCluster(nodes=2).__enter__()\n"
        "print(' '.join(c.namespaces), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n in listed for n in names)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    time.sleep(0.2)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
