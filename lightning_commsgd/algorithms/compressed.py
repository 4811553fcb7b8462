"""What the compressed-communication algorithms share: the flat gradient/model views of one optimizer's
parameters, per-rank random streams, the finite flag that travels with every payload, and checkpoints.

These algorithms act at every optimizer step, between ``backward`` and ``optimizer.step``::

    loss.backward()
    algorithm.after_backward()          # exchange compressed gradients; p.grad <- the aggregate
    if algorithm.should_step:           # every rank, or only the master (DORE with server="rank0")
        optimizer.step()
    algorithm.after_optimizer_step()    # DORE: the compressed model residual reaches every rank
    optimizer.zero_grad()

Non-finite values: every payload carries one status byte (1 = finite). A rank whose gradient (or, on the
master, model residual) is not finite sends 0 instead of touching its residual state; the byte reaches
every rank in the same round as the data, and every rank raises the same ``FloatingPointError`` naming
the ranks and the step. No residual state (h_i, h, e, x_hat) ever absorbs a NaN or Inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_commsgd.algorithms.finite import NonFiniteError, all_finite
from lightning_commsgd.algorithms.protocol import CommAlgorithm
from lightning_commsgd.comm import Communicator, all_gather_varlen, broadcast_varlen, gather_varlen
from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.compression.names import as_compressor
from lightning_commsgd.compression.wire import WireFormat, as_wire_format
from lightning_commsgd.flat import FlatBuffer

__all__ = ["CompressedAlgorithm"]


class CompressedAlgorithm(CommAlgorithm):
    """Base of step-wise compressed algorithms (see the module docstring for the call order).

    Args:
        optimizers: exactly one optimizer; its parameters (all groups, in order) are x.
        communicator: carries and counts every payload.
        seed: base of the random streams: rank r's worker stream is seeded ``seed + 1 + r``, the master
            stream ``seed`` (the same on every rank, so replicated masters draw identically).
        buffers: floating-point module buffers (BatchNorm running statistics): not part of x, they stay
            per rank during training and are averaged once by :meth:`finalize` (tag ``final``).
        wire: how payloads travel (:mod:`lightning_commsgd.compression.wire`): ``"packed"`` (default, the
            compressor's fixed-size payload) or ``"entropy"`` (entropy-coded, variable size; the trajectory
            is bit for bit the same, only bytes and time change).
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        seed: int = 0,
        *,
        buffers: Sequence[Tensor] = (),
        wire: WireFormat | str = "packed",
    ) -> None:
        if len(optimizers) != 1:
            raise TypeError(
                f"{type(self).__name__} steps exactly one optimizer (the master update), "
                f"got {len(optimizers)}."
            )
        self.optimizer = optimizers[0]
        self.params: list[Tensor] = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.params:
            raise ValueError("The optimizer has no parameters.")
        self.communicator = communicator
        self.wire = as_wire_format(wire)
        self.rank, self.world_size = communicator.rank, communicator.world_size
        self.numel = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.step = 0
        self.seed = int(seed)
        self.worker_generator = torch.Generator(device=self.device).manual_seed(self.seed + 1 + self.rank)
        self.master_generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.buffers = [b for b in buffers if b.is_floating_point()]
        self.consensus_every: int | None = None
        self.last_consensus: tuple[int, float] | None = None

    # -- flat views ---------------------------------------------------------------------------------
    def flat_grads(self, out: Tensor | None = None) -> Tensor:
        """g: the parameters' gradients in one fp32 vector (a parameter without a gradient counts as 0,
        so every rank sends the same layout); written into ``out`` when given (see :meth:`step_buffer`)."""
        parts = [
            (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in self.params
        ]
        return torch.cat(parts, out=out)

    def flat_params(self, out: Tensor | None = None) -> Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params], out=out)

    def step_buffer(self, name: str) -> Tensor:
        """A model-sized fp32 vector for work within one step, the same one every step under ``name`` on
        CPU (its contents do not survive into a later use of the name); a fresh one on an accelerator, whose
        caching allocator reuses memory anyway. Why: on CPU each fresh model-sized vector costs its page
        faults (about 1 ms per 5 MB), several times per step on the critical path of a per-step method."""
        if self.device.type != "cpu":
            return torch.empty(self.numel, dtype=torch.float32, device=self.device)
        buffers = self.__dict__.setdefault("_step_buffers", {})
        if name not in buffers:
            buffers[name] = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        return buffers[name]

    def _write(self, flat: Tensor, into_grad: bool) -> None:
        """Copy ``flat`` into the parameters (or their ``.grad``), cast to each parameter's dtype."""
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                view = flat[offset : offset + n].view_as(p)
                offset += n
                if into_grad:
                    if p.grad is None:
                        p.grad = view.to(p.dtype).clone()
                    else:
                        p.grad.copy_(view)
                else:
                    p.copy_(view)

    def set_grads(self, flat: Tensor) -> None:
        self._write(flat, into_grad=True)

    def set_params(self, flat: Tensor) -> None:
        self._write(flat, into_grad=False)

    # -- payloads on the wire: the wire format, and the collectives for its fixed or variable sizes ----
    def to_wire(self, payload: Tensor, compressor: Compressor) -> Tensor:
        return self.wire.pack(payload, compressor, self.numel)

    def from_wire(self, data: Tensor, compressor: Compressor) -> Tensor:
        return self.wire.unpack(data, compressor, self.numel)

    def all_gather_messages(self, message: Tensor, tag: str) -> list[Tensor]:
        if self.wire.variable_size:
            return all_gather_varlen(self.communicator, message, tag=tag)
        return self.communicator.all_gather(message, tag=tag)

    def gather_messages(self, message: Tensor, tag: str) -> list[Tensor] | None:
        """Every rank's message on rank 0 (``None`` elsewhere)."""
        if self.wire.variable_size:
            return gather_varlen(self.communicator, message, 0, tag=tag)
        return self.communicator.gather(message, dst=0, tag=tag)

    def broadcast_message(self, message: Tensor | None, fixed_size: int, tag: str) -> Tensor:
        """Rank 0's ``message`` on every rank; elsewhere ``message`` is ``None`` and a packed wire's message
        is known to be ``fixed_size`` bytes long."""
        if self.wire.variable_size:
            return broadcast_varlen(self.communicator, message, 0, tag=tag)
        if message is None:
            message = torch.zeros(fixed_size, dtype=torch.uint8, device=self.device)
        return self.communicator.broadcast_(message, src=0, tag=tag)

    # -- the finite flag ------------------------------------------------------------------------------
    @staticmethod
    def with_status(payload: Tensor, finite: bool) -> Tensor:
        """``payload`` plus one trailing status byte (1 = finite); a non-finite payload is zeroed."""
        status = payload.new_full((1,), 1 if finite else 0)
        return torch.cat([payload if finite else torch.zeros_like(payload), status])

    @staticmethod
    def split_status(message: Tensor) -> tuple[Tensor, bool]:
        return message[:-1], bool(message[-1].item() == 1)

    def raise_non_finite(self, what: str, ranks: Sequence[int]) -> None:
        raise NonFiniteError(
            f"{type(self).__name__}: non-finite (NaN/Inf) {what} on rank(s) {list(ranks)} at optimizer step "
            f"{self.step + 1}; the residual state was not updated. Lower the learning rate, clip gradients "
            "or resume from the last checkpoint."
        )

    @staticmethod
    def is_finite(x: Tensor) -> bool:
        return all_finite([x])  # max and min: no mask tensor (run on every step's gradient)

    @property
    def uncompressed_bytes_per_step(self) -> int:
        """What one rank would send per step without compression: the fp32 vector (4 bytes a parameter)."""
        return 4 * self.numel

    # -- the strategy protocol ------------------------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        """Every rank holds the same model after every step."""
        return True

    @property
    def steps_optimizer(self) -> bool:
        """Whether this rank runs the master update (``optimizer.step()``) at all."""
        return True

    @property
    def should_step(self) -> bool:
        """Whether this rank must call ``optimizer.step()`` now (asked after :meth:`after_backward`)."""
        return self.steps_optimizer

    exchanges_gradients = True

    @property
    def period(self) -> int:
        return 1  # a round every step

    def finalize(self) -> None:
        """The replicas' parameters agree after every step; their BatchNorm statistics, per rank during
        training, become their mean (one all-reduce, tag ``final``)."""
        if self.buffers and self.communicator.is_distributed:
            flat = FlatBuffer(self.buffers)
            self.communicator.all_reduce_(flat.pack(self.buffers), "mean", tag="final")
            flat.unpack(self.buffers)

    def after_backward(self) -> None:
        raise NotImplementedError

    def after_optimizer_step(self) -> bool:
        """Count the step (subclasses add their model phase). Returns True: every step is a round."""
        self.step += 1
        return True

    # -- checkpoints ----------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor | None]:
        """Subclass state tensors by name (``None`` where this rank has none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "worker_generator": self.worker_generator.get_state(),
            "master_generator": self.master_generator.get_state(),
            "tensors": {
                k: None if v is None else v.detach().cpu().clone() for k, v in self._tensors().items()
            },
        }

    def load_resized_state_dict(self, state: dict[str, Any]) -> None:
        """Another world size: residuals, memories and random streams belonged to ranks that no longer
        exist, so they start afresh; the step count continues."""
        self.load_state_dict({"step": state["step"]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a state holding only ``step`` (a resume on another world
        size) keeps the fresh residuals and random streams."""
        self.step = int(state["step"])
        if "tensors" not in state:
            return
        self.worker_generator.set_state(state["worker_generator"])
        self.master_generator.set_state(state["master_generator"])
        for name, value in state["tensors"].items():
            current = getattr(self, name)
            if value is None or current is None:
                setattr(self, name, None if value is None else value.to(self.device))
            else:
                current.copy_(value)


def check_compressor(compressor: Any, name: str = "compressor") -> Compressor:
    """The compressor ``compressor`` is or names (a codec name of
    :mod:`lightning_commsgd.compression.names`: bf16, fp16, int8, int4); a TypeError/ValueError naming
    ``name`` otherwise."""
    resolved = as_compressor(compressor, name)
    assert resolved is not None  # allow_none is off
    return resolved
