import os
import shutil
import tarfile
import urllib.error
from pathlib import Path

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


def test_a_missing_path_is_named_and_left_uncreated_when_the_download_fails(tmp_path, monkeypatch):
    # torchvision makes the folder before it connects: a mistyped --data used to leave an empty folder behind
    import torchvision.datasets

    def offline(root, **kw):
        os.makedirs(root, exist_ok=True)  # as torchvision's download_url does first
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    typo = tmp_path / "dtaa" / "cifar"
    with pytest.raises(DataError, match="no such folder, and CIFAR-10 could not be downloaded") as e:
        load_data("cifar10", typo, progress=False)
    assert str(e.value).startswith(f"{typo}: ") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither dtaa/ nor dtaa/cifar/
    with pytest.raises(DataError, match="no such folder and download is off"):
        load_data("cifar10", typo, download=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_started_keeps_its_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def cut_off(root, **kw):
        os.makedirs(root, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"the first bytes")
        raise ConnectionResetError("connection reset")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", cut_off)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_data("cifar10", tmp_path / "new", progress=False)
    assert (tmp_path / "new" / "cifar-10-python.tar.gz").is_file()


@pytest.mark.parametrize("test_only", [False, True])
def test_a_split_folder_says_to_point_at_its_parent(tmp_path, test_only):
    root = write_imagefolder(tmp_path / "ds")
    with pytest.raises(DataError, match=rf"point --data at its parent \({root}\)") as e:
        load_data("cifar10", root / "test", download=False, progress=False, test_only=test_only)
    assert str(e.value).startswith(f"{root / 'test'}: holds class folders of images")


def test_test_only_needs_no_train_split_and_caches_apart(tmp_path, monkeypatch, private_cache):
    root = write_imagefolder(tmp_path / "ds", n_per_class=4)
    full = load_data("cifar10", root, download=False, progress=False)
    shutil.rmtree(root / "train")
    test = load_data("cifar10", root, download=False, progress=False, test_only=True)
    assert torch.equal(test.test.images, full.test.images) and test.classes == full.classes
    assert len(test.train) == 0 and test.mean == () and test.std == ()
    decode = data_mod._decode
    monkeypatch.setattr(data_mod, "_decode", lambda p: pytest.fail("decoded again despite the cache"))
    assert torch.equal(load_data("cifar10", root, download=False, progress=False, test_only=True).test.labels,
                       full.test.labels)
    monkeypatch.setattr(data_mod, "_decode", decode)
    write_imagefolder(tmp_path / "ds2", n_per_class=6, seed=1)
    shutil.rmtree(root / "test")
    os.replace(tmp_path / "ds2" / "test", root / "test")  # a changed test split is read again
    assert len(load_data("cifar10", root, download=False, progress=False, test_only=True).test) == 9
    assert len(list(private_cache.glob("imagefolder-test-*.pt"))) == 2


def test_test_only_reads_just_the_official_test_batch(tmp_path):
    root = write_official(tmp_path / "off", n_train=20, n_test=10)
    full = load_data("cifar10", root, download=False, progress=False)
    for p in (root / "cifar-10-batches-py").glob("data_batch_*"):
        p.unlink()
    test = load_data("cifar10", root, download=False, progress=False, test_only=True)
    assert torch.equal(test.test.images, full.test.images) and len(test.train) == 0
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert torch.equal(load_data("cifar10", tar_path, download=False, progress=False, test_only=True).test.labels,
                       full.test.labels)
    with pytest.raises(DataError, match="expected data_batch_1..5 and test_batch"):  # training still needs them
        load_data("cifar10", root, download=False, progress=False)


@pytest.mark.parametrize("pixels", [4096, 2500])  # past twice the limit: Pillow's error; past the limit: its warning
def test_an_image_past_the_decompression_bomb_limit_is_one_line(tmp_path, monkeypatch, pixels):
    from PIL import Image

    root = write_imagefolder(tmp_path / "ds")
    side = int(pixels ** 0.5)
    Image.new("RGB", (side, side)).save(root / "train" / "dog" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 32x32 images stay below it
    with pytest.raises(DataError, match="too large to decode safely") as e:
        load_data("cifar10", root, download=False, progress=False)
    assert str(e.value).startswith(f"{root / 'train' / 'dog' / 'huge.png'}: ") and "\n" not in str(e.value)


def test_a_class_folder_without_images_is_refused(tmp_path):
    # it would still take a label and an output: a class the model never sees, reported at 0% in every run
    root = write_imagefolder(tmp_path / "ds")
    write_imagefolder(tmp_path / "birds", classes=("bird",))
    os.replace(tmp_path / "birds" / "test" / "bird", root / "test" / "bird")  # test/ has bird images, train/ none
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder holds no images .*; add some or remove the folder") as e:
        load_data("cifar10", root, download=False, progress=False)
    assert str(e.value).startswith(f"{root / 'train' / 'bird'}: ")
