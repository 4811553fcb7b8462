"""Single-process, plain-torch simulation of torchft 0.2.0 DiLoCo / Streaming DiLoCo.

Mirrors torchft/local_sgd.py (DiLoCo._step_post_hook, _StreamingDiLoCoFragment.prepare_sync /
perform_sync) for R replica groups in lockstep, with the all-reduce replaced by
sum(pseudo_grads) / R (torchft: gloo SUM, then `tensor /= num_participants`).
No torchft import: this is the "what we believe torchft computes" model.

    .venv/bin/python tests/reference/diloco_simulation.py --compare /tmp/ref/h4_f1 \
        --sync-every 4 --fragments 1 --steps 12
compares against the files written by run_torchft_pair.py (group0.pt, group1.pt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchft_diloco_run import batch, build_model, snapshot, split_fragments  # noqa: E402


def simulate(H, F, d=0, alpha=0.0, steps=12, outer_mode="per_fragment", replicas=2):
    K = H // F  # DiLoCo._sync_every: one fragment is synced every H/F inner steps
    assert H % F == 0 and d < K and 0.0 <= alpha <= 1.0
    models = [build_model() for _ in range(replicas)]
    frags = [[list(f.parameters()) for f in split_fragments(m, F)] for m in models]
    inner = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    mk = lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)  # noqa: E731
    outer = [
        [mk(fr) for fr in frags[r]] if outer_mode == "per_fragment" else [mk(models[r].parameters())] * F
        for r in range(replicas)
    ]
    anchor = [[[p.detach().clone() for p in fr] for fr in frags[r]] for r in range(replicas)]  # backup copy
    local_step, manager_step, avg = 0, 0, None
    recs = [{"initial": snapshot(m), "params": [], "manager_step": []} for m in models]
    for s in range(steps):
        for r, m in enumerate(models):
            x, y = batch(r, s)
            inner[r].zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            inner[r].step()
        local_step += 1
        f = manager_step % F  # DiLoCo._current_fragment
        with torch.no_grad():
            if local_step == K - d:  # prepare_sync: pseudo-grad = anchor - local, "all-reduce" now
                pg = [[a - p for a, p in zip(anchor[r][f], frags[r][f])] for r in range(replicas)]
                avg = [sum(g[i] for g in pg) / replicas for i in range(len(pg[0]))]
            if local_step == K:  # perform_sync
                for r in range(replicas):
                    local = [p.detach().clone() for p in frags[r][f]]  # local params at APPLY time
                    for p, a, g in zip(frags[r][f], anchor[r][f], avg):
                        p.copy_(a)  # restore_parameters
                        p.grad = g.clone()  # _set_grads (other fragments keep their inner .grad!)
                    outer[r][f].step()
                    anchor[r][f] = [p.detach().clone() for p in frags[r][f]]  # save_parameters
                    for p, lp in zip(frags[r][f], local):
                        p.lerp_(lp, alpha)  # _merge_parameters: (1-alpha)*global + alpha*local
                    outer[r][f].zero_grad()
                manager_step += 1  # should_commit() -> True
                local_step = 0
        for r, m in enumerate(models):
            recs[r]["params"].append(snapshot(m))
            recs[r]["manager_step"].append(manager_step)
    return recs


def max_abs_diff(rec_a, rec_b):
    assert len(rec_a["params"]) == len(rec_b["params"])
    worst = 0.0
    for pa, pb in zip(rec_a["params"], rec_b["params"]):
        assert pa.keys() == pb.keys()
        for name in pa:
            worst = max(worst, (pa[name] - pb[name]).abs().max().item())
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", required=True, help="dir with group0.pt/group1.pt from run_torchft_pair.py")
    ap.add_argument("--sync-every", type=int, default=4)
    ap.add_argument("--fragments", type=int, default=1)
    ap.add_argument("--delay", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--outer-mode", choices=["per_fragment", "shared"], default="per_fragment")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tol", type=float, default=0.0)
    a = ap.parse_args(argv)
    sim = simulate(a.sync_every, a.fragments, a.delay, a.alpha, a.steps, a.outer_mode)
    worst = 0.0
    for g in range(2):
        ref = torch.load(Path(a.compare) / f"group{g}.pt")
        assert ref["manager_step"] == sim[g]["manager_step"], (ref["manager_step"], sim[g]["manager_step"])
        diff = max_abs_diff(ref, sim[g])
        worst = max(worst, diff)
        print(f"group {g}: max|torchft - sim| = {diff:.3e}  manager_step={ref['manager_step']}")
    print("MATCH" if worst <= a.tol else "MISMATCH", f"(max {worst:.3e}, tol {a.tol:g})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
