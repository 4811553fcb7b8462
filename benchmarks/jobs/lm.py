"""A small decoder-only transformer language model on text that ships with Python, and one node's job of
``bench_diloco`` (``python -m benchmarks.jobs.lm ...`` with the repository root on ``PYTHONPATH``).

**The text**: the running interpreter's standard-library sources, nothing downloaded. :func:`stdlib_files`
lists every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (no ``site-packages``/``dist-packages``,
no ``test``/``tests``/``idle_test`` folders), sorted by path relative to that folder (POSIX form, plain
string order), and keeps the files in that order up to the first one that brings the total to
``corpus_bytes`` (default 3,000,000 bytes). Files whose position in that list is 9 mod 10 are the
validation text, the others the training text (whole files apart: no file is in both). The corpus thus
depends on the Python version; :func:`corpus_summary` (written into every result) names the version, the
files, their bytes and a SHA-256 of the concatenated text.

**Tokens**: bytes (vocabulary 256). Each split is the concatenation of its files (each followed by a newline);
training samples are the non-overlapping windows of ``context + 1`` bytes (stride ``context``), which
Lightning's ``DistributedSampler`` shuffles and shards; the final evaluation uses :data:`EVAL_WINDOWS` windows
evenly spaced over each split.

**The model** (:class:`ByteTransformerLM`): token + learned position embeddings, ``layers`` pre-norm blocks
(causal multi-head self-attention through ``scaled_dot_product_attention``, GELU MLP of 4 x ``d_model``), a
final LayerNorm and an untied linear head; no dropout. The inner optimizer is AdamW (betas 0.9/0.95, weight
decay 0.1, biases and norms without decay) with a linear warm-up of ``warmup`` steps, then a constant lr.

**The job** trains ``--workload lm`` (this model) or ``--workload digits`` (``bench_cluster``'s MLP on
scikit-learn's digits, SGD momentum 0.9) under one configuration of :data:`CONFIGS`, one process per node,
and rank 0 writes the same JSON as ``benchmarks.jobs.cluster_worker`` (``train_seconds``, the per-step trace
``steps`` of [seconds since ``on_train_start``, rank-mean loss, rank 0's bytes sent so far], ledger bytes and
rounds, the consensus model's ``train_loss``/``val_loss``, and ``val_acc`` for digits).
``--no-communication`` runs the same steps without a process group (the compute floor).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

# One intra-op thread per process (see cluster_worker: Lightning's DDP setup would otherwise pick 2).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, Strategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

__all__ = [
    "CONFIGS",
    "EVAL_WINDOWS",
    "ByteTransformerLM",
    "ByteWindows",
    "StdlibTextDataModule",
    "build_strategy",
    "corpus_summary",
    "load_corpus",
    "main",
    "stdlib_files",
]

DEFAULT_CORPUS_BYTES = 3_000_000
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
VAL_EVERY = 10  # file i is validation text when i % VAL_EVERY == VAL_EVERY - 1
EVAL_WINDOWS = 256  # windows per split in the final (untimed) evaluation

# Streaming DiLoCo's settings in this benchmark (the configuration's name says only the codec)
STREAMING_H, STREAMING_FRAGMENTS, STREAMING_DELAY = 32, 2, 2

# name -> what it runs (the tables' description)
CONFIGS: dict[str, str] = {
    "ddp": "Lightning DDPStrategy (gloo): gradient all-reduce every step, fp32",
    "local_sgd": (
        'create_strategy("local_sgd", tau=8): parameters + optimizer state averaged every 8 steps'
        ' (momentum="average", the default: SGD momentum buffer / both AdamW moments), fp32, blocking'
    ),
    "diloco_8": (
        'create_strategy("diloco", tau=8): outer Nesterov SGD lr 0.7 momentum 0.9 on the mean'
        " pseudo-gradient every 8 inner steps, fp32, blocking; inner optimizer state local"
    ),
    "diloco_32": 'create_strategy("diloco", tau=32): as diloco_8, every 32 inner steps',
    "diloco_128": 'create_strategy("diloco", tau=128): as diloco_8, every 128 inner steps',
    # ablations of the outer optimizer (not in bench_diloco's default list)
    "diloco_8_plain": (
        'create_strategy("diloco", tau=8, outer_optimizer=SGD(lr=1.0)): no outer momentum, i.e. periodic'
        " parameter averaging with the inner optimizer state local"
    ),
    "diloco_32_plain": "as diloco_8_plain, every 32 inner steps",
    "diloco_32_lr0.3": 'create_strategy("diloco", tau=32), outer Nesterov SGD lr 0.3 (not 0.7) momentum 0.9',
    "streaming_diloco_int4": (
        f'create_strategy("streaming_diloco", tau={STREAMING_H}, fragments={STREAMING_FRAGMENTS},'
        f' sync_delay={STREAMING_DELAY}, local_weight=0.5, compressor="int4"): one fragment every'
        f" {STREAMING_H // STREAMING_FRAGMENTS} steps, 4-bit pseudo-gradients, overlapped with"
        f" {STREAMING_DELAY} inner steps; LM: one transformer block per fragment (embeddings with the first,"
        " final norm and head with the last), digits: the MLP's layers dealt out in turn"
    ),
}


# -- the text ------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(corpus_bytes: int = DEFAULT_CORPUS_BYTES, root: Path | None = None) -> list[Path]:
    """The corpus's files, in order (see the module docstring): sorted ``*.py`` files of ``root`` (default:
    the standard library) up to the first one that brings their total size to ``corpus_bytes``."""
    if corpus_bytes < 1:
        raise ValueError(f"corpus_bytes must be >= 1, got {corpus_bytes}")
    root = stdlib_root() if root is None else root
    names = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if path.is_file() and not EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    )
    chosen, total = [], 0
    for name in names:
        chosen.append(root / name)
        total += (root / name).stat().st_size
        if total >= corpus_bytes:
            break
    if not chosen:
        raise FileNotFoundError(f"no *.py files under {root}")
    return chosen


def load_corpus(corpus_bytes: int = DEFAULT_CORPUS_BYTES, root: Path | None = None) -> tuple[bytes, bytes]:
    """(training text, validation text): the files of :func:`stdlib_files`, file i to validation when
    ``i % 10 == 9``, each file followed by a newline."""
    return _load_corpus(corpus_bytes, None if root is None else str(root))


@lru_cache(maxsize=4)
def _load_corpus(corpus_bytes: int, root: str | None) -> tuple[bytes, bytes]:
    train, val = [], []
    for i, path in enumerate(stdlib_files(corpus_bytes, None if root is None else Path(root))):
        (val if i % VAL_EVERY == VAL_EVERY - 1 else train).append(path.read_bytes() + b"\n")
    return b"".join(train), b"".join(val)


def corpus_summary(corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> dict[str, Any]:
    """What the corpus is, for the results file."""
    files = stdlib_files(corpus_bytes)
    train, val = load_corpus(corpus_bytes)
    root = stdlib_root()
    return {
        "python": platform.python_version(),
        "stdlib": str(root),
        "files": len(files),
        "first_file": files[0].relative_to(root).as_posix(),
        "last_file": files[-1].relative_to(root).as_posix(),
        "train_bytes": len(train),
        "val_bytes": len(val),
        "sha256": hashlib.sha256(train + b"\0" + val).hexdigest(),
    }


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes (stride ``context``) of ``text``, as int64 tensors:
    input = window[:-1], target = window[1:]."""

    def __init__(self, text: bytes, context: int) -> None:
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        if len(text) < context + 1:
            raise ValueError(f"text of {len(text)} bytes is shorter than one window ({context + 1})")
        self.data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self.context = context

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.context

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.context
        return self.data[start : start + self.context + 1].long()

    def evenly_spaced(self, count: int) -> torch.Tensor:
        """``count`` windows (or all, if fewer) evenly spaced over the text, stacked: ``(n, context + 1)``."""
        n = min(count, len(self))
        return torch.stack([self[i * len(self) // n] for i in range(n)])


class StdlibTextDataModule(LightningDataModule):
    """Byte windows of the standard-library text (see the module docstring)."""

    def __init__(
        self, context: int = 64, batch_size: int = 16, corpus_bytes: int = DEFAULT_CORPUS_BYTES
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.context, self.batch_size, self.corpus_bytes = context, batch_size, corpus_bytes
        self.train_dataset: ByteWindows | None = None
        self.val_dataset: ByteWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            train, val = load_corpus(self.corpus_bytes)
            self.train_dataset = ByteWindows(train, self.context)
            self.val_dataset = ByteWindows(val, self.context)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "call setup() first"
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False)


# -- the model -----------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteTransformerLM(LightningModule):
    """A decoder-only transformer over bytes (see the module docstring).

    Args:
        layers: transformer blocks.
        d_model: width.
        heads: attention heads (``d_model`` must be a multiple).
        context: longest input (positions).
        lr: AdamW's learning rate after warm-up.
        weight_decay: AdamW's decoupled weight decay on the matrices (not on biases, norms, embeddings).
        warmup: steps of linear lr warm-up (0: none).
    """

    vocab = 256

    def __init__(
        self,
        layers: int = 2,
        d_model: int = 128,
        heads: int = 4,
        context: int = 64,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        warmup: int = 20,
    ) -> None:
        super().__init__()
        if layers < 1 or d_model < 1 or heads < 1 or context < 1:
            raise ValueError("layers, d_model, heads and context must be >= 1")
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        if lr <= 0 or weight_decay < 0 or warmup < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup >= 0")
        self.save_hyperparameters()
        self.tok = nn.Embedding(self.vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte logits ``(batch, time, 256)`` of int64 ``tokens`` ``(batch, time)``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats) over windows ``(batch, context + 1)``."""
        logits = self(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.vocab), windows[:, 1:].reshape(-1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)  # not logged: a logged metric costs Lightning about 1 ms a step

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True, batch_size=len(batch))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and not n.startswith(("tok", "pos"))]
        ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in ids]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(0.9, 0.95),
        )
        if not hp.warmup:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / hp.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def fragment_prefixes(self, fragments: int) -> list[list[str]]:
        """Streaming DiLoCo's fragments by transformer block: blocks dealt out in turn (block j to fragment
        j mod F), the embeddings with fragment 0 and the final norm and head with the last block's."""
        layers = self.hparams.layers
        if not 1 <= fragments <= layers:
            raise ValueError(f"fragments must be in [1, layers={layers}], got {fragments}")
        out: list[list[str]] = [[] for _ in range(fragments)]
        out[0] += ["tok", "pos"]
        for j in range(layers):
            out[j % fragments].append(f"blocks.{j}")
        out[(layers - 1) % fragments] += ["ln_f", "head"]
        return out


@torch.no_grad()
def evaluate_lm(model: ByteTransformerLM, data: StdlibTextDataModule) -> dict[str, float]:
    """Mean next-byte loss (nats) on :data:`EVAL_WINDOWS` evenly spaced windows of each split."""
    model.eval()
    out = {}
    for split, dataset in (("train", data.train_dataset), ("val", data.val_dataset)):
        assert dataset is not None
        windows = dataset.evenly_spaced(EVAL_WINDOWS)
        losses = [float(model.loss(chunk)) * len(chunk) for chunk in windows.split(64)]
        out[f"{split}_loss"] = sum(losses) / len(windows)
    return out


# -- the job -------------------------------------------------------------------------------------------


def build_strategy(name: str, model: LightningModule | None = None) -> Strategy:
    """The strategy of configuration ``name`` (one of :data:`CONFIGS`); ``model`` (with a
    ``fragment_prefixes`` method, like the LM) chooses Streaming DiLoCo's fragments, else the default
    strided pattern."""
    from lightning_commsgd import create_strategy

    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "local_sgd":
        return create_strategy("local_sgd", tau=8)
    if name.startswith("diloco_") and name in CONFIGS:
        _, tau, *variant = name.split("_")
        if variant == ["plain"]:
            outer = functools.partial(torch.optim.SGD, lr=1.0)
            return create_strategy("diloco", tau=int(tau), outer_optimizer=outer)
        if variant == ["lr0.3"]:
            outer = functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9, nesterov=True)
            return create_strategy("diloco", tau=int(tau), outer_optimizer=outer)
        return create_strategy("diloco", tau=int(tau))
    if name == "streaming_diloco_int4":
        fragments: Any = STREAMING_FRAGMENTS
        if model is not None and hasattr(model, "fragment_prefixes"):
            fragments = model.fragment_prefixes(STREAMING_FRAGMENTS)
        return create_strategy(
            "streaming_diloco",
            tau=STREAMING_H,
            fragments=fragments,
            sync_delay=STREAMING_DELAY,
            local_weight=0.5,
            compressor="int4",
        )
    raise ValueError(f"Arg `config` must be one of {sorted(CONFIGS)}, got {name!r}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=("lm", "digits"), default="lm")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="diloco_32")
    parser.add_argument("--no-communication", action="store_true", help="the compute floor: no process group")
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--max-steps", type=int, required=True, help="optimizer steps per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="per process (lm: 16, digits: 32)")
    parser.add_argument("--lr", type=float, default=None, help="inner lr (lm: AdamW 2e-3, digits: SGD 0.05)")
    lm = parser.add_argument_group("lm")
    lm.add_argument("--layers", type=int, default=2)
    lm.add_argument("--d-model", type=int, default=128)
    lm.add_argument("--heads", type=int, default=4)
    lm.add_argument("--context", type=int, default=64)
    lm.add_argument("--warmup", type=int, default=20)
    lm.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES)
    digits = parser.add_argument_group("digits")
    digits.add_argument("--hidden", type=int, default=1100)
    digits.add_argument("--depth", type=int, default=2)
    digits.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--json", type=Path, required=True, help="rank 0 writes the results here")
    return parser


def build_workload(args: argparse.Namespace) -> tuple[LightningModule, LightningDataModule, Any]:
    """(model, data, evaluate(model, data) -> dict) of ``args.workload``."""
    if args.workload == "lm":
        model = ByteTransformerLM(
            layers=args.layers,
            d_model=args.d_model,
            heads=args.heads,
            context=args.context,
            lr=args.lr or 2e-3,
            warmup=args.warmup,
        )
        data = StdlibTextDataModule(args.context, args.batch_size or 16, args.corpus_bytes)
        return model, data, evaluate_lm
    from benchmarks.jobs.cluster_worker import _evaluate
    from examples.digits.data import DigitsDataModule
    from examples.digits.model import MLPClassifier

    model = MLPClassifier(hidden=args.hidden, depth=args.depth, lr=args.lr or 0.05, momentum=0.9)
    data = DigitsDataModule(batch_size=args.batch_size or 32, repeat=args.repeat, seed=args.seed)
    return model, data, _evaluate


def main(argv: list[str] | None = None) -> None:
    from benchmarks.jobs import BARE_TRAINER
    from benchmarks.jobs.cluster_worker import StepTrace, consensus_and_traces, mean_step_rows
    from lightning_commsgd import CommunicationMonitor

    args = build_parser().parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    model, data, evaluate = build_workload(args)
    monitor = CommunicationMonitor()
    trace = StepTrace(None if args.no_communication else monitor)
    common: dict[str, Any] = dict(accelerator="cpu", max_steps=args.max_steps, max_epochs=-1, **BARE_TRAINER)
    if args.no_communication:
        trainer = Trainer(devices=1, callbacks=[trace], **common)
    else:
        strategy = build_strategy(args.config, model if args.workload == "lm" else None)
        trainer = Trainer(
            devices=1, num_nodes=args.num_nodes, strategy=strategy, callbacks=[monitor, trace], **common
        )
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - trace.start
    results: dict[str, Any] = {
        "workload": args.workload,
        "config": "compute_floor" if args.no_communication else args.config,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_seconds": train_seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.no_communication:
        results.update(steps=[[t, loss, 0] for _, t, loss, _ in trace.rows], **evaluate(model, data))
        args.json.write_text(json.dumps(_finite(results)))
        return
    ledger = monitor.ledger
    results.update(
        bytes_sent=ledger.bytes_sent,
        bytes_received=ledger.bytes_received,
        rounds=ledger.rounds,
        by_tag={tag: vars(stats) for tag, stats in ledger.by_tag.items()},
    )
    traces = consensus_and_traces(trainer, model, trace.rows)  # untimed, after the ledger was read
    if traces is not None:  # rank 0
        results["steps"] = mean_step_rows(traces)
        results.update(evaluate(model, data))
        args.json.write_text(json.dumps(_finite(results)))
    from lightning_commsgd.comm import shutdown_process_group

    shutdown_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as cluster_worker: skip a finalization race in torch's native threads


def _finite(value: Any) -> Any:
    from benchmarks.results import json_safe

    return json_safe(value)


if __name__ == "__main__":
    main()
