"""Optimisation: the optimizer (SGD, or Muon for the conv filters and SGD for the rest, in one optimizer so
one scheduler and one checkpoint entry serve both), the LR schedule, and :class:`Stepper`, the one place
where a loss becomes a step (loss scaling for fp16, the optimizer, the schedule).

Muon (Keller Jordan, used by airbench94_muon): the update of a weight matrix is its Nesterov momentum,
orthogonalized by a few Newton-Schulz iterations (roughly U V^T of the momentum's SVD, every singular
direction moved by the same amount), and the weight is rescaled to a fixed norm before each step. Conv
filters followed by BatchNorm are scale-invariant, so the rescale changes nothing but the step's
relative size, which the LR then sets directly.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.sgd import sgd

from .config import Config
from .runtime import Precision
from .whitening import first_conv

# Quintic Newton-Schulz coefficients from Muon: they maximise the slope at zero, so three steps suffice.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for the 2-D ``g = U S V^T`` (singular values end up in about [0.5, 1.5]).

    A few large matmuls in ``dtype``: bf16 (as Muon does) where bf16 is native (GPUs from compute
    capability 8.0, CPUs with AVX512-BF16/AMX), fp32 (the default) elsewhere: emulated bf16 is far slower
    (bench/muon_cost.py on a 2-core AVX2 CPU: 27.6 s per ResNet18 optimizer step in bf16, 0.68 s in fp32)."""
    a, b, c = _NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + eps)  # top singular value <= 1, inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """``torch.optim.SGD``'s step (its functional ``sgd``: momentum, optional Nesterov, L2 weight decay) for
    every group, except that groups with ``orthogonal=True`` take Muon steps: weight rescaled to norm
    sqrt(rows), then ``lr`` times the orthogonalized (Nesterov) momentum of the gradient (no weight decay).

    ``ns_dtype``: the Newton-Schulz iteration's dtype (:func:`build_optimizer` sets it from the run's
    precision, which ``auto`` picks anew on each machine). It is not in the state dict, so a checkpoint
    resumed elsewhere orthogonalizes in the dtype of the run that resumes it."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonal=False))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            bufs = [self.state[p].get("momentum_buffer") for p in params]  # both steps fill in the missing ones
            if group["orthogonal"]:
                _muon(params, bufs, group["lr"], group["momentum"], group["nesterov"], self.ns_dtype)
            else:
                sgd(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                    momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=group["nesterov"],
                    maximize=False)
            if group["momentum"]:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _muon(params: list[torch.Tensor], bufs: list[torch.Tensor | None], lr: float, momentum: float,
          nesterov: bool, ns_dtype: torch.dtype) -> None:
    for i, p in enumerate(params):
        g = p.grad
        if momentum:
            if bufs[i] is None:
                bufs[i] = g.clone()
            else:
                bufs[i].mul_(momentum).add_(g)
            g = g.add(bufs[i], alpha=momentum) if nesterov else bufs[i]
        p.mul_(math.sqrt(p.size(0)) / (p.norm() + 1e-12))
        p.add_(orthogonalize(g.reshape(len(g), -1), dtype=ns_dtype).view_as(p), alpha=-lr)


class LRSchedule:
    """LR factor per optimizer step (a picklable callable for ``LambdaLR``).

    onecycle: linear from ``start`` to 1 over the first ``warmup_pct`` of the steps, then linear to 0.
    multistep: ``gamma`` at each milestone epoch.
    """

    def __init__(self, kind: str, total_steps: int, steps_per_epoch: int, warmup_pct: float = 0.25,
                 start: float = 0.1, milestones: tuple[int, ...] = (), gamma: float = 0.1) -> None:
        self.kind, self.total, self.per_epoch = kind, total_steps, steps_per_epoch
        self.warmup, self.start = max(1, int(round(warmup_pct * total_steps))), start
        self.milestones, self.gamma = tuple(milestones), gamma

    def __call__(self, step: int) -> float:
        if self.kind == "multistep":
            epoch = step // self.per_epoch  # epochs completed
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        if step < self.warmup:
            return self.start + (1 - self.start) * step / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def ns_dtype_for(precision: Precision | None) -> torch.dtype:
    """Muon's Newton-Schulz dtype for a run: bf16 where the run computes in native bf16, else fp32 (fp32
    runs; bf16 asked for where it is only emulated: 27.6 s against 0.68 s per step on an AVX2 CPU; fp16 runs
    on GPUs below compute capability 8.0 such as the T4: fp32 is the safe choice there, fp16 Newton-Schulz
    on tensor cores might be faster, but has not been measured)."""
    native_bf16 = precision is not None and precision.dtype is torch.bfloat16 and not precision.emulated
    return torch.bfloat16 if native_bf16 else torch.float32


def build_optimizer(model: nn.Module, config: Config, precision: Precision | None = None) -> torch.optim.Optimizer:
    """SGD (or, with ``optimizer=muon``, Muon for the conv filters and SGD for the rest; its Newton-Schulz
    iteration runs in :func:`ns_dtype_for` ``(precision)``: bf16 for bf16 runs, else fp32).

    BN weights and biases are exempt from weight decay unless ``wd_on_bn_bias``. The Muon group says how
    its LR relates to ``lr`` (``lr_scale``, for the LR finder). With ``freeze_stem`` the stem conv's weights
    sit in a last group of their own with LR 0 (marked ``frozen``; the schedule only scales that 0): they
    keep their initial values but stay parameters, so counts, checkpoints and DDP see the same model."""
    frozen = [first_conv(model).weight] if config.freeze_stem else []
    filters, decay, no_decay = [], [], []
    for p in model.parameters():
        if p.requires_grad and not any(p is f for f in frozen):
            if config.optimizer == "muon" and p.ndim == 4:
                filters.append(p)
            else:
                (no_decay if p.ndim <= 1 and not config.wd_on_bn_bias else decay).append(p)
    lr = config.effective_lr()
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if filters:
        groups.append({"params": filters, "orthogonal": True, "weight_decay": 0.0, "lr": config.muon_lr,
                       "lr_scale": config.muon_lr / lr, "momentum": config.muon_momentum, "nesterov": True})
    if frozen:
        groups.append({"params": frozen, "weight_decay": 0.0, "lr": 0.0, "frozen": True})
    nesterov = config.nesterov and config.momentum > 0
    if config.optimizer == "muon":
        return Muon(groups, lr=lr, momentum=config.momentum, nesterov=nesterov, ns_dtype=ns_dtype_for(precision))
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = LRSchedule(config.schedule, config.epochs * steps_per_epoch, steps_per_epoch, config.warmup_pct,
                          config.start_lr_factor, config.milestones, config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class Stepper:
    """Turns a loss into one training step: backward (scaled under fp16), optimizer step, scale update and
    the per-step schedule. The loops hold one of these instead of passing each part through every layer.

    Under fp16 the GradScaler skips a step whose gradients overflowed (and halves its scale); ``skipped``
    counts those on the device (a tensor, so counting costs no host-device sync)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.skipped: torch.Tensor | None = None

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            before = self.scaler._scale.clone()  # GradScaler's own scale tensor: get_scale() would sync
            self.scaler.update()
            dropped = (self.scaler._scale < before).long().sum()  # the scale only drops on an overflow
            self.skipped = dropped if self.skipped is None else self.skipped + dropped
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
