"""Batch iterators over a :class:`~eva_api.data.Split`.

``TensorLoader`` (the fast default) keeps the whole split as a uint8 tensor on the training device and
shuffles, crops, flips and normalizes whole batches there: no worker processes, no PIL. Each epoch's
order and augmentation come from generators seeded by (seed, epoch), so any epoch, and any batch
within it, can be replayed exactly (resume) and every DDP rank draws the same permutation. The whole
epoch's random draws are made at its start and moved to the device once, so a batch costs no
host-device synchronisation.

``ClassicLoader`` is the torchvision ``DataLoader`` + ``transforms`` path for users who bring their own
PIL / torchvision / albumentations transforms (the course's flip + rotation + colour jitter included).
Its transforms end in uint8 tensors; batches are normalized on the device by the same :func:`normalize`.

The test split is never augmented: evaluation loaders are built with ``train=False``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .data import Split
from .runtime import derive_seed, eval_batch_size

Batch = tuple[torch.Tensor, torch.Tensor]


class Normalizer:
    """uint8 [N, C, H, W] -> float ``(x / 255 - mean) / std``, as one multiply-add with constants kept on
    ``device`` (built once per loader: creating them per batch would copy from the host every time)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / std_t

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float() * self.scale + self.shift


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> normalized float on the images' device (see :class:`Normalizer`)."""
    return Normalizer(mean, std, images_uint8.device)(images_uint8)


SHUFFLE, AUGMENT = 0, 1  # the random streams of an epoch
S8_ROTATION, S8_JITTER = 5.0, 0.1  # the course's augmentation: +-5 degrees, brightness/contrast/saturation 0.9-1.1


def epoch_generator(seed: int, epoch: int, stream: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one stream of one epoch: the same (seed, epoch, stream, rank), the same draws.

    The shuffle and the augmentation draw from separate streams: from one generator seeded alike, the
    crop offsets would repeat the permutation's own random numbers (before 0.2, ``dy[0] == order[0] % 5``
    in every epoch). The shuffle is shared by all ranks (each takes its shard); augmentation is per rank."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, stream, rank))


def shard_indices(order: torch.Tensor, rank: int, world_size: int, pad: bool) -> torch.Tensor:
    """This rank's share of ``order``: every ``world_size``-th item starting at ``rank``.

    With ``pad`` (training) the order is first wrapped around to a multiple of ``world_size`` so all
    ranks run the same number of steps, as ``DistributedSampler`` does; without it (evaluation) the
    shards are disjoint and cover the split exactly, so all-reduced sums are exact.
    """
    if world_size == 1:
        return order
    if pad and len(order) % world_size:
        extra = world_size - len(order) % world_size
        order = torch.cat([order, order[:extra]])
    return order[rank::world_size]


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Random-crop (reflect padding ``pad``) and horizontally flip a float batch [N, C, H, W].

    ``dy``/``dx`` in [0, 2*pad] pick each image's crop window; ``flip`` is a bool per image. The crop
    gathers rows and columns with one advanced index, which yields NHWC memory: the permuted result
    is already channels_last.
    """
    n, _, h, w = x.shape
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
        x = x[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` square centred at (cy, cx) in each (normalized) image: zero is the mean colour.
    The square is clipped at the border, as in the original cutout."""
    h, w = x.shape[-2:]
    top, left = (cy - size // 2)[:, None, None], (cx - size // 2)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x.masked_fill(inside[:, None], 0.0)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of a batch about its centre by its own angle, nearest pixel, corners filled with 0
    (black before normalization), as torchvision's ``RandomRotation`` does per image."""
    theta = degrees.to(x.dtype) * (math.pi / 180)
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    h, w = x.shape[-2:]  # the grid's coordinates are relative to each side: undo that for non-square images
    matrix = torch.stack([cos, -sin * h / w, zero, sin * w / h, cos, zero], 1).view(-1, 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # ITU-R 601, as torchvision


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` (brightness, contrast, saturation; no hue) on a batch in pixel units
    [0, 255]: image i gets factors ``factors[i]`` (one per adjustment), applied in the order ``order[i]``
    (a permutation of 0, 1, 2), each result clamped to [0, 255] as torchvision does."""
    def adjust(op: int, img: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        f = f.view(-1, 1, 1, 1)
        if op == 0:  # brightness: blend with black
            return (img * f).clamp(0, 255)
        if op == 1:  # contrast: blend with the image's mean grey
            return (f * img + (1 - f) * _gray(img).mean((1, 2, 3), keepdim=True)).clamp(0, 255)
        return (f * img + (1 - f) * _gray(img)).clamp(0, 255)  # saturation: blend with its own grey

    for position in range(3):
        for op in range(3):
            x = torch.where((order[:, position] == op).view(-1, 1, 1, 1), adjust(op, x, factors[:, op]), x)
    return x


class TensorLoader:
    """Whole-split uint8 tensor on ``device``, shuffled and augmented per batch on that device."""

    def __init__(
        self,
        split: Split,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        crop_padding: int = 4,
        flip: bool = True,
        cutout_size: int = 0,
        rotate: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.normalize = Normalizer(mean, std, self.device)
        self.batch_size = batch_size
        self.train = train
        self.crop_padding = crop_padding if train else 0
        self.flip = flip and train
        self.cutout_size = cutout_size if train else 0
        self.rotate = rotate if train else 0.0
        self.jitter = jitter if train else 0.0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """The sample indices this rank visits this epoch, in order (a shard of one shared permutation)."""
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch, SHUFFLE))
        else:
            order = torch.arange(n)
        return shard_indices(order, self.rank, self.world_size, pad=self.train)

    def __len__(self) -> int:
        n, w = len(self.labels), self.world_size
        per_rank = -(-n // w) if self.train else len(range(self.rank, n, w))
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def _draws(self, m: int) -> dict[str, torch.Tensor]:
        """The epoch's augmentation for this rank's ``m`` samples, drawn on the CPU and moved once."""
        g = epoch_generator(self.seed, self.epoch, AUGMENT, self.rank)
        pad = self.crop_padding
        h, w = self.images.shape[-2:]
        draws = {"dy": torch.randint(0, 2 * pad + 1, (m,), generator=g),
                 "dx": torch.randint(0, 2 * pad + 1, (m,), generator=g),
                 "flip": (torch.rand(m, generator=g) < 0.5) & self.flip,
                 "cy": torch.randint(0, h, (m,), generator=g),
                 "cx": torch.randint(0, w, (m,), generator=g)}
        if self.rotate or self.jitter:  # drawn after the others, so crop_flip's draws stay what they were
            draws["angle"] = (torch.rand(m, generator=g) * 2 - 1) * self.rotate
            draws["factors"] = 1 + (torch.rand(m, 3, generator=g) * 2 - 1) * self.jitter
            draws["order"] = torch.rand(m, 3, generator=g).argsort(1)
        if self.device.type == "cuda":  # from pinned memory the copy is truly asynchronous
            draws = {k: v.pin_memory() for k, v in draws.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in draws.items()}

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """Iterate from batch ``start_batch`` on, with exactly the draws a full pass would give those batches."""
        idx = self.indices()
        m = len(idx)
        draws = self._draws(m) if self.train else {}
        idx = (idx.pin_memory() if self.device.type == "cuda" else idx).to(self.device, non_blocking=True)
        for b in range(start_batch, -(-m // self.batch_size)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            sel = idx[sl]
            if self.rotate or self.jitter:  # rotation fills black, the colour blends clamp: in pixel units
                x = self.normalize(self._pixel_augment(self.images[sel].float(), {k: v[sl] for k, v in draws.items()}))
            else:
                x = self.normalize(self.images[sel])
                if self.train:
                    x = crop_flip(x, draws["dy"][sl], draws["dx"][sl], draws["flip"][sl], self.crop_padding)
            if self.train and self.cutout_size:
                x = cutout(x, draws["cy"][sl], draws["cx"][sl], self.cutout_size)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[sel]

    def _pixel_augment(self, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """Crop and flip, then the course's rotation and colour jitter (its ``Compose`` order)."""
        x = crop_flip(x, d["dy"], d["dx"], d["flip"], self.crop_padding)
        if self.rotate:
            x = rotate(x, d["angle"])
        if self.jitter:
            x = color_jitter(x, d["factors"], d["order"])
        return x


def eval_loader(split: Split, mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                batch_size: int | None = None, channels_last: bool = False, rank: int = 0,
                world_size: int = 1) -> TensorLoader:
    """The evaluation loader (in order, never augmented); batch size by default as large as pays on ``device``."""
    device = torch.device(device)
    return TensorLoader(split, mean, std, batch_size or eval_batch_size(device), train=False, device=device,
                        channels_last=channels_last, rank=rank, world_size=world_size)


# ------------------------------------------------------------------------------------ classic path
class TensorImageDataset(torch.utils.data.Dataset):
    """A :class:`Split` seen as PIL images, for torchvision-style ``transform`` callables."""

    def __init__(self, split: Split, transform: Callable | None = None) -> None:
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC for PIL
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.labels[i]


def classic_transforms(augment: str = "crop_flip", crop_padding: int = 4):
    """torchvision transforms from a PIL image to a uint8 tensor: ``crop_flip`` (``crop_padding``-px reflect
    crop + flip), ``s8`` (the course's flip, ±5° rotation and light colour jitter) or ``none``. The
    :class:`ClassicLoader` normalizes the batches on the device."""
    from torchvision import transforms as T

    tail = [T.PILToTensor()]
    if augment == "crop_flip":
        head = [T.RandomCrop(32, padding=crop_padding, padding_mode="reflect"), T.RandomHorizontalFlip()]
    elif augment == "s8":
        head = [T.RandomHorizontalFlip(), T.RandomRotation(S8_ROTATION), T.ColorJitter(S8_JITTER, S8_JITTER, S8_JITTER)]
    elif augment == "none":
        head = []
    else:
        raise ValueError(f"unknown augmentation {augment!r}")
    return T.Compose(head + tail)


class ClassicLoader:
    """``DataLoader`` + ``DistributedSampler`` (also for one process), re-seeded every epoch.

    The sampler's order comes from (seed, epoch); the transforms' randomness from (seed, epoch, rank):
    with workers through the loader's generator (workers are not persistent, which would carry their RNG
    from one epoch to the next), without workers from a private generator swapped in around each batch
    (so the model's own use of the global RNG, e.g. dropout, neither disturbs nor is disturbed by it).
    Either way any epoch, and any batch within it, replays exactly.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.device = torch.device(device)
        self.normalize = Normalizer(mean, std, self.device)
        self.dataset = TensorImageDataset(split, transform)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.num_workers, self.channels_last = num_workers, channels_last
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda", generator=torch.Generator())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def _batches(self) -> Iterator[Batch]:
        g = epoch_generator(self.seed, self.epoch, AUGMENT, self.rank)
        if self.num_workers:
            self.loader.generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            yield from self.loader
            return
        from torch.utils.data import BatchSampler, default_collate

        state = g.get_state()
        for batch in BatchSampler(self.sampler, self.loader.batch_size, drop_last=False):
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                samples = [self.dataset[i] for i in batch]
                state = torch.get_rng_state()
            finally:
                torch.set_rng_state(outer)
            yield default_collate(samples)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        for b, (x, y) in enumerate(self._batches()):
            if b >= start_batch:  # skipped batches are still drawn, so the transforms' RNG stays in step
                x = self.normalize(x.to(self.device, non_blocking=True))
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
