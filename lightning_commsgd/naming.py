"""One naming table: every argument of every strategy, with one meaning and its paper symbol.

The same argument name means the same thing in every strategy and config. :data:`ARGUMENTS` states that
meaning once; :func:`naming_table` adds, read from the registry's configs and the adapters' signatures,
which strategies take each argument, and renders the table the README shows. ``tests/test_registry.py``
checks that every argument of every strategy is in the table and that the README shows the current one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_commsgd.registry import ENTRIES

__all__ = ["ARGUMENTS", "Argument", "naming_table", "strategy_arguments"]


@dataclass(frozen=True)
class Argument:
    """One argument name: what it means everywhere, and its symbol in the papers (empty: none)."""

    meaning: str
    symbol: str = ""


ARGUMENTS: dict[str, Argument] = {
    # the algorithms
    "tau": Argument("optimizer steps between communication rounds (an int or a schedule such as AdaComm)",
                    "tau (H, I)"),
    "momentum": Argument('what a round does to the optimizer state: "average" (combined like the model: '
                         'averaged, or mixed with W), "local" (untouched) or "zero" (reset)', "u"),
    "average_buffers": Argument("floating-point buffers (BatchNorm statistics) take part in the rounds"),
    "replica_weights": Argument('"uniform" mean of the replicas, or weighted by the "samples" each took'),
    "global_every": Argument("hierarchical averaging: every this many rounds averages over all ranks", "H"),
    "group_size": Argument("ranks per hierarchical block (consecutive ranks, a node by default)", "g"),
    "on_nonfinite": Argument('a replica with NaN/Inf before a round: "raise" on every rank, or "skip" it'),
    "topology": Argument("the gossip graph or doubly stochastic mixing matrix", "W"),
    "edge_weights": Argument('weights of a named graph\'s edges: "metropolis" or "uniform"', "W_ij"),
    "final_average": Argument("one exact average at the end of training (the consensus model)"),
    "alpha": Argument("the pull of each replica towards the centre/anchor z: x <- (1 - alpha) x + alpha z",
                      "alpha"),
    "anchor_momentum": Argument("momentum of the anchor's update (Overlap Local-SGD)", "beta"),
    "correction": Argument('how an arrived average is applied: "pull" (the paper) or "cocod"'),
    "compressor": Argument("the codec Q of what each rank sends (a round's change, a gradient or its "
                           "residual): a name (bf16, fp16, int8, int4) or a Compressor; None: exact fp32",
                           "Q"),
    "model_compressor": Argument("the codec of the master's model residual (a name or a Compressor)", "Q_m"),
    "server_compressor": Argument("the compressor of the aggregate sent back (with its own error feedback)",
                                  "Q_s"),
    "master": Argument('where the aggregate or master update is formed: "rank0" (gather, then broadcast) or '
                       '"replicated" (all-gather, every rank)'),
    "shift_rate": Argument("the step of the learned gradient shifts h_i", "alpha"),
    "model_rate": Argument("the step of the compressed model estimate x_hat", "beta"),
    "error_weight": Argument("the weight of the fed-back compression error e", "eta"),
    "rates": Argument('unset shift_rate / model_rate from the "paper"\'s experiments or the "theory"'),
    "error_feedback": Argument("each rank adds its last compression error to its next gradient", "e_i"),
    "seed": Argument("base of the compressors' random streams (rank r: seed + 1 + r)"),
    "wire": Argument('how compressed payloads travel: "packed" (fixed size) or "entropy" (entropy-coded, '
                     "variable size; the same trajectory bit for bit)"),
    # outer optimizers (DiLoCo, Streaming DiLoCo, SlowMo)
    "outer_optimizer": Argument("builds the optimizer that steps the anchor with the mean pseudo-gradient "
                                "(default: SGD lr 0.7, momentum 0.9, Nesterov)", "OuterOpt"),
    "outer_lr_scheduler": Argument("builds an LR scheduler for the outer optimizer, stepped after each outer "
                                   "step"),
    "fragments": Argument("Streaming DiLoCo: the model's fragments, synchronised at staggered times (a "
                          "count of strided layer groups, or lists of parameter-name prefixes)", "F"),
    "sync_delay": Argument("inner steps a fragment's mean travels before its outer step (overlap)",
                           "tau (d)"),
    "local_weight": Argument("weight of the local value when a fragment's new global value arrives: "
                             "x <- (1 - w) global + w local", "alpha"),
    "backup_device": Argument("where the anchor and the outer optimizer's state live (e.g. cpu)"),
    "slow_lr": Argument("SlowMo's slow learning rate", "alpha"),
    "slow_momentum": Argument("SlowMo's slow momentum", "beta"),
    # the parameter-server family
    "k": Argument("gradients per server update (K-sync, K-async, K-batch-async)", "K"),
    "variant": Argument('"k-async" or "k-batch" (K-batch-async)'),
    "staleness_lr": Argument("staleness-aware learning rate eta_j = min(C / ||w_j - w_tau(j)||^2, eta_max)",
                             "eta_j"),
    "straggler_mu": Argument("emulated stragglers: each worker waits Exp(mu) seconds per gradient", "mu"),
    "straggler_seed": Argument("seed of the emulated straggler delays"),
    "server": Argument('the parameter server\'s placement: "colocated" (a thread on rank 0, which trains) or '
                       '"dedicated" (rank 0 only serves)'),
    # the adapters
    "eval_on": Argument('which model validation sees during fit: "consensus" (the mean) or "local"'),
    "redundancy": Argument("RI-SGD's data placement: a RedundancyInfusion, or its redundancy as a number",
                           "mu"),
    "check_replicas": Argument("debug: after each round that equalises the replicas, check them bitwise"),
    "sync_timeout": Argument("seconds any collective may wait before the job is declared failed"),
    "rendezvous_timeout": Argument("seconds the ranks wait for each other while the process group forms"),
}  # fmt: skip

#: Lightning's own DDPStrategy arguments, passed through unchanged (not part of the table)
FRAMEWORK_ARGUMENTS = frozenset(
    {
        "accelerator",
        "parallel_devices",
        "cluster_environment",
        "checkpoint_io",
        "precision_plugin",
        "precision",
        "process_group_backend",
        "timeout",
        "start_method",
    }
)


def strategy_arguments(cls: type) -> list[str]:
    """The named arguments of a strategy class (every ``__init__`` of its bases, ``**kwargs`` resolved)."""
    names: list[str] = []
    fixed = set(getattr(cls, "fixed_arguments", ()))
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith(("lightning.", "builtins")):
            continue
        for param in inspect.signature(init).parameters.values():
            named = param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            if named and param.name not in ("self", "algorithm", *fixed) and param.name not in names:
                names.append(param.name)
    return names


#: sets of strategies the table names instead of listing them (the README defines each above the table)
STRATEGY_SETS: dict[str, tuple[str, ...]] = {
    "periodic": (
        "LocalSGD",
        "DecentralizedSGD",
        "ElasticAveraging",
        "OverlapLocalSGD",
        "DiLoCo",
        "StreamingDiLoCo",
        "SlowMo",
    ),
}


def _who(takers: list[str], everyone: list[str]) -> str:
    """The strategies column: "every strategy", a named set, "all but" at most two, or the list."""
    if not takers:
        return "-"
    if set(takers) == set(everyone):
        return "every strategy"
    for name, members in STRATEGY_SETS.items():
        if set(takers) == set(members):
            return f"*{name}*"
    missing = [name for name in everyone if name not in takers]
    if len(missing) <= 2 < len(takers):
        return "all but " + ", ".join(missing)
    return ", ".join(takers)


def naming_table(classes: Iterable[type]) -> str:
    """The README's table: argument, meaning, paper symbol, the strategies (of ``classes``) that take it."""
    takers: dict[str, list[str]] = {name: [] for name in ARGUMENTS}
    everyone = []
    for cls in classes:
        everyone.append(cls.__name__.removesuffix("Strategy"))
        for name in strategy_arguments(cls):
            if name in takers:
                takers[name].append(cls.__name__.removesuffix("Strategy"))
    lines = ["| argument | meaning | paper | strategies |", "|---|---|---|---|"]
    for name, argument in ARGUMENTS.items():
        who = _who(takers[name], everyone)
        lines.append(f"| `{name}` | {argument.meaning} | {argument.symbol or '-'} | {who} |")
    return "\n".join(lines)


def registered_classes(adapter_module: object) -> list[type]:
    """The strategy classes of the registry's own (non-preset) entries, from ``adapter_module``."""
    return [getattr(adapter_module, e.class_name) for e in ENTRIES.values() if not e.preset]
