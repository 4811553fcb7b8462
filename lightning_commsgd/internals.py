"""Every private name of torch and Lightning this package relies on, in one place.

Each entry says which versions it was verified on and what happens where the name is missing: a loud
``RuntimeError`` naming the Lightning/torch version and the supported range when running on would silently
change behaviour, or a documented no-op where skipping it is safe. Nothing here imports Lightning at module
level (Lightning is imported inside the functions that need it), so the pure layer (``comm``, ``watchdog``)
can use the torch part where Lightning is not installed. ``tests/test_internals.py`` fakes each missing name.

torch (verified on 2.13.0 and 2.14.1):

- ``torch.distributed.distributed_c10d._set_pg_timeout``: :func:`set_group_timeout`. Missing: warns, the
  group keeps its own timeout (safe: collectives still end, later).
- ``torch.distributed.distributed_c10d._get_default_store``: :func:`default_store`. Missing: RuntimeError.

Lightning (the ``lightning`` package). The supported range is :data:`LIGHTNING_RANGE`, 2.5.1 - 2.6.6: every
entry below verified by reading the source and by the ``lightning_smoke`` tests (which exercise each one) on
2.5.1, 2.5.1.post0, 2.5.2, 2.5.6, 2.6.0 and 2.6.6, with torch 2.13.0; ``make test-oldest-lightning`` runs
those tests on the oldest end in CI. 2.5.0 / 2.5.0.post0 pass them too, but their ``LightningCLI`` has no
``parser_class`` (the CLI's one-line argument errors); 2.4.0 fails the CLI fit (its hparams merge refuses the
``_class_path`` that model and data module both carry, fixed in 2.5.0).

- ``_TrainingEpochLoop._broadcast_sigterm_tensor`` (``trainer.fit_loop.epoch_loop``, since 2.5.2): replaced
  by a rank-local check in :func:`remove_per_step_collectives`. Missing before 2.5.2: no-op (2.4.0 -
  2.5.1.post0 have no per-step SIGTERM broadcast at all, read in their source: nothing to remove). Missing
  from 2.5.2 on: RuntimeError.
- ``trainer._signal_connector`` and its ``_sigterm_notifier_fn`` (it broadcasts from the signal handler since
  2.5.2): replaced by a rank-local handler in :func:`remove_per_step_collectives`, read by
  :func:`sigterm_message` / :func:`explain_sigterm`. Missing: RuntimeError.
- ``trainer.fit_loop._combined_loader`` and ``_TrainingEpochLoop.reset``'s "not resumable" warning text:
  :func:`quiet_exact_resume_warning`. Missing: no-op (safe: Lightning's warning is then shown on an exact
  mid-epoch resume too, nothing else changes).
- ``trainer._checkpoint_connector._select_ckpt_path``: wrapped by :func:`report_selected_ckpt_path`, so the
  strategy verifies the checkpoint before the process group forms. Missing: RuntimeError.
- ``trainer._checkpoint_connector.dump_checkpoint`` and its ``_loaded_checkpoint`` (the checkpoint it
  restores after the strategy's setup; ``resume_start`` leaves it alone without a ``ckpt_path``):
  :func:`training_state` / :func:`resume_from_state`, how a replica group healing from a live peer takes the
  peer's loops, callbacks and LR schedulers (:mod:`lightning_commsgd.strategies.replica_groups`). Missing:
  RuntimeError.
- ``lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher`` (the popen launcher)
  with its ``procs`` and ``_call_children_scripts``: :func:`popen_launcher_class` (the base class of
  ``ReportingScriptLauncher``), :func:`is_popen_launcher`, :func:`start_child_scripts`. Missing: RuntimeError.
- ``Strategy._launcher`` (no setter on the public ``launcher``): :func:`replace_launcher`. Missing:
  RuntimeError.
- ``lightning.fabric.utilities.distributed._set_num_threads_if_needed``: :func:`set_num_threads_if_needed`.
  Missing: no-op (safe: it only caps the threads per process where ``OMP_NUM_THREADS`` is unset).
- ``lightning.fabric.utilities.optimizer._optimizers_to_device``: :func:`optimizers_to_device`. Missing:
  RuntimeError.
- ``ParallelStrategy._layer_sync`` (what ``Trainer(sync_batchnorm=True)`` sets):
  :func:`sync_batchnorm_requested`. Missing: RuntimeError.
- ``DDPStrategy._get_process_group_backend``: :func:`process_group_backend`. Missing: RuntimeError.
- ``weights_only`` of ``Strategy.load_checkpoint`` and ``TorchCheckpointIO.load_checkpoint`` (public, since
  2.6.0): :func:`weights_only_kwargs` passes it on where they take it. Before 2.6.0 (they always load with
  ``weights_only=False``): ``None``/``False`` left out, ``True`` a RuntimeError.
- ``DDPStrategy``'s hooks ``_setup_model``, ``_register_ddp_hooks``, ``_configure_launcher``: overridden by
  :class:`DDPWithoutWrapperHooks`. Missing from every parent class: RuntimeError when the strategy class is
  defined (a TypeError there when ``DDPStrategy`` comes before the mixin in the bases).
- Fabric (``lightning.fabric.strategies.DDPStrategy``, the signatures read in 2.4.0, 2.5.0, 2.5.6 and 2.6.0;
  ``tests/test_fabric.py``, a ``lightning_smoke`` file, run on 2.5.1 and 2.6.6): its hooks
  ``_configure_launcher`` and ``_setup_distributed`` (with ``_set_world_ranks``,
  ``_get_process_group_backend`` and the ``_process_group_backend`` attribute it sets) are overridden by
  :class:`FabricDDPHooks`; its ``_backward_sync_control`` (what ``fabric.no_backward_sync`` enters) is
  replaced by :func:`replace_backward_sync_control`. Missing: RuntimeError (at class definition for the
  hooks).
"""

from __future__ import annotations

import logging
import re
import signal
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.distributed_c10d as c10d

if TYPE_CHECKING:  # annotations only: nothing here imports Lightning at run time outside functions
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "LIGHTNING_RANGE",
    "DDPWithoutWrapperHooks",
    "FabricDDPHooks",
    "default_store",
    "explain_sigterm",
    "is_popen_launcher",
    "lightning_version",
    "optimizers_to_device",
    "popen_launcher_class",
    "process_group_backend",
    "quiet_exact_resume_warning",
    "remove_per_step_collectives",
    "replace_backward_sync_control",
    "replace_launcher",
    "report_selected_ckpt_path",
    "set_group_timeout",
    "set_num_threads_if_needed",
    "sigterm_message",
    "start_child_scripts",
    "sync_batchnorm_requested",
    "unsupported",
    "weights_only_kwargs",
]

log = logging.getLogger(__name__)

# The Lightning versions the package is verified on, oldest and newest (pyproject.toml declares the same).
LIGHTNING_RANGE = ("2.5.1", "2.6.6")
# The first Lightning with the per-step SIGTERM broadcast (_TrainingEpochLoop._broadcast_sigterm_tensor).
SIGTERM_BROADCAST_SINCE = (2, 5, 2)
# the start of the warning _TrainingEpochLoop.reset gives on a mid-epoch resume (Lightning 2.4.0 - 2.6.6)
NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


# -- torch ---------------------------------------------------------------------------------------------------
def set_group_timeout(group: Any, seconds: float) -> None:
    """Bound every later operation of ``group`` by ``seconds`` (torch's private ``_set_pg_timeout``, the only
    way to shorten a group's timeout after its rendezvous; warns where it is missing)."""
    setter = getattr(c10d, "_set_pg_timeout", None)
    try:
        if setter is None:
            raise AttributeError("torch.distributed has no _set_pg_timeout")
        setter(timedelta(seconds=seconds), group)
    except (AttributeError, RuntimeError, ValueError) as error:  # an older torch, or a backend without it
        warnings.warn(
            f"The collective timeout of {seconds:g} s could not be set ({error}): collectives keep the "
            "process group's own timeout (the strategy's `timeout`).",
            stacklevel=3,
        )


def default_store() -> Any:
    """The key-value store of the default process group (torch's private ``_get_default_store``)."""
    getter = getattr(c10d, "_get_default_store", None)
    if getter is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.distributed.distributed_c10d._get_default_store, which "
            "lightning_commsgd's failure watchdog needs; use torch 2.13 - 2.14."
        )
    return getter()


# -- Lightning: versions and the loud failure ----------------------------------------------------------------
def lightning_version() -> str:
    """The installed Lightning's version string."""
    import lightning

    return str(lightning.__version__)


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.5.1.post0"`` -> ``(2, 5, 1)``: the release numbers only."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return (0,)
    return tuple(int(part or 0) for part in match.groups())


def unsupported(name: str, needed_for: str) -> RuntimeError:
    """The loud failure: ``name`` is missing from this Lightning; says what needs it, and the range."""
    oldest, newest = LIGHTNING_RANGE
    return RuntimeError(
        f"lightning_commsgd cannot find Lightning's private {name}, which it needs {needed_for}: Lightning "
        f"{lightning_version()} is not supported (verified: {oldest} - {newest}; install one of those, e.g. "
        f"pip install 'lightning>={oldest},<={newest}')."
    )


# -- Lightning: the per-step SIGTERM collectives -------------------------------------------------------------
def remove_per_step_collectives(trainer: pl.Trainer) -> None:
    """Make SIGTERM handling rank-local for ``trainer``.

    Lightning 2.5.2+ broadcasts a one-element "did rank 0 get SIGTERM?" tensor before *every* training batch
    (``_TrainingEpochLoop._broadcast_sigterm_tensor``), and its SIGTERM handler broadcasts again from inside
    the signal handler. Under local SGD that is a synchronisation point per step: it puts every step in
    lock-step across ranks and costs one network latency each, exactly what the algorithms avoid. A
    handler-side broadcast that the other ranks do not expect would also pair with the next averaging
    all-reduce and corrupt it. Both are replaced by rank-local checks: a rank that receives SIGTERM stops at
    its next batch with Lightning's ``SIGTERMException``. Its message (:func:`sigterm_message`, given by
    :func:`explain_sigterm` also to the bare ones Lightning's loops raise) names the rank, the signal, the
    steps and what the other ranks do; the strategy prints it and posts it as the job's abort notice, so the
    other ranks' errors name it, and the rank exits with status 128 + 15 = 143 (Lightning's bare exception
    exits 0). Lightning 2.4.0 - 2.5.1 have no per-step broadcast (their loop raises after the batch in which
    the signal arrived): only the handler is replaced there.

    Raises:
        RuntimeError: if this Lightning version no longer has the hooks patched here, so a Lightning
            upgrade fails loudly instead of silently bringing a per-step collective back.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    epoch_loop = trainer.fit_loop.epoch_loop
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "_sigterm_notifier_fn"):
        raise unsupported("Trainer._signal_connector._sigterm_notifier_fn", "to handle SIGTERM rank-locally")
    broadcasts = hasattr(epoch_loop, "_broadcast_sigterm_tensor")
    if not broadcasts and _version_tuple(lightning_version()) >= SIGTERM_BROADCAST_SINCE:
        raise unsupported(
            "_TrainingEpochLoop._broadcast_sigterm_tensor", "to remove the per-step SIGTERM broadcast"
        )

    def local_sigterm_check() -> None:
        if trainer.received_sigterm:
            raise SIGTERMException(sigterm_message(trainer))

    def local_sigterm_notifier(signum: int, _frame: FrameType | None) -> None:
        log.info("rank %d received SIGTERM (%d)", trainer.global_rank, signum)
        if not connector.received_sigterm:
            # what the message will say: the signal, the step, the ranks it is passed on to
            setattr(connector, _RECEIVED, (signum, trainer.global_step, _child_ranks(trainer)))
            if trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
        connector.received_sigterm = True

    if broadcasts:
        epoch_loop._broadcast_sigterm_tensor = local_sigterm_check
    connector._sigterm_notifier_fn = local_sigterm_notifier


_RECEIVED = "_commsgd_sigterm"  # the signal connector's attribute the handler fills


def _child_ranks(trainer: pl.Trainer) -> list[int]:
    """The global ranks this process started itself (the popen launcher's children, which the SIGTERM
    handler passes the signal on to), still running; empty on a child rank or under torchrun / SLURM."""
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    first = trainer.node_rank * trainer.num_devices + 1
    return [first + i for i, proc in enumerate(procs) if proc.poll() is None]


def _received(trainer: pl.Trainer) -> tuple[int, int, list[int]]:
    """What the rank-local handler recorded: the signal, the step it came at, the ranks it was passed to."""
    default = (int(signal.SIGTERM), trainer.global_step, [])
    return getattr(getattr(trainer, "_signal_connector", None), _RECEIVED, default)


def sigterm_message(trainer: pl.Trainer) -> str:
    """What a rank that got SIGTERM says when it stops: the rank, the signal, the step it arrived at and the
    step the rank stops at, and what the other ranks do."""
    signum, received_at, forwarded = _received(trainer)
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown signal"
    rank = trainer.global_rank
    head = f"rank {rank} received signal {signum} ({name}) at step {received_at}, stopped at step "
    head += str(trainer.global_step)
    if forwarded:
        ranks = ", ".join(str(r) for r in forwarded)
        return f"{head}; it passed the signal on to rank(s) {ranks} (processes it launched): they stop too"
    return (
        f"{head}; a rank that did not receive the signal stops at its next collective with a "
        f"RankFailureError naming rank {rank} (its failure watchdog ends it if it does not)"
    )


def explain_sigterm(exception: SIGTERMException, trainer: pl.Trainer) -> str:
    """Give a ``SIGTERMException`` that Lightning raised bare (its loops raise it at several places) the
    message of :func:`sigterm_message`, and the exit status ``128 + signal`` (143 for SIGTERM), as a shell
    reports a process the signal ended: the bare exception would exit 0, so torchrun and schedulers would
    count the interrupted rank as finished. Returns the message."""
    if not str(exception):
        exception.args = (sigterm_message(trainer),)
    exception.code = 128 + int(_received(trainer)[0])
    return str(exception)


# -- Lightning: the "not resumable" warning on an exact mid-epoch resume -------------------------------------
def quiet_exact_resume_warning(trainer: pl.Trainer, exact: Callable[[Sequence[Any]], bool]) -> None:
    """Drop Lightning's "your dataloader is not resumable" warning when the resume is exact.

    On a mid-epoch resume Lightning (``_TrainingEpochLoop.reset``) warns unless every training loader has
    ``state_dict``/``load_state_dict``. The strategies restore the loader's position from their per-rank
    checkpoint entries instead (:mod:`lightning_commsgd.resumable`): a loader with that interface would make
    Lightning also write rank 0's loader state into ``loops.fit_loop`` of every checkpoint, and such a
    checkpoint no longer resumes under a strategy whose loader lacks it (Lightning's ``DDPStrategy`` raises
    "The CombinedLoader has 0 stateful loaders, but found 1 states"). So the loop's reset runs with that one
    warning filtered out whenever ``exact(training_loaders)`` says the strategy restored their position; in
    every other case (a loader the strategy does not rebuild, a checkpoint without the position) Lightning's
    warning is accurate and stays. Where ``fit_loop._combined_loader`` is missing this is a no-op (the
    warning then also shows on an exact resume).
    """
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    fit_loop = trainer.fit_loop
    if not hasattr(fit_loop, "_combined_loader"):
        return
    epoch_loop = fit_loop.epoch_loop
    reset = epoch_loop.reset
    if getattr(reset, "_commsgd_quiet", False):  # a second fit on the same Trainer
        return

    def reset_quietly() -> None:
        combined = getattr(fit_loop, "_combined_loader", None)
        if combined is None or not exact(combined.flattened):
            return reset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NOT_RESUMABLE_WARNING, category=PossibleUserWarning)
            return reset()

    reset_quietly._commsgd_quiet = True  # type: ignore[attr-defined]
    epoch_loop.reset = reset_quietly  # type: ignore[method-assign]


# -- Lightning: checkpoint path ------------------------------------------------------------------------------
def report_selected_ckpt_path(trainer: Any, report: Callable[[Any], None]) -> None:
    """Have ``trainer`` report the checkpoint path it resolves (``fit(ckpt_path="last")`` included) as soon as
    it does, once per Trainer: Lightning keeps that path to itself until it loads the checkpoint, after the
    strategy's setup and its first collectives."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    select = getattr(connector, "_select_ckpt_path", None)
    if select is None:
        raise unsupported(
            "Trainer._checkpoint_connector._select_ckpt_path",
            "to verify the checkpoint before the process group forms",
        )
    if getattr(select, "_reports_to_commsgd", False):
        return

    def select_and_report(*args: Any, **kwargs: Any) -> Any:
        path = select(*args, **kwargs)
        report(path)
        return path

    select_and_report._reports_to_commsgd = True  # type: ignore[attr-defined]
    connector._select_ckpt_path = select_and_report


def training_state(trainer: Any) -> dict[str, Any]:
    """What ``trainer.save_checkpoint`` would write now (loops, callbacks, LR schedulers, precision, the
    module's and optimizers' states), as a dict in memory: a replica group a peer heals from hands it over."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    dump = getattr(connector, "dump_checkpoint", None)
    if dump is None:
        raise unsupported(
            "Trainer._checkpoint_connector.dump_checkpoint", "to hand the training state to a healing group"
        )
    return dump(weights_only=False)


def resume_from_state(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Have ``trainer`` restore ``checkpoint`` (a :func:`training_state` dict) after the strategy's setup,
    exactly as a ``ckpt_path`` it loaded: Lightning restores the checkpoint it holds there (module, callbacks,
    loops, optimizers, LR schedulers) and then releases it."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    if connector is None or not isinstance(getattr(connector, "_loaded_checkpoint", None), dict):
        raise unsupported(
            "Trainer._checkpoint_connector._loaded_checkpoint", "to resume a healing group from its peer"
        )
    connector._loaded_checkpoint = checkpoint


# -- Lightning: the popen launcher ---------------------------------------------------------------------------
def popen_launcher_class() -> type:
    """Lightning's private ``_SubprocessScriptLauncher`` (``python train.py`` with ``devices=N``), checked for
    what ``ReportingScriptLauncher`` uses of it: ``launch``, ``kill``, ``_call_children_scripts`` and
    ``cluster_environment``/``num_processes``/``num_nodes``/``procs``."""
    try:
        from lightning.pytorch.strategies.launchers import subprocess_script
    except ImportError:
        subprocess_script = None  # type: ignore[assignment]
    base = getattr(subprocess_script, "_SubprocessScriptLauncher", None)
    if base is None or not all(hasattr(base, n) for n in ("launch", "kill", "_call_children_scripts")):
        raise unsupported(
            "lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher",
            "to report a dead rank under the popen launcher",
        )
    return base


def is_popen_launcher(launcher: Any) -> bool:
    """Whether ``launcher`` is exactly Lightning's popen launcher (not a subclass someone configured)."""
    return type(launcher) is popen_launcher_class()


def start_child_scripts(launcher: Any) -> None:
    """Start ranks 1..N-1 of this node as children of this process (the popen launcher's own way)."""
    start = getattr(launcher, "_call_children_scripts", None)
    if start is None:
        raise unsupported("_SubprocessScriptLauncher._call_children_scripts", "to start the child ranks")
    start()


def replace_launcher(strategy: Any, launcher: Any) -> None:
    """Set ``strategy``'s launcher (Lightning's ``Strategy.launcher`` has no setter; ``_configure_launcher``
    sets the private ``_launcher``)."""
    if not hasattr(strategy, "_launcher"):
        raise unsupported("Strategy._launcher", "to install its own launcher")
    strategy._launcher = launcher


def set_num_threads_if_needed(num_processes: int) -> None:
    """What Lightning's launchers do before running the function: cap the threads per process where
    ``OMP_NUM_THREADS`` is unset. A no-op where the private helper is missing (threads only)."""
    try:
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
    except ImportError:
        return
    _set_num_threads_if_needed(num_processes=num_processes)


# -- Lightning: strategy internals ---------------------------------------------------------------------------
def optimizers_to_device(optimizers: Sequence[Any], device: torch.device) -> None:
    """Move every optimizer's state tensors to ``device`` (Lightning's ``_optimizers_to_device``)."""
    try:
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
    except ImportError:
        raise unsupported(
            "lightning.fabric.utilities.optimizer._optimizers_to_device", "to move optimizer states"
        ) from None
    _optimizers_to_device(optimizers, device)


_NO_LAYER_SYNC = object()


def sync_batchnorm_requested(strategy: Any) -> bool:
    """Whether ``Trainer(sync_batchnorm=True)`` gave ``strategy`` a layer sync (its ``_layer_sync``)."""
    layer_sync = getattr(strategy, "_layer_sync", _NO_LAYER_SYNC)
    if layer_sync is _NO_LAYER_SYNC:
        raise unsupported("ParallelStrategy._layer_sync", "to refuse Trainer(sync_batchnorm=True)")
    return layer_sync is not None


def process_group_backend(strategy: Any) -> str:
    """The process-group backend ``strategy`` would use: the one it was given, else the device's default
    (``DDPStrategy._get_process_group_backend``)."""
    get = getattr(strategy, "_get_process_group_backend", None)
    if get is None:
        raise unsupported("DDPStrategy._get_process_group_backend", "to form the process group")
    return str(get())


# -- Lightning: public signatures that differ across the supported range -------------------------------------
def weights_only_kwargs(weights_only: bool | None) -> dict[str, Any]:
    """The ``weights_only`` keyword for a parent's ``load_checkpoint`` (Lightning's ``Strategy`` and
    ``TorchCheckpointIO``): ``super().load_checkpoint(path, **weights_only_kwargs(weights_only))``.

    Lightning 2.6.0 added the argument to both (default ``None``). Before 2.6 neither takes it, Lightning
    never passes it, and ``TorchCheckpointIO`` always loads with ``weights_only=False``: ``None`` and
    ``False`` are left out there, ``True`` is refused (RuntimeError) rather than silently ignored.
    """
    if weights_only is None:
        return {}
    import inspect

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    if "weights_only" in inspect.signature(TorchCheckpointIO.load_checkpoint).parameters:
        return {"weights_only": weights_only}
    if not weights_only:
        return {}
    raise RuntimeError(
        f"Lightning {lightning_version()} loads checkpoints with weights_only=False only; "
        "weights_only=True needs Lightning 2.6.0 or later."
    )


# -- Lightning: DDPStrategy's hooks --------------------------------------------------------------------------
class DDPWithoutWrapperHooks:
    """Mixin, put before ``DDPStrategy`` in a strategy's bases, that turns DDPStrategy's private hooks into
    public ones: ``class S(DDPWithoutWrapperHooks, DDPStrategy)``.

    - ``_setup_model(model)`` returns ``model`` itself: no ``DistributedDataParallel`` wrapper.
    - ``_register_ddp_hooks()`` does nothing (there is no DDP module to register communication hooks on).
    - ``_configure_launcher()`` (the Trainer calls it while it is constructed, after applying its flags and
      before any process or process group exists) calls :meth:`check_before_launch`, then the parent's
      ``_configure_launcher`` (which creates the launcher), then :meth:`after_launcher_configured`.

    A strategy overrides the two public methods (both no-ops here, call ``super()`` in an override) and never
    the private hooks. Defining a subclass raises a RuntimeError when a class after the mixin no longer
    defines one of the hooks (Lightning renamed it: the override would silently stop applying) or when a
    class after the mixin in the bases shadows the mixin's (wrong order of the bases). Verified on
    Lightning 2.5.1 - 2.6.6 (``DDPStrategy`` defines all three).
    """

    WRAPPER_HOOKS = ("_setup_model", "_register_ddp_hooks", "_configure_launcher")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        position = mro.index(DDPWithoutWrapperHooks)
        for hook in DDPWithoutWrapperHooks.WRAPPER_HOOKS:
            owner = next(klass for klass in mro if hook in klass.__dict__)
            if not issubclass(owner, DDPWithoutWrapperHooks):  # DDPStrategy's own comes first
                raise TypeError(
                    f"{cls.__name__}: {owner.__name__}.{hook} comes before DDPWithoutWrapperHooks.{hook} in "
                    "the method resolution order; put DDPWithoutWrapperHooks before DDPStrategy in the bases."
                )
            if not any(hook in klass.__dict__ for klass in mro[position + 1 :]):
                raise unsupported(f"DDPStrategy.{hook}", f"for {cls.__name__} to run without DDP's wrapper")

    def check_before_launch(self) -> None:
        """Refuse Trainer flags that contradict the strategy (called while the Trainer is constructed, before
        any process or process group exists; no launcher yet). Does nothing here."""

    def after_launcher_configured(self) -> None:
        """Adjust the launcher Lightning chose (``self.launcher``; :func:`replace_launcher` to swap it).
        Does nothing here."""

    def _setup_model(self, model: Any) -> Any:
        return model

    def _register_ddp_hooks(self) -> None:
        return None

    def _configure_launcher(self) -> None:
        self.check_before_launch()
        super()._configure_launcher()  # type: ignore[misc]
        self.after_launcher_configured()


# -- Lightning Fabric: DDPStrategy's hooks ---------------------------------------------------------------
def _check_hooks(cls: type, mixin: type, hooks: Sequence[str], framework: str) -> None:
    """The class-definition check of the hook mixins: a parent after ``mixin`` defines each hook, and no class
    after the mixin shadows it."""
    mro = cls.__mro__
    position = mro.index(mixin)
    for hook in hooks:
        if not any(hook in klass.__dict__ for klass in mro[position + 1 :]):
            raise unsupported(f"{framework}.{hook}", f"for {cls.__name__}")
        owner = next(klass for klass in mro if hook in klass.__dict__)
        if mro.index(owner) > position:
            raise TypeError(
                f"{cls.__name__}: {owner.__name__}.{hook} comes before {mixin.__name__}.{hook} in the method "
                f"resolution order; put {mixin.__name__} first in the bases."
            )


class FabricDDPHooks:
    """Mixin, put before Fabric's ``DDPStrategy`` in a strategy's bases, that turns its private hooks into
    public ones: ``class S(FabricDDPHooks, lightning.fabric.strategies.DDPStrategy)``.

    - ``_configure_launcher()`` (Fabric's connector calls it once devices, nodes and precision are set, before
      any process exists) calls :meth:`check_before_launch`, then the parent's.
    - ``_setup_distributed()`` (``fabric.launch()``) sets the world ranks and the backend as Fabric does, then
      calls :meth:`form_process_group` with the backend instead of Fabric's own rendezvous.
    """

    FABRIC_HOOKS = ("_configure_launcher", "_setup_distributed")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_hooks(cls, FabricDDPHooks, FabricDDPHooks.FABRIC_HOOKS, "lightning.fabric DDPStrategy")

    def check_before_launch(self) -> None:
        """Refuse settings that contradict the world (no process yet). Does nothing here."""

    def form_process_group(self, backend: str) -> None:
        """Form the default process group with ``backend`` (called by ``fabric.launch()``)."""
        raise NotImplementedError

    def _configure_launcher(self) -> None:
        self.check_before_launch()
        super()._configure_launcher()  # type: ignore[misc]

    def _setup_distributed(self) -> None:
        for name in ("_set_world_ranks", "_get_process_group_backend"):
            if not hasattr(self, name):
                raise unsupported(f"lightning.fabric DDPStrategy.{name}", "to form the process group")
        self._set_world_ranks()  # type: ignore[attr-defined]
        self._process_group_backend = self._get_process_group_backend()  # type: ignore[attr-defined]
        self.form_process_group(self._process_group_backend)


def replace_backward_sync_control(strategy: Any, control: Any) -> None:
    """Make ``control`` what Fabric's ``no_backward_sync`` enters for ``strategy`` (its private
    ``_backward_sync_control``, set by Fabric's ``DDPStrategy.__init__``)."""
    if not hasattr(strategy, "_backward_sync_control"):
        name = "lightning.fabric DDPStrategy._backward_sync_control"
        raise unsupported(name, "for fabric.no_backward_sync")
    strategy._backward_sync_control = control
