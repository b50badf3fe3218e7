"""Checkpoints are never half-written (ditfuse.checkpoint_io): a write that fails part-way, from
a full disk or an exception while pickling, leaves the previous file loadable and no stray
temporary file, and says which file failed and why."""

from __future__ import annotations

import errno

import pytest
import torch

from ditfuse import checkpoint_io
from ditfuse.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    with_atomic_checkpoints,
)


def _full_disk_after(nbytes: int):
    """torch.save that writes `nbytes` of the file, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        f.truncate(nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_a_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, path)
    monkeypatch.setattr(checkpoint_io.torch, "save", _full_disk_after(100))
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    msg = str(err.value)
    assert str(path) in msg and "No space left on device" in msg and "previous last.ckpt is unchanged" in msg
    assert "\n" not in msg
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["w"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone


def test_an_exception_while_pickling_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint"):
        # the tensor is written, then a lambda cannot be pickled: torch.save stops mid-file
        io.save_checkpoint({"global_step": 2, "w": torch.ones(10_000), "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_first_write_failing_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_io.torch, "save", _full_disk_after(0))
    with pytest.raises(CheckpointWriteError, match="no last.ckpt was written"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "sub" / "last.ckpt")
    assert list((tmp_path / "sub").iterdir()) == []


def test_a_users_checkpoint_io_is_kept():
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env, own = SLURMEnvironment(), TorchCheckpointIO()
    added = with_atomic_checkpoints([env])
    assert added[0] is env and isinstance(added[1], AtomicCheckpointIO)
    assert with_atomic_checkpoints([env, own]) == [env, own]
    assert isinstance(with_atomic_checkpoints(None)[0], AtomicCheckpointIO)
