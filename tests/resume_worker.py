"""Resume from every interesting checkpoint, for every strategy, in one launch (issue 9, item 2).

Run under ``torchrun --nproc-per-node=3`` (processes created externally, so one process group serves many
fits). For each configuration named on the command line, each rank:

1. fits 13 steps with a checkpoint after every step (an epoch is 5 steps, so most fall mid-epoch);
2. for each resume step k of that configuration, fits again from ``step=k.ckpt`` with a new Trainer and a new
   strategy, as a restarted job would;
3. compares the resumed fit with the uninterrupted one, bitwise: parameters after every step after k, the
   losses training_step returned, the final parameters, the optimizer state and the algorithm's state
   (step counters, tau, graph phase, centre variable, residuals, anchors) at the end, and the ledger's
   rounds by tag (the ledger is checkpointed too).

Each rank writes ``OUT/<config>/rank<r>.json``: ``{"k": [mismatch descriptions...]}`` (empty lists pass).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_commsgd import (  # noqa: E402
    QSGD,
    AdaComm,
    CompressedSGDStrategy,
    DecentralizedSGDStrategy,
    DianaStrategy,
    DiLoCoStrategy,
    DoubleResidualStrategy,
    ElasticAveragingStrategy,
    LocalSGDStrategy,
    OverlapLocalSGDStrategy,
    PNormQuantizer,
    PostLocalSGD,
    RedundancyInfusion,
    ScaledSign,
    StreamingDiLoCoStrategy,
    TopK,
)

STEPS = 13
BATCH = 4
SAMPLES = 60  # 20 per rank: 5 batches, so epochs end at steps 5 and 10

# configuration -> (strategy factory, resume steps). tau = 4 unless said: rounds end steps 4, 8, 12.
CONFIGS = {
    # before the first round (2), tau-1 (3), tau (4), tau+1 and an epoch end (5), mid-period and mid-epoch (7)
    "local_sgd": (lambda: LocalSGDStrategy(tau=4), [2, 3, 4, 5, 7]),
    "local_sgd_int8": (lambda: LocalSGDStrategy(tau=4, compressor="int8"), [3, 4, 6]),
    "local_sgd_int4": (lambda: LocalSGDStrategy(tau=4, compressor="int4"), [6]),
    # hierarchical rounds (blocks of 1 rank, every 2nd round global) and sample-weighted rounds
    "hierarchical": (lambda: LocalSGDStrategy(tau=2, global_every=2, group_size=1), [3, 5]),
    "weighted": (lambda: LocalSGDStrategy(tau=4, replica_weights="samples"), [3, 6]),
    "local_sgd_bf16": (lambda: LocalSGDStrategy(tau=4, compressor="bf16", momentum="zero"), [4, 7]),
    # AdaComm decides every 3 steps from the losses (decisions after rounds at steps >= 3, 6, 9)
    "adacomm": (lambda: LocalSGDStrategy(tau=AdaComm(tau0=2, interval_steps=3)), [2, 3, 6, 7]),
    # post-local SGD: tau 1 until step 5, then 3
    "post_local": (lambda: LocalSGDStrategy(tau=PostLocalSGD(switch_step=5, tau=3)), [4, 5, 6, 9]),
    # one-peer exponential graph: the peer changes every round (phase 0, 1, 0, ...)
    "gossip_one_peer": (lambda: DecentralizedSGDStrategy(topology="one_peer_exponential", tau=1), [1, 2, 3]),
    "gossip_ring_tau": (lambda: DecentralizedSGDStrategy(topology="ring", tau=3), [2, 3, 4]),
    "elastic": (lambda: ElasticAveragingStrategy(tau=4), [3, 4, 5]),
    # a round in flight at every step after the first round
    "overlap": (lambda: OverlapLocalSGDStrategy(tau=4, alpha=0.5, compressor="bf16"), [3, 4, 5, 6]),
    "overlap_int8": (
        lambda: OverlapLocalSGDStrategy(tau=4, alpha=0.3, anchor_momentum=0.9, compressor="int8"),
        [4, 6],
    ),
    "overlap_cocod": (lambda: OverlapLocalSGDStrategy(tau=4, correction="cocod"), [4, 6]),
    # outer steps at 4, 8, 12: right after one (anchor and outer Nesterov momentum), mid-period and mid-epoch
    "diloco": (lambda: DiLoCoStrategy(tau=4), [4, 7]),
    # H=4, 2 fragments (K=2), d=1: fragment 0 sends at 1, 5, 9, 13 and lands at 2, 6, 10; fragment 1 sends
    # at 3, 7, 11 and lands at 4, 8, 12. Resumes with fragment 1 in flight (3, mid-epoch), right after
    # fragment 0 landed (6, the first step of epoch 2), and with fragment 1 in flight mid-epoch (7)
    "streaming_diloco": (
        lambda: StreamingDiLoCoStrategy(
            tau=4, fragments=[["net.0"], ["net.2"]], sync_delay=1, local_weight=0.5, compressor="int4"
        ),
        [3, 6, 7],
    ),
    # compression residuals (worker h_i, server h, model error e)
    "dore": (lambda: DoubleResidualStrategy(PNormQuantizer(float("inf"), 16), master="rank0"), [2, 6]),
    "dore_replicated": (
        lambda: DoubleResidualStrategy(PNormQuantizer(float("inf"), 16), master="replicated"),
        [3],
    ),
    "diana": (lambda: DianaStrategy(PNormQuantizer(float("inf"), 16)), [3]),
    "mem_sgd": (lambda: CompressedSGDStrategy(TopK(0.2), error_feedback=True), [3, 7]),
    "double_squeeze": (
        lambda: CompressedSGDStrategy(
            ScaledSign(16), error_feedback=True, server_compressor=ScaledSign(16), master="rank0"
        ),
        [3],
    ),
    "qsgd": (lambda: CompressedSGDStrategy(QSGD(2, 32)), [3]),
    # RI-SGD's own sampler, mid-epoch
    "ri_sgd": (lambda: LocalSGDStrategy(tau=4, redundancy=1 / 3), [3, 7]),
    "ri_sgd_union": (
        lambda: LocalSGDStrategy(tau=4, redundancy=RedundancyInfusion(mu=2 / 3, sampling="union")),
        [6],
    ),
}


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        data = TensorDataset(torch.randn(SAMPLES, 6, generator=g), torch.randn(SAMPLES, 1, generator=g))
        return DataLoader(data, batch_size=BATCH, shuffle=True)


class Recorder(Callback):
    """Parameters and loss after every optimizer step, keyed by the global step."""

    def __init__(self) -> None:
        self.params: dict[int, torch.Tensor] = {}
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.params[step] = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])
        self.losses[step] = float(outputs["loss"])


def flatten(state, prefix=""):
    """Every tensor and number of a nested state, by path."""
    out = {}
    if isinstance(state, dict):
        for key, value in state.items():
            out.update(flatten(value, f"{prefix}/{key}"))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            out.update(flatten(value, f"{prefix}/{i}"))
    elif isinstance(state, (torch.Tensor, int, float, str, bool)) or state is None:
        out[prefix] = state
    return out


def fit(make_strategy, ckpt_dir: str | None, resume: str | None) -> dict:
    recorder = Recorder()
    callbacks: list[Callback] = [recorder]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=1, save_top_k=-1))
    strategy = make_strategy()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=3,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=bool(ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    model = Net()
    trainer.fit(model, ckpt_path=resume)
    algorithm = strategy.algorithm
    return {
        "params": recorder.params,
        "losses": recorder.losses,
        "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "optimizer": flatten(trainer.optimizers[0].state_dict()),
        "algorithm": flatten(algorithm.state_dict()) if algorithm is not None else {},
        # the algorithm's rounds by tag: not the checkpoints' own (gather, and Lightning's barrier and reduce
        # around each save), nor setup's broadcast (a resumed fit sets up again)
        "rounds": {
            tag: entry["rounds"]
            for tag, entry in strategy.communicator.ledger.as_dict()["by_tag"].items()
            if tag not in ("checkpoint", "setup_broadcast") and not tag.startswith("lightning_")
        },
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def compare(full: dict, resumed: dict, k: int) -> list[str]:
    problems = []
    steps = sorted(resumed["params"])
    if steps != list(range(k + 1, STEPS + 1)):
        problems.append(f"resumed steps {steps}")
    for step in steps:
        if not same(full["params"].get(step), resumed["params"][step]):
            problems.append(f"params differ after step {step}")
            break
    for step in steps:
        if full["losses"].get(step) != resumed["losses"][step]:
            problems.append(f"loss differs at step {step}")
            break
    if not same(full["final"], resumed["final"]):
        problems.append("final params differ")
    for name in ("optimizer", "algorithm"):
        keys = sorted(set(full[name]) | set(resumed[name]))
        # elapsed_s: wall-clock seconds a schedule has seen (AdaComm's time mode), never equal across runs
        bad = [
            key
            for key in keys
            if not key.endswith("elapsed_s") and not same(full[name].get(key), resumed[name].get(key))
        ]
        if bad:
            problems.append(f"{name} state differs: {bad[:5]}")
    if full["rounds"] != resumed["rounds"]:
        problems.append(f"rounds {resumed['rounds']} != {full['rounds']}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    for name in args.configs:
        make_strategy, resume_steps = CONFIGS[name]
        folder = os.path.join(args.out, name)
        ckpt_dir = os.path.join(folder, "ckpt")
        L.seed_everything(0, verbose=False)
        full = fit(make_strategy, ckpt_dir, None)
        report = {}
        for k in resume_steps:
            L.seed_everything(0, verbose=False)
            resumed = fit(make_strategy, None, os.path.join(ckpt_dir, f"step={k}.ckpt"))
            report[str(k)] = compare(full, resumed, k)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
