"""Training and evaluation loops: plain functions that return metric dicts.

``train_one_epoch`` and ``evaluate`` know nothing of files; ``fit`` runs the epochs, prints the course-
style logs and calls back at each epoch end (the runner saves checkpoints there). Averages are taken
over samples: per-batch sums are added up and divided by the number of samples at the end, never an
average of batch means. Under DDP the sums are all-reduced, so every rank reports the same numbers.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import unwrap_model
from .ema import EMA, Lookahead
from .errors import ConfigError, TrainingError


# --------------------------------------------------------------------------- device, precision, seed
def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Anything else is taken literally (and checked)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"bad device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


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
    """Autocast settings for one device: ``dtype`` None means full fp32."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self):
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None


def pick_precision(device: torch.device, name: str = "auto") -> Precision:
    """``auto``: bf16 on CUDA that supports it (else fp16), bf16 on CPUs with AVX512-BF16/AMX, else fp32."""
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif kind == "cpu":
            name = "bf16" if cpu_has_bf16() else "fp32"
        else:
            name = "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"bad precision {name!r}; choose auto, bf16, fp16 or fp32")
    if name == "fp16" and kind == "cpu":
        raise ConfigError("fp16 autocast is for GPUs; use --precision bf16 or fp32 on a CPU")
    return Precision(kind, dtypes[name])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): a CPU run with the same seed repeats exactly."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ distributed
def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    if not dist_ready():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------- loops
@dataclass
class EpochState:
    """Running sums of one training epoch; saved on interruption so the epoch can be finished later."""

    batches: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0


def course_desc(loss: float, batch_id: int, acc: float) -> str:
    """The course's progress line: ``Loss=0.4403 Batch_id=781 Accuracy=77.73``."""
    return f"Loss={loss:.4f} Batch_id={batch_id} Accuracy={acc:.2f}"


def _progress_bar(total: int, initial: int, enabled: bool, epoch: int):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    # non-interactive (logs, saved notebooks): few refreshes, so a finished epoch leaves one short line
    return tqdm(total=total, initial=initial, disable=not enabled, leave=True, dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 30.0, desc=f"Epoch {epoch}", file=sys.stderr)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: Precision,
    scheduler=None,
    scaler=None,
    ema: EMA | None = None,
    lookahead: Lookahead | None = None,
    epoch: int = 1,
    state: EpochState | None = None,
    progress: bool = True,
    log_every: int = 25,
) -> dict:
    """One pass over ``loader``; scheduler, ``lookahead`` and ``ema`` step per batch. Returns loss/acc/seconds/lr.

    ``state`` lets an interrupted epoch continue: its batches are skipped and its sums kept. The loss
    is summed on the device and read back only every ``log_every`` batches (a GPU sync per batch
    would cost throughput); a NaN or infinite loss stops training with a :class:`TrainingError`.
    """
    state = state if state is not None else EpochState()
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    base = (state.loss_sum, state.correct, state.samples)
    total = len(loader)
    bar = _progress_bar(total, state.batches, progress, epoch)
    start = time.perf_counter() - state.seconds
    try:
        for x, y in loader.iter_from(state.batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if lookahead is not None:
                lookahead.update(model)
            if ema is not None:
                ema.update(model)
            n = y.shape[0]
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            state.batches += 1
            state.samples += n
            bar.update(1)
            if state.batches % log_every == 0 or state.batches == total:
                state.loss_sum, state.correct = base[0] + loss_sum.item(), base[1] + int(correct.item())
                if not math.isfinite(state.loss_sum):
                    raise TrainingError(
                        f"loss became {state.loss_sum} in epoch {epoch} by batch {state.batches} "
                        f"(lr={optimizer.param_groups[0]['lr']:.4g}); lower --lr or use --precision fp32")
                bar.set_description(course_desc(state.loss_sum / state.samples, state.batches - 1,
                                                100.0 * state.correct / state.samples), refresh=False)
    finally:
        # an interruption keeps everything up to the last finished batch
        state.loss_sum, state.correct = base[0] + loss_sum.item(), base[1] + int(correct.item())
        state.seconds = time.perf_counter() - start
        bar.close()
    if dist_ready():  # BN running stats drift apart after the last step: make every rank hold rank 0's
        for buf in [*unwrap_model(model).buffers(), *(ema.module.buffers() if ema is not None else ()),
                    *(lookahead.slow.values() if lookahead is not None else ())]:
            torch.distributed.broadcast(buf, 0)
    loss_total, correct_total, samples = all_reduce_sum([state.loss_sum, state.correct, state.samples], device)
    return {
        "loss": loss_total / max(samples, 1),
        "acc": 100.0 * correct_total / max(samples, 1),
        "samples": int(samples),
        "seconds": state.seconds,
        "lr": optimizer.param_groups[0]["lr"],
    }


def tta_views(kind: str = "flip") -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Extra test-time views averaged with the plain one: ``flip``, or ``flip+translate`` (±1 px)."""
    views = [lambda x: x.flip(3)]
    if kind == "flip+translate":
        for shift in (-1, 1):
            views.append(lambda x, s=shift: _translate(x, s))
            views.append(lambda x, s=shift: _translate(x.flip(3), s))
    elif kind != "flip":
        raise ConfigError(f"unknown TTA {kind!r}; choose flip or flip+translate")
    return views


def _translate(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Shift a batch ``shift`` pixels right and down, filling with reflected edges."""
    p = abs(shift)
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[-2:]
    o = p - shift
    return padded[..., o : o + h, o : o + w]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    precision: Precision | None = None,
    tta: bool | str | Sequence[Callable[[torch.Tensor], torch.Tensor]] = False,
    return_outputs: bool = False,
    all_reduce: bool = True,
) -> dict:
    """Average loss (summed over samples / number of samples) and accuracy on ``loader``.

    ``tta``: True or ``"flip"`` for horizontal-flip TTA, ``"flip+translate"``, or a list of callables;
    their logits are averaged with the plain view's and reported as ``acc_tta`` next to ``acc``.
    ``return_outputs`` adds the (rank-local) logits and labels, e.g. for a confusion matrix.
    ``all_reduce``: sum the metrics over DDP ranks (off when one rank evaluates the whole split alone).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # each rank evaluates its own shard; no collectives per batch
    model.eval()
    device = next(model.parameters()).device
    precision = precision or Precision(device.type, None)
    if tta is False:
        views = []
    elif isinstance(tta, (bool, str)):
        views = tta_views("flip" if tta is True else tta)
    else:
        views = list(tta)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    correct_tta = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    outputs, targets = [], []
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x).float()
            if views:
                avg = logits.clone()
                for view in views:
                    avg += model(view(x)).float()
                correct_tta += (avg.argmax(1) == y).sum()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
        if return_outputs:
            outputs.append(logits.cpu())
            targets.append(y.cpu())
    sums = [loss_sum.item(), correct.item(), correct_tta.item(), n]
    loss_total, correct_total, ctta_total, n_total = all_reduce_sum(sums, device) if all_reduce else sums
    out = {
        "loss": loss_total / max(n_total, 1),
        "acc": 100.0 * correct_total / max(n_total, 1),
        "correct": int(correct_total),
        "total": int(n_total),
        "seconds": time.perf_counter() - start,
    }
    if views:
        out["acc_tta"] = 100.0 * ctta_total / max(n_total, 1)
    if return_outputs:
        out["logits"] = torch.cat(outputs) if outputs else torch.empty(0)
        out["labels"] = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return out


def format_test_line(metrics: dict) -> str:
    """``Test set: Average loss: 0.3866, Accuracy: 8676/10000 (86.76%)`` (+ TTA when measured)."""
    line = (f"Test set: Average loss: {metrics['loss']:.4f}, "
            f"Accuracy: {metrics['correct']}/{metrics['total']} ({metrics['acc']:.2f}%)")
    if "acc_tta" in metrics:
        line += f", with flip TTA: {metrics['acc_tta']:.2f}%"
    return line


# ---------------------------------------------------------------------------------------- history
@dataclass
class History:
    """One record per epoch: epoch, lr, train loss/acc, test loss/acc (+ TTA), train and eval seconds."""

    records: list[dict] = field(default_factory=list)

    def append(self, record: dict) -> None:
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def column(self, key: str) -> list:
        return [r.get(key) for r in self.records]

    def best(self, key: str = "test_acc") -> dict:
        """The record with the highest ``key`` (for reporting; never used to pick a checkpoint)."""
        return max(self.records, key=lambda r: r.get(key, float("-inf")))

    def first_reaching(self, threshold: float, key: str = "test_acc") -> dict | None:
        return next((r for r in self.records if r.get(key, -1) >= threshold), None)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.records, f, indent=2)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "History":
        with open(path) as f:
            return cls(json.load(f))


# -------------------------------------------------------------------------------------------- fit
@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the duration, so a killed job saves like Ctrl-C."""
    if not hasattr(signal, "SIGTERM") or signal.getsignal(signal.SIGTERM) is None:
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    criterion: Callable | None = None,
    precision: Precision | None = None,
    scheduler=None,
    scaler=None,
    ema: EMA | None = None,
    lookahead: Lookahead | None = None,
    history: History | None = None,
    start_epoch: int = 0,
    epoch_state: EpochState | None = None,
    tta: bool = False,
    progress: bool = True,
    verbose: bool = True,
    on_epoch_end: Callable[[int, History], None] | None = None,
    on_interrupt: Callable[[int, EpochState], None] | None = None,
) -> History:
    """Train for epochs ``start_epoch+1 .. epochs``, evaluating after each; returns the History.

    With ``ema`` the averaged weights are the ones evaluated (``test_acc``, TTA); the training weights'
    plain accuracy goes in ``test_acc_raw`` so one run shows what the average adds.

    ``on_epoch_end(epoch, history)`` runs after each epoch's evaluation (checkpointing goes there);
    on Ctrl-C or SIGTERM ``on_interrupt(epoch_in_progress, state)`` runs, then KeyboardInterrupt goes on.
    """
    device = next(model.parameters()).device
    precision = precision or Precision(device.type, None)
    criterion = criterion or nn.CrossEntropyLoss()
    history = history if history is not None else History()
    epoch = start_epoch + 1
    state = epoch_state or EpochState()
    with sigterm_as_interrupt():
        try:
            for epoch in range(start_epoch + 1, epochs + 1):
                train_loader.set_epoch(epoch)
                tr = train_one_epoch(model, train_loader, optimizer, criterion=criterion, precision=precision,
                                     scheduler=scheduler, scaler=scaler, ema=ema, lookahead=lookahead, epoch=epoch,
                                     state=state, progress=progress)
                te = evaluate(ema.module if ema is not None else model, test_loader, precision=precision, tta=tta)
                record = {"epoch": epoch, "lr": tr["lr"], "train_loss": tr["loss"], "train_acc": tr["acc"],
                          "test_loss": te["loss"], "test_acc": te["acc"], "train_seconds": tr["seconds"],
                          "eval_seconds": te["seconds"]}
                if "acc_tta" in te:
                    record["test_acc_tta"] = te["acc_tta"]
                line = format_test_line(te)
                if ema is not None:
                    raw = evaluate(model, test_loader, precision=precision)
                    record["test_acc_raw"] = raw["acc"]
                    record["eval_seconds"] += raw["seconds"]
                    line += f" (EMA weights; training weights: {raw['acc']:.2f}%)"
                if verbose:
                    print(line, flush=True)
                history.append(record)
                state = EpochState()
                if on_epoch_end is not None:
                    on_epoch_end(epoch, history)
        except KeyboardInterrupt:
            if on_interrupt is not None:
                on_interrupt(epoch, state)
            raise
    return history


__all__ = [
    "EpochState", "History", "Precision", "evaluate", "fit", "format_test_line", "pick_device",
    "pick_precision", "seed_everything", "train_one_epoch", "tta_views",
]
