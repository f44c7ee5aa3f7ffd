"""Checkpoints: one file with everything needed to resume exactly or to load a ready-to-eval model.

Contents: unwrapped model state_dict (no ``module.`` / ``_orig_mod.`` prefixes), optimizer, scheduler,
scaler, the averaged weights (``ema``, when the config keeps an EMA: ``load_model`` returns those),
lookahead's slow weights and step (``lookahead``),
completed epochs, the unfinished epoch's sums (after an interruption), History, config, classes,
normalization and RNG states. Written atomically (temp file in the same folder + rename):
a crash mid-write never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

FORMAT_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: str | os.PathLike, **payload: Any) -> Path:
    """Atomically write ``payload`` (plus format version) to ``path``; ``model`` may be a module."""
    path = Path(path)
    if isinstance(payload.get("model"), nn.Module):
        payload["model"] = unwrap_model(payload["model"]).state_dict()
    payload["format_version"] = FORMAT_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and sanity-check a checkpoint; a missing, truncated or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, ModuleNotFoundError, AttributeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    except Exception as e:  # unpickling garbage can raise almost anything
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not an eva_api checkpoint (no model/config entries)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer eva_api (format {ckpt['format_version']})")
    return ckpt


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes so any saved state loads into a plain model."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """A ready-to-eval model from a checkpoint, on ``device`` (default: the best available).

    The returned module carries ``classes``, ``mean`` and ``std`` attributes for prediction.
    """
    from .config import Config
    from .engine import pick_device
    from .models import get_model

    device = pick_device(str(device)) if device is not None else pick_device("auto")
    ckpt = load_checkpoint(path, map_location=device)
    config = Config.from_dict(ckpt["config"])
    classes = ckpt.get("classes") or [str(i) for i in range(10)]
    model = get_model(config.model, num_classes=len(classes), dropout=config.dropout)
    try:
        model.load_state_dict(strip_prefixes(ckpt.get("ema") or ckpt["model"]))  # the EMA when trained with one
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {config.model} ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    model.classes, model.mean, model.std = list(classes), tuple(ckpt["mean"]), tuple(ckpt["std"])
    return model
