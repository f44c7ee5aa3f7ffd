"""What the model learned: Grad-CAM figures, and :func:`interpret_predictions` (the CLI's ``interpret``): Grad-CAM,
top losses, confusion matrix and a precision/recall/F1 report written to a folder. The numbers come
from ``eva_api.metrics``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from .loaders import normalize
from .models import unwrap_model


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


def plot_gradcam_pairs(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                       mean, std, preds: torch.Tensor | None = None, save=None, dpi: int = 80,
                       title: str | None = None):
    """For each image: Grad-CAM for the predicted class and for the true class, side by side.

    ``preds``: the predictions to explain and print (pass the gallery's, e.g. from the bf16 evaluation, so
    both figures name the same class); by default this fp32 forward pass's own. ``title`` (e.g. "SYNTHETIC
    data") goes in front of the heading."""
    from .plots import image_grid, titled

    device = next(model.parameters()).device
    x = normalize(images_uint8, mean, std).to(device)
    cam_pred, logits = grad_cam(model, x, None if preds is None else preds.to(device))
    cam_true, _ = grad_cam(model, x, labels.to(device))
    preds = (logits.argmax(1) if preds is None else preds).cpu()
    pics = torch.stack([images_uint8, images_uint8], 1).flatten(0, 1)
    cams = torch.stack([cam_pred.cpu(), cam_true.cpu()], 1).flatten(0, 1)
    titles = []
    for y, p in zip(labels.tolist(), preds.tolist()):
        titles += [f"looks at: {classes[p]}\n(predicted)", f"looks at: {classes[y]}\n(actual)"]
    return image_grid(pics, titles, ncols=6, overlays=cams, save=save, dpi=dpi,
                      suptitle=titled(title, "Grad-CAM: predicted class vs actual class"))


def plot_gradcam_class(model: nn.Module, images_uint8: torch.Tensor, class_index: int, classes: Sequence[str],
                       mean, std, preds: torch.Tensor | None = None, save=None, dpi: int = 80,
                       title: str | None = None):
    """Grad-CAM for one chosen class on the given images, titled with ``preds`` (default: this pass's own);
    ``title`` (e.g. "SYNTHETIC data") goes in front of the heading."""
    from .plots import image_grid, titled

    device = next(model.parameters()).device
    cams, logits = grad_cam(model, normalize(images_uint8, mean, std).to(device), class_index)
    preds = (logits.argmax(1) if preds is None else preds).cpu().tolist()
    titles = [f"predicted: {classes[p]}" for p in preds]
    return image_grid(images_uint8, titles, ncols=min(8, len(images_uint8)), overlays=cams.cpu(), save=save, dpi=dpi,
                      suptitle=titled(title, f"Grad-CAM for class '{classes[class_index]}'"))


def interpret_predictions(model: nn.Module, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
              out: str | Path, n: int = 16, title: str | None = None) -> dict:
    """Figures and a report for a model's test predictions, written to ``out``; returns the report dict.

    ``images`` uint8 test images, ``logits``/``labels`` their evaluation outputs (the Grad-CAM titles use
    these predictions); ``model`` carries ``classes``, ``mean`` and ``std`` as :func:`load_model` sets them.
    ``n``: images per figure (misclassified pairs, each class's Grad-CAM, top losses). ``title`` (e.g.
    "SYNTHETIC data") heads every figure and report.txt.
    Writes confusion_matrix.png, gradcam_misclassified.png, gradcam_class_<name>.png, top_losses.png,
    report.txt and report.json."""
    import matplotlib.pyplot as plt

    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes, preds = model.classes, logits.argmax(1)
    cm = metrics.confusion_matrix(labels, preds, len(classes))
    figs = [plots.plot_confusion_matrix(cm, classes, save=out / "confusion_matrix.png", title=title)]
    wrong = metrics.misclassified(images, labels, preds, n=n)
    if len(wrong):
        figs.append(plot_gradcam_pairs(model, images[wrong], labels[wrong], classes, model.mean, model.std,
                                       preds=preds[wrong], save=out / "gradcam_misclassified.png", title=title))
    for c in range(len(classes)):
        idx = (labels == c).nonzero().flatten()[:n]
        if len(idx):
            figs.append(plot_gradcam_class(model, images[idx], c, classes, model.mean, model.std, preds=preds[idx],
                                           save=out / f"gradcam_class_{classes[c]}.png", title=title))
    tops = metrics.top_losses(logits, labels, classes, k=n)
    figs.append(plots.image_grid(images[[t.index for t in tops]],
                                 [f"{t.actual} -> {t.predicted}\nloss {t.loss:.2f} p {t.probability:.2f}" for t in tops],
                                 ncols=4, save=out / "top_losses.png",
                                 suptitle=plots.titled(title, "Top losses (actual -> predicted)")))
    for f in figs:
        plt.close(f)
    report = metrics.classification_report(cm, classes)
    summary = {"report": report, "accuracy": 100.0 * float((preds == labels).float().mean()),
               "most_confused": metrics.most_confused(cm, classes)[:10], "top_losses": [vars(t) for t in tops]}
    (out / "report.txt").write_text(metrics.format_report(report, title) + "\n")
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
