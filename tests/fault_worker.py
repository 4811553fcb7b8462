"""A 3-rank Lightning fit that injects one fault, chosen by the environment variable ``FAULT``.

``FAULT=rank:step:kind:where``:

- ``kind``: ``crash`` (an exception), ``kill`` (SIGKILL, as the OOM killer sends), ``hang`` (the rank stays
  alive and does nothing), ``nan`` (NaN written into the rank's parameters; training goes on), ``term``
  (SIGTERM to the rank's own process, as ``kill PID`` or a scheduler sends; training goes on until the
  rank's signal handling stops it);
- ``where``: ``step`` (in ``training_step`` once ``step`` optimizer steps are done: mid-period) or ``round``
  (inside the first collective after ``step`` steps: the averaging round, when tau divides ``step``).

Launched by ``tests/test_faults.py`` as ``python tests/fault_worker.py --out DIR [--sync-timeout S]``; the
popen launcher re-runs it for ranks 1 and 2. Under ``torchrun`` the fault hits the first attempt only, and
``--auto-resume`` resumes a restarted attempt from ``DIR/ckpt/last.ckpt``. Each rank writes
``DIR/pid<rank>`` at the start of fit; the faulty rank writes ``DIR/fault.json`` (time, rank, step, kind,
where) just before the fault. With ``--record`` each rank also writes ``DIR/rounds<rank>.pt``: its flat
parameters just before and just after every averaging round, and after fit. At exit, after the
strategy's own exit handler, each rank writes ``DIR/group_at_exit<rank>``: whether its process group was
still initialised.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import time

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_commsgd import create_strategy  # noqa: E402

ARMED = {"round": False}


def parse_fault() -> dict | None:
    spec = os.environ.get("FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None  # under torchrun the fault hits the first attempt only
    rank, step, kind, where = spec.split(":")
    if kind not in ("crash", "kill", "hang", "nan", "term") or where not in ("step", "round"):
        raise SystemExit(f"bad FAULT {spec!r}")
    return {"rank": int(rank), "step": int(step), "kind": kind, "where": where}


def inject(fault: dict, out: str) -> None:
    record = {**fault, "time": time.time()}
    with open(os.path.join(out, "fault.json"), "w") as f:
        json.dump(record, f)
    if fault["kind"] == "crash":
        raise RuntimeError(f"injected crash on rank {fault['rank']} at step {fault['step']}")
    if fault["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault["kind"] == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if fault["kind"] == "nan":
        return
    while True:  # hang: alive, doing nothing
        time.sleep(3600)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class Net(L.LightningModule):
    def __init__(self, fault: dict | None, out: str, record: bool = False) -> None:
        super().__init__()
        self.record, self.rounds = record, []
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.fault, self.out = fault, out
        self.fired = False

    def on_fit_start(self) -> None:
        with open(os.path.join(self.out, f"pid{self.global_rank}"), "w") as f:
            f.write(str(os.getpid()))

    def training_step(self, batch, batch_idx):
        fault = self.fault
        if fault is not None and fault["rank"] == self.global_rank:
            # ">=" once: under the parameter-server strategies the global step (the server's) can jump
            if fault["where"] == "step" and self.global_step >= fault["step"] and not self.fired:
                self.fired = True
                inject(fault, self.out)
                if fault["kind"] == "nan":
                    with torch.no_grad():
                        self.net[0].weight[0, 0] = float("nan")
            if fault["where"] == "round" and self.global_step == fault["step"] - 1:
                ARMED["round"] = True  # the next collective is the round that ends this step
        time.sleep(0.02)  # a step takes time, as real ones do (heartbeats are sampled)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_start(self) -> None:
        if not self.record:
            return
        algorithm = self.trainer.strategy.algorithm
        communicate = algorithm.communicate

        def recorded(tag):  # the flat parameters just before and just after each round
            before = flat(self)
            communicate(tag)
            self.rounds.append({"step": algorithm.step, "before": before, "after": flat(self)})

        algorithm.communicate = recorded

    def on_fit_end(self) -> None:
        if self.record:
            torch.save(
                {"rounds": self.rounds, "final": flat(self)},
                os.path.join(self.out, f"rounds{self.global_rank}.pt"),
            )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def make_strategy(args: argparse.Namespace):
    """The package's one factory (lightning_commsgd.registry), with this test's settings."""
    if args.strategy == "async":
        return create_strategy("async_sgd", k=args.k or 1, sync_timeout=args.sync_timeout)
    if args.strategy == "ksync":
        return create_strategy("ksync_sgd", k=args.k, sync_timeout=args.sync_timeout)
    return create_strategy("local_sgd", tau=4, sync_timeout=args.sync_timeout, on_nonfinite=args.on_nonfinite)


def report_group_at_exit(out: str) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    with open(os.path.join(out, f"group_at_exit{rank}"), "w") as f:
        f.write("initialized" if dist.is_initialized() else "destroyed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sync-timeout", type=float, default=5.0)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--resume", default=None, help="ckpt_path for fit")
    parser.add_argument("--on-nonfinite", default="raise")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--samples", type=int, default=256, help="dataset size (96: 4 steps per epoch)")
    parser.add_argument("--ckpt-every", type=int, default=0, help="ModelCheckpoint every N steps + last.ckpt")
    parser.add_argument("--auto-resume", action="store_true", help="resume from OUT/ckpt/last.ckpt if there")
    parser.add_argument("--strategy", default="local_sgd", choices=["local_sgd", "async", "ksync"])
    parser.add_argument("--k", type=int, default=None)
    args = parser.parse_args()
    fault = parse_fault()
    # Registered before fit, so it runs after the handler the strategy registers (atexit is LIFO).
    atexit.register(report_group_at_exit, args.out)

    original_all_reduce = dist.all_reduce

    def all_reduce(*a, **kw):  # the averaging round's collective; the fault fires inside it
        if ARMED["round"]:
            ARMED["round"] = False
            inject(fault, args.out)
        return original_all_reduce(*a, **kw)

    dist.all_reduce = all_reduce

    generator = torch.Generator().manual_seed(7)
    data = TensorDataset(
        torch.randn(args.samples, 8, generator=generator), torch.randn(args.samples, 1, generator=generator)
    )
    ckpt_dir = os.path.join(args.out, "ckpt")
    callbacks = []
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                ckpt_dir, "{step}", every_n_train_steps=args.ckpt_every, save_top_k=-1, save_last=True
            )
        )
    resume = args.resume
    if args.auto_resume and os.path.exists(os.path.join(ckpt_dir, "last.ckpt")):
        resume = os.path.join(ckpt_dir, "last.ckpt")
        print(f"RESUMING from {resume}", flush=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=3,
        strategy=make_strategy(args),
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(fault, args.out, args.record), DataLoader(data, batch_size=8), ckpt_path=resume)
    if trainer.global_rank == 0:
        print("FIT DONE", flush=True)


if __name__ == "__main__":
    main()
