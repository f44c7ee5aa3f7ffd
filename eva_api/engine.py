"""Training and evaluation loops: plain functions that return metric dicts.

``train_one_epoch`` and ``evaluate`` know nothing of files; ``fit`` runs the epochs, prints the course-
style logs and calls back at each epoch end (the runner saves checkpoints there). Averages are taken
over samples: per-batch sums are added up and divided by the number of samples at the end, never an
average of batch means. Under DDP the sums are all-reduced, so every rank reports the same numbers.

Interruptions: during ``fit`` SIGINT (Ctrl-C) and SIGTERM only set a flag (:class:`StopRequest`); the
training loop looks at it between optimizer steps, so the state it hands to ``on_interrupt`` is always
one that the uninterrupted run also passed through.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, any_rank, dist_ready
from .errors import ConfigError, TrainingError
from .models import unwrap_model
from .optim import Stepper
from .runtime import Precision


class Interrupted(KeyboardInterrupt):
    """Training stopped at a clean step boundary because of a signal (or :meth:`StopRequest.request`)."""


class StopRequest:
    """A flag that SIGINT / SIGTERM set while :meth:`installed` is active (a second signal, e.g. during the
    checkpoint write, only sets it again). ``check`` is where the loop asks; under DDP every rank gets the
    same answer, so all stop at the same step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int = signal.SIGINT, frame=None) -> None:
        self.signum = signum

    def check(self, device: torch.device) -> bool:
        return any_rank(self.signum is not None, device)  # the flag itself in a single process

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------- loops
@dataclass
class EpochState:
    """Running sums of one training epoch; saved on interruption so the epoch can be finished later."""

    batches: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0
    skipped: int = 0  # fp16 steps the GradScaler skipped (gradients overflowed)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype for loss sums on ``device``: float64, except float32 on mps (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


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
    stepper: Stepper | torch.optim.Optimizer,
    *,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: Precision,
    epoch: int = 1,
    state: EpochState | None = None,
    progress: bool = True,
    log_every: int = 25,
    stop: StopRequest | None = None,
) -> dict:
    """One pass over ``loader``, one ``stepper.step(loss)`` per batch. Returns loss/acc/samples/seconds/lr/skipped.

    ``state`` lets an interrupted epoch continue: its batches are skipped and its sums kept. The loss
    is summed on the device and read back only every ``log_every`` batches (a GPU sync per batch
    would cost throughput); a NaN or infinite loss stops training with a :class:`TrainingError`.
    ``stop`` is looked at between steps (every ``log_every`` under DDP on CUDA, where asking is a collective);
    when set, :class:`Interrupted` is raised with ``state`` holding exactly the finished steps.
    """
    stepper = stepper if isinstance(stepper, Stepper) else Stepper(stepper)
    state = state if state is not None else EpochState()
    model.train()
    device = next(model.parameters()).device
    dtype_sum = _sum_dtype(device)
    loss_sum = torch.zeros((), dtype=dtype_sum, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    skipped_before = stepper.skipped
    base = (state.loss_sum, state.correct, state.skipped)
    total = len(loader)
    # Under DDP asking is a collective: on CUDA every log_every steps (a fraction of a second each). On CPU
    # (gloo) every step: a step takes seconds there, and torchrun kills its workers 30 s after passing on
    # a Ctrl-C or SIGTERM, so 25 steps would lose the unfinished epoch.
    check_every = log_every if dist_ready() and device.type == "cuda" else 1

    def sync_state() -> None:
        state.loss_sum, state.correct = base[0] + loss_sum.item(), base[1] + int(correct.item())
        if stepper.skipped is not None:
            state.skipped = base[2] + int(stepper.skipped - (0 if skipped_before is None else skipped_before))

    bar = _progress_bar(total, state.batches, progress, epoch)
    start = time.perf_counter() - state.seconds
    try:
        if stop is not None and stop.check(device):
            raise Interrupted
        for x, y in loader.iter_from(state.batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = stepper.train_step(model, x, y, criterion, precision)
            n = y.shape[0]
            loss_sum += loss.to(dtype_sum) * n
            correct += (logits.argmax(1) == y).sum()
            state.batches += 1
            state.samples += n
            bar.update(1)
            if state.batches % log_every == 0 or state.batches == total:
                sync_state()
                if not math.isfinite(state.loss_sum):
                    raise TrainingError(
                        f"loss became {state.loss_sum} in epoch {epoch} by batch {state.batches} "
                        f"(lr={stepper.lr:.4g}); lower --lr or use --precision fp32")
                bar.set_description(course_desc(state.loss_sum / state.samples, state.batches - 1,
                                                100.0 * state.correct / state.samples), refresh=False)
            if stop is not None and state.batches % check_every == 0 and state.batches < total and stop.check(device):
                raise Interrupted
    finally:
        # whatever ends the loop, the state holds everything up to the last finished step
        sync_state()
        state.seconds = time.perf_counter() - start
        bar.close()
    if dist_ready():  # BN running stats drift apart after the last step: make every rank hold rank 0's
        for buf in unwrap_model(model).buffers():
            torch.distributed.broadcast(buf, 0)
    loss_total, correct_total, samples = all_reduce_sum([state.loss_sum, state.correct, state.samples], device)
    return {
        "loss": loss_total / max(samples, 1),
        "acc": 100.0 * correct_total / max(samples, 1),
        "samples": int(samples),
        "seconds": state.seconds,
        "lr": stepper.lr,
        "skipped": state.skipped,
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
    model = unwrap_model(model)  # each rank evaluates its own shard: no collectives per batch (DDP, compiled or not)
    model.eval()
    device = next(model.parameters()).device
    precision = precision or Precision(device.type, None)
    if tta is False:
        views, tta_name = [], ""
    elif isinstance(tta, (bool, str)):
        tta_name = "flip" if tta is True else tta
        views = tta_views(tta_name)
    else:
        views = list(tta)
        tta_name = f"{len(views) + 1}-view"
    dtype_sum = _sum_dtype(device)
    loss_sum = torch.zeros((), dtype=dtype_sum, device=device)
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
        loss_sum += F.cross_entropy(logits, y, reduction="sum").to(dtype_sum)
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
        out["acc_tta"], out["tta"] = 100.0 * ctta_total / max(n_total, 1), tta_name
    if return_outputs:
        out["logits"] = torch.cat(outputs) if outputs else torch.empty(0)
        out["labels"] = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return out


def format_test_line(metrics: dict) -> str:
    """``Test set: Average loss: 0.3866, Accuracy: 8676/10000 (86.76%)`` (+ TTA when measured)."""
    line = (f"Test set: Average loss: {metrics['loss']:.4f}, "
            f"Accuracy: {metrics['correct']}/{metrics['total']} ({metrics['acc']:.2f}%)")
    if "acc_tta" in metrics:
        line += f", with {metrics.get('tta', 'flip')} TTA: {metrics['acc_tta']:.2f}%"
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

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.records, f, indent=2)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "History":
        with open(path) as f:
            return cls(json.load(f))


# -------------------------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    stepper: Stepper | torch.optim.Optimizer,
    *,
    epochs: int,
    criterion: Callable | None = None,
    precision: Precision | None = None,
    history: History | None = None,
    start_epoch: int = 0,
    epoch_state: EpochState | None = None,
    tta: bool = False,
    progress: bool = True,
    verbose: bool = True,
    on_epoch_end: Callable[[int, History, dict], None] | None = None,
    on_interrupt: Callable[[int, EpochState], None] | None = None,
) -> History:
    """Train for epochs ``start_epoch+1 .. epochs``, evaluating after each; returns the History.

    ``stepper``: a :class:`~eva_api.optim.Stepper` (optimizer + schedule + fp16 scaler) or a bare optimizer.
    ``on_epoch_end(epoch, history, test_metrics)`` runs after each epoch's evaluation (checkpointing goes
    there); the last epoch's ``test_metrics`` hold the logits and labels. On SIGINT / SIGTERM the loop
    stops at the next step boundary, ``on_interrupt(epoch_in_progress, state)`` runs (signals only set the
    flag meanwhile), then :class:`Interrupted` (a KeyboardInterrupt) goes on.
    """
    stepper = stepper if isinstance(stepper, Stepper) else Stepper(stepper)
    device = next(model.parameters()).device
    precision = precision or Precision(device.type, None)
    criterion = criterion or nn.CrossEntropyLoss()
    history = history if history is not None else History()
    epoch = start_epoch + 1
    state = epoch_state or EpochState()
    with StopRequest().installed() as stop:
        try:
            for epoch in range(start_epoch + 1, epochs + 1):
                if verbose:
                    print(f"EPOCH: {epoch}/{epochs}", flush=True)
                train_loader.set_epoch(epoch)
                tr = train_one_epoch(model, train_loader, stepper, criterion=criterion, precision=precision,
                                     epoch=epoch, state=state, progress=progress, stop=stop)
                te = evaluate(model, test_loader, precision=precision, tta=tta, return_outputs=epoch == epochs)
                record = {"epoch": epoch, "lr": tr["lr"], "train_loss": tr["loss"], "train_acc": tr["acc"],
                          "test_loss": te["loss"], "test_acc": te["acc"], "train_seconds": tr["seconds"],
                          "eval_seconds": te["seconds"]}
                if "acc_tta" in te:
                    record["test_acc_tta"] = te["acc_tta"]
                if tr["skipped"]:
                    record["skipped_steps"] = tr["skipped"]
                if verbose:
                    print(format_test_line(te), flush=True)
                history.append(record)
                state = EpochState()
                if on_epoch_end is not None:
                    on_epoch_end(epoch, history, te)
        except Interrupted:
            if on_interrupt is not None:
                on_interrupt(epoch, state)
            raise
    return history


__all__ = [
    "EpochState", "History", "Interrupted", "StopRequest", "evaluate", "fit", "format_test_line", "train_one_epoch",
    "tta_views",
]
