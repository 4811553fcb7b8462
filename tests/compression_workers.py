"""Multi-process workers for the compression tests: DORE / QSGD / MEM-SGD in a plain PyTorch loop."""

from __future__ import annotations

from typing import Any

import torch
from mp import CountingPatch
from mp_workers import loss_fn, make_batches, make_model, make_optimizer

from lightning_commsgd.algorithms import CompressedGradientSGD, DoubleResidualCompression, NonFiniteError
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression import QSGD, Identity, PNormQuantizer, RandomK, ScaledSign, TopK

COMPRESSORS = {
    "pnorm": lambda: PNormQuantizer(float("inf"), 16),
    "pnorm256": lambda: PNormQuantizer(float("inf"), 256),  # the DORE paper's blocks
    "qsgd": lambda: QSGD(levels=2, bucket_size=32),
    "identity": Identity,
    "topk": lambda: TopK(0.2),
    "randk": lambda: RandomK(0.3),
    "sign": lambda: ScaledSign(16),
}


def build(case: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    comm = Communicator()
    if case["algorithm"] == "dore":
        return DoubleResidualCompression(
            [optimizer],
            comm,
            COMPRESSORS[case["compressor"]](),
            model_compressor=COMPRESSORS[case.get("model_compressor", case["compressor"])](),
            server=case["server"],
            alpha=case.get("alpha"),
            beta=case.get("beta"),
            eta=case.get("eta", 1.0),
            rates=case.get("rates", "paper"),
            seed=case.get("seed", 0),
            wire=case.get("wire", "packed"),
        )
    return CompressedGradientSGD(
        [optimizer],
        comm,
        COMPRESSORS[case["compressor"]](),
        error_feedback=case["error_feedback"],
        server_compressor=COMPRESSORS[case["server_compressor"]]() if case.get("server_compressor") else None,
        server=case.get("server", "replicated"),
        seed=case.get("seed", 0),
        wire=case.get("wire", "packed"),
    )


def train(
    rank: int,
    case: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    algorithm: Any,
    batches: list,
    steps: range,
    counter: CountingPatch | None = None,
    poison: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Run ``steps`` (1-based labels); ``poison=(rank, step)`` makes that rank's gradient NaN there."""
    params = []
    for t in steps:
        if counter is not None:
            counter.label = t
        optimizer.zero_grad()
        loss_fn(model, batches[rank][t - 1]).backward()
        if poison == (rank, t):
            next(model.parameters()).grad[0, 0] = float("nan")
        algorithm.after_backward()
        if algorithm.should_step:
            optimizer.step()
        algorithm.after_optimizer_step()
        params.append(torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]))
    return params


def compression_worker(
    rank: int, world_size: int, cases: list[dict[str, Any]], steps: int, data_seed: int, model_seed: int
) -> dict[str, dict[str, Any]]:
    batches = make_batches(world_size, steps, data_seed)
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        model = make_model("mlp", model_seed)
        optimizer = make_optimizer(case["optimizer"], model)
        algorithm = build(case, model, optimizer)
        counter = CountingPatch()
        with counter:
            params = train(rank, case, model, optimizer, algorithm, batches, range(1, steps + 1), counter)
        results[case["id"]] = {
            "params": torch.stack(params),
            "calls": counter.calls,
            "ledger": algorithm.communicator.ledger.as_dict(),
            "alpha": getattr(algorithm, "alpha", None),
            "beta": getattr(algorithm, "beta", None),
        }
    return results


def resume_worker(
    rank: int, world_size: int, case: dict[str, Any], steps: int, split: int, data_seed: int, model_seed: int
) -> dict[str, Any]:
    """Uninterrupted run vs a run checkpointed after ``split`` steps and restored into fresh objects."""
    batches = make_batches(world_size, steps, data_seed)
    model = make_model("mlp", model_seed)
    optimizer = make_optimizer(case["optimizer"], model)
    full = train(rank, case, model, optimizer, build(case, model, optimizer), batches, range(1, steps + 1))

    model = make_model("mlp", model_seed)
    optimizer = make_optimizer(case["optimizer"], model)
    algorithm = build(case, model, optimizer)
    first = train(rank, case, model, optimizer, algorithm, batches, range(1, split + 1))
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "algorithm": algorithm.state_dict(),
    }
    saved = torch.load(_roundtrip(saved), weights_only=False)
    model = make_model("mlp", model_seed + 1)  # a different x_0: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    optimizer = make_optimizer(case["optimizer"], model)
    optimizer.load_state_dict(saved["optimizer"])
    algorithm = build(case, model, optimizer)
    algorithm.load_state_dict(saved["algorithm"])
    rest = train(rank, case, model, optimizer, algorithm, batches, range(split + 1, steps + 1))
    return {"full": torch.stack(full), "resumed": torch.stack(first + rest)}


def _roundtrip(obj: Any) -> Any:
    import io

    stream = io.BytesIO()
    torch.save(obj, stream)
    stream.seek(0)
    return stream


def nan_worker(
    rank: int, world_size: int, case: dict[str, Any], poison: tuple[int, int], data_seed: int, model_seed: int
) -> dict[str, Any]:
    """Every rank must raise the same NonFiniteError at the poisoned step, with the residuals untouched."""
    batches = make_batches(world_size, poison[1], data_seed)
    model = make_model("mlp", model_seed)
    optimizer = make_optimizer(case["optimizer"], model)
    algorithm = build(case, model, optimizer)
    train(rank, case, model, optimizer, algorithm, batches, range(1, poison[1]))
    before = {k: None if v is None else v.clone() for k, v in algorithm._tensors().items()}
    params_before = [p.detach().clone() for p in model.parameters()]
    opt_before = {k: v["momentum_buffer"].clone() for k, v in enumerate(optimizer.state.values())}
    try:
        train(
            rank, case, model, optimizer, algorithm, batches, range(poison[1], poison[1] + 1), poison=poison
        )
    except NonFiniteError as err:
        error = str(err)
    else:
        error = None
    after = algorithm._tensors()
    return {
        "error": error,
        "state_unchanged": all(
            (before[k] is None and after[k] is None) or torch.equal(before[k], after[k]) for k in before
        ),
        "params_unchanged": all(torch.equal(a, p) for a, p in zip(params_before, model.parameters())),
        "optimizer_unchanged": all(
            torch.equal(opt_before[k], v["momentum_buffer"]) for k, v in enumerate(optimizer.state.values())
        ),
    }


def wire_worker(
    rank: int, world_size: int, cases: list[dict[str, Any]], steps: int
) -> dict[str, dict[str, Any]]:
    """Each case under both wire formats on a 9.6k-parameter model (large enough for coding to pay):
    the trajectory (every step's parameters) and the ledger's bytes."""
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [
        (torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(steps)
    ]
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        for wire in ("packed", "entropy"):
            torch.manual_seed(7)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            algorithm = build({**case, "wire": wire}, model, optimizer)
            params = []
            for x, y in batches:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                algorithm.after_backward()
                if algorithm.should_step:
                    optimizer.step()
                algorithm.after_optimizer_step()
                params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
            results[f"{case['id']}-{wire}"] = {
                "params": torch.stack(params),
                "ledger": algorithm.communicator.ledger.as_dict(),
            }
    return results
