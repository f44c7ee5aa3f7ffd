"""Checkpoint writes that fail part-way (full disk, a folder that cannot be synced), run locks on file systems
without locks, and files that are no checkpoint at all: one line, and the previous checkpoint stays loadable."""
import errno
import os
import pickle
import random
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


def test_the_payload_keeps_its_containers_and_the_state_dicts_metadata(tmp_path):
    # save_checkpoint rebuilds the payload to move tensors to the CPU (a GPU run's file then loads anywhere):
    # lists stay lists, tuples tuples, and the model's state_dict keeps the module versions in _metadata
    bn = torch.nn.BatchNorm2d(3)
    nested = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": "x"}
    save_checkpoint(tmp_path / "c.pt", model=bn, config={"model": "tiny"}, nested=nested, mean=(0.5, 0.25))
    got = torch.load(tmp_path / "c.pt", weights_only=True)
    assert type(got["model"]) is type(bn.state_dict()) and got["model"]._metadata == bn.state_dict()._metadata
    assert type(got["nested"]["a"]) is list and type(got["nested"]["a"][1]) is tuple and got["mean"] == (0.5, 0.25)
    assert torch.equal(got["nested"]["a"][0], torch.ones(2)) and got["nested"]["a"][1][1] == 3 and got["nested"]["b"] == "x"


def test_a_damaged_record_is_corrupt_not_refused_even_in_torch_2_4s_wording(tmp_path, monkeypatch):
    path = _save(tmp_path / "checkpoint.pt", 1)

    def load_as_torch_2_4(*args, **kwargs):  # 2.4 wrapped every load error in the weights_only text (fixed in 2.5)
        raise pickle.UnpicklingError(
            "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
            "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
            "source.\n WeightsUnpickler error: PytorchStreamReader failed reading file data/0: invalid header or "
            "archive is corrupted")

    monkeypatch.setattr(torch, "load", load_as_torch_2_4)
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_checkpoint(path)  # not "refused ... pass --trust-checkpoint", which would only switch the guard off


@pytest.mark.parametrize("map_error", [None, RuntimeError("unable to mmap 1536 bytes from file: Operation not supported"),
                                       OSError(errno.ENODEV, "No such device")])
def test_a_look_at_the_config_maps_the_file_or_falls_back_to_a_plain_read(tmp_path, monkeypatch, map_error):
    # mmap=True (resume_config, unfinished_run) maps the tensors instead of reading them; a file system that
    # cannot map files (RuntimeError / OSError from torch) still gets the checkpoint, by a plain read
    path = _save(tmp_path / "checkpoint.pt", 3)
    calls, real_load = [], torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        if kwargs.get("mmap") and map_error is not None:
            raise map_error
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    ckpt = load_checkpoint(path, mmap=True)
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["model"]["w"], torch.full((4,), 3.0))
    assert calls == ([True] if map_error is None else [True, False])
    calls.clear()
    load_checkpoint(path)
    assert calls == [False]  # a full load (resume, load_model) reads the file as before


class _Custom:  # a class torch's weights_only loader does not know: loading it would need arbitrary unpickling
    pass


@pytest.mark.parametrize("content", ["readme", "random", "plain pickle"])
def test_a_file_that_is_no_checkpoint_says_so_and_does_not_point_at_the_unsafe_flag(tmp_path, content):
    # these were "refused: loading it needs arbitrary unpickling ... pass --trust-checkpoint", yet trusting them
    # cannot help (torch.load fails on them anyway) and a plain pickle would run its code first
    from conftest import REPO

    path = tmp_path / "file.pt"
    path.write_bytes({"readme": (REPO / "README.md").read_bytes(), "random": random.Random(0).randbytes(4096),
                      "plain pickle": pickle.dumps(_Custom())}[content])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{path}: not a checkpoint (not a file written by torch.save)"


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_real_checkpoint_that_needs_code_is_still_refused_with_the_trust_hint(tmp_path, zip_format):
    path = tmp_path / "c.pt"
    torch.save({"model": {}, "config": {}, "extra": _Custom()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused: loading it needs arbitrary unpickling.*--trust-checkpoint"):
        load_checkpoint(path)
