"""Checkpoints: one file with everything needed to resume exactly or to load a ready-to-eval model.

Contents: unwrapped model state_dict (no ``module.`` / ``_orig_mod.`` prefixes), optimizer, scheduler and
scaler states, completed epochs, the unfinished epoch's sums (after an interruption), the world size,
History, config, classes, normalization and every rank's RNG states: tensors (on the CPU, whatever device
trained) and plain values only, so a checkpoint loads with ``torch.load(weights_only=True)`` and a file that
would need arbitrary unpickling (code) is refused before any of it runs.

Writes are durable: temp file in the same folder, fsync, rename over the old file, fsync of the folder.
A crash, a full disk or a second Ctrl-C mid-write leaves the previous checkpoint in place and loadable.
A run folder is locked while a run writes into it (:class:`RunLock`).
"""
from __future__ import annotations

import errno
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .models import get_model, strip_prefixes, unwrap_model
from .runtime import pick_device

FORMAT_VERSION = 2  # 2: weights_only-safe contents (RNG states as tensors), world_size, per-rank RNG


def out_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path, refused with one line when it or a folder above it is a file (``--out`` of train,
    lr-find or interpret given a file's name); a missing folder is fine (it is made when first written)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):  # the nearest existing one: a file there would fail only at mkdir
        if p.exists():
            if not p.is_dir():
                what = "is a file, not a folder" if p == folder else f"cannot be a folder, {p} is a file"
                raise ConfigError(f"{folder}: {what}; choose another --out")
            break
    return folder


def save_checkpoint(path: str | os.PathLike, **payload: Any) -> Path:
    """Durably write ``payload`` (plus format version) to ``path``; ``model`` may be a module.

    A failure (full disk, unwritable folder) raises :class:`CheckpointError` and leaves any previous
    file at ``path`` untouched."""
    path = Path(path)
    if isinstance(payload.get("model"), nn.Module):
        payload["model"] = unwrap_model(payload["model"]).state_dict()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        payload = {**_on_cpu(payload), "format_version": FORMAT_VERSION}  # a CUDA error here is one line too
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        reason = "disk full" if full else (getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e)[:80]}")
        raise CheckpointError(f"{path}: could not write the checkpoint ({reason}); "
                              f"the previous checkpoint, if any, is unchanged") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)  # after the rename: the new file is in place whatever this says
    return path


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor (in nested dicts, lists, tuples) moved to the CPU: a bare ``torch.load`` of a
    GPU run's checkpoint then works on a machine without that GPU (torch.save copies to the host anyway)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, OrderedDict):  # a state_dict: keep its type and _metadata (module versions)
        out = OrderedDict((k, _on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) is dict:
        return {k: _on_cpu(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj  # anything else is stored as it is (the payload holds no other containers)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut (POSIX; Windows has no directory fsync)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some network and WSL mounts cannot sync a folder: the data itself was synced
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF):
            raise CheckpointError(f"{folder}: could not sync the folder after writing the checkpoint "
                                  f"({e.strerror})") from None
    finally:
        os.close(fd)


# How a torch.save file starts: a zip archive, or (the legacy format) its pickled magic number
_TORCH_HEADERS = (b"PK\x03\x04", *(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)
                                   for p in range(pickle.HIGHEST_PROTOCOL + 1)))


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` files do; anything else (a README, random bytes, a plain pickle)
    is no checkpoint at all, and --trust-checkpoint could not make it one."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    return head.startswith(_TORCH_HEADERS)


def _torch_load(path: Path, map_location: str | torch.device, trust: bool, mmap: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=not trust, mmap=True)
        except (RuntimeError, OSError):
            pass  # not a zip file, a damaged one, or a file system that cannot map: the plain read words it
    return torch.load(path, map_location=map_location, weights_only=not trust)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    trust: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Read and sanity-check a checkpoint: a missing, empty, truncated, foreign or unsafe file raises
    :class:`CheckpointError` with one line.

    Loading is ``weights_only``: tensors and plain values only, so no code stored in the file can run.
    ``trust=True`` (``--trust-checkpoint``) also reads files that need full unpickling, such as those of
    eva_api before format 2; only for files you made yourself: unpickling can run any code.
    ``mmap=True`` maps the tensors instead of reading them, for a look at the config or epoch only: the
    ~86 MB of a ``fast`` run's weights and Muon momenta are then not read, which counts over a Drive mount.
    Zip-format files only (what ``torch.save`` writes); a plain read where the file system cannot map."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (not a checkpoint)")
    if not _is_torch_file(path):
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        ckpt = _torch_load(path, map_location, trust, mmap)
    except pickle.UnpicklingError as e:
        msg = str(e).lower()
        # torch 2.4 (fixed in 2.5) words any error met while loading, a damaged tensor record too, as a refusal
        if ("weights_only" not in msg and "weights only" not in msg) or "pytorchstreamreader" in msg:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (UnpicklingError)") from None
        raise CheckpointError(
            f"{path}: refused: loading it needs arbitrary unpickling, which can run code stored in the file "
            f"(an eva_api checkpoint before format 2, or not an eva_api file). Nothing in it was run. If you "
            f"wrote it yourself, pass --trust-checkpoint (load_checkpoint(..., trust=True)) to read it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, ModuleNotFoundError, AttributeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    except Exception as e:  # unpickling garbage can raise almost anything
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not an eva_api checkpoint (no model/config entries)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer eva_api (format {ckpt['format_version']})")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device | None = None, trust: bool = False) -> nn.Module:
    """A ready-to-eval model from a checkpoint, on ``device`` (default: the best available).

    The returned module carries ``classes``, ``mean``, ``std`` and ``config`` attributes for prediction and
    evaluation."""
    from .config import Config

    device = pick_device(str(device)) if device is not None else pick_device("auto")
    ckpt = load_checkpoint(path, map_location=device, trust=trust)
    config = Config.from_dict(ckpt["config"])
    classes = ckpt.get("classes") or [str(i) for i in range(10)]
    model = get_model(config.model, num_classes=len(classes), dropout=config.dropout)
    try:
        model.load_state_dict(strip_prefixes(ckpt.get("ema") or ckpt["model"]))  # "ema": a 0.1 run with --ema
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {config.model} ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    if config.channels_last:  # as it trained: bf16 convolutions round differently in NCHW
        model.to(memory_format=torch.channels_last)
    model.classes, model.mean, model.std = list(classes), tuple(ckpt["mean"]), tuple(ckpt["std"])
    model.config = config
    return model


class RunLock:
    """An exclusive lock on a run folder (``.lock`` inside it), held while a run writes there.

    The operating system releases it when the process ends, however it ends, so a lock left by a killed
    run never blocks the next one. Where file locks are unavailable it is a no-op."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lock"
        self._file = None
        self._made: list[Path] = []

    def acquire(self) -> "RunLock":
        folder = out_folder(self.path.parent.absolute())
        self._made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise CheckpointError(f"{folder}: cannot write the run folder ({e.strerror or e})") from None
        try:
            import fcntl
        except ImportError:  # Windows: no fcntl
            self._file = f
            return self
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks on this file system
                self._file = f
                return self
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise CheckpointError(f"{self.path.parent}: a run is already writing into this folder ({owner}); "
                                  f"wait for it or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._file = f
        for stale in folder.glob(".*.tmp"):  # a save cut short by kill -9; the lock says nobody else writes
            stale.unlink(missing_ok=True)
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None
            if self._made and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                self.path.unlink()  # a run that failed before writing anything leaves no empty folders
                for folder in self._made:
                    if any(folder.iterdir()):
                        break
                    folder.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["FORMAT_VERSION", "RunLock", "load_checkpoint", "load_model", "out_folder", "save_checkpoint"]
