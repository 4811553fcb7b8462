"""Which tensors make up one worker's replica: parameters x_i, optimizer state u_i, buffers.

The list is built in a rank-independent order (optimizer param groups, then module buffers), so every
rank packs the same layout and issues the same collective. Optimizer state is *materialised* before a
round where a parameter has none yet (a parameter that got no gradient on this rank): PR-SGD-Momentum
starts every u_i at zero, and a layout that differed between ranks would hang the collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["MOMENTUM_MODES", "MomentumMode", "ReplicaState", "averaged_state_keys"]

MomentumMode = Literal["average", "local", "zero"]
MOMENTUM_MODES: tuple[str, ...] = ("average", "local", "zero")


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
        f"{type(optimizer).__name__}. Use momentum='local' (state stays per worker) or momentum='zero' "
        f"(state is reset at every round)."
    )


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
        self.buffers = [b for b in module.buffers() if torch.is_floating_point(b)] if average_buffers else []
        if momentum == "average":
            for opt in self.optimizers:  # fail now, not at the first round
                for group in opt.param_groups:
                    averaged_state_keys(opt, group)

    def optimizer_tensors(self) -> list[Tensor]:
        """u_i: the optimizer-state tensors averaged in ``"average"`` mode, materialised where missing."""
        if self.momentum != "average":
            return []
        out: list[Tensor] = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                keys = averaged_state_keys(opt, group)
                for param in group["params"]:
                    if keys:
                        _materialise(opt, group, param, keys)
                        out.extend(opt.state[param][k] for k in keys)
        return out

    def averaged_tensors(self) -> list[Tensor]:
        """Parameters first (consensus distance reads them from the buffer's head), then u_i, buffers."""
        return [*self.params, *self.optimizer_tensors(), *self.buffers]

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
