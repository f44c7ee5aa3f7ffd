"""The run summary: one table saying what ran and what it reached, built from the config and the results
(never typed by hand), for the notebook, the README and ``summary.md`` in each run folder."""
from __future__ import annotations

from typing import Any

from .config import Config


def describe_recipe(config: Config) -> dict[str, str]:
    """Optimizer(s), schedule, augmentation, regularization and initialization of ``config``, in words."""
    sgd = f"SGD lr {config.effective_lr():g}, momentum {config.momentum:g}{' (Nesterov)' if config.nesterov else ''}"
    optimizer = sgd if config.optimizer == "sgd" else (
        f"Muon for the conv filters (lr {config.muon_lr:g}, momentum {config.muon_momentum:g}); {sgd} for the rest")
    if config.schedule == "multistep":
        schedule = f"MultiStepLR at epochs {list(config.milestones)}, x{config.gamma:g}"
    else:
        schedule = (f"one-cycle: {config.start_lr_factor:g}x -> peak over the first {config.warmup_pct:.0%}, "
                    f"then linear to 0")
    augment = {"s8": "horizontal flip, ±5° rotation, colour jitter (torchvision, DataLoader)",
               "crop_flip": f"{config.crop_padding}-px reflect-pad random crop + horizontal flip (on whole batches)",
               "none": "none"}[config.augment]
    if config.cutout:
        augment += f", cutout {config.cutout}x{config.cutout}"
    reg = [f"weight decay {config.weight_decay:g}" + ("" if config.wd_on_bn_bias else " (not on BN/bias)")]
    if config.dropout:
        reg.append(f"dropout {config.dropout:g} before the head")
    if config.label_smoothing:
        reg.append(f"label smoothing {config.label_smoothing:g}")
    init = ["stem = whitening basis of training patches"] * config.whiten_init + ["stem frozen"] * config.freeze_stem
    return {"optimizer": optimizer, "schedule": schedule, "augmentation": augment, "regularization": ", ".join(reg),
            "initialization": ", ".join(init) or "PyTorch default"}


def run_summary(config: Config, metrics: dict[str, Any]) -> dict[str, str]:
    """The summary table (name -> value) of a finished run, from its config and ``RunResult.metrics``."""
    def acc(key: str) -> str:
        return "n/a" if metrics.get(key) is None else f"{metrics[key]:.2f}%"

    final = acc("final_test_acc")
    if metrics.get("final_test_acc_tta") is not None:
        final += f" ({acc('final_test_acc_tta')} with flip TTA)"
    data = metrics.get("data_source", config.data) + (" (SYNTHETIC)" if metrics.get("synthetic") else "")
    return {
        "data": data,
        "recipe / epochs": f"{config.recipe} / {metrics.get('epochs', config.epochs)} (batch {config.batch_size})",
        "best test accuracy": f"{acc('best_test_acc')} at epoch {metrics.get('best_epoch')}",
        "final test accuracy": final,
        "parameters": f"{metrics.get('parameters', 0):,} ({config.model})",
        **describe_recipe(config),
        "precision / device": f"{metrics.get('precision', config.precision)} on {metrics.get('device', config.device)}",
        "training time": f"{metrics.get('train_seconds', 0):.0f} s (+ {metrics.get('eval_seconds', 0):.0f} s evaluation)",
    }


def format_summary(table: dict[str, str], header: tuple[str, str] = ("item", "value")) -> str:
    """The table as Markdown under a ``header`` row (renders in Jupyter and on GitHub, reads as plain text too)."""
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|")  # a bare | would split the cell

    rows = [header, ("---", "---"), *table.items()]
    return "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in rows)


__all__ = ["describe_recipe", "format_summary", "run_summary"]
