"""LR range test (Leslie Smith / fastai): an exponential LR sweep, smoothed loss vs LR, a suggestion.

The model, the optimizer and the RNG are restored bit for bit afterwards, so the test can run right
before training without changing it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError
from .optim import Stepper
from .runtime import Precision, rng_states, set_rng_states


@dataclass
class LRFinderResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = float("nan")

    def plot(self, save=None, dpi: int = 80):
        from .plots import _finish, _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        if math.isfinite(self.suggestion):
            ax.axvline(self.suggestion, color="tab:red", ls="--", label=f"suggested lr {self.suggestion:.3g}")
        ax.set(xscale="log", xlabel="learning rate (log)", ylabel="training loss", title="LR range test")
        if self.smoothed:
            lo, hi = min(self.smoothed), self.smoothed[0]
            ax.set_ylim(lo - 0.1 * abs(hi - lo), hi + 0.5 * abs(hi - lo) + 1e-3)
        ax.legend()
        ax.grid(alpha=0.3)
        return _finish(fig, save, dpi)


def check_sweep(start_lr: float, end_lr: float, steps: int) -> None:
    """A sweep ``lr_find`` can run (a zero or negative LR would fail mid-way: the geometric ratio needs both > 0)."""
    if not 0 < start_lr < end_lr or steps < 1:
        raise ConfigError(f"bad LR range test: needs 0 < start-lr < end-lr and steps >= 1 (got start-lr {start_lr:g}, "
                          f"end-lr {end_lr:g}, steps {steps})")


def lr_find(
    model: nn.Module, loader, optimizer: torch.optim.Optimizer, criterion=None, *, start_lr: float = 1e-5,
    end_lr: float = 10.0, steps: int = 200, beta: float = 0.98, diverge: float = 4.0,
    precision: Precision | None = None,
) -> LRFinderResult:
    """Sweep the LR from ``start_lr`` to ``end_lr`` over ``steps`` batches (stopping early once the smoothed
    loss exceeds ``diverge`` x its best). Suggests the LR of the steepest descent of the smoothed loss."""
    check_sweep(start_lr, end_lr, steps)
    device = next(model.parameters()).device
    precision = precision or Precision(device.type, None)
    criterion = criterion or nn.CrossEntropyLoss()
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = rng_states(device)
    stepper = Stepper(optimizer, scaler=precision.make_scaler())  # fp16 needs its loss scaling here too
    was_training = model.training
    result = LRFinderResult()
    ratio = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    avg, best = 0.0, float("inf")
    try:
        model.train()
        step = 0
        while step < steps:
            for x, y in loader:
                lr = start_lr * ratio**step
                for g in optimizer.param_groups:
                    if not g.get("frozen"):  # frozen weights (``freeze_stem``) stay at LR 0
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                x, y = x.to(device), y.to(device)
                with precision.autocast():
                    loss = criterion(model(x), y)
                stepper.step(loss)
                value = float(loss.detach())
                avg = beta * avg + (1 - beta) * value
                smooth = avg / (1 - beta ** (step + 1))
                result.lrs.append(lr)
                result.losses.append(value)
                result.smoothed.append(smooth)
                best = min(best, smooth)
                step += 1
                if step >= steps or not math.isfinite(smooth) or smooth > diverge * best:
                    step = steps
                    break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        set_rng_states(rng, device)
        model.train(was_training)
    result.suggestion = suggest_lr(result.lrs, result.smoothed)
    return result


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """LR at the steepest negative slope of smoothed loss vs log LR (ignoring the noisy ends)."""
    finite = [(lr, s) for lr, s in zip(lrs, smoothed) if math.isfinite(s)]
    if len(finite) < 5:
        return float("nan")
    lo = max(1, len(finite) // 10)
    pts = finite[lo:]
    slopes = [(pts[i + 1][1] - pts[i][1]) / (math.log(pts[i + 1][0]) - math.log(pts[i][0])) for i in range(len(pts) - 1)]
    i = min(range(len(slopes)), key=slopes.__getitem__)
    return pts[i][0]
