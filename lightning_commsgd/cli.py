"""``commsgd``: LightningCLI with this package's strategies registered; models and data come from the config.

Where a run writes: the shipped configs log with ``CSVLogger`` to ``lightning_logs/<config name>/version_N/``
(``metrics.csv``, with the ``CommunicationMonitor``'s ``comm/*`` columns), and the run's full ``config.yaml``
goes into that same folder. With ``--trainer.logger=false`` the config goes to
``<default_root_dir>/lightning_logs/version_N/config.yaml`` (where Lightning's default logger would write),
never into the working directory itself.

A bad value (``--trainer.strategy.tau=0``) ends the run before any process starts: one line on stderr,
``commsgd: error: LocalSGDStrategy: Arg `tau` must be ...``, and exit status 2. Only argument errors
(``ValueError``, ``TypeError``, ``KeyError`` raised while the objects are built) are shortened; anything
else, and every error once the run has started, keeps its traceback. A value the parser itself refuses
(a wrong type, a choice not in a ``Literal``, an unknown key) prints a short usage line and one line,
``commsgd: error: --trainer.strategy.momentum: Expected a typing.Literal[...]. Got value: ...``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NoReturn

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

import lightning_commsgd  # noqa: F401  (registers strategy names)

__all__ = [
    "EXIT_USAGE",
    "CommSGDCLI",
    "CommandLineError",
    "SaveConfigToLogDir",
    "condense_parse_error",
    "main",
]

EXIT_USAGE = 2  # argparse's exit status for a bad command line
_ARGUMENT_ERRORS = (ValueError, TypeError, KeyError)


class CommandLineError(ValueError):
    """A constructor refused a value of the config or the command line; the message is one line."""


class SaveConfigToLogDir(SaveConfigCallback):
    """Lightning's :class:`SaveConfigCallback`, writing to the run's log folder even without a logger.

    Lightning writes ``config.yaml`` to ``trainer.log_dir``: the logger's folder, but the working directory
    (``default_root_dir``) when the run has no logger. Here a run without a logger (or with a logger that
    has no folder) writes to ``<default_root_dir>/lightning_logs/version_N/``, the folder Lightning's
    default logger would take, chosen on rank 0 and broadcast.
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir if trainer.loggers else None  # every rank calls it: it broadcasts
        if log_dir is None:
            log_dir = CSVLogger(trainer.default_root_dir).log_dir if trainer.is_global_zero else None
            log_dir = trainer.strategy.broadcast(log_dir)
        assert log_dir is not None
        config_path = os.path.join(log_dir, self.config_filename)
        fs = get_filesystem(log_dir)
        if not self.overwrite:
            exists = trainer.strategy.broadcast(fs.isfile(config_path) if trainer.is_global_zero else False)
            if exists:
                raise RuntimeError(
                    f"{config_path} exists already: delete it, or pass "
                    "save_config_kwargs={'overwrite': True}."
                )
        if trainer.is_global_zero:
            fs.makedirs(log_dir, exist_ok=True)
            self.parser.save(
                self.config, config_path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
            )
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class _RecordingInstantiator:
    """jsonargparse's default instantiator, ``class_type(*args, **kwargs)``, remembering what failed.

    jsonargparse reports a constructor's error inside a union of the types it tried (the Trainer's
    ``strategy`` is ``str | Strategy``), chained to the first type's error (``str``'s), not to the
    constructor's: this keeps the constructor's own exception and class.
    """

    def __init__(self) -> None:
        self.failures: list[tuple[type, Exception]] = []

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return class_type(*args, **kwargs)
        except Exception as err:
            self.failures.append((class_type, err))
            raise


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err
    return " ".join(str(text).split())


_KEY_PREFIX = re.compile(r'^Parser key "[^"]+":\s*')
_PARSE_ERROR_FRAMING = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Problem with given class_path",
)
_TRIED_OTHER_TYPE = re.compile(r"Expected a <class '(str|NoneType)'>\.?")


def condense_parse_error(message: str) -> str:
    """jsonargparse's nested parse error as one line: the full key (``--trainer.strategy.momentum``) and
    the innermost messages, without the union framing or the types tried in vain (``str`` for a class
    path, ``None`` for an optional value) when a more specific message is there."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [_KEY_PREFIX.sub("", line.strip().removeprefix("- ").strip()) for line in message.splitlines()]
    details = [line for line in lines if line and not line.startswith(_PARSE_ERROR_FRAMING)]
    details = [d for d in details if not _TRIED_OTHER_TYPE.fullmatch(d)] or details
    text = "; ".join(dict.fromkeys(details)) or " ".join(message.split())
    if "Got value" not in text:
        given = [line[len("Given value:") :].strip() for line in lines if line.startswith("Given value:")]
        plain = [g for g in given if not g.startswith(("NestedArg(", "Namespace("))]
        if plain:
            text += f". Got value: {plain[0]}"
    return f"--{'.'.join(keys)}: {text}" if keys else text


class _ShortErrorParser(LightningArgumentParser):
    """Parse errors as a short usage line and one error line; jsonargparse prints the whole usage (60 lines
    for ``fit``) and a nested message. ``JSONARGPARSE_DEBUG=1`` or ``exit_on_error=False`` keep its own."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"usage: {prog} [--config CONFIG] [--KEY VALUE ...]  (all options: {prog} --help)\n")
        sys.stderr.write(f"commsgd: error: {condense_parse_error(message)}\n")
        sys.exit(EXIT_USAGE)


class CommSGDCLI(LightningCLI):
    """:class:`LightningCLI` that writes ``config.yaml`` to the run's log folder
    (:class:`SaveConfigToLogDir`), raises :class:`CommandLineError` (one line: the refusing class and its
    message) when a constructor refuses an argument while the objects are built, and reports parse errors
    in two lines. Arguments as for :class:`LightningCLI`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._instantiator = _RecordingInstantiator()
        kwargs.setdefault("save_config_callback", SaveConfigToLogDir)
        kwargs.setdefault("parser_class", _ShortErrorParser)
        super().__init__(*args, **kwargs)

    @override
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        # appended: Lightning's own instantiators (model, data) keep precedence for their classes
        self.parser.add_instantiator(self._instantiator, object, subclasses=True)

    @override
    def instantiate_classes(self) -> None:
        self._instantiator.failures.clear()
        try:
            super().instantiate_classes()
        except Exception as err:
            message = self._argument_error(err)
            if message is None:
                raise
            raise CommandLineError(message) from err

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        self._instantiator.failures.clear()  # the parser succeeded: what failed before was a type it tried
        return super().instantiate_trainer(**kwargs)

    def _argument_error(self, err: Exception) -> str | None:
        """One line for the argument error behind ``err``, ``None`` when it is not one (a bug keeps its
        traceback): the constructor that refused the value, and its message."""
        text = str(err)
        class_type: type | None = None
        cause: BaseException = err
        for failed, exc in reversed(self._instantiator.failures):
            first_line = next(iter(str(exc).strip().splitlines()), "")
            if first_line and first_line in text:
                class_type, cause = failed, exc
                break
        else:  # the Trainer's own check, or a model / data module built by Lightning's instantiator
            while isinstance(cause.__cause__, Exception):
                cause = cause.__cause__
        if not isinstance(cause, _ARGUMENT_ERRORS):
            return None
        return f"{class_type.__qualname__}: {_one_line(cause)}" if class_type else _one_line(cause)


def main(args: list[str] | None = None) -> None:
    """Entry point: ``commsgd fit --config my_config.yaml [--trainer.strategy.tau=16]`` (the shipped digits
    configs run through ``python examples/digits/cli.py``, whose folder holds their model and data).

    A refused argument prints ``commsgd: error: <class>: <message>`` on stderr and exits with status 2.

    ``commsgd plan ...`` runs the scaling model instead (:mod:`lightning_commsgd.planning.cli`: predicted
    time per epoch of every strategy, recommended tau and payload format); no Trainer is built.
    ``commsgd lighthouse ...`` starts the torchft Lighthouse replica groups meet at
    (:mod:`lightning_commsgd.ft.cli`).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "plan":
        from lightning_commsgd.planning.cli import main as plan_main

        plan_main(argv[1:])
        return
    if argv and argv[0] == "lighthouse":
        from lightning_commsgd.ft.cli import main as lighthouse_main

        lighthouse_main(argv[1:])
        return
    try:
        CommSGDCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except CommandLineError as err:
        print(f"commsgd: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
