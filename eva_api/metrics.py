"""Numbers about predictions: confusion matrix, per-class accuracy, precision/recall/F1, top losses,
most-confused pairs and which images were misclassified. No plotting here (see ``plots``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def misclassified(images, labels, preds, only_class: int | None = None, n: int = 25, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` wrong predictions (optionally only those whose true class is ``only_class``).

    Test sets are often sorted by class, so the first mistakes would all share one class: the
    indices are drawn in a fixed pseudo-random order instead (same ``seed``, same gallery).
    """
    labels, preds = torch.as_tensor(labels).cpu(), torch.as_tensor(preds).cpu()
    wrong = labels != preds
    if only_class is not None:
        wrong &= labels == only_class
    idx = wrong.nonzero().flatten()
    return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][:n]


def confusion_matrix(labels, preds, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    labels, preds = torch.as_tensor(labels).long().cpu(), torch.as_tensor(preds).long().cpu()
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor, classes: Sequence[str]) -> list[tuple[str, int, int, float]]:
    """Rows of (class, correct, total, accuracy %) from a confusion matrix."""
    rows = []
    for i, name in enumerate(classes):
        total = int(cm[i].sum())
        correct = int(cm[i, i])
        rows.append((name, correct, total, 100.0 * correct / total if total else float("nan")))
    return rows


def format_per_class(rows, title: str | None = None) -> str:
    """:func:`per_class_accuracy` rows as a text table, under ``title`` (e.g. "SYNTHETIC data") when given."""
    lines = ([title] if title else []) + [f"{'class':<12}{'correct':>8}{'total':>8}{'acc %':>8}"]
    lines += [f"{name:<12}{c:>8}{t:>8}{a:>8.2f}" for name, c, t, a in rows]
    return "\n".join(lines)


@dataclass
class TopLoss:
    index: int
    actual: str
    predicted: str
    loss: float
    probability: float  # of the predicted class


def top_losses(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], k: int = 16) -> list[TopLoss]:
    """The ``k`` test images with the highest cross-entropy loss."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    probs = logits.float().softmax(1)
    order = losses.argsort(descending=True)[:k]
    preds = probs.argmax(1)
    return [TopLoss(int(i), classes[int(labels[i])], classes[int(preds[i])], float(losses[i]), float(probs[i, preds[i]]))
            for i in order]


def most_confused(cm: torch.Tensor, classes: Sequence[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """Off-diagonal (actual, predicted, count) pairs, most frequent first."""
    pairs = [(classes[i], classes[j], int(cm[i, j])) for i in range(len(classes)) for j in range(len(classes))
             if i != j and cm[i, j] >= min_count]
    return sorted(pairs, key=lambda p: -p[2])


def classification_report(cm: torch.Tensor, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows actual, columns predicted),
    plus ``macro avg`` and ``accuracy``."""
    cm = torch.as_tensor(cm).double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    report = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, name in enumerate(classes)}
    report["macro avg"] = {"precision": float(precision.mean()), "recall": float(recall.mean()),
                           "f1": float(f1.mean()), "support": int(support.sum())}
    report["accuracy"] = {"value": float(tp.sum() / cm.sum().clamp_min(1))}
    return report


def format_report(report: dict[str, dict[str, float]], title: str | None = None) -> str:
    """:func:`classification_report` as a text table, under ``title`` (e.g. "SYNTHETIC data") when given."""
    lines = ([title] if title else []) + [f"{'':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, r in report.items():
        if name == "accuracy":
            lines.append(f"{'accuracy':<12}{'':>20}{r['value']:>10.4f}")
        else:
            lines.append(f"{name:<12}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['support']:>9d}")
    return "\n".join(lines)
