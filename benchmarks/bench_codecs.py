"""Codecs at the wire's limit: encode / decode throughput of every compressor and payload format, and the
bits per value each sends against the empirical entropy of what it sends.

For each codec, on one thread (``torch.set_num_threads(1)``; ``OMP_NUM_THREADS=1`` is set too), the median
over ``--repeats`` of

- ``encode`` / ``decode``: the compressor's payload from fp32 values and back, in GB/s of fp32 input
  (4 bytes per value), so codecs compare by the gradient size they can process per second;
- ``entropy pack`` / ``unpack``: the lossless ``"entropy"`` wire format (Zstandard over a transform,
  :mod:`lightning_commsgd.compression.wire`) on top, likewise in GB/s of fp32 input;
- sizes in bits per value: the packed payload, the empirical-entropy bound
  (:func:`lightning_commsgd.compression.payload_entropy`: side values at 32 bits, codes at their zeroth-order
  entropy), the entropy-coded message, and each one's ratio to fp32 (32 bits).

Two inputs: ``gaussian`` (``--numel`` N(0, 1) values) and ``gradient``: the flat gradient of the digits MLP
(``--hidden 1400``: 4.0 M parameters) on one batch of 32 after 20 SGD steps, which is heavy-tailed (a few
large values per block: the p-norm quantizer's codes are sparser than on Gaussian values) and has exact
zeros (units that no input of the batch activates).

Usage: ``python -m benchmarks.bench_codecs [--numel 4194304 --repeats 7 --device cpu]`` (``make
bench-codecs``); ``--device cuda`` times the CUDA kernels (synchronised) when a GPU is present. Writes
``benchmarks/results/codecs_<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks.results import machine_description, markdown_table  # noqa: E402
from lightning_commsgd.compression import (  # noqa: E402
    QSGD,
    BlockInt4,
    BlockInt8,
    Cast,
    Compressor,
    EntropyWire,
    Identity,
    PNormQuantizer,
    RandomK,
    ScaledSign,
    TopK,
    payload_entropy,
)

RESULTS = Path(__file__).resolve().parent / "results"


def codecs() -> list[tuple[str, Compressor]]:
    """(label, compressor): the compressed-SGD compressors with their common settings, then the averaging
    strategies' payload formats by their codec names."""
    return [
        ("pnorm inf/256 (DORE, DIANA)", PNormQuantizer(float("inf"), 256)),
        ("pnorm 2/256", PNormQuantizer(2.0, 256)),
        ("qsgd s=4/512", QSGD(levels=4, bucket_size=512)),
        ("qsgd s=16/512", QSGD(levels=16, bucket_size=512)),
        ("topk 1%", TopK(0.01)),
        ("randomk 1%", RandomK(0.01)),
        ("scaled sign", ScaledSign()),
        ("scaled sign/256", ScaledSign(block_size=256)),
        ('"int8" (BlockInt8/256)', BlockInt8(256)),
        ('"int4" (BlockInt4/64)', BlockInt4(64)),
        ('"bf16"', Cast("bf16")),
        ('"fp16"', Cast("fp16")),
        ("fp32 (Identity)", Identity()),
    ]


def digits_gradient(hidden: int) -> torch.Tensor:
    """The digits MLP's flat gradient on one batch after 20 SGD steps (never tiled: a repeated vector would
    let Zstandard's match finder code the copies for free)."""
    import torch.nn.functional as F

    from examples.digits.data import DigitsDataModule
    from examples.digits.model import MLPClassifier

    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    model = MLPClassifier(hidden=hidden, depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = iter(data.train_dataloader())
    for _ in range(21):
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if _ < 20:
            optimizer.step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def seconds(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median wall-clock seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(label: str, compressor: Compressor, x: torch.Tensor, repeats: int) -> list[str]:
    numel, cuda = x.numel(), x.is_cuda
    fp32_bytes = 4 * numel
    generator = torch.Generator(device=x.device).manual_seed(0)
    wire = EntropyWire()
    payload = compressor.encode(x, generator)
    message = wire.pack(payload, compressor, numel)
    assert torch.equal(wire.unpack(message, compressor, numel), payload)
    encode = seconds(lambda: compressor.encode(x, generator), repeats, cuda)
    decode = seconds(lambda: compressor.decode(payload, numel), repeats, cuda)
    pack = seconds(lambda: wire.pack(payload, compressor, numel), repeats, cuda)
    unpack = seconds(lambda: wire.unpack(message, compressor, numel), repeats, cuda)
    bound = payload_entropy(compressor, payload, numel)
    coded = 8 * message.numel() / numel
    gbs = [f"{fp32_bytes / t / 1e9:.2f}" for t in (encode, decode, pack, unpack)]
    return [
        label,
        *gbs,
        f"{bound.packed_bits_per_value:.3f}",
        f"{bound.entropy_bits_per_value:.3f}",
        f"{coded:.3f}",
        f"{coded / bound.entropy_bits_per_value:.3f}",
        f"{bound.packed_bits_per_value / 32:.4f}",
        f"{coded / 32:.4f}",
    ]


HEADERS = [
    "codec",
    "encode GB/s",
    "decode GB/s",
    "entropy pack GB/s",
    "entropy unpack GB/s",
    "packed bits/value",
    "entropy bits/value",
    "coded bits/value",
    "coded / entropy",
    "packed / fp32",
    "coded / fp32",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 22, help="values per vector (default 4 Mi)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--hidden", type=int, default=1400, help="width of the gradient source MLP (1400: 4.0 M values)"
    )
    sources = ("gaussian", "gradient")
    parser.add_argument("--inputs", nargs="+", choices=sources, default=list(sources))
    parser.add_argument("--out", type=Path, default=None, help="default: results/codecs_DATE.md")
    args = parser.parse_args(argv)
    if args.numel < 1 or args.repeats < 1:
        parser.error("--numel and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sections = []
    for source in args.inputs:
        if source == "gaussian":
            x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
        else:
            x = digits_gradient(args.hidden)
        x = x.to(device)
        rows = [measure(label, compressor, x, args.repeats) for label, compressor in codecs()]
        table = markdown_table(HEADERS, rows)
        print(f"\n## input: {source}\n\n{table}", flush=True)
        sections.append(f"## Input: {source} ({x.numel()} values, {device})\n\n{table}")
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"codecs_{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_codecs " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        f"# Codec throughput and bits per value ({date})",
        "",
        f"Command: `{command.strip()}`; machine: {machine_description()}; one thread.",
        "",
        "GB/s are of fp32 input (4 bytes per value), medians over the repeats. `entropy` = the empirical-"
        "entropy bound of the payload (side values at 32 bits, codes at their zeroth-order entropy);"
        " `coded` = the `wire=\"entropy\"` message (Zstandard level 1 over a lossless transform).",
    ]
    out.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
