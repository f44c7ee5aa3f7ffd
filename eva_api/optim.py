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
    """SGD with momentum (as ``torch.optim.SGD``: dampening 0, optional Nesterov, L2 weight decay) for every
    group, except that groups with ``orthogonal=True`` take Muon steps: weight rescaled to norm
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
            lr, momentum, orthogonal = group["lr"], group["momentum"], group["orthogonal"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not orthogonal:
                    g = g.add(p, alpha=group["weight_decay"])
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(g)
                    buf = state["momentum_buffer"]
                    g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                if orthogonal:
                    p.mul_(math.sqrt(p.size(0)) / (p.norm() + 1e-12))
                    g = orthogonalize(g.reshape(len(g), -1)).view_as(p)
                p.add_(g, alpha=-lr)
        return loss
