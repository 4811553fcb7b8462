"""Reference harness: one replica group of a torchft 0.2.0 DiLoCo / Streaming DiLoCo run.

Runs ONE replica group (one process, group world size 1) on CPU/gloo and records the
model parameters after every inner step.  Start two of these (group 0 and 1) against
one torchft Lighthouse -- see run_torchft_pair.py, which does all of that with timeouts.

torchft is not a dependency of lightning_commsgd; it is installed beside the venv with
    .venv/bin/pip install --no-deps --target .venv/torchft-ref torchft==0.2.0 ...
(see tests/reference/install_torchft_ref.sh) and put on PYTHONPATH by the launcher.

Deterministic setup (must be mirrored by diloco_simulation.py):
  * model  = Sequential(Linear(8,16), Tanh, Linear(16,4)) created after torch.manual_seed(0)
  * fragments: the Linear layers split into F contiguous groups (F in {1, 2})
  * data: group g, inner step s (0-based) uses gen = torch.Generator().manual_seed(1000*g + s);
          x = randn(16, 8, gen), y = randn(16, 4, gen); loss = mse_loss(model(x), y)
  * inner: SGD(lr=0.1, momentum=0.9) over all parameters
  * outer: SGD(lr=0.7, momentum=0.9, nesterov=True), one per fragment ("per_fragment", the
           default and what torchft's own tests use) or a single one over all parameters
           ("shared", the backward-compatible form DiLoCo also accepts)

Output (torch.save): dict with
  "config": the args, "initial": {name: tensor}, "params": [ {name: tensor} after inner step s ],
  "manager_step": [manager.current_step() after inner step s]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta

import torch
from torch import nn


def build_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def split_fragments(model: nn.Sequential, num_fragments: int) -> list[nn.Module]:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if not 1 <= num_fragments <= len(linears):
        raise ValueError(f"num_fragments must be in [1, {len(linears)}]")
    if num_fragments == 1:
        return [model]
    per = len(linears) // num_fragments
    bounds = [i * per for i in range(num_fragments)] + [len(linears)]
    return [nn.ModuleList(linears[bounds[i] : bounds[i + 1]]) for i in range(num_fragments)]


def batch(group: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * group + step)
    x = torch.randn(16, 8, generator=gen)
    y = torch.randn(16, 4, generator=gen)
    return x, y


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, required=True, help="replica group index (0-based)")
    ap.add_argument("--num-groups", type=int, default=2, help="number of replica groups (min_replica_size)")
    ap.add_argument("--lighthouse", required=True, help="lighthouse address, e.g. http://localhost:29510")
    ap.add_argument("--sync-every", type=int, default=4, help="H (inner steps between syncs of one fragment)")
    ap.add_argument("--fragments", type=int, default=1)
    ap.add_argument("--delay", type=int, default=0, help="fragment_sync_delay")
    ap.add_argument("--alpha", type=float, default=0.0, help="fragment_update_alpha")
    ap.add_argument("--quantize", action="store_true", help="should_quantize=True")
    ap.add_argument("--outer-mode", choices=["per_fragment", "shared"], default="per_fragment")
    ap.add_argument("--steps", type=int, default=12, help="number of inner steps")
    ap.add_argument("--init-sync", action="store_true", help="Manager(init_sync=True), torchft's default")
    ap.add_argument("--distinct-init", action="store_true", help="seed the model with the group index")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="torchft manager/pg timeouts")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("TORCHFT_REF_LOGLEVEL", "WARNING"))

    # Imported late so --help works without torchft on the path.
    from torch.distributed import TCPStore
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    torch.set_num_threads(1)
    model = build_model(args.group if args.distinct_init else 0)
    fragments = split_fragments(model, args.fragments)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if args.outer_mode == "per_fragment":
        outer: torch.optim.Optimizer | list[torch.optim.Optimizer] = [
            torch.optim.SGD(f.parameters(), lr=0.7, momentum=0.9, nesterov=True) for f in fragments
        ]
    else:
        outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])

    timeout = timedelta(seconds=args.timeout_s)
    # One process == one replica group of world size 1; it hosts its own TCPStore master.
    store = TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False, timeout=timeout)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=args.num_groups,
        use_async_quorum=False,  # DiLoCo refuses async quorum
        init_sync=args.init_sync,  # default False: identical seeds -> no step-0 weight sync/heal
        rank=0,
        world_size=1,
        store_addr="localhost",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"diloco_ref_{args.group}",
        port=0,
        hostname="localhost",
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
        max_retries=0,  # a failed commit is a harness failure, not something to retry
    )

    record: dict = {"config": vars(args), "initial": snapshot(model), "params": [], "manager_step": []}
    try:
        with DiLoCo(
            manager,
            fragments,
            inner,
            outer,
            sync_every=args.sync_every,
            backup_device=torch.device("cpu"),
            pin_memory=False,
            should_quantize=args.quantize,
            fragment_sync_delay=args.delay,
            fragment_update_alpha=args.alpha,
        ):
            for s in range(args.steps):
                x, y = batch(args.group, s)
                inner.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                inner.step()  # DiLoCo's post-step hook prepares/syncs fragments here
                if manager.errored() is not None:
                    raise RuntimeError(f"torchft reported an error at inner step {s}: {manager.errored()}")
                record["params"].append(snapshot(model))
                record["manager_step"].append(manager.current_step())
    finally:
        manager.shutdown(wait=False)

    tmp = args.out + ".tmp"
    torch.save(record, tmp)
    os.replace(tmp, args.out)
    print(f"group {args.group}: {args.steps} steps, manager_step={manager.current_step()} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
