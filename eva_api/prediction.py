"""Predict on the user's own images: any size or mode, resized and normalized the way the model expects.

:func:`predict_files` (``python -m eva_api predict``) takes files and folders and reports an unreadable file
in its place instead of stopping the batch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from .data import IMAGE_SUFFIXES, decompression_bombs_refused, image_files, open_rgb
from .errors import ConfigError, DataError
from .loaders import normalize

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821
Prediction = list[tuple[str, float]]
BATCH = 256  # images per forward pass: a folder of thousands fits in memory


def to_uint8(image: ImageLike, size: int = 32) -> torch.Tensor:
    """One image (path, PIL image, or uint8/float CHW tensor) as uint8 [3, size, size]."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise DataError(f"tensor image must be [C, H, W] with 1 or 3 channels, got {tuple(t.shape)}")
        image = Image.fromarray(t.expand(3, -1, -1).permute(1, 2, 0).numpy())
    elif not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        with decompression_bombs_refused():
            image = open_rgb(path)
    image = image.convert("RGB")
    if image.size != (size, size):
        bicubic = getattr(Image, "Resampling", Image).BICUBIC  # Image.BICUBIC warns on Pillow 9.1-9.3
        image = image.resize((size, size), bicubic, reducing_gap=None)
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[ImageLike] | ImageLike, *, classes: Sequence[str] | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None, top: int = 3,
            size: int = 32) -> list[Prediction]:
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
    model.eval()
    probs = torch.cat([model(normalize(batch[i : i + BATCH], mean, std).to(device)).float().softmax(1).cpu()
                       for i in range(0, len(batch), BATCH)])
    k = min(top, probs.shape[1])
    values, idx = probs.topk(k, dim=1)
    return [[(classes[int(i)], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values, idx)]


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], top: int = 3,
                  size: int = 32) -> list[tuple[Path, Prediction | DataError]]:
    """``(file, top-k)`` per image, a folder standing for the image files directly in it (sorted by name). A file
    that cannot be read (missing, not an image, too large to decode safely), or a folder without images, gets
    its :class:`DataError` in place of a prediction; the other files are still predicted."""
    if top < 1:
        raise ConfigError(f"bad value {top} for top: must be >= 1")
    decoded: list[tuple[Path, torch.Tensor | DataError]] = []
    for path in map(Path, paths):
        files = image_files(path) if path.is_dir() else [path]
        if not files:
            decoded.append((path, DataError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")))
        for file in files:
            try:
                decoded.append((file, to_uint8(file, size)))
            except DataError as e:
                decoded.append((file, e))
    images = [t for _, t in decoded if isinstance(t, torch.Tensor)]
    results = iter(predict(model, images, top=top, size=size) if images else [])
    return [(path, next(results) if isinstance(t, torch.Tensor) else t) for path, t in decoded]
