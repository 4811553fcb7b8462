"""Launch a torchft Lighthouse plus two replica groups of torchft_diloco_run.py and wait.

Everything is bounded: each group gets --timeout-s of wall time (then it and its
process group are killed) and the torchft collectives/quorum time out after
--torchft-timeout-s.  Exit status is 0 only if both groups exit 0 and wrote their file.

Example (from the repo root):
    .venv/bin/python tests/reference/run_torchft_pair.py --out-dir /tmp/ref_h4 \
        --sync-every 4 --fragments 2 --delay 1 --alpha 0.5 --steps 12

torchft is looked up on --torchft-path (default .venv/torchft-ref, see
install_torchft_ref.sh); it is prepended to PYTHONPATH for this process and the children.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--torchft-path", default=str(REPO / ".venv" / "torchft-ref"))
    ap.add_argument("--timeout-s", type=float, default=120.0, help="wall-clock limit for the pair")
    ap.add_argument("--torchft-timeout-s", type=float, default=30.0)
    ap.add_argument("--sync-every", type=int, default=4)
    ap.add_argument("--fragments", type=int, default=1)
    ap.add_argument("--delay", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--quantize", action="store_true")
    ap.add_argument("--outer-mode", choices=["per_fragment", "shared"], default="per_fragment")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--init-sync", action="store_true", help="Manager(init_sync=True)")
    ap.add_argument("--distinct-init", action="store_true", help="model seeded with the group index")
    args = ap.parse_args(argv)

    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust lighthouse/manager logging
    sys.path.insert(0, args.torchft_path)
    from torchft._torchft import LighthouseServer

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [args.torchft_path, env.get("PYTHONPATH", "")] if p)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHFT_USE_OTEL", "false")

    # min_replicas=2: the first quorum waits for both groups; both heartbeat, so it
    # forms as soon as both have joined.
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=10_000)
    addr = lighthouse.address()
    procs: list[tuple[subprocess.Popen, Path, Path]] = []
    rc = 0
    try:
        for g in range(2):
            out = out_dir / f"group{g}.pt"
            log = out_dir / f"group{g}.log"
            if out.exists():
                out.unlink()
            cmd = [
                sys.executable, str(HERE / "torchft_diloco_run.py"),
                "--group", str(g), "--num-groups", "2", "--lighthouse", addr,
                "--sync-every", str(args.sync_every), "--fragments", str(args.fragments),
                "--delay", str(args.delay), "--alpha", str(args.alpha),
                "--outer-mode", args.outer_mode, "--steps", str(args.steps),
                "--timeout-s", str(args.torchft_timeout_s), "--out", str(out),
            ]  # fmt: skip
            for flag in ("quantize", "init_sync", "distinct_init"):
                if getattr(args, flag):
                    cmd.append("--" + flag.replace("_", "-"))
            logf = open(log, "w")
            p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            logf.close()
            procs.append((p, out, log))

        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p, _, _ in procs):
            # fail fast: if one group died, the other would only wait for its timeout
            if any(p.poll() not in (None, 0) for p, _, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = 1
        lighthouse.shutdown()

    for g, (p, out, log) in enumerate(procs):
        ok = p.returncode == 0 and out.exists()
        print(f"group {g}: rc={p.returncode} out={'ok' if out.exists() else 'missing'} log={log}")
        if not ok:
            rc = 1
            sys.stdout.write("".join(log.read_text().splitlines(True)[-30:]))
    return rc


if __name__ == "__main__":
    sys.exit(main())
