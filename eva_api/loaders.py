"""Batch iterators over a :class:`~eva_api.data.Split`.

``TensorLoader`` (the fast default) keeps the whole split as a uint8 tensor on the training device and
shuffles, crops, flips and normalizes whole batches there: no worker processes, no PIL. Each epoch's
order and augmentation come from a generator seeded by (seed, epoch), so any epoch, and any batch
within it, can be replayed exactly (resume) and every DDP rank draws the same permutation.
With ``alternate_flip`` (as in airbench) each image is flipped at random in epoch 1 and then the other
way round from one epoch to the next, so every pair of epochs shows it both ways.

``ClassicLoader`` is the torchvision ``DataLoader`` + ``transforms`` path for users who bring their own
PIL / torchvision / albumentations transforms (the course's flip + rotation + colour jitter included).

The test split is never augmented: evaluation loaders are built with ``train=False``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .data import Split

Batch = tuple[torch.Tensor, torch.Tensor]


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float ``(x / 255 - mean) / std`` on the images' device."""
    m = torch.tensor(mean, dtype=torch.float32, device=images_uint8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images_uint8.device).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


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
        alternate_flip: bool = False,
        cutout_size: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        c = self.images.shape[1]
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1) / std_t
        self.batch_size = batch_size
        self.train = train
        self.crop_padding = crop_padding if train else 0
        self.flip = flip and train
        self.alternate_flip = alternate_flip
        self.cutout_size = cutout_size if train else 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """The sample indices this rank visits this epoch, in order."""
        n = len(self.labels)
        order = torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch)) if self.train else torch.arange(n)
        return shard_indices(order, self.rank, self.world_size, pad=self.train)

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return x_uint8.float() * self.scale + self.shift

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """Iterate from batch ``start_batch`` on; the skipped batches' randomness is still drawn."""
        g = _epoch_generator(self.seed, self.epoch)
        idx = self.indices()  # consumes g's first draw only through its own generator
        m = len(idx)
        # the whole epoch's augmentation, drawn up front on the CPU: identical on every device and rank
        pad = self.crop_padding
        dy = torch.randint(0, 2 * pad + 1, (m,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (m,), generator=g)
        flips = torch.rand(m, generator=g) < 0.5
        if self.alternate_flip:  # per image, not per position: epoch 1's coin, then flipped each epoch
            first = torch.rand(len(self.labels), generator=_epoch_generator(self.seed, -1)) < 0.5
            flips = first[idx] ^ (self.epoch % 2 == 0)
        h, w = self.images.shape[-2:]
        cy = torch.randint(0, h, (m,), generator=g)
        cx = torch.randint(0, w, (m,), generator=g)
        idx = idx.to(self.device)
        for b in range(start_batch, -(-m // self.batch_size)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            sel = idx[sl]
            x = self.normalize(self.images[sel])
            if self.train:
                x = crop_flip(x, dy[sl].to(self.device), dx[sl].to(self.device),
                              (flips[sl] if self.flip else torch.zeros_like(flips[sl])).to(self.device), pad)
                if self.cutout_size:
                    x = cutout(x, cy[sl].to(self.device), cx[sl].to(self.device), self.cutout_size)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[sel]


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


def classic_transforms(mean: Sequence[float], std: Sequence[float], augment: str = "crop_flip", crop_padding: int = 4):
    """torchvision transforms: ``crop_flip`` (``crop_padding``-px reflect crop + flip), ``s8`` (the course's flip,
    ±5° rotation and light colour jitter) or ``none`` (test-time: tensor + normalize only)."""
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if augment == "crop_flip":
        head = [T.RandomCrop(32, padding=crop_padding, padding_mode="reflect"), T.RandomHorizontalFlip()]
    elif augment == "s8":
        head = [T.RandomHorizontalFlip(), T.RandomRotation(5), T.ColorJitter(0.1, 0.1, 0.1)]
    elif augment == "none":
        head = []
    else:
        raise ValueError(f"unknown augmentation {augment!r}")
    return T.Compose(head + tail)


class ClassicLoader:
    """``DataLoader`` + ``DistributedSampler`` (also for one process), re-seeded every epoch.

    The sampler and the workers' RNG are seeded from (seed, epoch), so an epoch is replayable; workers
    are not persistent because persistent workers would carry their RNG from one epoch to the next.
    With ``num_workers=0`` the transforms draw from the global RNG instead, so replay is exact only
    with workers.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable,
        batch_size: int,
        *,
        train: bool,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.dataset = TensorImageDataset(split, transform)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
        self.seed = seed
        self.epoch = 0
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=pin_memory, generator=torch.Generator())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        self.loader.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        it = iter(self.loader)
        for b, batch in enumerate(it):
            if b >= start_batch:  # skipped batches are still drawn, so the RNG stays in step
                yield batch
