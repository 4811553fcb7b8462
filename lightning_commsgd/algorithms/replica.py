"""Which tensors make up one worker's replica: parameters x_i, optimizer state u_i, buffers.

The list is built in a rank-independent order (optimizer param groups, then module buffers), so every
rank packs the same layout and issues the same collective. Optimizer state is *materialised* before a
round where a parameter has none yet (a parameter that got no gradient on this rank): PR-SGD-Momentum
starts every u_i at zero, and a layout that differed between ranks would hang the collective.

The tensors fall in two sections, packed in this order: *signed* ones (parameters, first moments and
momentum buffers, other floating buffers), then *non-negative* ones (Adam's second moments ``exp_avg_sq`` /
``max_exp_avg_sq``, normalisation layers' ``running_var``). A rounded payload treats the two differently
(:mod:`lightning_commsgd.payload`): a non-negative quantity must stay positive with relative precision,
or Adam divides by its eps and BatchNorm by a negative variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "MOMENTUM_MODES",
    "NONNEGATIVE_STATE_KEYS",
    "MomentumMode",
    "ReplicaState",
    "averaged_state_keys",
    "nonnegative_buffers",
]

MomentumMode = Literal["average", "local", "zero"]
MOMENTUM_MODES: tuple[str, ...] = ("average", "local", "zero")
#: optimizer-state entries that are non-negative by construction (running means of squared gradients)
NONNEGATIVE_STATE_KEYS: tuple[str, ...] = ("exp_avg_sq", "max_exp_avg_sq")


def nonnegative_buffers(module: nn.Module) -> list[Tensor]:
    """The floating buffers of ``module`` that are non-negative by construction: the running variance of
    every normalisation layer that tracks running statistics (BatchNorm, InstanceNorm, SyncBatchNorm)."""
    out = []
    for sub in module.modules():
        running_var = getattr(sub, "running_var", None)
        if isinstance(sub, nn.modules.batchnorm._NormBase) and isinstance(running_var, Tensor):
            out.append(running_var)
    return out


def averaged_state_keys(optimizer: Optimizer, group: dict) -> tuple[str, ...]:
    """Optimizer-state entries of one param group that are averaged in ``momentum="average"`` mode.

    - ``torch.optim.SGD``: ``momentum_buffer`` (u_i of PR-SGD-Momentum) when ``momentum != 0``.
    - ``torch.optim.Adam`` / ``AdamW``: the first and second moments ``exp_avg``, ``exp_avg_sq`` (and
      ``max_exp_avg_sq`` with ``amsgrad``). The step counter stays local: it is equal on all ranks.

    Raises:
        TypeError: for any other optimizer, whose state layout this package does not know.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return ("momentum_buffer",) if group.get("momentum", 0) != 0 else ()
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
    raise TypeError(
        f"momentum='average' knows how to average the state of torch.optim.SGD, Adam and AdamW, not "
        f"{type(optimizer).__name__}. Use momentum='local' (its state stays per worker) or momentum='zero' "
        f"(its state is reset at every round)."
    )


def check_averageable(optimizers: Sequence[Optimizer]) -> None:
    """Raise the TypeError of :func:`averaged_state_keys` for the first optimizer whose state
    ``momentum="average"`` cannot average (before any collective: the strategies call it first)."""
    for opt in optimizers:
        for group in opt.param_groups:
            averaged_state_keys(opt, group)


def _materialise(optimizer: Optimizer, group: dict, param: Tensor, keys: tuple[str, ...]) -> None:
    """Create the zero state ``optimizer`` itself would create, for a parameter that has none yet."""
    state = optimizer.state[param]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and "step" not in state:
        on_device = group.get("capturable") or group.get("fused")
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=scalar_dtype, device=param.device if on_device else None)
    for key in keys:
        if key not in state:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


class ReplicaState:
    """The tensors a round of averaging touches, for one module and its optimizers.

    Args:
        module: the model; its floating-point buffers (BatchNorm running statistics) are averaged when
            ``average_buffers`` is true. Integer buffers (``num_batches_tracked``) are equal on all
            ranks and never averaged.
        optimizers: parameters are taken from their param groups (each once, in group order); with no
            optimizer, the module's parameters that require gradients.
        momentum: ``"average"`` (PR-SGD-Momentum: u_i replaced by the average), ``"local"`` (state never
            touched) or ``"zero"`` (state reset after every round).
        average_buffers: average floating-point module buffers with the parameters.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        momentum: MomentumMode,
        average_buffers: bool,
    ) -> None:
        self.optimizers = list(optimizers)
        self.momentum = momentum
        seen: set[int] = set()
        self.params: list[Tensor] = []
        sources = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        for param in sources or [p for p in module.parameters() if p.requires_grad]:
            if id(param) not in seen:
                seen.add(id(param))
                self.params.append(param)
        floating = [b for b in module.buffers() if torch.is_floating_point(b)] if average_buffers else []
        positive = {id(b) for b in nonnegative_buffers(module)}
        self.buffers = [b for b in floating if id(b) not in positive]  # signed floating buffers
        self.nonnegative_buffers = [b for b in floating if id(b) in positive]
        if momentum == "average":
            check_averageable(self.optimizers)  # fail now, not at the first round

    def _state_sections(self) -> tuple[list[Tensor], list[Tensor]]:
        """The averaged optimizer-state tensors, ``(signed, nonnegative)``, materialised where missing (one
        pass over the param groups)."""
        signed: list[Tensor] = []
        nonnegative: list[Tensor] = []
        if self.momentum != "average":
            return signed, nonnegative
        for opt in self.optimizers:
            for group in opt.param_groups:
                keys = averaged_state_keys(opt, group)
                for param in group["params"]:
                    if keys:
                        _materialise(opt, group, param, keys)
                        for key in keys:
                            section = nonnegative if key in NONNEGATIVE_STATE_KEYS else signed
                            section.append(opt.state[param][key])
        return signed, nonnegative

    def optimizer_tensors(self) -> list[Tensor]:
        """u_i: every optimizer-state tensor averaged in ``"average"`` mode (signed, then non-negative)."""
        signed, nonnegative = self._state_sections()
        return [*signed, *nonnegative]

    def averaged_sections(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(signed, nonnegative)``: parameters first (consensus distance reads them from the buffer's
        head), then signed optimizer state (momentum buffers, first moments) and signed buffers; then the
        non-negative optimizer state (second moments) and buffers (running variances)."""
        signed, nonnegative = self._state_sections()
        return [*self.params, *signed, *self.buffers], [*nonnegative, *self.nonnegative_buffers]

    def averaged_tensors(self) -> list[Tensor]:
        """Both sections of :meth:`averaged_sections` in one list, signed first."""
        signed, nonnegative = self.averaged_sections()
        return [*signed, *nonnegative]

    def reset_optimizer_state(self) -> None:
        """``momentum="zero"``: forget the optimizer state of every averaged parameter, as if the
        optimizer were new (SGD's next step starts its buffer from the gradient, Adam its bias
        correction from step 1)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    opt.state.pop(param, None)

    @property
    def param_numel(self) -> int:
        """Number of parameter elements: the head of the packed buffer."""
        return sum(p.numel() for p in self.params)
