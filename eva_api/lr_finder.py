"""LR range test (Leslie Smith / fastai): an exponential LR sweep, smoothed loss vs LR, a suggestion.

The model, the optimizer and the RNG are restored bit for bit afterwards, so the test can run right
before training without changing it.
"""
from __future__ import annotations

import copy
import math
import warnings
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .optim import Stepper
from .runtime import Precision, rng_states, set_rng_states

SUGGESTION_RULE = "valley rule: two-thirds of the way down the longest descent before the loss minimum"
MIN_TRUSTED_POINTS = 50  # fewer recorded steps: the EMA (beta 0.98, ~50 steps of memory) has not settled


@dataclass
class LRFinderResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = float("nan")

    def plot(self, save=None, dpi: int = 80, title: str | None = None):
        """Smoothed and raw loss vs LR, the suggestion as a line and a dot on the curve. The y range covers
        the smoothed curve up to its minimum (the part the suggestion comes from), not the divergence."""
        from .plots import _finish, _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        n = _finite_prefix(self.smoothed)
        if math.isfinite(self.suggestion) and n:
            i = min(range(n), key=lambda k: abs(math.log(self.lrs[k] / self.suggestion)))
            ax.axvline(self.suggestion, color="tab:red", ls="--", lw=1)
            ax.plot([self.suggestion], [self.smoothed[i]], "o", color="tab:red", zorder=3,
                    label=f"suggested lr {self.suggestion:.3g} (valley)")
        ax.set(xscale="log", xlabel="learning rate (log)", ylabel="training loss", title=title or "LR range test")
        if n:
            bottom = min(range(n), key=self.smoothed.__getitem__)
            lo, hi = self.smoothed[bottom], max(self.smoothed[:bottom + 1])
            span = hi - lo or abs(lo) * 0.1 or 1.0
            ax.set_ylim(lo - 0.1 * span, hi + 0.3 * span)
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
    loss exceeds ``diverge`` x its best). Suggests an LR by :func:`suggest_lr` (``SUGGESTION_RULE``) and warns
    when fewer than ``MIN_TRUSTED_POINTS`` points were recorded."""
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
            if not result.lrs:  # an empty loader would loop forever
                raise ConfigError("LR range test: the training loader yields no batches")
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        set_rng_states(rng, device)
        model.train(was_training)
    result.suggestion = suggest_lr(result.lrs, result.smoothed)
    _warn_if_short(result, steps)
    return result


def _finite_prefix(values: Sequence[float]) -> int:
    """How many values come before the first NaN/inf (what follows a blow-up is not a loss curve)."""
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))


def _descent_lengths(values: Sequence[float]) -> list[int]:
    """For each point, the length of the longest strictly decreasing subsequence ending there (O(n log n))."""
    tails: list[float] = []  # tails[k]: largest negated end of a decreasing run of length k + 1
    lengths = []
    for v in values:
        k = bisect_left(tails, -v)
        tails[k:k + 1] = [-v]
        lengths.append(k + 1)
    return lengths


def suggestion_index(smoothed: Sequence[float]) -> int | None:
    """Index of the suggested LR in a sweep's smoothed loss (fastai's ``valley``, restricted to the curve
    before its minimum); None with fewer than 5 finite points.

    The longest valley is the longest strictly decreasing subsequence ending at the minimum, as a span of
    that many points; the pick lies two-thirds of the way from its top to its bottom (in steps, i.e. log LR).
    The first 10% of the sweep is left out (the smoothed start rests on a handful of batches), and nothing
    after the minimum counts: a divergence and any collapse after it cannot move the suggestion."""
    n = _finite_prefix(smoothed)
    if n < 5:
        return None
    first = max(1, n // 10)
    curve = list(smoothed[first:n])
    bottom = min(range(len(curve)), key=curve.__getitem__)
    depth = _descent_lengths(curve[:bottom + 1])[bottom]  # the minimum ends the longest descent before it
    top = bottom - (depth - 1)
    return first + top + round(2 / 3 * (bottom - top))


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> float:
    """The LR :func:`suggestion_index` picks (NaN with fewer than 5 finite points). ``SUGGESTION_RULE`` names it."""
    i = suggestion_index(smoothed)
    return float("nan") if i is None else float(lrs[i])


def _warn_if_short(result: LRFinderResult, steps: int) -> None:
    """One warning line when the sweep recorded too few points for its suggestion to mean much."""
    n = len(result.lrs)
    if n >= MIN_TRUSTED_POINTS:
        return
    why = (f"the loss diverged at lr {result.lrs[-1]:.3g}, step {n} of {steps}" if n < steps
           else f"{steps} steps requested")
    warnings.warn(f"LR range test: only {n} points recorded ({why}); with fewer than {MIN_TRUSTED_POINTS} the "
                  f"suggestion is a rough guess: sweep more steps (200 is the default)", stacklevel=3)
