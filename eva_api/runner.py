"""One training run end to end: data, model, optimizer, schedule, fit, checkpoints and artifacts.

``train(config, out_dir)`` is what ``python -m eva_api train`` runs; the notebook and the benchmarks
call it too. The run directory receives ``config.json``, ``checkpoint.pt`` (every epoch end, and on
Ctrl-C / SIGTERM), ``history.json``, ``metrics.json`` and the PNG plots. Under torchrun only rank 0
writes files or prints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states, strip_prefixes, unwrap_model
from .config import Config, save_config
from .data import ImageData, load_data
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .ema import EMA, Lookahead
from .engine import EpochState, History, Precision, evaluate, fit, pick_precision, seed_everything
from .errors import CheckpointError, ConfigError
from .loaders import ClassicLoader, TensorLoader, classic_transforms
from .models import count_parameters, get_model
from .optim import Muon
from .whitening import first_conv, whiten_stem_
from . import plots

CHECKPOINT = "checkpoint.pt"


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


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD (or, with ``optimizer=muon``, Muon for the conv filters and SGD for the rest: ``eva_api.optim``).

    BN weights and biases are exempt from weight decay unless ``wd_on_bn_bias``. ``bn_bias_lr`` multiplies
    the LR of the BatchNorm biases (their own group). Groups whose LR is not ``lr`` say by how much
    (``lr_scale``, for the LR finder). Frozen weights sit in a last group of their own with LR 0 and no
    weight decay (marked ``frozen``; the schedule only scales that 0): the stem conv's with
    ``freeze_stem``, the BN scales with ``freeze_bn_scale``. They keep their initial values but stay
    parameters, so counts, checkpoints and DDP see the same model either way."""
    frozen = [first_conv(model).weight] if config.freeze_stem else []
    bn_biases = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            frozen += [module.weight] if config.freeze_bn_scale else []
            bn_biases += [module.bias] if config.bn_bias_lr != 1 else []
    special = {id(p) for p in frozen + bn_biases}
    filters, decay, no_decay = [], [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in special:
            if config.optimizer == "muon" and p.ndim == 4:
                filters.append(p)
            else:
                (no_decay if p.ndim <= 1 and not config.wd_on_bn_bias else decay).append(p)
    lr = config.effective_lr()
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if bn_biases:
        groups.append({"params": bn_biases, "weight_decay": config.weight_decay if config.wd_on_bn_bias else 0.0,
                       "lr": lr * config.bn_bias_lr, "lr_scale": config.bn_bias_lr})
    if filters:
        groups.append({"params": filters, "orthogonal": True, "weight_decay": 0.0, "lr": config.muon_lr,
                       "lr_scale": config.muon_lr / lr, "momentum": config.muon_momentum, "nesterov": True})
    if frozen:
        groups.append({"params": frozen, "weight_decay": 0.0, "lr": 0.0, "frozen": True})
    kind = Muon if config.optimizer == "muon" else torch.optim.SGD
    return kind(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int):
    schedule = LRSchedule(config.schedule, config.epochs * steps_per_epoch, steps_per_epoch, config.warmup_pct,
                          config.start_lr_factor, config.milestones, config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build_loaders(data: ImageData, config: Config, dist: DistInfo, device: torch.device):
    """(train, test) loaders for this rank; ``batch_size`` is global and split over the ranks."""
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {dist.world_size} processes")
    per_rank = config.batch_size // dist.world_size
    common = dict(seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    if config.loader == "classic":
        if config.alternate_flip:
            raise ConfigError("alternate_flip needs --loader tensor (the classic loader flips through its transforms)")
        transform = classic_transforms(data.mean, data.std, config.augment, config.crop_padding)
        train = ClassicLoader(data.train, transform, per_rank, train=True, num_workers=config.num_workers,
                              pin_memory=device.type == "cuda", **common)
    else:
        if config.augment == "s8":
            raise ConfigError("augment=s8 (rotation, colour jitter) needs --loader classic")
        on = config.augment == "crop_flip"
        train = TensorLoader(data.train, data.mean, data.std, per_rank, train=True, device=device,
                             crop_padding=config.crop_padding if on else 0, flip=on,
                             alternate_flip=on and config.alternate_flip, cutout_size=config.cutout,
                             channels_last=config.channels_last, **common)
    test = TensorLoader(data.test, data.mean, data.std, max(per_rank, 256), train=False, device=device,
                        channels_last=config.channels_last, **common)
    return train, test


def build_model(config: Config, num_classes: int, device: torch.device, dist: DistInfo | None = None,
                whiten_from: ImageData | None = None) -> nn.Module:
    """The config's model on ``device``. With ``config.whiten_init`` the stem is initialised from the
    patches of ``whiten_from.train`` (pass None only when trained weights will be loaded over it)."""
    model = get_model(config.model, num_classes=num_classes, dropout=config.dropout,
                      zero_init_residual=config.zero_init_residual)
    if config.whiten_init and whiten_from is not None:
        whiten_stem_(model, whiten_from.train.images, whiten_from.mean, whiten_from.std)
    if dist is not None and dist.distributed and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_config_data(config: Config, progress: bool = True) -> ImageData:
    return load_data(config.dataset, config.data, download=config.download, synthetic_train=config.synthetic_train,
                     synthetic_test=config.synthetic_test, seed=config.seed, progress=progress)


@dataclass
class RunResult:
    model: nn.Module
    history: History
    data: ImageData
    config: Config
    precision: Precision
    out_dir: Path | None
    metrics: dict[str, Any]


def _describe(config: Config, data: ImageData, model: nn.Module, device, precision: Precision, dist: DistInfo) -> str:
    tag = "SYNTHETIC data" if data.synthetic else "data"
    return (f"eva_api: {config.model} ({count_parameters(model):,} params) | {tag}: {data.source} "
            f"({len(data.train)} train / {len(data.test)} test) | device {device} x{dist.world_size} | "
            f"{precision.name}{' | channels_last' if config.channels_last else ''} | recipe {config.recipe}, "
            f"batch {config.batch_size}, lr {config.effective_lr():g}, {config.epochs} epochs")


def final_report(model: nn.Module, data: ImageData, history: History, config: Config, precision: Precision,
                 device: torch.device, out_dir: Path | None) -> dict[str, Any]:
    """Metrics of the finished model on the full test split; with ``out_dir``, the JSON files and plots."""
    loader = TensorLoader(data.test, data.mean, data.std, 256, train=False, device=device,
                          channels_last=config.channels_last)
    ev = evaluate(model, loader, precision=precision, tta=config.tta, return_outputs=True, all_reduce=False)
    preds = ev["logits"].argmax(1)
    cm = plots.confusion_matrix(ev["labels"], preds, len(data.classes))
    best = history.best() if len(history) else {}
    metrics = {
        "data_source": data.source, "synthetic": data.synthetic, "recipe": config.recipe,
        "epochs": len(history), "parameters": count_parameters(model),
        "final_test_acc": ev["acc"], "final_test_loss": ev["loss"], "final_test_acc_tta": ev.get("acc_tta"),
        "best_test_acc": best.get("test_acc"), "best_epoch": best.get("epoch"),
        "train_seconds": sum(history.column("train_seconds")), "eval_seconds": sum(history.column("eval_seconds")),
        "per_class_acc": {n: a for n, _, _, a in plots.per_class_accuracy(cm, data.classes)},
    }
    if out_dir is not None:
        history.to_json(out_dir / "history.json")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out_dir / "per_class.txt").write_text(plots.format_per_class(plots.per_class_accuracy(cm, data.classes)) + "\n")
        prefix = "SYNTHETIC data - " if data.synthetic else ""
        figs = [plots.plot_history(history, save=out_dir / "curves.png", title=f"{prefix}{config.model}, recipe {config.recipe}"),
                plots.plot_misclassified(data.test.images, ev["labels"], preds, data.classes, n=config.gallery,
                                         save=out_dir / "misclassified.png"),
                plots.plot_confusion_matrix(cm, data.classes, save=out_dir / "confusion_matrix.png")]
        import matplotlib.pyplot as plt

        for f in figs:
            plt.close(f)
    return metrics


def train(config: Config, out_dir: str | Path | None = None, resume: bool | str | Path = False,
          data: ImageData | None = None) -> RunResult:
    """Train ``config`` (single process, or one rank under torchrun); see the module doc.

    ``resume``: True continues from ``out_dir/checkpoint.pt``, a path continues from that file. The
    checkpoint's config is used then, with this config's data location, device and progress settings.
    ``data`` skips loading (e.g. the notebook passes what it already loaded).
    """
    out = Path(out_dir) if out_dir is not None else None
    ckpt = None
    if resume:
        ckpt_path = Path(resume) if not isinstance(resume, bool) else (out / CHECKPOINT if out else None)
        if ckpt_path is None:
            raise ConfigError("resume=True needs an out_dir holding checkpoint.pt")
        ckpt = load_checkpoint(ckpt_path)
        keep = {k: getattr(config, k) for k in ("data", "download", "device", "progress", "num_workers")}
        config = Config.from_dict({**ckpt["config"], **keep})
    elif out is not None and (out / CHECKPOINT).exists():
        raise CheckpointError(f"{out / CHECKPOINT} exists; pass --resume to continue that run or choose another --out")

    dist = init_distributed(config.device)
    try:
        return _train(config, out, ckpt, dist, data)
    finally:
        cleanup_distributed()


def _train(config: Config, out: Path | None, ckpt: dict | None, dist: DistInfo, data: ImageData | None) -> RunResult:
    device = dist.device
    seed_everything(config.seed)
    data = data or load_config_data(config, progress=config.progress and dist.is_main)
    precision = pick_precision(device, config.precision)
    model = build_model(config, len(data.classes), device, dist, whiten_from=None if ckpt else data)
    optimizer = build_optimizer(model, config)
    train_loader, test_loader = build_loaders(data, config, dist, device)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    scaler = precision.make_scaler()
    history, start_epoch, epoch_state = History(), 0, None
    if ckpt is not None:
        unwrap_model(model).load_state_dict(strip_prefixes(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        history = History(list(ckpt["history"]))
        start_epoch = ckpt["epoch"]
        if ckpt.get("epoch_state"):
            epoch_state = EpochState(**ckpt["epoch_state"])
            if not dist.is_main:  # the saved sums are rank 0's own: count them once in the all-reduce
                epoch_state.samples, epoch_state.loss_sum, epoch_state.correct = 0, 0.0, 0
        set_rng_states(ckpt["rng"])
    ema = EMA(model, config.ema) if config.ema else None
    if ema is not None and ckpt is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    lookahead = Lookahead(model, config.lookahead, config.epochs * len(train_loader)) if config.lookahead else None
    if lookahead is not None and ckpt is not None and ckpt.get("lookahead"):
        lookahead.load_state_dict(ckpt["lookahead"])
    train_model = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    if dist.is_main:
        print(_describe(config, data, model, device, precision, dist), flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            save_config(config, out / "config.json")
        if start_epoch or epoch_state:
            print(f"resuming after epoch {start_epoch}"
                  + (f" (+{epoch_state.batches} batches of epoch {start_epoch + 1})" if epoch_state else ""), flush=True)

    def checkpoint(epochs_done: int, state: EpochState | None) -> None:
        if out is None or not dist.is_main:
            return
        save_checkpoint(out / CHECKPOINT, model=model, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                        ema=ema.state_dict() if ema is not None else None,
                        lookahead=lookahead.state_dict() if lookahead is not None else None,
                        epoch=epochs_done, epoch_state=vars(state) if state else None, history=history.records,
                        config=config.to_dict(), classes=data.classes, mean=data.mean, std=data.std,
                        rng=rng_states(), data_source=data.source)

    def on_interrupt(epoch: int, state: EpochState) -> None:
        done = len(history)
        checkpoint(done, state if done < epoch and state.batches else None)
        if dist.is_main and out is not None:
            print(f"\ninterrupted: checkpoint saved to {out / CHECKPOINT}; continue with --resume", flush=True)

    fit(train_model, train_loader, test_loader, optimizer, epochs=config.epochs,
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), precision=precision,
        scheduler=scheduler, scaler=scaler, ema=ema, lookahead=lookahead, history=history, start_epoch=start_epoch, epoch_state=epoch_state,
        tta=config.tta, progress=config.progress and dist.is_main, verbose=dist.is_main,
        on_epoch_end=lambda e, h: checkpoint(e, None), on_interrupt=on_interrupt)

    final = ema.module if ema is not None else model  # the weights that were evaluated and are kept
    metrics: dict[str, Any] = {}
    if dist.is_main:
        metrics = final_report(final, data, history, config, precision, device, out)
    return RunResult(final, history, data, config, precision, out, metrics)
