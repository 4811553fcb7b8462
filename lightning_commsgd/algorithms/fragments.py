"""How Streaming DiLoCo splits a model into fragments, each synchronised at its own time.

A fragment is a set of parameters (and the floating buffers of the same modules). The default pattern is
the Streaming DiLoCo paper's: the model's *layers* (the modules that own parameters directly, in
``named_modules`` order) dealt out in turn, layer j to fragment j mod F, so consecutive fragments are not
neighbouring blocks of layers ("strided" fragments). A user overrides it with a list of fragments, each a
list of name prefixes (``[["encoder.0", "encoder.2"], ["encoder.1", "head"]]``): a parameter or buffer
belongs to the first fragment with a prefix that names it or one of its modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Fragment", "check_fragments", "split_into_fragments"]


@dataclass
class Fragment:
    """The tensors of one fragment: parameters (through the outer optimizer) and floating buffers
    (averaged as values), signed and non-negative ones apart."""

    params: list[Tensor] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    buffers: list[Tensor] = field(default_factory=list)
    nonnegative_buffers: list[Tensor] = field(default_factory=list)

    @property
    def param_numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def tensors(self) -> list[Tensor]:
        """What a sync sends, in order: parameters, signed buffers, non-negative buffers."""
        return [*self.params, *self.buffers, *self.nonnegative_buffers]


def check_fragments(fragments: Any) -> int | list[list[str]]:
    """``fragments`` if it is an int >= 1 (F, the default strided pattern) or a non-empty list of non-empty
    lists of name prefixes; a TypeError/ValueError naming the argument otherwise."""
    if isinstance(fragments, int) and not isinstance(fragments, bool):
        if fragments < 1:
            raise ValueError(
                f"Arg `fragments` must be an int >= 1 (F, fragments of the model), got {fragments}."
            )
        return fragments
    if (
        isinstance(fragments, (list, tuple))
        and fragments
        and all(isinstance(f, (list, tuple)) and f and all(isinstance(n, str) for n in f) for f in fragments)
    ):
        return [list(f) for f in fragments]
    raise TypeError(
        "Arg `fragments` must be an int >= 1 or a list of fragments, each a non-empty list of parameter-name "
        f"prefixes, got {fragments!r}."
    )


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _matches(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def split_into_fragments(
    module: nn.Module,
    params: Sequence[Tensor],
    fragments: int | list[list[str]],
    nonnegative: set[int],
    average_buffers: bool,
) -> list[Fragment]:
    """The fragments of ``module``: ``params`` (the optimizers' parameters, in their order) and, with
    ``average_buffers``, its floating buffers (``nonnegative`` holds the ids of non-negative ones).

    Raises a ValueError when a fragment would be empty, or a parameter belongs to no fragment."""
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError("Every optimized parameter must be a parameter of the module (DiLoCo's fragments).")
    if isinstance(fragments, int):
        layers = [n for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
        if fragments > len(layers):
            raise ValueError(
                f"Arg `fragments` ({fragments}) must be at most the model's layers with parameters "
                f"({len(layers)})."
            )
        layer_fragment = {layer: j % fragments for j, layer in enumerate(layers)}
        count = fragments

        def fragment_of(name: str) -> int | None:
            owner = _owner(name)
            while owner not in layer_fragment and owner:
                owner = _owner(owner)
            return layer_fragment.get(owner, 0)

    else:
        prefixes = fragments
        count = len(prefixes)

        def fragment_of(name: str) -> int | None:
            return next(
                (f for f, group in enumerate(prefixes) if any(_matches(name, g) for g in group)), None
            )

    out = [Fragment() for _ in range(count)]
    for param in params:
        f = fragment_of(names[id(param)])
        if f is None:
            raise ValueError(f"Parameter {names[id(param)]!r} is in none of the `fragments` given.")
        out[f].params.append(param)
        out[f].param_names.append(names[id(param)])
    if average_buffers:
        for name, buffer in module.named_buffers():
            if not torch.is_floating_point(buffer):
                continue
            f = fragment_of(name)
            section = out[0 if f is None else f]
            (section.nonnegative_buffers if id(buffer) in nonnegative else section.buffers).append(buffer)
    empty = [f for f, fragment in enumerate(out) if not fragment.params]
    if empty:
        raise ValueError(f"Arg `fragments`: fragment(s) {empty} hold no parameter of the model.")
    return out
