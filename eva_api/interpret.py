"""What the model learned: Grad-CAM, top losses, most-confused pairs and a precision/recall/F1 report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import unwrap_model
from .loaders import normalize


def default_cam_layer(model: nn.Module) -> nn.Module:
    """The last block of ``layer4`` for the ResNets here, else the last Conv2d."""
    model = unwrap_model(model)
    if hasattr(model, "layer4"):
        return model.layer4[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | Sequence[int] | int | None = None,
    layer: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM heat maps [N, H, W] in [0, 1] at the input's size, and the logits.

    ``target``: the class to explain per image (default: the predicted class). The map is the ReLU of
    the layer's activations weighted by the spatially averaged gradient of the target logit, upsampled
    bilinearly and scaled per image to [0, 1] (all zeros where nothing speaks for the class).
    """
    layer = layer or default_cam_layer(model)
    was_training = model.training
    model.eval()
    saved: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: saved.__setitem__("act", o))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # makes the graph reach the layer even if weights are frozen
            logits = model(x)
            if target is None:
                target_t = logits.argmax(1)
            else:
                target_t = torch.as_tensor(target, device=logits.device).long().expand(len(x))
            score = logits.gather(1, target_t[:, None]).sum()
            grads = torch.autograd.grad(score, saved["act"])[0]
    finally:
        handle.remove()
        model.train(was_training)
    act = saved["act"].detach().float()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    cam = torch.where(hi > lo, (cam - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(cam))
    return cam.clamp(0, 1), logits.detach()


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


def format_report(report: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, r in report.items():
        if name == "accuracy":
            lines.append(f"{'accuracy':<12}{'':>20}{r['value']:>10.4f}")
        else:
            lines.append(f"{name:<12}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['support']:>9d}")
    return "\n".join(lines)


def plot_gradcam_pairs(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                       mean, std, save=None, dpi: int = 80):
    """For each image: Grad-CAM for the predicted class and for the true class, side by side."""
    from .plots import image_grid

    device = next(model.parameters()).device
    x = normalize(images_uint8, mean, std).to(device)
    cam_pred, logits = grad_cam(model, x)
    cam_true, _ = grad_cam(model, x, labels.to(device))
    preds = logits.argmax(1).cpu()
    pics = torch.stack([images_uint8, images_uint8], 1).flatten(0, 1)
    cams = torch.stack([cam_pred.cpu(), cam_true.cpu()], 1).flatten(0, 1)
    titles = []
    for y, p in zip(labels.tolist(), preds.tolist()):
        titles += [f"looks at: {classes[p]}\n(predicted)", f"looks at: {classes[y]}\n(actual)"]
    return image_grid(pics, titles, ncols=6, overlays=cams, save=save, dpi=dpi,
                      suptitle="Grad-CAM: predicted class vs actual class")


def plot_gradcam_class(model: nn.Module, images_uint8: torch.Tensor, class_index: int, classes: Sequence[str],
                       mean, std, save=None, dpi: int = 80):
    """Grad-CAM for one chosen class on the given images."""
    from .plots import image_grid

    device = next(model.parameters()).device
    cams, logits = grad_cam(model, normalize(images_uint8, mean, std).to(device), class_index)
    preds = logits.argmax(1).cpu().tolist()
    titles = [f"predicted: {classes[p]}" for p in preds]
    return image_grid(images_uint8, titles, ncols=min(8, len(images_uint8)), overlays=cams.cpu(), save=save, dpi=dpi,
                      suptitle=f"Grad-CAM for class '{classes[class_index]}'")

