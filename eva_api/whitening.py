"""Data-dependent initialisation of the stem: its filters start as the whitening (PCA) basis of the
training images' patches, the trick airbench and "How to train your ResNet" use to speed up early
training. Only the initial values change: same layer, same shape, same parameter count. The filters are
trained like any other unless ``freeze_stem`` keeps them (the ``fast`` recipe does: see ``build_optimizer``).

The stem conv is followed by BatchNorm, which rescales each channel anyway; what the basis buys is
channels that start decorrelated and equally strong (a random 3x3 filter mostly measures brightness).
Each eigen-filter is used twice, as ``+v`` and ``-v``, so the ReLU after the BN passes both signs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .loaders import normalize


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first ``Conv2d`` a forward pass meets (the stem, for the models here)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ConfigError("whitening init needs a model with a Conv2d stem")


@torch.no_grad()
def patch_whitening_filters(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                            kernel_size: tuple[int, int], eps: float = 5e-4) -> torch.Tensor:
    """``[d, C, kh, kw]`` filters (``d = C*kh*kw``) mapping normalised patches to whitened coordinates,
    strongest principal direction first. ``images`` is uint8 ``[N, C, H, W]``."""
    x = normalize(images, mean, std)
    c = x.shape[1]
    d = c * kernel_size[0] * kernel_size[1]
    # every patch as a d-vector, via a conv with one-hot filters: F.unfold gives the same values but
    # took 16 s for 2,000 images on the 2-core dev CPU, the conv well under a second. No padding, so
    # no zero-filled border patches skew the statistics.
    one_hot = torch.eye(d, dtype=x.dtype, device=x.device).view(d, c, *kernel_size)
    patches = F.conv2d(x, one_hot).transpose(0, 1).reshape(d, -1).T.double()
    patches -= patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    filters = eigvecs.T / (eigvals.clamp_min(0) + eps).sqrt()[:, None]
    return filters.float().view(d, c, *kernel_size)


@torch.no_grad()
def whiten_stem_(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 max_images: int = 2000, eps: float = 5e-4) -> None:
    """Set the stem's first ``2*d`` filters to ``±`` the patch-whitening basis of up to ``max_images``
    images spread evenly over ``images`` (folders are sorted by class, so never just the first ones).
    Deterministic: the same images give the same weights on every rank. Other filters keep their
    random init."""
    conv = first_conv(model)
    kernel = tuple(conv.kernel_size)
    d = conv.in_channels * kernel[0] * kernel[1]
    if conv.out_channels < 2 * d or conv.groups != 1:
        raise ConfigError(f"whitening init needs >= {2 * d} stem filters, the stem has {conv.out_channels}")
    pick = torch.linspace(0, len(images) - 1, min(max_images, len(images))).round().long()
    filters = patch_whitening_filters(images[pick.to(images.device)].cpu(), mean, std, kernel, eps)
    w = filters.to(conv.weight.device, conv.weight.dtype)
    conv.weight[:d] = w
    conv.weight[d : 2 * d] = -w


__all__ = ["first_conv", "patch_whitening_filters", "whiten_stem_"]
