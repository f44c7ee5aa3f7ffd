"""Where and how a run executes: device, numeric precision, seeds and RNG states.

The bottom of the house: it imports nothing else from eva_api but the errors, and everything above it
(loaders, loops, checkpoints, the runner) asks it these questions.
"""
from __future__ import annotations

import hashlib
import platform
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


# --------------------------------------------------------------------------------------------- device
def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Anything else is taken literally (and checked)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: nothing here is made for them
        raise ConfigError(f"bad device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device {name!r} asked for, but MPS (Apple GPUs) is not available here; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def check_compile() -> None:
    """One line where ``torch.compile`` cannot run: e.g. torch 2.5 on Python 3.13, or on Windows before torch
    supported it there (torch itself says which pairs work; the error would otherwise come mid-run)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"--compile: torch.compile does not run with torch {torch.__version__} on Python "
                          f"{platform.python_version()} ({sys.platform}); leave --compile off or upgrade torch")


def configure_backends(device: torch.device) -> None:
    """CUDA: let cuDNN pick the fastest convolution for the (fixed) input shapes, and TF32 for fp32 matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def eval_batch_size(device: torch.device) -> int:
    """Evaluation needs no gradients: ResNet18 on 1,024 32x32 images takes well under 2 GB on a GPU."""
    return 1024 if device.type == "cuda" else 256


# ------------------------------------------------------------------------------------------ precision
def cpu_has_bf16() -> bool:
    """True where the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


@dataclass(frozen=True)
class Precision:
    """Autocast settings for one device: ``dtype`` None means full fp32; ``reason`` says why it was chosen;
    ``emulated``: bf16 asked for on a device without native bf16 (its matmuls run far slower)."""

    device_type: str
    dtype: torch.dtype | None
    reason: str = ""
    emulated: bool = False

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, cache_enabled: bool = True):
        """Autocast to ``dtype`` (a no-op for fp32); ``cache_enabled=False`` while a CUDA graph is captured."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache_enabled)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling (its range is too narrow for small gradients); bf16 and fp32 do not."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: CUDA from compute capability 8.0, CPUs with AVX512-BF16/AMX (other devices:
    not known here, so not flagged). torch.cuda.is_bf16_supported() also says True where bf16 is only
    emulated (T4, V100): ask the chip."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type != "cpu" or cpu_has_bf16()


def _auto_precision(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if _native_bf16(device):
            return "bf16", f"compute capability {major}.{minor} has native bf16"
        return "fp16", f"compute capability {major}.{minor} has no native bf16 (needs 8.0): fp16 with loss scaling"
    if device.type == "cpu":
        if _native_bf16(device):
            return "bf16", "the CPU has bf16 units (AVX512-BF16/AMX)"
        return "fp32", "the CPU has no bf16 units"
    return "fp32", f"mixed precision on {device.type} is not tested here: fp32 is the safe choice"


def pick_precision(device: torch.device, name: str = "auto") -> Precision:
    """``auto``: bf16 on CUDA with compute capability >= 8.0 (A100, L4, RTX 30xx, H100), fp16 + GradScaler
    below (T4, V100), bf16 on CPUs with bf16 units, else fp32. ``fp16`` works on CPUs too (with a scaler)."""
    emulated = False
    if name == "auto":
        name, reason = _auto_precision(device)
    elif name in _DTYPES:
        reason = "asked for"
        emulated = name == "bf16" and not _native_bf16(device)  # 40x slower matmuls on an AVX2 CPU, measured
        if emulated:
            reason += f"; {device.type} here has no native bf16: it is emulated, far slower (see auto's choice)"
    else:
        raise ConfigError(f"bad precision {name!r}; choose auto, bf16, fp16 or fp32")
    need = {"fp16": "2.5", "bf16": "2.6"}.get(name) if device.type == "mps" else None
    if need and torch.__version__ < need:  # older torch: "unsupported autocast device_type" mid-run, or silent fp32
        raise ConfigError(f"--precision {name} on mps needs torch >= {need} (autocast on Apple GPUs); this is "
                          f"torch {torch.__version__}: use --precision fp32")
    return Precision(device.type, _DTYPES[name], reason, emulated)


# ---------------------------------------------------------------------------------------------- seeds
def derive_seed(*keys: int) -> int:
    """A 63-bit seed for one random stream named by integer ``keys`` (e.g. seed, epoch, stream, rank).

    Hashing the keys keeps (seed 0, epoch 5) and (seed 5, epoch 0) apart, and streams whose keys differ
    in any position share no draws."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): a CPU run with the same seed repeats exactly."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """Global RNG states as tensors and plain numbers (so a checkpoint loads with ``weights_only=True``).

    CUDA: only ``device``'s generator (each DDP rank keeps its own GPU's), never every GPU's. mps: its one generator."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"python": torch.tensor(internal, dtype=torch.int64), "python_gauss": gauss,
                              "torch": torch.get_rng_state()}
    try:
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    elif device is not None and device.type == "mps":  # dropout draws there
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_states` returned (the CUDA or mps state only onto ``device``).

    Also takes the pickled form of eva_api before checkpoint format 2 (python/numpy states as tuples)."""
    python = states["python"]
    legacy = isinstance(python, tuple)
    random.setstate(python if legacy else (3, tuple(int(v) for v in python.tolist()), states["python_gauss"]))
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        n = states["numpy"]
        np.random.set_state(n if legacy else
                            ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in states and device is not None and device.type == "cuda":
        cuda = states["cuda"]
        if isinstance(cuda, (list, tuple)):  # before format 2: every GPU's state
            index = device.index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    if "mps" in states and device is not None and device.type == "mps":
        torch.mps.set_rng_state(states["mps"])


__all__ = ["Precision", "check_compile", "configure_backends", "derive_seed", "eval_batch_size", "pick_device",
           "pick_precision", "rng_states", "seed_everything", "set_rng_states"]
