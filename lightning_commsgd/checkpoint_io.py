"""Checkpoint files that are whole or refused: atomic saves and an integrity check before loading.

Why: Lightning's ``TorchCheckpointIO`` writes a checkpoint into a temporary file in the system's temp folder
and moves it into place; when that folder is on another file system the move is a copy, and a kill during
the copy leaves a truncated checkpoint where the previous one was. And ``torch.load`` of a damaged file
either fails deep inside the unpickler or, when the damage hits tensor bytes, loads wrong numbers without a
word. Here:

- :class:`AtomicCheckpointIO` (the default ``checkpoint_io`` of every lightning_commsgd strategy) writes a
  local checkpoint to a temporary file *in the target's folder* (``.<name>.tmp-<pid>``), flushes and
  syncs it to disk, replaces the target with it (``os.replace``) and syncs the folder: at every instant
  the target is either the previous complete file or the new complete file. A save killed midway leaves only
  the temporary file, which the next save into that folder removes.
- :func:`verify_checkpoint` checks a file before anything is read from it: empty, not a zip archive
  (torch's format since 1.6), truncated (no central directory), or a record whose CRC-32 does not match
  its bytes (one flipped bit in tensor data is caught) raise :class:`DamagedCheckpointError` naming the file.
  The strategies call it on every rank before the process group is created, when the Trainer was given a
  ``ckpt_path`` (with the popen launcher; spawn/fork runs refuse the file when it is loaded).

Remote paths (``s3://...``) are passed to Lightning's own implementation unchanged.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from lightning_commsgd.internals import weights_only_kwargs

__all__ = ["AtomicCheckpointIO", "DamagedCheckpointError", "verify_checkpoint"]

_TMP_MARK = ".tmp-"


class DamagedCheckpointError(ValueError):
    """A checkpoint file is empty, truncated or corrupted; the message names the file."""


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedCheckpointError` naming ``path`` unless it is a complete torch zip checkpoint
    whose every record matches its CRC-32 (reads the whole file once). Missing files are left to the caller
    (Lightning says so with its own error)."""
    path = Path(path)
    if not path.is_file():
        return
    size = path.stat().st_size
    where = f"Checkpoint {str(path)!r}"
    if size == 0:
        raise DamagedCheckpointError(
            f"{where} is empty (0 bytes): a save that was interrupted, or a full disk. Resume from an "
            "earlier checkpoint."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except zipfile.BadZipFile as error:
        raise DamagedCheckpointError(
            f"{where} ({size} bytes) is truncated or not a torch checkpoint ({error}): torch writes zip "
            "archives, and this one has no readable directory. Resume from an earlier checkpoint."
        ) from error
    except (OSError, EOFError, ValueError, RuntimeError) as error:  # unreadable headers inside the archive
        raise DamagedCheckpointError(f"{where} ({size} bytes) cannot be read: {error}.") from error
    if bad_record is not None:
        raise DamagedCheckpointError(
            f"{where} ({size} bytes) is corrupted: record {bad_record!r} fails its CRC-32 check (bytes "
            "changed after the save). Resume from an earlier checkpoint."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local saves and verified loads (see the module docstring)."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        import torch

        target = Path(path).expanduser().absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        temporary = target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}")
        try:
            with open(temporary, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> Any:
        if _is_local(path):
            verify_checkpoint(Path(path).expanduser())
        try:
            kwargs = weights_only_kwargs(weights_only)  # Lightning 2.6+ takes it
            return super().load_checkpoint(path, map_location=map_location, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:  # a damage the CRCs cannot see (e.g. a pickle that no longer parses)
            raise DamagedCheckpointError(f"Checkpoint {str(path)!r} cannot be loaded: {error}") from error


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files that killed saves of ``target`` left behind (any process's)."""
    for stale in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
        try:
            pid = int(stale.name.rsplit(_TMP_MARK, 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
