"""Checkpoints are never half-written: write a temporary file next to the target, then rename.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives
in the system temp folder (`tempfile.mkstemp()`): when that is another filesystem than the run
folder (node-local /tmp, checkpoints on NFS/Lustre), the commit is a copy, and a copy that fails
half-way (the run folder's disk is full) leaves a truncated last.ckpt, the file `--ckpt_path
last` resumes from. Here the temporary file is in the target's own folder, so the final
`os.replace` is a rename within one filesystem: atomic on POSIX. A failed write removes the
temporary file and leaves the previous checkpoint as it was.

`ditfuse fit|validate` use this plugin unless trainer.plugins already holds a CheckpointIO
(ditfuse.commands.lightning_cli). Remote paths (`s3://...`) keep Lightning's fsspec path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the file and the cause."""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX: a rename is recorded in the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through `.<name>.tmp-<pid>` in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({reason}); {kept}. Free space in "
                                   f"{path.parent} or move the run with --trainer.default_root_dir=DIR") from exc
    except BaseException:  # Ctrl-C during the write: no stray temporary file, nothing replaced
        tmp.unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (a temporary file in the same folder, renamed)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """trainer.plugins plus an AtomicCheckpointIO, unless the user chose a CheckpointIO."""
    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed):
        return listed
    return [*listed, AtomicCheckpointIO()]
