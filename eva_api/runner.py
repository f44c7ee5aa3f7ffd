"""One training run end to end: data, model, optimizer, schedule, fit, checkpoints and artifacts.

``train(config, out_dir)`` is what ``python -m eva_api train`` runs; the notebook and the benchmarks
call it too. The run directory receives ``config.json``, ``checkpoint.pt`` (every epoch end, and on
Ctrl-C / SIGTERM), ``history.json``, ``metrics.json``, ``summary.md`` and the PNG plots. Under torchrun
only rank 0 reads the data source first, writes files or prints.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import metrics as M
from . import plots
from .checkpoint import RunLock, load_checkpoint, out_folder, save_checkpoint
from .config import RUNTIME_FIELDS, Config, replace, resume_conflicts, save_config
from .data import ImageData, load_data
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, gather_objects, init_distributed
from .engine import EpochState, History, evaluate, fit
from .errors import CheckpointError, ConfigError
from .loaders import S8_JITTER, S8_ROTATION, ClassicLoader, TensorLoader, classic_transforms, eval_loader
from .models import count_parameters, get_model, strip_prefixes, unwrap_model
from .optim import Stepper, build_optimizer, build_scheduler, graph_fallback
from .runtime import (Precision, check_compile, configure_backends, derive_seed, pick_device, pick_precision,
                      rng_states, seed_everything, set_rng_states)
from .summary import format_summary, run_summary
from .whitening import whiten_stem_

CHECKPOINT = "checkpoint.pt"


def build_loaders(data: ImageData, config: Config, dist: DistInfo, device: torch.device):
    """(train, test) loaders for this rank; ``batch_size`` is global and split over the ranks."""
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {dist.world_size} processes")
    per_rank = config.batch_size // dist.world_size
    common = dict(seed=config.seed, rank=dist.rank, world_size=dist.world_size, device=device,
                  channels_last=config.channels_last)
    if config.loader == "classic":
        transform = classic_transforms(config.augment, config.crop_padding)
        train = ClassicLoader(data.train, transform, per_rank, mean=data.mean, std=data.std, train=True,
                              num_workers=config.num_workers, **common)
    else:
        on, s8 = config.augment == "crop_flip", config.augment == "s8"
        train = TensorLoader(data.train, data.mean, data.std, per_rank, train=True,
                             crop_padding=config.crop_padding if on else 0, flip=on or s8, cutout_size=config.cutout,
                             rotate=S8_ROTATION if s8 else 0.0, jitter=S8_JITTER if s8 else 0.0, **common)
    test = eval_loader(data.test, data.mean, data.std, device, channels_last=config.channels_last, rank=dist.rank,
                       world_size=dist.world_size)
    return train, test


def build_model(config: Config, num_classes: int, device: torch.device, dist: DistInfo | None = None,
                whiten_from: ImageData | None = None) -> nn.Module:
    """The config's model on ``device``. With ``config.whiten_init`` the stem is initialised from the
    patches of ``whiten_from.train`` (pass None only when trained weights will be loaded over it)."""
    model = get_model(config.model, num_classes=num_classes, dropout=config.dropout)
    if config.whiten_init and whiten_from is not None:
        whiten_stem_(model, whiten_from.train.images, whiten_from.mean, whiten_from.std)
    if dist is not None and dist.distributed and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_config_data(config: Config, progress: bool = True, dist: DistInfo | None = None) -> ImageData:
    """The config's data. Under DDP rank 0 downloads, decodes and writes the cache while the others wait;
    then they read that cache (torchvision's download is not safe to run from several processes)."""
    def load(show: bool) -> ImageData:
        return load_data(config.dataset, config.data, download=config.download,
                         synthetic_train=config.synthetic_train, synthetic_test=config.synthetic_test,
                         seed=config.seed, progress=show)

    if dist is None or not dist.distributed:
        return load(progress)
    if dist.is_main:
        data = load(progress)
        barrier()
        return data
    barrier()
    return load(False)


@dataclass
class Setup:
    """Everything a training loop needs, built from a config (shared by :func:`train` and the LR finder)."""

    config: Config
    dist: DistInfo
    precision: Precision
    data: ImageData
    model: nn.Module
    stepper: Stepper
    train_loader: Any
    test_loader: TensorLoader

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)


def prepare(config: Config, dist: DistInfo | None = None, data: ImageData | None = None,
            init_weights: bool = True, progress: bool = True) -> Setup:
    """Seed, load data, build model, loaders, optimizer, schedule and scaler for this process.

    ``init_weights=False`` skips the data-dependent stem init (a checkpoint's weights will be loaded)."""
    dist = dist or DistInfo(device=pick_device(config.device))
    device = dist.device
    if config.sync_bn and dist.distributed and device.type != "cuda":  # SyncBatchNorm's forward refuses CPU input
        raise ConfigError(f"--sync-bn needs CUDA GPUs (nccl) under torchrun, not {device.type}; drop it")
    configure_backends(device)
    seed_everything(config.seed)
    data = data or load_config_data(config, progress=progress and dist.is_main, dist=dist)
    precision = pick_precision(device, config.precision)
    model = build_model(config, len(data.classes), device, dist, whiten_from=data if init_weights else None)
    if dist.rank:  # same initial weights on every rank (above); own dropout and transform draws from here on
        seed_everything(derive_seed(config.seed, dist.rank))
    optimizer = build_optimizer(model, config, precision)
    train_loader, test_loader = build_loaders(data, config, dist, device)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    blocker = graph_fallback(precision, dist.distributed, config.compile)
    if config.cuda_graph and blocker and device.type == "cuda" and dist.is_main:
        warnings.warn(f"no CUDA graph, the training step runs eagerly: {blocker}", stacklevel=2)
    stepper = Stepper(optimizer, scheduler, precision.make_scaler(), cuda_graph=config.cuda_graph and not blocker)
    return Setup(config, dist, precision, data, model, stepper, train_loader, test_loader)


@dataclass
class RunResult:
    model: nn.Module
    history: History
    data: ImageData
    config: Config
    precision: Precision
    out_dir: Path | None
    metrics: dict[str, Any]


def describe(setup: Setup) -> str:
    """The run's banner: model, data, device, precision (and why), recipe."""
    config, data = setup.config, setup.data
    tag = "SYNTHETIC data" if data.synthetic else "data"
    why = f" ({setup.precision.reason})" if setup.precision.reason else ""
    return (f"eva_api: {config.model} ({count_parameters(setup.model):,} params) | {tag}: {data.source} "
            f"({len(data.train)} train / {len(data.test)} test) | device {setup.device} x{setup.dist.world_size} | "
            f"{setup.precision.name}{why}{' | channels_last' if config.channels_last else ''} | recipe "
            f"{config.recipe}, batch {config.batch_size}, lr {config.effective_lr():g}, {config.epochs} epochs")


def final_report(model: nn.Module, data: ImageData, history: History, config: Config, precision: Precision,
                 device: torch.device, out_dir: Path | None,
                 outputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Metrics of the finished model on the full test split; with ``out_dir``, the JSON files and plots.

    ``outputs``: the last epoch's (logits, labels) in test-set order, so nothing is evaluated twice; without
    them (e.g. a run resumed after its last epoch) the model is evaluated here."""
    last = history[-1] if len(history) else {}
    if outputs is None:
        ev = evaluate(model, eval_loader(data.test, data.mean, data.std, device, channels_last=config.channels_last),
                      precision=precision, tta=config.tta, return_outputs=True, all_reduce=False)
        outputs = ev["logits"], ev["labels"]
        last = {"test_acc": ev["acc"], "test_loss": ev["loss"], "test_acc_tta": ev.get("acc_tta")}
    logits, labels = outputs
    preds = logits.argmax(1)
    cm = M.confusion_matrix(labels, preds, len(data.classes))
    best = history.best() if len(history) else {}
    metrics = {
        "data_source": data.source, "synthetic": data.synthetic, "recipe": config.recipe,
        "epochs": len(history), "parameters": count_parameters(model),
        "final_test_acc": last.get("test_acc"), "final_test_loss": last.get("test_loss"),
        "final_test_acc_tta": last.get("test_acc_tta"),
        "best_test_acc": best.get("test_acc"), "best_epoch": best.get("epoch"),
        "train_seconds": sum(history.column("train_seconds")), "eval_seconds": sum(history.column("eval_seconds")),
        "precision": precision.name, "device": str(device),
        "per_class_acc": {n: a for n, _, _, a in M.per_class_accuracy(cm, data.classes)},
    }
    if out_dir is not None:
        history.to_json(out_dir / "history.json")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        label = "SYNTHETIC data" if data.synthetic else None
        (out_dir / "per_class.txt").write_text(M.format_per_class(M.per_class_accuracy(cm, data.classes), title=label) + "\n")
        (out_dir / "summary.md").write_text(format_summary(run_summary(config, metrics)) + "\n")
        peak = config.effective_lr() if config.schedule == "onecycle" else None  # param group 0's LR peaks there
        figs = [plots.plot_history(history, save=out_dir / "curves.png", peak_lr=peak,
                                   title=plots.titled(label, f"{config.model}, recipe {config.recipe}")),
                plots.plot_misclassified(data.test.images, labels, preds, data.classes, n=config.gallery,
                                         save=out_dir / "misclassified.png", title=label),
                plots.plot_confusion_matrix(cm, data.classes, save=out_dir / "confusion_matrix.png", title=label)]
        import matplotlib.pyplot as plt

        for f in figs:
            plt.close(f)
    return metrics


def resume_config(checkpoint: str | Path, overrides: dict[str, Any] | None = None, recipe: str | None = None,
                  trust: bool = False) -> Config:
    """The config to continue a saved run with: the checkpoint's, with ``overrides`` (CLI ``--key value``) on
    top; :func:`train` then refuses any override that is not a runtime field. ``recipe`` (when given) must
    be the saved one."""
    saved = Config.from_dict(load_checkpoint(checkpoint, trust=trust, mmap=True)["config"])
    if recipe is not None and recipe != saved.recipe:
        raise ConfigError(f"cannot resume: the run in {checkpoint} uses recipe {saved.recipe!r}, not {recipe!r}")
    return replace(saved, **(overrides or {}))


def unfinished_run(root: str | Path, config: Config | None = None,
                   left_alone: list[tuple[Path, str, str]] | None = None) -> Path | None:
    """The newest run folder under ``root`` (or ``root`` itself) whose checkpoint has epochs left to train,
    e.g. to continue after a Colab disconnect; None when there is none.

    With ``config`` only a run saved with the same settings (``resume_conflicts``) counts: an unfinished run
    with others stays as it is (continuing it would train that other experiment), and ``left_alone`` (when
    given) receives ``(folder, "N of M epochs done", "field: saved -> new; ...")`` for each one passed over."""
    root = Path(root)
    candidates = sorted((p.parent for p in [root / CHECKPOINT, *root.glob(f"*/{CHECKPOINT}")] if p.is_file()),
                        key=lambda d: (d / CHECKPOINT).stat().st_mtime, reverse=True)
    for folder in candidates:
        try:
            ckpt = load_checkpoint(folder / CHECKPOINT, mmap=True)  # the config and epoch only: no weights are read
        except CheckpointError:
            continue
        epochs = int(ckpt["config"].get("epochs", 0))
        if ckpt["epoch"] >= epochs:
            continue  # finished
        conflicts = resume_conflicts(Config.from_dict(ckpt["config"]), config) if config is not None else []
        if not conflicts:
            return folder
        if left_alone is not None:
            shown = "; ".join(conflicts[:3]) + (f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
            left_alone.append((folder, f"{ckpt['epoch']} of {epochs} epochs done", shown))
    return None


def train(config: Config, out_dir: str | Path | None = None, resume: bool | str | Path = False,
          data: ImageData | None = None, trust_checkpoint: bool = False) -> RunResult:
    """Train ``config`` (single process, or one rank under torchrun); see the module doc.

    ``resume``: True continues from ``out_dir/checkpoint.pt``, a path continues from that file. ``config``
    must then equal the saved one except for runtime fields (data location, device, workers, progress...):
    any other difference is refused with one line naming each field. ``data`` skips loading (e.g. the
    notebook passes what it already loaded). ``trust_checkpoint`` reads an old, fully pickled checkpoint.
    """
    out = Path(out_dir) if out_dir is not None else None
    ckpt, ckpt_path = None, None
    if resume:
        ckpt_path = Path(resume) if not isinstance(resume, bool) else (out / CHECKPOINT if out else None)
        if ckpt_path is None:
            raise ConfigError("resume=True needs an out_dir holding checkpoint.pt")
        ckpt = load_checkpoint(ckpt_path, trust=trust_checkpoint)
        saved = Config.from_dict(ckpt["config"])
        conflicts = resume_conflicts(saved, config)
        if conflicts:
            raise ConfigError(f"cannot resume {ckpt_path} with changed settings ({'; '.join(conflicts)}); only "
                              f"{', '.join(RUNTIME_FIELDS)} may change. Start a new run (another --out) to change others")
        config = replace(saved, **{k: getattr(config, k) for k in RUNTIME_FIELDS})
    def refuse_existing() -> None:
        if out is None or not (out_folder(out) / CHECKPOINT).exists():
            return
        if ckpt is None:
            raise CheckpointError(f"{out / CHECKPOINT} exists; pass --resume to continue that run or choose another --out")
        if not (out / CHECKPOINT).samefile(ckpt_path):  # resuming run B into run A's folder would overwrite A
            raise CheckpointError(f"{out} holds another checkpoint than {ckpt_path}; to continue that one: --resume "
                                  f"{out / CHECKPOINT}; to continue {ckpt_path}: leave out --out (it continues in "
                                  f"{ckpt_path.parent}) or choose an empty one")

    refuse_existing()  # on every rank, before any collective: all ranks stop alike
    if config.compile:
        check_compile()  # before the data loads
    dist = init_distributed(config.device)
    lock = RunLock(out) if out is not None and dist.is_main else None
    try:
        if lock is not None:
            lock.acquire()
            refuse_existing()  # again under the lock: a run that finished meanwhile is not overwritten
        return _train(config, out, ckpt, dist, data)
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def _resume_state(setup: Setup, ckpt: dict) -> tuple[History, int, EpochState | None]:
    """Load a checkpoint's training state into ``setup``; returns (history, epochs done, unfinished epoch)."""
    dist = setup.dist
    unwrap_model(setup.model).load_state_dict(strip_prefixes(ckpt["model"]))
    setup.stepper.load_state_dict(ckpt)
    epoch_state = None
    saved_world = int(ckpt.get("world_size", 1))
    if ckpt.get("epoch_state"):
        if saved_world != dist.world_size:
            raise ConfigError(f"the checkpoint stopped in the middle of epoch {ckpt['epoch'] + 1} under {saved_world} "
                              f"process(es); resume it with {saved_world} (a checkpoint from an epoch's end resumes "
                              f"under any number)")
        epoch_state = EpochState(**ckpt["epoch_state"])
        if not dist.is_main:  # the saved sums are all ranks' together: rank 0 carries them, counted once
            epoch_state.samples, epoch_state.loss_sum, epoch_state.correct = 0, 0.0, 0
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if dist.rank < len(rngs):
        set_rng_states(rngs[dist.rank], setup.device)
    else:  # more ranks than saved states (an epoch-boundary resume): a fresh stream of this rank's own
        seed_everything(derive_seed(setup.config.seed, ckpt["epoch"], dist.rank))
    return History(list(ckpt["history"])), int(ckpt["epoch"]), epoch_state


def _train(config: Config, out: Path | None, ckpt: dict | None, dist: DistInfo, data: ImageData | None) -> RunResult:
    setup = prepare(config, dist, data, init_weights=ckpt is None, progress=config.progress)
    model, device, data = setup.model, setup.device, setup.data
    history, start_epoch, epoch_state = History(), 0, None
    if ckpt is not None:
        history, start_epoch, epoch_state = _resume_state(setup, ckpt)
    train_model = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    if dist.is_main:
        print(describe(setup), flush=True)
        if out is not None:
            save_config(config, out / "config.json")
        if start_epoch or epoch_state:
            print(f"resuming after epoch {start_epoch}"
                  + (f" (+{epoch_state.batches} batches of epoch {start_epoch + 1})" if epoch_state else ""), flush=True)

    def checkpoint(epochs_done: int, state: EpochState | None) -> None:
        if out is None:
            return
        rngs = gather_objects(rng_states(device))  # collectives: every rank takes part, rank 0 writes
        if state is not None:  # the unfinished epoch's sums over all ranks (rank 0 alone carries them on resume)
            state = EpochState(**vars(state))
            state.loss_sum, state.correct, state.samples = all_reduce_sum(
                [state.loss_sum, state.correct, state.samples], device)
            state.correct, state.samples = int(state.correct), int(state.samples)
        if dist.is_main:
            save_checkpoint(out / CHECKPOINT, model=model, **setup.stepper.state_dict(), epoch=epochs_done,
                            epoch_state=vars(state) if state else None, world_size=dist.world_size,
                            history=history.records, config=config.to_dict(), classes=data.classes,
                            mean=data.mean, std=data.std, rng=rngs, data_source=data.source)

    last_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_epoch_end(epoch: int, hist: History, test_metrics: dict) -> None:
        checkpoint(epoch, None)
        if "logits" in test_metrics:  # the last epoch: keep its predictions for the report, in test-set order
            shards = gather_objects((test_metrics["logits"], test_metrics["labels"]))
            n = sum(len(s[1]) for s in shards)
            logits = torch.empty(n, shards[0][0].shape[1])
            labels = torch.empty(n, dtype=torch.long)
            for r, (lg, lb) in enumerate(shards):  # rank r evaluated samples r, r + world, ...
                logits[r::len(shards)], labels[r::len(shards)] = lg, lb
            last_outputs.append((logits, labels))

    def on_interrupt(epoch: int, state: EpochState) -> None:
        done = len(history)
        checkpoint(done, state if done < epoch and state.batches else None)
        if dist.is_main and out is not None:
            print(f"\ninterrupted: checkpoint saved to {out / CHECKPOINT}; continue with --resume {out / CHECKPOINT} "
                  f"(or train(..., resume=True))", flush=True)

    fit(train_model, setup.train_loader, setup.test_loader, setup.stepper, epochs=config.epochs,
        criterion=setup.criterion(), precision=setup.precision, history=history, start_epoch=start_epoch,
        epoch_state=epoch_state, tta=config.tta, progress=config.progress and dist.is_main, verbose=dist.is_main,
        on_epoch_end=on_epoch_end, on_interrupt=on_interrupt)

    metrics: dict[str, Any] = {}
    if dist.is_main:
        metrics = final_report(model, data, history, config, setup.precision, device, out,
                               last_outputs[0] if last_outputs else None)
    return RunResult(model, history, data, config, setup.precision, out, metrics)


__all__ = ["CHECKPOINT", "RunResult", "Setup", "build_loaders", "build_model", "describe", "final_report",
           "load_config_data", "prepare", "resume_config", "train", "unfinished_run"]
