"""Figures: training curves, sample grid, misclassified gallery, confusion matrix.

Each function returns a matplotlib Figure and, given ``save=PATH``, writes a PNG. pyplot falls back to
the Agg backend where there is no display, so this is safe on servers and in CI.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .metrics import misclassified


def _pyplot():
    # matplotlib itself falls back to Agg where there is no display; Jupyter keeps its inline backend
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, save: str | os.PathLike | None, dpi: int):
    if not fig._suptitle:  # figures with a suptitle were laid out before it was added
        fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    return fig


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Whole-epoch ticks, half an epoch of margin each side (a lone epoch would otherwise get 0.96..1.04)."""
    from matplotlib.ticker import MaxNLocator

    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # the default 2 falls back to 0.1 steps


def plot_history(history, save: str | os.PathLike | None = None, dpi: int = 80, title: str | None = None,
                 peak_lr: float | None = None):
    """Loss and accuracy (train vs test, flip TTA where recorded) and the LR, per epoch. Every series has
    markers, so a one-epoch run shows its points (and a legend that matches them).

    The History holds the LR at each epoch's end, so a one-cycle peak reached mid-epoch never shows among
    those points: ``peak_lr`` (e.g. ``config.effective_lr()``) draws it as a dashed line."""
    plt = _pyplot()
    records = history.records if hasattr(history, "records") else list(history)
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    axes[0].plot(epochs, [r["test_loss"] for r in records], "o-", label="test")
    axes[0].set(title="Loss", xlabel="epoch")
    axes[1].plot(epochs, [r["train_acc"] for r in records], "o-", label="train")
    axes[1].plot(epochs, [r["test_acc"] for r in records], "o-", label="test")
    if all("test_acc_tta" in r for r in records):
        axes[1].plot(epochs, [r["test_acc_tta"] for r in records], "s--", ms=4, label="test (flip TTA)")
    axes[1].set(title="Accuracy (%)", xlabel="epoch")
    axes[2].plot(epochs, [r["lr"] for r in records], "o-", color="tab:green", label="LR at epoch end")
    if peak_lr is not None:
        axes[2].axhline(peak_lr, color="tab:green", ls="--", alpha=0.6, label=f"peak LR {peak_lr:g} (schedule)")
    axes[2].set(title="Learning rate", xlabel="epoch")
    top = max([r["lr"] for r in records] + [peak_lr or 0.0])
    if top > 0:  # from 0 (a lone point would otherwise sit in a range like 0.071..0.079), the peak line inside
        axes[2].set_ylim(-0.04 * top, 1.1 * top)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
        _epoch_axis(ax, epochs)
    fig.tight_layout()
    if title:
        fig.suptitle(title, y=1.04)
    return _finish(fig, save, dpi)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized float [N, C, H, W] back to [0, 1] for display."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def _as_display(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 images -> [0, 1]; normalized floats are un-normalized with ``mean``/``std``."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if mean is not None and std is not None:
        return denormalize(images.float(), mean, std)
    return images.float().clamp(0, 1)


def image_grid(images, titles: Sequence[str], ncols: int = 5, mean=None, std=None, save=None, dpi: int = 80,
               suptitle: str | None = None, overlays=None):
    """A grid of images with titles; ``overlays`` (N, H, W) in [0, 1] are drawn as heat maps on top."""
    plt = _pyplot()
    shown = _as_display(images, mean, std)
    n = len(shown)
    nrows = max(1, -(-n // ncols))
    height = 2.45 * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(shown[i].permute(1, 2, 0).numpy())
            if overlays is not None:
                ax.imshow(overlays[i].detach().cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout(h_pad=1.2)
    if suptitle:
        fig.suptitle(suptitle, y=1 + 0.35 / height)  # ~0.35 inch above the top row's titles
    return _finish(fig, save, dpi)


def plot_samples(images, labels, classes: Sequence[str], n: int = 20, ncols: int = 10, save=None, dpi: int = 80,
                 title: str | None = None):
    """``n`` images with their class names, taken from every class in turn (folders are sorted by class,
    so the first ``n`` images would all be airplanes)."""
    labels = torch.as_tensor(labels).cpu()
    per_class = [(labels == c).nonzero().flatten().tolist() for c in range(len(classes))]
    idx = [i for row in zip(*per_class) for i in row][:n] if all(per_class) else list(range(min(n, len(labels))))
    titles = [classes[int(labels[i])] for i in idx]
    return image_grid(images[idx], titles, ncols=ncols, save=save, dpi=dpi, suptitle=title)


def titled(label: str | None, text: str) -> str:
    """``text`` with ``label`` (e.g. "SYNTHETIC data") in front, so a figure says what data it was made from."""
    return f"{label} - {text}" if label else text


def plot_misclassified(images, labels, preds, classes: Sequence[str], n: int = 25, only_class: int | str | None = None,
                       ncols: int = 5, mean=None, std=None, save=None, dpi: int = 80, title: str | None = None):
    """The misclassified gallery: un-normalized images titled ``Actual: cat / Predicted: dog``. ``title``
    (e.g. "SYNTHETIC data") goes in front of the heading."""
    if isinstance(only_class, str):
        only_class = list(classes).index(only_class)
    idx = misclassified(images, labels, preds, only_class, n)
    titles = [f"Actual: {classes[int(labels[i])]}\nPredicted: {classes[int(preds[i])]}" for i in idx]
    return image_grid(images[idx], titles, ncols=ncols, mean=mean, std=std, save=save, dpi=dpi,
                      suptitle=titled(title, f"{len(idx)} misclassified images"))


def _cell_text(count: float, shown: float, normalize: bool) -> str:
    """A confusion cell's number: blank when empty, "<.01" for a share that would round to a false 0.00."""
    if count == 0:
        return ""
    if not normalize:
        return f"{int(count)}"
    return "<.01" if shown < 0.005 else f"{shown:.2f}"


def plot_confusion_matrix(cm: torch.Tensor, classes: Sequence[str], normalize: bool = True, save=None, dpi: int = 80,
                          title: str | None = None):
    """Heat map of the confusion matrix (rows: actual, columns: predicted), with per-cell numbers (empty
    cells blank). ``title`` (e.g. "SYNTHETIC data") goes in front of the heading."""
    plt = _pyplot()
    cm = torch.as_tensor(cm).float()
    shown = cm / cm.sum(1, keepdim=True).clamp_min(1) if normalize else cm
    k = len(classes)
    fig, ax = plt.subplots(figsize=(0.6 * k + 3, 0.6 * k + 2.2))
    im = ax.imshow(shown.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xticks=range(k), yticks=range(k), xlabel="Predicted", ylabel="Actual",
           title=titled(title, "Confusion matrix" + (" (row-normalized)" if normalize else "")))
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for i in range(k):
        for j in range(k):
            v = shown[i, j].item()
            ax.text(j, i, _cell_text(cm[i, j].item(), v, normalize), ha="center", va="center", fontsize=7,
                    color="white" if v > shown.max().item() / 2 else "black")
    return _finish(fig, save, dpi)
