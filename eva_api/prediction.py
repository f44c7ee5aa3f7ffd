"""Predict on the user's own images: any size or mode, resized and normalized the way the model expects."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from .errors import ConfigError, DataError
from .loaders import normalize

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821


def to_uint8(image: ImageLike, size: int = 32) -> torch.Tensor:
    """One image (path, PIL image, or uint8/float CHW tensor) as uint8 [3, size, size]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, torch.Tensor):
        t = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise DataError(f"tensor image must be [C, H, W] with 1 or 3 channels, got {tuple(t.shape)}")
        image = Image.fromarray(t.expand(3, -1, -1).permute(1, 2, 0).numpy())
    elif not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: unreadable image ({type(e).__name__})") from None
    image = image.convert("RGB")
    if image.size != (size, size):
        bicubic = getattr(Image, "Resampling", Image).BICUBIC  # Image.BICUBIC warns on Pillow 9.1-9.3
        image = image.resize((size, size), bicubic, reducing_gap=None)
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[ImageLike] | ImageLike, *, classes: Sequence[str] | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None, top: int = 3,
            size: int = 32) -> list[list[tuple[str, float]]]:
    """Top-``top`` (class, probability) per image. ``classes``/``mean``/``std`` default to the attributes
    that :func:`eva_api.load_model` sets on the model."""
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    if top < 1:
        raise ConfigError(f"bad value {top} for top: must be >= 1")
    classes = list(classes or getattr(model, "classes"))
    mean = mean or getattr(model, "mean")
    std = std or getattr(model, "std")
    batch = torch.stack([to_uint8(im, size) for im in images])
    device = next(model.parameters()).device
    x = normalize(batch, mean, std).to(device)
    model.eval()
    probs = model(x).float().softmax(1).cpu()
    k = min(top, probs.shape[1])
    values, idx = probs.topk(k, dim=1)
    return [[(classes[int(i)], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values, idx)]
