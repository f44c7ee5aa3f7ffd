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
import warnings

import torch
from torch import nn

from .config import Config
from .runtime import Precision
from .whitening import first_conv

# Quintic Newton-Schulz coefficients from Muon: they maximise the slope at zero, so three steps suffice.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for ``g = U S V^T`` (singular values end up in about [0.5, 1.5]); ``g`` is one
    matrix [m, n] or a stack of same-shape matrices [k, m, n], each orthogonalized on its own.

    Three batched matmuls per iteration in ``dtype``: bf16 (as Muon does) where bf16 is native (GPUs from
    compute capability 8.0, CPUs with AVX512-BF16/AMX), fp32 (the default) elsewhere: emulated bf16 is far
    slower (bench/muon_cost.py on a 2-core AVX2 CPU: 27.6 s per ResNet18 optimizer step in bf16, 0.68 s in fp32)."""
    a, b, c = _NS_COEFFS
    x = g.to(dtype)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)  # top singular value <= 1
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    stacked = x if x.dim() == 3 else x.unsqueeze(0)
    for _ in range(steps):
        s = stacked @ stacked.mT
        s = torch.baddbmm(s, s, s, beta=b, alpha=c)  # b*S + c*S@S in one matmul
        stacked = torch.baddbmm(stacked, s, stacked, beta=a)  # a*X + (b*S + c*S@S) @ X
    x = stacked if x.dim() == 3 else stacked.squeeze(0)
    return (x.mT if tall else x).to(g.dtype, memory_format=torch.contiguous_format)


class Muon(torch.optim.Optimizer):
    """SGD (momentum, optional Nesterov, L2 weight decay: the math of ``torch.optim.SGD``) for every group,
    except that groups with ``orthogonal=True`` take Muon steps: weight rescaled to norm sqrt(rows), then
    ``lr`` times the orthogonalized (Nesterov) momentum of the gradient (no weight decay). Groups marked
    ``frozen`` are skipped (their LR is 0).

    Built for few kernel launches, since on a GPU a ResNet18 step is launch-bound: every group steps
    through ``torch._foreach_*`` ops (one launch for all its tensors), and same-shape filter banks are
    stacked into one batched Newton-Schulz (ResNet18: 19 banks in 10 shapes). The LRs are read from
    one 0-d tensor per group on the parameters' device, refilled from ``group["lr"]`` by :meth:`sync_lr`
    at each :meth:`step` (``step(sync_lr=False)``: the caller fills them, as a CUDA graph's replay needs).
    ``generation`` counts the times the state's tensors were replaced (``load_state_dict``,
    ``add_param_group``): a captured step that holds the old ones must be captured again. The state dict is
    ``torch.optim.SGD``'s.

    ``stack``: orthogonalize same-shape banks together; None (default): on GPUs, where it saves launches,
    not on CPUs, where batched matmuls ran ~15% slower than one bank at a time (2-core EPYC, fp32).

    ``ns_dtype``: the Newton-Schulz iteration's dtype (:func:`build_optimizer` sets it from the run's
    precision, which ``auto`` picks anew on each machine). It is not in the state dict, so a checkpoint
    resumed elsewhere orthogonalizes in the dtype of the run that resumes it."""

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.float32, stack: bool | None = None):
        self.generation = 0
        self._lrs: list[torch.Tensor] | None = None
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonal=False, frozen=False))
        self.ns_dtype = ns_dtype
        self.stack = stack

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.generation += 1
        self._lrs = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new momentum buffers
        self.generation += 1
        self._lrs = None

    def sync_lr(self) -> None:
        """Copy each group's ``lr`` into its device tensor (one tiny fill each; no host-device sync)."""
        if self._lrs is None:
            self._lrs = [torch.zeros((), device=g["params"][0].device if g["params"] else "cpu")
                         for g in self.param_groups]
        for t, group in zip(self._lrs, self.param_groups):
            t.fill_(group["lr"])

    @torch.no_grad()
    def step(self, closure=None, sync_lr: bool = True):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if sync_lr or self._lrs is None:
            self.sync_lr()
        for group, lr in zip(self.param_groups, self._lrs):
            params = [p for p in group["params"] if p.grad is not None]
            if group.get("frozen") or not params:
                continue
            grads = [p.grad for p in params]
            if group.get("weight_decay") and not group.get("orthogonal"):
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"]:
                grads = self._momentum(params, grads, group["momentum"], group["nesterov"])
            if group.get("orthogonal"):
                stack = self.stack if self.stack is not None else params[0].device.type != "cpu"
                _muon_update(params, grads, lr, self.ns_dtype, stack)
            else:
                updates = torch._foreach_mul(grads, lr)
                torch._foreach_sub_(params, updates)
        return loss

    def _momentum(self, params: list[torch.Tensor], grads: list[torch.Tensor], momentum: float,
                  nesterov: bool) -> list[torch.Tensor]:
        """Update the momentum buffers in place (created from the first gradients, as SGD does); returns
        the direction to step along: the buffers, or with Nesterov ``grad + momentum * buffer``."""
        states = [self.state[p] for p in params]
        if any("momentum_buffer" not in st or st["momentum_buffer"] is None for st in states):
            for st, g in zip(states, grads):
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = g.detach().clone()
                else:
                    st["momentum_buffer"].mul_(momentum).add_(g)
        else:
            bufs = [st["momentum_buffer"] for st in states]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
        bufs = [st["momentum_buffer"] for st in states]
        return torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs


def _muon_update(params: list[torch.Tensor], directions: list[torch.Tensor], lr: torch.Tensor,
                 ns_dtype: torch.dtype, stack: bool) -> None:
    """Rescale each weight to norm sqrt(rows), then step by ``lr`` times its orthogonalized direction;
    with ``stack`` banks of one shape are orthogonalized together (one batched Newton-Schulz per shape)."""
    norms = torch._foreach_norm(params)
    torch._foreach_add_(norms, 1e-12)
    torch._foreach_reciprocal_(norms)
    torch._foreach_mul_(norms, [math.sqrt(p.size(0)) for p in params])
    torch._foreach_mul_(params, norms)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape) if stack else (i,), []).append(i)
    updates: list[torch.Tensor] = list(directions)
    for index in by_shape.values():
        banks = torch.stack([_as_matrix(directions[i]) for i in index])
        for i, u in zip(index, orthogonalize(banks, dtype=ns_dtype).unbind(0)):
            updates[i] = _matrix_like(u, directions[i])
    torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(params, updates)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A filter bank as [rows, cols], its columns in memory order (a view for NCHW and channels_last
    tensors). Orthogonalization commutes with permuting columns, so the order does not change the result."""
    return t.permute(0, 2, 3, 1).reshape(len(t), -1) if _channels_last(t) else t.reshape(len(t), -1)


def _matrix_like(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:func:`_as_matrix` undone: the matrix ``u`` made of ``t`` as a tensor of ``t``'s shape and memory
    layout (a view; the weights have it too, so the foreach update runs on its one-launch fast path)."""
    if _channels_last(t):
        o, i, h, w = t.shape
        return u.view(o, h, w, i).permute(0, 3, 1, 2)
    return u.view(t.shape)


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


def build_optimizer(model: nn.Module, config: Config, precision: Precision | None = None) -> Muon:
    """A :class:`Muon`: with ``optimizer=sgd`` every group steps as SGD; with ``optimizer=muon`` the conv
    filters take Muon steps (Newton-Schulz in :func:`ns_dtype_for` ``(precision)``: bf16 for bf16 runs,
    else fp32) and the rest SGD steps. One class for both keeps the LRs on the device (CUDA graphs).

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
    return Muon(groups, lr=lr, momentum=config.momentum, nesterov=nesterov, ns_dtype=ns_dtype_for(precision))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = LRSchedule(config.schedule, config.epochs * steps_per_epoch, steps_per_epoch, config.warmup_pct,
                          config.start_lr_factor, config.milestones, config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class Stepper:
    """Turns a batch (:meth:`train_step`) or a loss (:meth:`step`) into one training step: backward (scaled
    under fp16), optimizer step, scale update and the per-step schedule. The loops hold one of these
    instead of passing each part through every layer.

    Under fp16 the GradScaler skips a step whose gradients overflowed (and halves its scale); ``skipped``
    counts those on the device (a tensor, so counting costs no host-device sync).

    ``cuda_graph``: :meth:`train_step` serves each batch shape, once it has been seen ``warmup`` times, by a
    :class:`StaticStep` (fixed input buffers; on a GPU the whole step replays as one CUDA graph). Needs an
    optimizer whose LRs live on the device (:class:`Muon`: ``build_optimizer`` returns one for every
    config) and no GradScaler (its overflow check reads the GPU from the host each step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None,
                 scaler: torch.amp.GradScaler | None = None, cuda_graph: bool = False, warmup: int = 3) -> None:
        if cuda_graph and (scaler is not None or not hasattr(optimizer, "sync_lr")):
            raise ValueError("cuda_graph needs an optimizer with device LRs (eva_api.Muon) and no GradScaler")
        if warmup < 1:  # the momentum buffers and LR tensors must exist before a capture
            raise ValueError(f"warmup must be >= 1, not {warmup}")
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.skipped: torch.Tensor | None = None
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self._static: dict[tuple, StaticStep] = {}
        self._seen: dict[tuple, int] = {}
        self._generation = 0
        self._side_stream = None

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

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion,
                   precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (under ``precision``'s autocast), loss and :meth:`step` for one batch; returns the detached
        loss and logits (with ``cuda_graph``, static tensors that the next step of that shape overwrites)."""
        if not self.cuda_graph:
            return self._eager(model, x, y, criterion, precision)
        if self.optimizer.generation != self._generation:  # the optimizer's tensors were replaced: capture anew
            self._static.clear()
            self._seen.clear()
            self._generation = self.optimizer.generation
        key = (id(model), model.training, tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), x.device)
        static = self._static.get(key)
        if static is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            full = x.shape[0] >= max(k[2][0] for k in self._seen)  # a last, partial batch always runs eagerly
            if self._seen[key] <= self.warmup or not full:  # cuDNN's algorithm search, lazy init, momentum buffers
                return self._warmup_step(model, x, y, criterion, precision)
            try:
                static = self._static[key] = StaticStep(self.optimizer, model, x, y, criterion, precision)
            except RuntimeError as e:  # e.g. a model that reads a GPU value on the host: eager from here on
                warnings.warn(f"no CUDA graph, the training step runs eagerly: capturing it failed "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=2)
                self.cuda_graph = False
                return self._eager(model, x, y, criterion, precision)
        out = static.run(x, y)
        if self.scheduler is not None:
            self.scheduler.step()
        return out

    def _eager(self, model, x, y, criterion, precision) -> tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast():
            logits = model(x)
            loss = criterion(logits, y)
        self.step(loss)
        return loss.detach(), logits.detach()

    def _warmup_step(self, model, x, y, criterion, precision) -> tuple[torch.Tensor, torch.Tensor]:
        """An eager step; on a GPU on a side stream, as CUDA graph capture asks of the steps before it."""
        if x.device.type != "cuda":
            return self._eager(model, x, y, criterion, precision)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(x.device)
        main = torch.cuda.current_stream(x.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            out = self._eager(model, x, y, criterion, precision)
        main.wait_stream(self._side_stream)
        return out

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # Muon's generation moves on: no stale graph replays
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class StaticStep:
    """One training step (zero grads, forward, loss, backward, optimizer step) on fixed input buffers.

    :meth:`run` copies a batch into the buffers, fills the optimizer's device LRs from its groups, then
    replays the step: on CUDA a CUDA graph captured at construction (one launch instead of ~400: the
    ResNet18 step at batch 64 is launch-bound), elsewhere the same function eagerly, so CPU tests run
    this bookkeeping too. Everything the step touches outside the graph's own memory (weights, momentum
    buffers, LR tensors, BatchNorm statistics) is updated in place, so captured and eager steps (the
    warm-up, a last partial batch) can alternate. The captured step must not be the first of its shape:
    cuDNN's autotuning, lazy initialisation and the momentum buffers come from eager steps before it.
    Captured in ``thread_local`` mode: a DataLoader's pin-memory thread may call CUDA meanwhile."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 criterion, precision: Precision) -> None:
        self.optimizer = optimizer
        self.x, self.y = x.clone(), y.clone()  # clone keeps the memory format (channels_last)

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            optimizer.zero_grad(set_to_none=True)  # captured: backward then writes the graph's own grads
            with precision.autocast(cache_enabled=False):  # a cached cast would be baked into the graph
                logits = model(self.x)
                loss = criterion(logits, self.y)
            loss.backward()
            optimizer.step(sync_lr=False)  # run() fills the LR tensors before each replay
            return loss.detach(), logits.detach()

        self.fn, self.graph = step, None
        if x.device.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out = step()

    def run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.optimizer.sync_lr()
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


def graph_fallback(precision: Precision, distributed: bool, compiled: bool) -> str | None:
    """Why a run's step cannot be a captured CUDA graph (None: it can)."""
    if precision.dtype is torch.float16:
        return "fp16's GradScaler reads its overflow check on the host every step"
    if distributed:
        return "DDP's gradient all-reduce is not captured here"
    if compiled:
        return "torch.compile is not combined with it (torch.compile(mode='reduce-overhead') makes its own graphs)"
    return None
