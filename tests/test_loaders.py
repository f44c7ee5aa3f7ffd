import pytest
import torch
import torch.nn.functional as F

from eva_api import ClassicLoader, TensorLoader, classic_transforms, make_synthetic
from eva_api.loaders import crop_flip, shard_indices


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
    loader = ClassicLoader(data.train, classic_transforms(data.mean, data.std, "s8"), 32, train=True, num_workers=1)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (32, 3, 32, 32) and batches[0][1].dtype == torch.long
    loader.set_epoch(1)
    assert torch.equal(next(loader.iter_from(1))[0], batches[1][0])  # replayable epoch
    test = ClassicLoader(data.test, classic_transforms(data.mean, data.std, "none"), 40, train=False, num_workers=0)
    x, _ = next(iter(test))
    ref = TensorLoader(data.test, data.mean, data.std, 40, train=False)
    assert torch.allclose(x, next(iter(ref))[0], atol=1e-5)  # same normalization, no augmentation


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


def _flipped_per_image(loader, data, epoch):
    """{sample index: was it flipped} for one epoch of a crop-free training loader."""
    loader.set_epoch(epoch)
    order = loader.indices()
    x = torch.cat([b for b, _ in loader])
    plain = TensorLoader(data.train, data.mean, data.std, 96, train=False).normalize(data.train.images[order])
    flipped = torch.isclose(x, plain.flip(3), atol=1e-5).flatten(1).all(1)
    assert (flipped | torch.isclose(x, plain, atol=1e-5).flatten(1).all(1)).all()  # each is plain or flipped
    return dict(zip(order.tolist(), flipped.tolist()))


def test_alternate_flip_shows_each_image_the_other_way_every_epoch(data):
    loader = TensorLoader(data.train, data.mean, data.std, 32, train=True, crop_padding=0, alternate_flip=True, seed=5)
    e1, e2, e3 = (_flipped_per_image(loader, data, e) for e in (1, 2, 3))
    assert 20 < sum(e1.values()) < 76  # epoch 1: a coin per image
    assert all(e2[i] != e1[i] and e3[i] == e1[i] for i in e1)
    plain = TensorLoader(data.train, data.mean, data.std, 32, train=True, crop_padding=0, seed=5)
    r1, r2 = (_flipped_per_image(plain, data, e) for e in (1, 2))
    assert sum(r2[i] == r1[i] for i in r1) > 20  # random flips: many images keep their orientation


def test_alternate_flip_is_refused_by_the_classic_loader(data):
    from eva_api import ConfigError, make_config
    from eva_api.distributed import DistInfo
    from eva_api.runner import build_loaders

    config = make_config("fast", loader="classic", alternate_flip=True, num_workers=0)
    with pytest.raises(ConfigError, match="alternate_flip needs --loader tensor"):
        build_loaders(data, config, DistInfo(), torch.device("cpu"))
