"""Named strategies (``LocalSGDStrategy(tau=8)``): an adapter with one algorithm's arguments in its signature.

Each is made from the registry's table (:mod:`lightning_commsgd.registry`) by :func:`named_strategy`: a
subclass of an adapter (the Trainer's :class:`~lightning_commsgd.strategies.base.CommunicationStrategy`,
or Fabric's) whose ``__init__`` takes the algorithm config's arguments followed by the adapter's own, builds
the config and hands it to the adapter. Its signature and docstring are the config's and the adapter's
together, so LightningCLI (jsonargparse) and ``help()`` show every argument with its meaning, and a
misspelt argument gets the closest valid name. No algorithm logic lives here.

This module imports no framework: the Lightning and Fabric adapters call :func:`named_strategy` on their
own base class.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from typing import Any

from lightning_commsgd.algorithms.protocol import AlgorithmConfig
from lightning_commsgd.registry import ENTRIES

__all__ = ["named_strategy", "registered_strategies", "registered_strategy"]


def _args_section(doc: str | None) -> list[str]:
    """The lines of the ``Args:`` section of a Google-style docstring (entries indented 4 spaces)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    out: list[str] = []
    inside = False
    for line in lines:
        if line.strip() == "Args:":
            inside = True
            continue
        if inside:
            if line and not line.startswith(" "):
                break
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return out


def _summary(doc: str | None) -> str:
    """The docstring's text before its first section."""
    text = inspect.cleandoc(doc or "")
    return re.split(r"\n\s*\n(?=(Args|Raises|Returns|Attributes):)", text)[0].strip()


def _resolved_parameters(function: Any) -> list[inspect.Parameter]:
    """``function``'s parameters with their annotations evaluated (the modules use postponed annotations,
    and the generated ``__init__`` lives elsewhere, so the strings could not be resolved from there)."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that does not evaluate here: keep the strings
        hints = {}
    return [
        p.replace(annotation=hints.get(name, p.annotation))
        for name, p in inspect.signature(function).parameters.items()
    ]


def named_strategy(
    config_cls: type[AlgorithmConfig], adapter: type, class_name: str, module: str, strategy_name: str
) -> type:
    """A subclass of ``adapter`` named ``class_name`` whose ``__init__`` takes ``config_cls``'s arguments and
    the adapter's (except ``algorithm``), and passes ``config_cls(...)`` to the adapter as its algorithm."""
    config_params = [p for p in _resolved_parameters(config_cls.__init__) if p.name != "self"]
    config_names = {p.name for p in config_params}
    adapter_params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in _resolved_parameters(adapter.__init__)
        if p.name not in ("self", "algorithm") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    process_params = [  # what the adapter's **kwargs passes on to its own bases
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for base in adapter.__mro__[1:]
        if "__init__" in base.__dict__ and hasattr(base, "check_before_launch")
        for p in _resolved_parameters(base.__dict__["__init__"])
        if p.name not in ("self", "algorithm") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    seen: set[str] = set()
    keyword_params = []
    for p in [*adapter_params, *process_params]:
        if p.name not in seen and p.name not in config_names:
            seen.add(p.name)
            keyword_params.append(p)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = inspect.Signature([self_param, *config_params, *keyword_params])
    accepted = [p.name for p in [*config_params, *keyword_params]]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [name for name in kwargs if name not in accepted]
        if unknown:
            guesses = difflib.get_close_matches(unknown[0], accepted, n=1, cutoff=0.6)
            hint = (
                f"did you mean {guesses[0]!r}?" if guesses else f"it accepts: {', '.join(sorted(accepted))}."
            )
            raise TypeError(f"{class_name} got an unexpected argument {unknown[0]!r}; {hint}")
        bound = signature.bind(self, *args, **kwargs)
        config_args = {k: v for k, v in bound.arguments.items() if k in config_names}
        adapter_args = {k: v for k, v in bound.arguments.items() if k != "self" and k not in config_names}
        adapter.__init__(self, config_cls(**config_args), **adapter_args)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{class_name}.__init__"
    __init__.__module__ = module
    doc = "\n".join(
        [
            f"{_summary(config_cls.__doc__)}",
            "",
            f"The :class:`~{config_cls.__module__}.{config_cls.__name__}` algorithm under the Lightning "
            f"{'Fabric' if 'fabric' in adapter.__module__ else 'Trainer'}: the same as "
            f"``{adapter.__name__}({config_cls.__name__}(...), ...)``.",
            "",
            "Args:",
            *_args_section(config_cls.__doc__),
            *[line for line in _args_section(adapter.__doc__) if not line.strip().startswith("algorithm:")],
        ]
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": module,
        "__qualname__": class_name,
        "strategy_name": strategy_name,
        "algorithm_type": config_cls,
    }
    return type(adapter)(class_name, (adapter,), namespace)


def registered_strategy(name: str, adapter: type, module: str) -> type:
    """The named strategy of registry entry ``name`` under ``adapter``: its class name, its algorithm's
    arguments (what each adapter package defines its public classes with)."""
    entry = ENTRIES[name]
    if entry.algorithm is None:
        raise ValueError(f"Registry entry {name!r} has no algorithm config to build a named strategy from.")
    return named_strategy(entry.algorithm, adapter, entry.class_name, module, name)


def registered_strategies(adapter: type, module: str) -> dict[str, type]:
    """Every named strategy of the registry under ``adapter`` by class name (one per entry with an algorithm
    that is not a preset): what an adapter package puts in its namespace, so a registry entry is all a new
    algorithm needs to appear as ``MyAlgoStrategy`` in both adapters."""
    return {
        entry.class_name: registered_strategy(name, adapter, module)
        for name, entry in ENTRIES.items()
        if entry.algorithm is not None and not entry.preset
    }
