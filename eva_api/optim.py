"""Muon for the conv filters, SGD for the rest, in one optimizer (so one scheduler, one checkpoint entry).

Muon (Keller Jordan, used by airbench94_muon): the update of a weight matrix is its Nesterov momentum,
orthogonalized by a few Newton-Schulz iterations (roughly U V^T of the momentum's SVD, every singular
direction moved by the same amount), and the weight is rescaled to a fixed norm before each step. Conv
filters followed by BatchNorm are scale-invariant, so the rescale changes nothing but the step's
relative size, which the LR then sets directly.
"""
from __future__ import annotations

import math

import torch
from torch.optim.sgd import sgd

# Quintic Newton-Schulz coefficients from Muon: they maximise the slope at zero, so three steps suffice.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for the 2-D ``g = U S V^T`` (singular values end up in about [0.5, 1.5]).

    Runs in bf16, as Muon does: a few large matmuls, fast on GPUs and on CPUs with bf16 units."""
    a, b, c = _NS_COEFFS
    x = g.to(torch.bfloat16)
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
    sqrt(rows), then ``lr`` times the orthogonalized (Nesterov) momentum of the gradient (no weight decay)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonal=False))

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
                _muon(params, bufs, group["lr"], group["momentum"], group["nesterov"])
            else:
                sgd(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                    momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=group["nesterov"],
                    maximize=False)
            if group["momentum"]:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _muon(params: list[torch.Tensor], bufs: list[torch.Tensor | None], lr: float, momentum: float,
          nesterov: bool) -> None:
    for i, p in enumerate(params):
        g = p.grad
        if momentum:
            if bufs[i] is None:
                bufs[i] = g.clone()
            else:
                bufs[i].mul_(momentum).add_(g)
            g = g.add(bufs[i], alpha=momentum) if nesterov else bufs[i]
        p.mul_(math.sqrt(p.size(0)) / (p.norm() + 1e-12))
        p.add_(orthogonalize(g.reshape(len(g), -1)).view_as(p), alpha=-lr)
