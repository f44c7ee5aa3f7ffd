"""Whole runs on tiny synthetic data: artifacts, checkpoints, exact resume, interruption, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from eva_api import CheckpointError, load_checkpoint, load_model, make_config, train
from eva_api.loaders import TensorLoader

TINY = dict(dataset="synthetic", synthetic_train=96, synthetic_test=48, batch_size=32, progress=False,
            precision="fp32", gallery=8)
KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_tta")


def strip_times(history):
    return [{k: r[k] for k in KEYS} for r in history]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(make_config("fast", epochs=3, **TINY), out), out


def test_run_writes_every_artifact_and_a_loadable_checkpoint(full_run):
    result, out = full_run
    for name in ("config.json", "history.json", "metrics.json", "checkpoint.pt", "curves.png", "misclassified.png",
                 "confusion_matrix.png", "per_class.txt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic"] and "synthetic" in metrics["data_source"] and metrics["parameters"] == 11_173_962
    assert len(json.loads((out / "history.json").read_text())) == 3
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "scheduler", "rng", "config", "history", "classes", "mean", "std"} <= set(ckpt)
    model = load_model(out / "checkpoint.pt", "cpu")
    assert not model.training and model.classes == result.data.classes
    loader = TensorLoader(result.data.test, model.mean, model.std, 48, train=False)
    from eva_api import evaluate

    assert evaluate(model, loader)["acc"] == pytest.approx(result.history[-1]["test_acc"])


def test_a_seeded_cpu_run_repeats_exactly(full_run, tmp_path):
    result, _ = full_run
    again = train(make_config("fast", epochs=3, **TINY), tmp_path)
    assert strip_times(again.history) == strip_times(result.history)


def interrupted_then_resumed(tmp_path, monkeypatch, stop_epoch, stop_batch, **overrides):
    """Train 3 epochs with a Ctrl-C at (stop_epoch, stop_batch), check the checkpoint, resume to the end."""
    original = TensorLoader.iter_from

    def interrupt(self, start):
        for b, batch in enumerate(original(self, start)):
            if self.train and self.epoch == stop_epoch and start + b == stop_batch:
                raise KeyboardInterrupt
            yield batch
        if self.train and self.epoch == stop_epoch:
            raise AssertionError("interruption point not reached")

    monkeypatch.setattr(TensorLoader, "iter_from", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(make_config("fast", epochs=3, **TINY, **overrides), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == stop_epoch - 1
    assert (ckpt["epoch_state"] or {}).get("batches", 0) == stop_batch
    monkeypatch.setattr(TensorLoader, "iter_from", original)
    return train(make_config("fast", **TINY), tmp_path, resume=True)


@pytest.mark.parametrize("stop_epoch,stop_batch", [(2, 1), (3, 0)])  # mid-epoch, and at an epoch boundary
def test_interrupted_then_resumed_matches_an_uninterrupted_run(full_run, tmp_path, monkeypatch, stop_epoch, stop_batch):
    result, _ = full_run
    resumed = interrupted_then_resumed(tmp_path, monkeypatch, stop_epoch, stop_batch)
    assert strip_times(resumed.history) == strip_times(result.history)


def test_ema_run_resumes_exactly_and_keeps_the_averaged_weights(tmp_path, monkeypatch):
    whole = train(make_config("fast", epochs=3, ema=0.9, **TINY), tmp_path / "whole")
    raw = [r["test_acc_raw"] for r in whole.history]
    assert len(raw) == 3 and whole.metrics["final_test_acc"] == pytest.approx(whole.history[-1]["test_acc"])
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch, 2, 1, ema=0.9)
    assert strip_times(resumed.history) == strip_times(whole.history)
    assert [r["test_acc_raw"] for r in resumed.history] == raw
    ckpt = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    kept = load_model(tmp_path / "resumed" / "checkpoint.pt", "cpu").state_dict()
    assert all(torch.equal(kept[k], v) for k, v in ckpt["ema"].items())  # the average, not the last step
    assert not all(torch.equal(kept[k], v) for k, v in ckpt["model"].items())
    assert all(torch.equal(kept[k], v) for k, v in whole.model.state_dict().items())


def test_lookahead_run_resumes_exactly_and_ends_on_the_slow_weights(tmp_path, monkeypatch):
    whole = train(make_config("fast", epochs=3, lookahead=3, **TINY), tmp_path / "whole")
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch, 2, 1, lookahead=3)
    assert strip_times(resumed.history) == strip_times(whole.history)
    ckpt = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert ckpt["lookahead"]["steps"] == 3 * 3  # 3 epochs of 96 / 32 batches
    kept = load_model(tmp_path / "resumed" / "checkpoint.pt", "cpu").state_dict()
    assert all(torch.equal(kept[k], v.to(kept[k].dtype)) for k, v in ckpt["lookahead"]["slow"].items())
    assert all(torch.equal(kept[k], v) for k, v in whole.model.state_dict().items())


def test_sgd_run_with_frozen_bn_scales_resumes_exactly(full_run, tmp_path, monkeypatch):
    # the other resume tests run the fast recipe's Muon; this one the plain SGD path and the BN options
    other = dict(optimizer="sgd", freeze_bn_scale=True, bn_bias_lr=4.0)
    whole = train(make_config("fast", epochs=3, **other, **TINY), tmp_path / "whole")
    assert strip_times(whole.history) != strip_times(full_run[0].history)  # the options took effect
    resumed = interrupted_then_resumed(tmp_path / "resumed", monkeypatch, 2, 1, **other)
    assert strip_times(resumed.history) == strip_times(whole.history)
    assert "momentum_buffer" in next(iter(load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["optimizer"]["state"].values()))


def test_existing_checkpoint_is_never_overwritten_without_resume(full_run):
    _, out = full_run
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        train(make_config("fast", epochs=1, **TINY), out)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_truncated_checkpoint_is_a_one_line_error(full_run, tmp_path):
    _, out = full_run
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(bad)
    assert "\n" not in str(e.value)


def test_nan_run_writes_no_checkpoint(tmp_path):
    from eva_api import TrainingError

    with pytest.raises(TrainingError):
        train(make_config("fast", epochs=1, lr=1e12, start_lr_factor=1.0, **TINY), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eva_api", "train", "--dataset", "synthetic", "--synthetic-train", "64",
           "--synthetic-test", "16", "--batch-size", "16", "--epochs", "200", "--precision", "fp32", "--no-tta",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: checkpoint saved" in stdout and "Traceback" not in stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1
