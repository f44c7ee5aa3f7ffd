"""CIFAR-10 (or any small ImageFolder) as uint8 tensors, from whichever source the user has.

Sources, detected from the path in this order:
  * an ImageFolder layout ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``;
  * the official python format: ``ROOT/cifar-10-batches-py/`` (or ROOT itself), or
    ``cifar-10-python.tar.gz`` (read straight from the archive, nothing extracted);
  * otherwise the official download into ROOT (torchvision), when ``download`` is on.
``load_data("synthetic")`` generates a small deterministic set with learnable structure.
``load_data(..., test_only=True)`` reads the test split alone (what evaluating a checkpoint needs).

Decoded splits are cached as one ``.pt`` file keyed by the source files' names, sizes and mtimes,
so a changed folder is re-read and a second load of 50,000 images takes a second or two.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
_CACHE_VERSION = 1


@dataclass
class Split:
    """One split: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageData:
    """Train and test splits, class names, per-channel mean/std (from the training split) and a source tag."""

    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def synthetic(self) -> bool:
        return self.source.startswith("synthetic")

    def class_counts(self, split: str = "train") -> dict[str, int]:
        labels = getattr(self, split).labels
        counts = torch.bincount(labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, accumulated in float64 chunk by chunk."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


# ----------------------------------------------------------------------------------------- synthetic
PALETTE = torch.tensor(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]],
    dtype=torch.uint8,
)


def synthetic_split(
    n: int, num_classes: int = 10, size: int = 32, patch: int = 8, seed: int = 0
) -> tuple[Split, torch.Tensor]:
    """Grey noise with one coloured square whose colour is the class; returns the split and boxes.

    ``boxes[i] = (top, left)`` of image i's patch: the only discriminative pixels (used to test Grad-CAM).
    """
    if num_classes > len(PALETTE):
        raise DataError(f"synthetic data supports at most {len(PALETTE)} classes")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(90, 166, (n, 3, size, size), generator=g, dtype=torch.int64).to(torch.uint8)
    tops = torch.randint(0, size - patch + 1, (n,), generator=g)
    lefts = torch.randint(0, size - patch + 1, (n,), generator=g)
    for i in range(n):
        t, l = int(tops[i]), int(lefts[i])
        images[i, :, t : t + patch, l : l + patch] = PALETTE[labels[i]].view(3, 1, 1)
    return Split(images, labels.long()), torch.stack([tops, lefts], 1)


def make_synthetic(n_train: int = 2000, n_test: int = 500, num_classes: int = 10, size: int = 32, seed: int = 0) -> ImageData:
    """A small deterministic data set with learnable structure, for smoke runs and tests."""
    train, _ = synthetic_split(n_train, num_classes, size, seed=seed)
    test, _ = synthetic_split(n_test, num_classes, size, seed=seed + 1)
    mean, std = channel_stats(train.images)
    classes = list(CIFAR10_CLASSES[:num_classes])
    return ImageData(train, test, classes, mean, std, source=f"synthetic (generated, seed {seed})")


# ------------------------------------------------------------------------------------------ sources
def _list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing split folder (expected {split_dir}/<class>/<image files>)")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split_dir}: no class sub-folders (expected {split_dir}/<class>/<image files>)")
    files = []
    for label, d in enumerate(class_dirs):
        images = image_files(d)
        if not images:  # refused: its label would name a class the model never sees (0% accuracy, every run)
            raise DataError(f"{d}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add some "
                            f"or remove the folder")
        files += [(p, label) for p in images]
    return [d.name for d in class_dirs], files


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@contextlib.contextmanager
def decompression_bombs_refused() -> Iterator[None]:
    """Pillow's DecompressionBombWarning (an image past ``Image.MAX_IMAGE_PIXELS``) raised as an error, which
    :func:`open_rgb` turns into one line. Set it in the thread that starts the decoding: warning filters are
    process-wide, so a pool's threads follow it (entering it in each of them would not be thread-safe)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_rgb(path: Path) -> "PIL.Image.Image":  # noqa: F821
    """The image file ``path`` decoded to RGB; :class:`DataError` (one line) if it cannot be read or is too large
    to decode safely (Pillow's decompression-bomb limit; the warning level too under
    :func:`decompression_bombs_refused`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _decode(path: Path) -> np.ndarray:
    return np.asarray(open_rgb(path), dtype=np.uint8)


def _read_imagefolder_split(split_dir: Path, classes: list[str] | None, progress: bool) -> tuple[Split, list[str]]:
    found, files = _list_images(split_dir)
    if classes is not None and found != classes:
        raise DataError(f"{split_dir}: class folders {found} differ from the training split's {classes}")
    from tqdm.auto import tqdm

    with decompression_bombs_refused(), ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        arrays = list(tqdm(pool.map(_decode, (p for p, _ in files), chunksize=256), total=len(files),
                           desc=f"decoding {split_dir.name}/", disable=not progress, leave=False))
    h, w = arrays[0].shape[:2]
    for (path, _), a in zip(files, arrays):
        if a.shape[:2] != (h, w):
            raise DataError(f"{path}: image is {a.shape[1]}x{a.shape[0]}, expected {w}x{h} like {files[0][0].name}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return Split(images, labels), found


def _unpickle(f) -> dict:
    try:
        return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{getattr(f, 'name', 'CIFAR batch')}: not a CIFAR-10 python batch ({e})") from None


def _batch_to_split(batches: list[dict], where: str) -> Split:
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = sum((list(b[b"labels"]) for b in batches), [])
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    except (KeyError, ValueError) as e:
        raise DataError(f"{where}: malformed CIFAR-10 batch ({type(e).__name__}: {e})") from None
    return Split(images, torch.tensor(labels, dtype=torch.long))


def _read_official_dir(batches_dir: Path, test_only: bool = False) -> tuple[Split | None, Split, list[str]]:
    """(train, test, classes) from the official python batches; train is None with ``test_only``."""
    train_files = sorted(batches_dir.glob("data_batch_*"))
    test_file = batches_dir / "test_batch"
    if not test_file.is_file() or not (train_files or test_only):
        wanted = "test_batch" if test_only else "data_batch_1..5 and test_batch"
        raise DataError(f"{batches_dir}: expected {wanted} (the official python format)")

    def read(p: Path) -> dict:
        with open(p, "rb") as f:
            return _unpickle(f)

    train = None if test_only else _batch_to_split([read(p) for p in train_files], str(batches_dir))
    meta = batches_dir / "batches.meta"
    classes = [n.decode() for n in read(meta)[b"label_names"]] if meta.is_file() else list(CIFAR10_CLASSES)
    return train, _batch_to_split([read(test_file)], str(test_file)), classes


def _read_official_tar(path: Path, test_only: bool = False) -> tuple[Split | None, Split, list[str]]:
    """(train, test, classes) straight from the official archive; train is None with ``test_only``."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            train_names = sorted(n for n in members if n.startswith("data_batch_"))
            if "test_batch" not in members or not (train_names or test_only):
                raise DataError(f"{path}: archive lacks {'test_batch' if test_only else 'data_batch_* / test_batch'}")
            train = None if test_only else [_unpickle(tar.extractfile(members[n])) for n in train_names]
            test = _unpickle(tar.extractfile(members["test_batch"]))
            classes = list(CIFAR10_CLASSES)
            if "batches.meta" in members:
                classes = [n.decode() for n in _unpickle(tar.extractfile(members["batches.meta"]))[b"label_names"]]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable archive ({type(e).__name__}: {e})") from None
    return (None if train is None else _batch_to_split(train, str(path))), _batch_to_split([test], str(path)), classes


def _download_official(root: Path) -> Path:
    """Download the official CIFAR-10 into ``root`` with torchvision; one clear error when offline, and then the
    folders made for it (torchvision makes ``root`` before it connects) are removed again."""
    from torchvision.datasets import CIFAR10

    made = [p for p in (root, *root.parents) if not p.exists()]  # innermost first
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # URLError, socket errors, HTTP errors, checksum mismatch, read-only dir
        _remove_empty(made)
        where = f"{root}: no such folder, and CIFAR-10" if made else f"CIFAR-10 is not in {root} and"
        raise DataError(
            f"{where} could not be downloaded ({type(e).__name__}: {e}); check the path, put cifar-10-batches-py/ "
            f"or cifar-10-python.tar.gz in {root}, point --data at an ImageFolder with train/ and test/, or use "
            f"--dataset synthetic"
        ) from None
    return root / "cifar-10-batches-py"


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty: a failed download leaves no folder behind."""
    for folder in folders:
        try:
            folder.rmdir()  # refuses a folder that is not empty (a download that started keeps its partial file)
        except OSError:
            return


def _is_split_folder(root: Path) -> bool:
    """Whether ``root`` holds class folders of images, as one split of an ImageFolder (e.g. PATH/test) does."""
    return root.is_dir() and any(image_files(d) for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _no_source(root: Path, download: bool, test_only: bool) -> tuple[str, Path]:
    """Nothing usable at ``root``: download the official files there, or say in one line why not."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: not a folder nor a cifar-10-python.tar.gz archive")
    if (root / "train").is_dir() or (root / "test").is_dir():
        missing = "test" if (root / "train").is_dir() else "train"
        raise DataError(f"{root}: ImageFolder layout needs {'test/' if test_only else 'both train/ and test/'} "
                        f"({missing}/ is missing)")
    if _is_split_folder(root):
        raise DataError(f"{root}: holds class folders of images, not {'test/' if test_only else 'train/ and test/'}; "
                        f"if it is one split, point --data at its parent ({root.parent})")
    if not download:
        what = "no CIFAR-10 here (official files or ImageFolder train/ + test/)" if root.exists() else "no such folder"
        raise DataError(f"{root}: {what} and download is off")
    return "official", _download_official(root)


def detect_source(root: Path, test_only: bool = False) -> tuple[str, Path] | None:
    """``(kind, path)`` with kind in imagefolder | official | tar, or None when nothing is found. ``test_only``:
    an ImageFolder needs only test/."""
    if root.is_file():
        return ("tar", root) if root.name.endswith((".tar.gz", ".tgz")) else None
    if (root / "test").is_dir() and (test_only or (root / "train").is_dir()):
        return "imagefolder", root
    for d in (root / "cifar-10-batches-py", root):
        if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
            return "official", d
    if (root / "cifar-10-python.tar.gz").is_file():
        return "tar", root / "cifar-10-python.tar.gz"
    return None


# ------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    base = os.environ.get("EVA_API_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "eva_api")
    return Path(base)


def _fingerprint(kind: str, path: Path) -> str:
    """Hash of every source file's relative name, size and mtime: a changed folder gets a new key."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}:{kind}:{path.resolve()}".encode())
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(path) if p != path else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _load_cache(file: Path, key: str) -> ImageData | None:
    if not file.is_file():
        return None
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        assert blob["key"] == key and blob["version"] == _CACHE_VERSION
        train, test = (_cached_split(blob, name, len(blob["classes"])) for name in ("train", "test"))
        assert len(test) and (len(train) or not blob["mean"])  # a train split is empty in a test-only cache alone
        return ImageData(train, test, list(blob["classes"]), tuple(blob["mean"]), tuple(blob["std"]), blob["source"])
    except Exception as e:  # truncated zip, wrong keys, tampered tensors: rebuild
        warnings.warn(f"data cache {file} is unusable ({type(e).__name__}); rebuilding it", stacklevel=3)
        return None


def _cached_split(blob: dict, name: str, num_classes: int) -> Split:
    images, labels = blob[f"{name}_images"], blob[f"{name}_labels"]
    assert images.dtype == torch.uint8 and images.ndim == 4 and labels.dtype == torch.long
    assert len(images) == len(labels) and (not len(labels) or int(labels.max()) < num_classes)
    return Split(images, labels)


def _save_cache(file: Path, key: str, data: ImageData) -> None:
    blob = {"key": key, "version": _CACHE_VERSION, "classes": data.classes, "mean": list(data.mean),
            "std": list(data.std), "source": data.source,
            "train_images": data.train.images, "train_labels": data.train.labels,
            "test_images": data.test.images, "test_labels": data.test.labels}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, file)
    except OSError as e:  # a read-only cache only costs speed
        warnings.warn(f"could not write data cache {file} ({e})", stacklevel=3)


# --------------------------------------------------------------------------------------------- API
def load_data(
    dataset: str = "cifar10",
    root: str | os.PathLike = "./data",
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    synthetic_train: int = 2000,
    synthetic_test: int = 500,
    seed: int = 0,
    progress: bool = True,
    test_only: bool = False,
) -> ImageData:
    """Train and test splits of CIFAR-10 (or of an ImageFolder) as uint8 tensors; see the module doc.

    ``test_only`` reads the test split alone, e.g. to evaluate a checkpoint (which holds the training mean/std):
    an ImageFolder needs only test/, the official files only test_batch; ``train`` is then empty and ``mean``
    and ``std`` are ``()``. Synthetic data is generated whole either way (it takes no time)."""
    if dataset == "synthetic":
        return make_synthetic(synthetic_train, synthetic_test, seed=seed)
    if dataset != "cifar10":
        raise DataError(f"unknown dataset {dataset!r}; choose cifar10 or synthetic")
    root = Path(root).expanduser()
    kind, path = detect_source(root, test_only) or _no_source(root, download, test_only)
    tag = f"{kind}-test" if test_only else kind  # a test-only cache is a file of its own
    key = _fingerprint(tag, path / "test" if tag == "imagefolder-test" else path)
    cache_file = Path(cache_dir or default_cache_dir()) / f"{tag}-{key}.pt"
    cached = _load_cache(cache_file, key)
    if cached is not None:
        return cached
    train, test, classes = _read_source(kind, path, test_only, progress)
    if train is None:  # test_only: no training images, no statistics of them
        train, (mean, std) = Split(test.images[:0], test.labels[:0]), ((), ())
    else:
        mean, std = channel_stats(train.images)
    data = ImageData(train, test, classes, mean, std, source=f"{kind}:{path}")
    _save_cache(cache_file, key, data)
    return data


def _read_source(kind: str, path: Path, test_only: bool, progress: bool) -> tuple[Split | None, Split, list[str]]:
    """(train, test, classes) decoded from a detected source; train is None with ``test_only``."""
    if kind == "imagefolder":
        train, classes = (None, None) if test_only else _read_imagefolder_split(path / "train", None, progress)
        test, classes = _read_imagefolder_split(path / "test", classes, progress)
        return train, test, classes
    if kind == "official":
        return _read_official_dir(path, test_only)
    return _read_official_tar(path, test_only)
