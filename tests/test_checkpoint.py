"""Checkpoint writes that fail part-way (full disk, a folder that cannot be synced) and run locks on file
systems without locks: one line, and the previous checkpoint stays loadable."""
import errno
import os
import stat

import pytest
import torch

from eva_api import CheckpointError, RunLock, load_checkpoint, save_checkpoint
from eva_api import checkpoint as ckpt_mod


def _save(path, value):
    return save_checkpoint(path, model={"w": torch.full((4,), float(value))}, config={"model": "tiny"}, epoch=value)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed "
                                                "writing file data/0: file write failed (No space left on device)")])
def test_a_full_disk_mid_write_gives_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = _save(tmp_path / "checkpoint.pt", 1)
    real_save = torch.save

    def half_then_full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(ckpt_mod.torch, "save", half_then_full)
    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint, if any, is unchanged"):
        _save(path, 2)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_a_folder_that_cannot_be_synced_still_saves(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")  # as some network and WSL mounts answer
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    assert load_checkpoint(_save(tmp_path / "checkpoint.pt", 3))["epoch"] == 3


def test_the_lock_clears_a_killed_saves_temp_file(tmp_path):
    (tmp_path / ".checkpoint.pt.12345.tmp").write_bytes(b"cut short by kill -9")
    with RunLock(tmp_path):
        assert not (tmp_path / ".checkpoint.pt.12345.tmp").exists()


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock(tmp_path), RunLock(tmp_path):  # no error: locking is simply unavailable there
        pass
