"""Runs one Lightning fit on several CPU processes and records what each rank did.

Launched by the tests as ``python tests/lightning_worker.py --out DIR ...``; with the default popen
launcher Lightning re-runs this script for every other rank. Each rank writes ``DIR/rank{r}.pt``:
flat parameters after every optimizer step, the torch.distributed calls it made (with the step and
whether they happened inside a training batch) and its ledger.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from toy_problem import BATCH_SIZE, make_dataset, make_net, mse  # noqa: E402

from lightning_commsgd import (  # noqa: E402
    QSGD,
    AdaComm,
    CommunicationMonitor,
    PNormQuantizer,
    RedundancyInfusion,
    ScaledSign,
    TopK,
    create_strategy,
)

CALLS: list[dict] = []
PHASE = {"step": -1, "in_batch": False}
_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "gather",
    "scatter",
    "reduce",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "all_to_all",
    "all_to_all_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
)


def _count(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # all_gather(output_list, input): the payload is the input tensor
        tensor = next((a for a in args[:2] if isinstance(a, torch.Tensor)), None)
        nbytes = tensor.numel() * tensor.element_size() if tensor is not None else 0
        thread = threading.current_thread().name
        CALLS.append({"fn": name, "bytes": nbytes, "thread": thread, **PHASE})
        return fn(*args, **kwargs)

    return wrapper


for _name in _COLLECTIVES:
    if hasattr(dist, _name):
        setattr(dist, _name, _count(_name, getattr(dist, _name)))


class ToyModule(L.LightningModule):
    def __init__(self, optimizer: str, batch_norm: bool, seed: int, scheduler: bool, groups: bool) -> None:
        super().__init__()
        self.net = make_net(seed, batch_norm)
        self.optimizer_name, self.use_scheduler, self.groups = optimizer, scheduler, groups

    def training_step(self, batch, batch_idx):
        loss = mse(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0 and not NO_GATHER:  # Lightning's all_gather, routed through the communicator
            GATHERED.append(self.all_gather(torch.tensor([float(self.global_rank)])).tolist())
        self.log("val_loss", mse(self.net, batch), sync_dist=True)

    def configure_optimizers(self):
        if self.groups:
            params = [{"params": self.net[0].parameters(), "lr": 0.05}, {"params": self.net[-1].parameters()}]
        else:
            params = self.parameters()
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=0.01)
        elif self.optimizer_name == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=0.01)
        elif self.optimizer_name == "sgd_plain":
            opt = torch.optim.SGD(params, lr=0.1)
        else:
            opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        if not self.use_scheduler:
            return opt
        if self.use_scheduler == "epoch":
            scheduler = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "epoch"}
        else:
            scheduler = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def train_dataloader(self):
        return DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=True)

    def val_dataloader(self):
        return DataLoader(make_dataset(), batch_size=BATCH_SIZE)


class Recorder(Callback):
    def __init__(self, out: str) -> None:
        self.out, self.params, self.steps, self.batch_sizes = out, [], [], []

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        PHASE.update(step=trainer.global_step, in_batch=True)
        self.batch_sizes.append(len(batch[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        PHASE.update(in_batch=False)
        last = self.steps[-1] if self.steps else self.start_step
        if trainer.global_step == last:
            return  # an accumulation micro-batch: no optimizer step happened
        self.params.append(torch.cat([p.detach().reshape(-1).double() for p in pl_module.parameters()]))
        self.steps.append(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        ledger = getattr(trainer.strategy, "communicator", None)
        monitor = next(c for c in trainer.callbacks if isinstance(c, CommunicationMonitor))
        torch.save(
            {
                "params": self.params,
                "steps": self.steps,
                "batch_sizes": self.batch_sizes,
                "calls": CALLS,
                "ledger": monitor.ledger.as_dict(),
                "has_communicator": ledger is not None,
                "final_params": torch.cat([p.detach().reshape(-1).double() for p in pl_module.parameters()]),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "logged": dict(LOGGED),
                "gathered": list(GATHERED),
                "progress_bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items()},
                "world_size": trainer.world_size,
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


LOGGED: dict[str, list[float]] = {}
GATHERED: list = []
NO_GATHER = "--no-gather" in sys.argv  # the parameter-server strategies refuse all_gather while training


class MetricTap(Callback):
    """Keeps every value the CommunicationMonitor logged (logger=False keeps only the latest)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key, value in trainer.callback_metrics.items():
            if key.startswith("comm/"):
                LOGGED.setdefault(key, []).append(float(value))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=2)
    # "ddp" (Lightning's DDPStrategy) or a name of lightning_commsgd.registry
    ap.add_argument("--strategy", default="local_sgd")
    ap.add_argument("--master", default="rank0", help="DORE/DIANA: rank0 | replicated")
    ap.add_argument("--overlap-alpha", type=float, default=0.5)
    ap.add_argument("--correction", default="pull")
    ap.add_argument("--anchor-momentum", type=float, default=0.0)
    ap.add_argument("--topology", default="ring")
    # None: not given, so Lightning's sampler (any RI-SGD option, 0.0 included, selects the strided shards)
    ap.add_argument("--redundancy", type=float, default=None)
    ap.add_argument("--sampling", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="one b per rank")
    ap.add_argument("--replica-weights", default="uniform")
    ap.add_argument("--compressor", default=None)
    ap.add_argument("--global-every", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--original-world-size", type=int, default=None)
    ap.add_argument("--failed-workers", type=int, nargs="*", default=[])
    ap.add_argument("--tau", type=int, default=3)
    ap.add_argument("--k", type=int, default=None, help="K of the parameter-server strategies")
    ap.add_argument("--variant", default="k-async")
    ap.add_argument("--ps-server", default="colocated", help="colocated | dedicated")
    ap.add_argument("--straggler-mu", type=float, default=None)
    ap.add_argument("--no-gather", action="store_true", help="no all_gather in validation_step")
    # not given: each strategy's default ("average" for local SGD and gossip, "local" for DiLoCo and SlowMo)
    ap.add_argument("--momentum", default=None)
    # DiLoCo / Streaming DiLoCo: the outer SGD (default the paper's: lr 0.7, momentum 0.9, Nesterov)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--outer-nesterov", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fragments", default="2", help="Streaming DiLoCo: F, or a JSON list of prefix lists")
    ap.add_argument("--sync-delay", type=int, default=1, help="Streaming DiLoCo: d")
    ap.add_argument("--local-weight", type=float, default=0.5, help="Streaming DiLoCo: w")
    ap.add_argument("--slow-lr", type=float, default=1.0, help="SlowMo: alpha")
    ap.add_argument("--slow-momentum", type=float, default=0.5, help="SlowMo: beta")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "sgd_plain", "adam", "rmsprop"])
    ap.add_argument("--batch-norm", action="store_true")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--start-method", default="popen")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--clip", type=float, default=None)
    ap.add_argument("--scheduler", action="store_true")
    ap.add_argument("--epoch-scheduler", action="store_true", help="StepLR(1, 0.5) per epoch instead")
    ap.add_argument("--groups", action="store_true")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--eval-on", default="consensus")
    ap.add_argument("--check-replicas", action="store_true", help="the strategies' debug replica check")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--ckpt-on-val", action="store_true")
    ap.add_argument("--prog-bar", action="store_true")
    ap.add_argument("--adacomm-interval", type=int, default=0, help="AdaComm(tau0=--tau) in step mode")
    ap.add_argument("--consensus-every", type=int, default=None)
    args = ap.parse_args()

    L.seed_everything(0, verbose=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # popen children know their rank here; others use 0
    # not given: Lightning's sampler (any RI-SGD option, mu = 0 included, selects the strided shards)
    redundancy = None
    ri_sgd = (args.sampling, args.batch_sizes, args.original_world_size, args.failed_workers)
    if args.redundancy is not None or any(ri_sgd):
        redundancy = RedundancyInfusion(
            mu=args.redundancy or 0.0,
            sampling=args.sampling or "stratified",
            batch_sizes=args.batch_sizes,
            original_world_size=args.original_world_size,
            failed_workers=args.failed_workers,
        )
    ours = {
        "start_method": args.start_method,
        "redundancy": redundancy,
        "check_replicas": args.check_replicas,
        "eval_on": args.eval_on,
    }
    tau = AdaComm(tau0=args.tau, interval_steps=args.adacomm_interval) if args.adacomm_interval else args.tau
    outer_optimizer = functools.partial(
        torch.optim.SGD, lr=args.outer_lr, momentum=args.outer_momentum, nesterov=args.outer_nesterov
    )
    outer = {"outer_optimizer": outer_optimizer, "compressor": args.compressor}
    per_strategy = {
        "ksync_sgd": {"k": args.k, "server": args.ps_server, "start_method": args.start_method},
        "async_sgd": {
            "k": args.k or 1,
            "variant": args.variant,
            "straggler_mu": args.straggler_mu,
            "start_method": args.start_method,
        },
        "decentralized_sgd": {
            "topology": args.topology,
            "tau": args.tau,
            "momentum": args.momentum or "average",
            **ours,
        },
        "overlap_local_sgd": {
            "tau": args.tau,
            "alpha": args.overlap_alpha,
            "anchor_momentum": args.anchor_momentum,
            "compressor": args.compressor,
            "correction": args.correction,
            **ours,
        },
        "elastic_averaging": {"tau": args.tau, **ours},
        "dore": {"compressor": PNormQuantizer(float("inf"), 16), "master": args.master, **ours},
        "diana": {"compressor": PNormQuantizer(float("inf"), 16), "master": args.master, **ours},
        "double_squeeze": {
            "compressor": ScaledSign(16),
            "server_compressor": ScaledSign(16),
            "master": "rank0",
            **ours,
        },
        "qsgd": {"compressor": QSGD(2, 32), **ours},
        "mem_sgd": {"compressor": TopK(0.2), **ours},
        "local_sgd": {
            "tau": tau,
            "momentum": args.momentum or "average",
            "replica_weights": args.replica_weights,
            "compressor": args.compressor,
            "global_every": args.global_every,
            "group_size": args.group_size,
            **ours,
        },
        "diloco": {"tau": tau, "momentum": args.momentum or "local", **outer, **ours},
        "streaming_diloco": {
            "tau": args.tau,
            "fragments": json.loads(args.fragments),  # 2, or [["net.0"], ["net.2"]]
            "sync_delay": args.sync_delay,
            "local_weight": args.local_weight,
            "momentum": args.momentum or "local",
            **outer,
            **ours,
        },
        "slowmo": {
            "tau": tau,
            "slow_lr": args.slow_lr,
            "slow_momentum": args.slow_momentum,
            "momentum": args.momentum or "local",
            **ours,
        },
    }
    if args.strategy == "ddp":
        strategy = DDPStrategy(start_method=args.start_method)
    else:  # the package's one factory, with this test's settings
        strategy = create_strategy(args.strategy, **per_strategy[args.strategy])
    callbacks = [
        Recorder(args.out),
        # every step: the tests read each step's ledger values from the logged metrics
        CommunicationMonitor(1, consensus_every_n_rounds=args.consensus_every, prog_bar=args.prog_bar),
        MetricTap(),
    ]
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=os.path.join(args.out, "ckpt"),
                every_n_train_steps=args.ckpt_every,
                save_top_k=-1,
                filename="{step}",
            )
        )
    if args.ckpt_on_val:  # saved in on_validation_end, i.e. while validation holds the consensus model
        callbacks.append(
            ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), monitor="val_loss", filename="val")
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        precision=args.precision,
        gradient_clip_val=args.clip,
        limit_val_batches=2 if args.validate else 0,
        val_check_interval=5 if args.validate else None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every or args.ckpt_on_val),
        enable_progress_bar=args.prog_bar,  # the monitor puts its figures on the bar when there is one
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=args.out,
    )
    # Different x_0 per rank (popen children): the strategy must broadcast rank 0's.
    model = ToyModule(
        args.optimizer,
        args.batch_norm,
        seed=100 + rank,
        scheduler="epoch" if args.epoch_scheduler else args.scheduler,
        groups=args.groups,
    )
    trainer.fit(model, ckpt_path=args.resume)
    if args.strategy == "ddp":
        # Lightning's DDPStrategy, the reference, leaves a gloo group to interpreter finalization, which now
        # and then aborts a finished process ("terminate called without an active exception",
        # pytorch/pytorch#190489; seen once in CI). Our strategies destroy their group at exit
        # (comm.destroy_process_group_at_exit); the reference gets the same treatment here.
        from lightning_commsgd.comm import destroy_process_group_at_exit

        destroy_process_group_at_exit()


if __name__ == "__main__":
    main()
