"""``python -m eva_api doctor``: is this machine ready? Versions, the device, the precision ``auto`` picks
and why, then a short real check on that device: a few ResNet18 training steps and an evaluation (with
their images/s), a checkpoint written, reloaded on the CPU and giving the same predictions.

One line per check, ``PASS`` or what failed; the exit status is 0 only if every check passed.
"""
from __future__ import annotations

import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch


def environment(device: torch.device) -> list[str]:
    """Versions and the device, one ``key: value`` line each."""
    import torchvision

    from . import __version__
    from .optim import graph_fallback, ns_dtype_for
    from .runtime import pick_precision

    lines = [f"python: {platform.python_version()} ({platform.machine()})", f"torch: {torch.__version__}",
             f"torchvision: {torchvision.__version__}", f"eva_api: {__version__}",
             f"CUDA: {torch.version.cuda or 'not built with CUDA'} (available: {torch.cuda.is_available()})",
             f"cuDNN: {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'n/a'}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device: {device} = {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} GPU(s)")
    else:
        lines.append(f"device: {device} ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads)")
    precision = pick_precision(device, "auto")
    lines.append(f"precision (auto): {precision.name}, because {precision.reason}; the fast recipe's Muon "
                 f"orthogonalizes in {'bf16' if ns_dtype_for(precision) is torch.bfloat16 else 'fp32'}")
    if device.type == "cuda":
        why = graph_fallback(precision, distributed=False, compiled=False)
        lines.append("training step: " + (f"eager, because {why}" if why else "one CUDA graph per step (--no-cuda-graph: eager)"))
    return lines


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timing covers it (GPUs run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def run_checks(device: torch.device) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for the training, evaluation and checkpoint checks on ``device``."""
    from .checkpoint import load_model, save_checkpoint
    from .config import make_config
    from .data import make_synthetic
    from .engine import evaluate
    from .loaders import TensorLoader, eval_loader, normalize
    from .models import get_model
    from .optim import Stepper, build_optimizer
    from .runtime import configure_backends, pick_precision

    gpu = device.type == "cuda"
    batch, steps = (256, 20) if gpu else (32, 3)  # a few seconds either way
    precision = pick_precision(device, "auto")
    data = make_synthetic(batch * (steps + 1), 2 * batch)
    config = make_config("fast", precision=precision.name)
    model = stepper = loader = None
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            results.append((name, True, fn()))
        except Exception as e:  # a check reports, it never stops the others
            where = traceback.extract_tb(e.__traceback__)[-1]
            results.append((name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                         f"({Path(where.filename).name}:{where.lineno})"))

    def setup() -> str:  # the first work on the device: a broken driver or a wheel without its kernels shows here
        nonlocal model, stepper, loader
        configure_backends(device)
        torch.manual_seed(0)
        model = get_model("resnet18").to(device).to(memory_format=torch.channels_last)
        stepper = Stepper(build_optimizer(model, config, precision), scaler=precision.make_scaler())
        loader = TensorLoader(data.train, data.mean, data.std, batch, train=True, device=device, channels_last=True,
                              crop_padding=2)
        return f"ResNet18 and {len(data.train) + len(data.test)} synthetic images on {device}"

    def train_steps() -> str:
        loader.set_epoch(1)
        model.train()
        it = iter(loader)
        for i, (x, y) in enumerate(it):
            if i == 1:  # the first step pays for cuDNN's algorithm search and lazy init: not timed
                _sync(device)
                start = time.perf_counter()
            with precision.autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            stepper.step(loss)
        _sync(device)
        seconds = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()}")
        return f"{steps} steps of {batch} in {precision.name}: {steps * batch / seconds:,.0f} train img/s"

    def evaluation() -> str:
        test = eval_loader(data.test, data.mean, data.std, device, channels_last=True)
        evaluate(model, test, precision=precision)  # warm-up
        _sync(device)
        start = time.perf_counter()
        m = evaluate(model, test, precision=precision)
        seconds = time.perf_counter() - start
        if m["total"] != len(data.test):
            raise RuntimeError(f"evaluated {m['total']} of {len(data.test)} images")
        return f"{len(data.test)} images: {len(data.test) / seconds:,.0f} eval img/s"

    def checkpoint_roundtrip() -> str:
        x = normalize(data.test.images[:64].to(device), data.mean, data.std)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare in true fp32
        try:
            model.eval()
            with torch.no_grad():
                here = model(x).float().cpu()
            with tempfile.TemporaryDirectory() as tmp:
                path = save_checkpoint(Path(tmp) / "doctor.pt", model=model, config=config.to_dict(),
                                       classes=data.classes, mean=data.mean, std=data.std)
                cpu_model = load_model(path, "cpu")
            with torch.no_grad():
                there = cpu_model(x.cpu().contiguous()).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        same = int((here.argmax(1) == there.argmax(1)).sum())
        diff = (here - there).abs().max().item()
        if same != len(x) or diff > 1e-3 * max(1.0, here.abs().max().item()):
            raise RuntimeError(f"{same}/{len(x)} predictions agree, max logit difference {diff:.3g}")
        return f"written, reloaded on the CPU: {same}/{len(x)} predictions agree (max logit difference {diff:.1e})"

    check("setup", setup)
    if results[-1][1]:
        check("train", train_steps)
        check("evaluate", evaluation)
        check("checkpoint", checkpoint_roundtrip)
    return results


def doctor(device_name: str = "auto", quick: bool = False, print_fn: Callable[[str], None] = print) -> int:
    """Print the environment and (unless ``quick``) run the checks; 0 when everything passed, else 1."""
    from .errors import EvaError
    from .runtime import pick_device

    try:
        device = pick_device(device_name)
    except EvaError as e:
        print_fn(f"FAIL device: {e}")
        return 1
    for line in environment(device):
        print_fn(line)
    if quick:
        return 0
    failed = 0
    for name, ok, detail in run_checks(device):
        print_fn(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        failed += not ok
    print_fn("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


__all__ = ["doctor", "environment", "run_checks"]
