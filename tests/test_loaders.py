import pytest
import torch
import torch.nn.functional as F

from eva_api import ClassicLoader, TensorLoader, classic_transforms, make_synthetic
from eva_api.loaders import color_jitter, crop_flip, rotate, shard_indices


@pytest.fixture(scope="module")
def data():
    return make_synthetic(96, 40)


def test_test_loader_is_plain_normalized_images_in_order(data):
    loader = TensorLoader(data.test, data.mean, data.std, 16, train=False)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and x.shape == (40, 3, 32, 32) and len(loader) == 3
    assert torch.equal(y, data.test.labels)  # never shuffled
    back = x * torch.tensor(data.std).view(1, 3, 1, 1) + torch.tensor(data.mean).view(1, 3, 1, 1)
    assert torch.allclose(back * 255, data.test.images.float(), atol=1e-3)  # never augmented


def test_normalized_training_data_has_zero_mean_unit_std(data):
    loader = TensorLoader(data.train, data.mean, data.std, 96, train=False)
    x, _ = next(iter(loader))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


@pytest.mark.parametrize("pad", [4, 2])
def test_augmentation_really_crops_and_flips(data, pad):
    loader = TensorLoader(data.train, data.mean, data.std, 96, train=True, seed=3, crop_padding=pad)
    loader.set_epoch(1)
    order = loader.indices()
    x, y = next(iter(loader))
    assert torch.equal(y, data.train.labels[order])
    plain = TensorLoader(data.train, data.mean, data.std, 96, train=False).normalize(data.train.images[order])
    padded = F.pad(plain, (pad, pad, pad, pad), mode="reflect")
    shifted = flipped = 0
    for i in range(len(x)):
        windows = {(dy, dx): padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}
        hits = [(dy, dx, f) for (dy, dx), w in windows.items() for f in (False, True)
                if torch.allclose(w.flip(2) if f else w, x[i], atol=1e-5)]
        assert hits, f"image {i} is no crop/flip of its original"
        shifted += all((dy, dx) != (pad, pad) for dy, dx, _ in hits)
        flipped += all(f for _, _, f in hits)
    assert shifted > len(x) // 2 and 20 < flipped < 76


def test_crop_flip_with_no_shift_and_no_flip_is_identity():
    x = torch.randn(5, 3, 8, 8)
    same = crop_flip(x, torch.full((5,), 2), torch.full((5,), 2), torch.zeros(5, dtype=torch.bool), pad=2)
    assert torch.equal(same, x)
    flipped = crop_flip(x, torch.full((5,), 2), torch.full((5,), 2), torch.ones(5, dtype=torch.bool), pad=2)
    assert torch.equal(flipped, x.flip(3))


def test_epochs_differ_but_replay_exactly_from_any_batch(data):
    loader = TensorLoader(data.train, data.mean, data.std, 32, train=True, cutout_size=8)
    loader.set_epoch(1)
    e1 = [x for x, _ in loader]
    loader.set_epoch(2)
    assert not torch.equal(e1[0], next(iter(loader))[0])
    loader.set_epoch(1)
    tail = [x for x, _ in loader.iter_from(1)]
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(e1[1:], tail))


def test_channels_last_output(data):
    loader = TensorLoader(data.train, data.mean, data.std, 8, train=True, channels_last=True)
    assert next(iter(loader))[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n,world", [(12, 2), (13, 3)])
def test_shards_are_disjoint_and_cover(n, world):
    order = torch.randperm(n)
    eval_shards = [shard_indices(order, r, world, pad=False) for r in range(world)]
    assert sorted(torch.cat(eval_shards).tolist()) == list(range(n))  # exact cover, no repeats
    train_shards = [shard_indices(order, r, world, pad=True) for r in range(world)]
    assert len({len(s) for s in train_shards}) == 1  # same number of steps on every rank
    assert set(torch.cat(train_shards).tolist()) == set(range(n))


def test_classic_loader_with_course_transforms(data):
    loader = ClassicLoader(data.train, classic_transforms("s8"), 32, mean=data.mean, std=data.std, train=True,
                           num_workers=1)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (32, 3, 32, 32) and batches[0][1].dtype == torch.long
    loader.set_epoch(1)
    assert torch.equal(next(loader.iter_from(1))[0], batches[1][0])  # replayable epoch
    test = ClassicLoader(data.test, classic_transforms("none"), 40, mean=data.mean, std=data.std, train=False,
                         num_workers=0)
    x, _ = next(iter(test))
    ref = TensorLoader(data.test, data.mean, data.std, 40, train=False)
    assert torch.equal(x, next(iter(ref))[0])  # one normalization, no augmentation


@pytest.mark.parametrize("kind", ["tensor", "classic"])
def test_config_crop_padding_reaches_the_training_loader(data, kind):
    from torchvision import transforms as T

    from eva_api import make_config
    from eva_api.distributed import DistInfo
    from eva_api.runner import build_loaders

    config = make_config("fast", loader=kind, crop_padding=2, num_workers=0, batch_size=32)
    train, test = build_loaders(data, config, DistInfo(), torch.device("cpu"))
    if kind == "tensor":
        assert (train.crop_padding, test.crop_padding) == (2, 0)
    else:
        crops = [t for t in train.dataset.transform.transforms if isinstance(t, T.RandomCrop)]
        assert [c.padding for c in crops] == [2]


def test_crop_offsets_are_drawn_independently_of_the_shuffle(data):
    """The shuffle and the augmentation come from separate streams: the first crop offset must not be a
    function of the first index (with one shared generator ``dy[0] == order[0] % 5`` held in every epoch)."""
    from eva_api.data import Split

    n = 5000  # torch.randperm takes another path below ~1,000 items, where the old bug did not show
    big = Split(data.train.images[:1].expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long))
    loader = TensorLoader(big, data.mean, data.std, 96, train=True, crop_padding=2, seed=0)
    hits = 0
    for epoch in range(1, 201):
        loader.set_epoch(epoch)
        order = loader.indices()
        dy = loader._draws(len(order))["dy"]
        hits += int(dy[0]) == int(order[0]) % 5
    assert 15 < hits < 70  # 1 in 5 by chance: 40 expected of 200


def test_augmentation_differs_between_ranks_but_the_shuffle_is_shared(data):
    ranks = [TensorLoader(data.train, data.mean, data.std, 16, train=True, seed=1, rank=r, world_size=2)
             for r in (0, 1)]
    for loader in ranks:
        loader.set_epoch(3)
    draws = [loader._draws(48) for loader in ranks]
    assert not torch.equal(draws[0]["dy"], draws[1]["dy"]) and not torch.equal(draws[0]["flip"], draws[1]["flip"])
    together = torch.cat([ranks[0].indices(), ranks[1].indices()])
    assert sorted(together.tolist()) == list(range(96))  # one permutation, split in two shards
    classic = [ClassicLoader(data.train, classic_transforms("crop_flip"), 16, mean=data.mean, std=data.std,
                             train=True, num_workers=0, rank=r, world_size=2) for r in (0, 1)]
    for loader in classic:
        loader.set_epoch(3)
    assert not torch.equal(next(iter(classic[0]))[0], next(iter(classic[1]))[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_classic_loader_replays_an_epoch_from_any_batch_whatever_the_global_rng_does(data, workers):
    loader = ClassicLoader(data.train, classic_transforms("s8"), 32, mean=data.mean, std=data.std, train=True,
                           num_workers=workers, seed=4)
    loader.set_epoch(2)
    torch.manual_seed(0)
    full = [x for x, _ in loader]
    loader.set_epoch(2)
    torch.manual_seed(123)  # the model's dropout would move the global RNG: the transforms must not care
    tail = [x for x, _ in loader.iter_from(1)]
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(full[1:], tail))


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_rotate_is_torchvisions_rotation_per_image(size):
    import torchvision.transforms.functional as TF

    x = torch.randint(0, 256, (3, 3, *size), generator=torch.Generator().manual_seed(0)).float()
    angles = torch.tensor([5.0, -3.5, 30.0])
    out = rotate(x, angles)
    for img, angle, got in zip(x, angles.tolist(), out):
        want = TF.rotate(img, angle, interpolation=TF.InterpolationMode.NEAREST)
        assert (got != want).float().mean() < 0.01  # non-square: a few pixels on rounding boundaries differ


def test_color_jitter_is_torchvisions_adjustments_in_the_drawn_order():
    import torchvision.transforms.functional as TF

    x = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float()
    factors = torch.tensor([[1.08, 0.93, 1.05], [0.91, 1.1, 0.9], [1.0, 1.0, 1.0]])
    order = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    out = color_jitter(x, factors, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for img, f, o, got in zip(x, factors, order, out):
        want = img / 255
        for op in o.tolist():
            want = adjust[op](want, f[op].item())
        torch.testing.assert_close(got, want * 255, rtol=0, atol=2e-3)


def test_the_course_augmentation_on_whole_batches(data):
    """s8's flip, rotation and colour jitter on the tensor path: per image, replayable, train split only."""
    def batches(epoch, **kw):
        loader = TensorLoader(data.train, data.mean, data.std, 32, train=True, seed=3, **{"crop_padding": 0, **kw})
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    s8 = dict(rotate=5.0, jitter=0.1)
    assert torch.equal(batches(1, **s8), batches(1, **s8)) and not torch.equal(batches(1, **s8), batches(2, **s8))
    flip_only = batches(1)
    changed = (batches(1, **s8) - flip_only).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.9  # nearly every image rotated or recoloured, each its own way
    cropped = batches(1, crop_padding=2, cutout_size=8, **s8)  # crops and cutout apply on this path too
    assert not torch.equal(cropped, batches(1, **s8)) and (cropped == 0).flatten(1).sum(1).min() >= 4 * 4 * 3  # clipped at a corner
    test = TensorLoader(data.test, data.mean, data.std, 40, train=False, rotate=5.0, jitter=0.1)
    assert torch.equal(next(iter(test))[0], next(iter(TensorLoader(data.test, data.mean, data.std, 40, train=False)))[0])


def test_s8_runs_on_the_tensor_loader_with_the_course_augmentation(data):
    from eva_api import build_loaders, make_config
    from eva_api.distributed import DistInfo

    train, test = build_loaders(data, make_config("s8", loader="tensor"), DistInfo(device=torch.device("cpu")), "cpu")
    assert isinstance(train, TensorLoader) and (train.rotate, train.jitter, train.flip, train.crop_padding) == (5, 0.1, True, 0)
    assert (test.rotate, test.jitter, test.flip) == (0, 0, False)
