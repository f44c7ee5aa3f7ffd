import os
import tarfile
import urllib.error

import pytest
import torch

from conftest import write_imagefolder, write_official
from eva_api import DataError, load_data, make_synthetic
from eva_api import data as data_mod


def test_imagefolder_layout_loads_as_uint8_with_train_stats(tmp_path):
    root = write_imagefolder(tmp_path / "ds", n_per_class=4)
    d = load_data("cifar10", root, download=False, progress=False)
    assert d.classes == ["cat", "dog", "ship"]
    assert d.train.images.shape == (12, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (6, 3, 32, 32) and d.train.labels.dtype == torch.long
    assert d.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    x = d.train.images.double() / 255
    assert torch.allclose(torch.tensor(d.mean, dtype=torch.double), x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(d.std, dtype=torch.double), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    assert d.source.startswith("imagefolder:") and not d.synthetic


def test_jpeg_and_grayscale_images_are_read_as_rgb(tmp_path):
    from PIL import Image

    root = write_imagefolder(tmp_path / "ds", n_per_class=2, suffix=".jpg")
    Image.new("L", (32, 32), 77).save(root / "train" / "cat" / "grey.png")
    d = load_data("cifar10", root, download=False, progress=False)
    assert len(d.train) == 7 and d.train.images.shape[1] == 3


def test_official_folder_and_tarball(tmp_path):
    root = write_official(tmp_path / "off", n_train=20, n_test=10, batches=2)
    d = load_data("cifar10", root, download=False, progress=False)
    assert d.train.images.shape == (40, 3, 32, 32) and d.test.images.shape == (10, 3, 32, 32)
    assert d.classes[0] == "airplane" and d.source.startswith("official:")
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    t = load_data("cifar10", tar_path, download=False, progress=False)
    assert torch.equal(t.train.images, d.train.images) and torch.equal(t.test.labels, d.test.labels)
    # a folder that only holds the archive is found too
    (tmp_path / "only_tar").mkdir()
    os.replace(tar_path, tmp_path / "only_tar" / "cifar-10-python.tar.gz")
    assert len(load_data("cifar10", tmp_path / "only_tar", download=False, progress=False).train) == 40


def test_second_load_comes_from_the_cache_and_a_changed_folder_is_reread(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "ds", n_per_class=2)
    first = load_data("cifar10", root, download=False, progress=False)
    decode = data_mod._decode
    monkeypatch.setattr(data_mod, "_decode", lambda p: pytest.fail("decoded again despite the cache"))
    again = load_data("cifar10", root, download=False, progress=False)
    assert torch.equal(first.train.images, again.train.images)
    monkeypatch.setattr(data_mod, "_decode", decode)
    write_imagefolder(tmp_path / "ds", n_per_class=3, seed=1)  # adds and rewrites files
    changed = load_data("cifar10", root, download=False, progress=False)
    assert len(changed.train) == 9


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, private_cache):
    root = write_imagefolder(tmp_path / "ds", n_per_class=2)
    first = load_data("cifar10", root, download=False, progress=False)
    (cache_file,) = private_cache.glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = load_data("cifar10", root, download=False, progress=False)
    assert torch.equal(rebuilt.train.images, first.train.images)


def test_offline_download_fails_with_one_clear_message(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        load_data("cifar10", tmp_path / "empty", download=True, progress=False)
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "could not be downloaded" in msg and "--dataset synthetic" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("case,match", [
    ("missing", "download is off"),
    ("no_classes", "no class sub-folders"),
    ("unreadable", "unreadable image"),
    ("wrong_size", "expected 32x32"),
    ("only_train", "test/ is missing"),
])
def test_bad_data_gives_a_one_line_error_naming_the_place(tmp_path, case, match):
    root = tmp_path / "ds"
    if case == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    elif case == "only_train":
        write_imagefolder(root)
        import shutil

        shutil.rmtree(root / "test")
    elif case != "missing":
        write_imagefolder(root)
        bad = root / "train" / "dog" / "bad.png"
        if case == "unreadable":
            bad.write_bytes(b"not an image")
        else:
            from PIL import Image

            Image.new("RGB", (40, 40)).save(bad)
    with pytest.raises(DataError, match=match) as e:
        load_data("cifar10", root, download=False, progress=False)
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_synthetic_is_deterministic_learnable_and_labelled():
    a, b = make_synthetic(100, 50), make_synthetic(100, 50)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.synthetic and "synthetic" in a.source
    assert sorted(a.class_counts().values()) == [10] * 10
    assert not torch.equal(a.train.images, a.test.images[:1].expand_as(a.train.images))
