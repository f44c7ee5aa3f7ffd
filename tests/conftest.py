"""Shared fixtures: no network, a private data cache, tiny data sets written to tmp dirs, a tiny CNN
(registered as model ``tiny``)."""
from __future__ import annotations

import os
import pickle
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from tinymodel import TinyResNet  # noqa: E402  (also registers model "tiny")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the way an offline machine does."""

    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # local (AF_UNIX) sockets stay allowed
            raise OSError("network disabled in tests")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVA_API_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_imagefolder(root: Path, n_per_class: int = 3, classes=("cat", "dog", "ship"), size: int = 32,
                      seed: int = 0, suffix: str = ".png") -> Path:
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png with random pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", max(1, n_per_class // 2))):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}{suffix}")
    return root


def write_official(root: Path, n_train: int = 20, n_test: int = 10, batches: int = 2, seed: int = 0) -> Path:
    """A tiny cifar-10-batches-py/ folder in the official pickled format."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, batches + 1):
        blob = {b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
                b"labels": rng.integers(0, 10, n_train).tolist()}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(blob))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"labels": list(range(10)) * (n_test // 10)}
    (d / "test_batch").write_bytes(pickle.dumps(test))
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


TinyNet = TinyResNet  # a small CNN for tests where the architecture does not matter (fast on 2 cores)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


def signal_at(monkeypatch, epoch: int, batch: int | None, signum: int = signal.SIGINT, loader=None) -> None:
    """Send this process a real ``signum`` when training batch ``batch`` of ``epoch`` is fetched, or, with
    ``batch=None``, when evaluation number ``epoch`` starts. ``loader``: the loader class to hook
    (default TensorLoader)."""
    from eva_api import engine
    from eva_api.loaders import TensorLoader

    cls = loader or TensorLoader
    original_iter, original_eval = cls.iter_from, engine.evaluate
    calls = []

    def iter_from(self, start):
        for b, item in enumerate(original_iter(self, start)):
            if getattr(self, "train", True) and self.epoch == epoch and start + b == batch:
                os.kill(os.getpid(), signum)
            yield item

    def evaluate(*args, **kw):
        calls.append(1)
        if batch is None and len(calls) == epoch:
            os.kill(os.getpid(), signum)
        return original_eval(*args, **kw)

    monkeypatch.setattr(cls, "iter_from", iter_from)
    monkeypatch.setattr(engine, "evaluate", evaluate)
