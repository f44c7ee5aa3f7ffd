"""Whole runs on tiny synthetic data and the tiny model: artifacts, checkpoints, exact resume after a real
signal, changed-flag refusal, the run lock, bad input."""
import json
import signal

import pytest
import torch

from eva_api import (CheckpointError, ConfigError, Interrupted, count_parameters, evaluate, load_checkpoint, load_model,
                     make_config, prepare, train)
from eva_api.loaders import ClassicLoader, TensorLoader, eval_loader

from conftest import signal_at

TINY = dict(model="tiny", dataset="synthetic", synthetic_train=96, synthetic_test=48, batch_size=32, progress=False,
            precision="fp32", gallery=8)
KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_tta")


def strip_times(history):
    return [{k: r[k] for k in KEYS if k in r} for r in history]


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(make_config("fast", epochs=3, **TINY), out), out


def test_run_writes_every_artifact_and_a_loadable_checkpoint(full_run):
    result, out = full_run
    for name in ("config.json", "history.json", "metrics.json", "checkpoint.pt", "curves.png", "misclassified.png",
                 "confusion_matrix.png", "per_class.txt", "summary.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic"] and "synthetic" in metrics["data_source"]
    assert metrics["parameters"] == count_parameters(result.model)
    assert len(json.loads((out / "history.json").read_text())) == 3
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 1 and ckpt["format_version"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "scheduler", "rng", "config", "history", "classes", "mean", "std"} <= set(ckpt)
    model = load_model(out / "checkpoint.pt", "cpu")
    assert not model.training and model.classes == result.data.classes
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # as it trained
    acc = evaluate(model, TensorLoader(result.data.test, model.mean, model.std, 48, train=False))["acc"]
    assert acc == pytest.approx(result.history[-1]["test_acc"])
    # the report reuses the last epoch's evaluation instead of running it again
    assert metrics["final_test_acc"] == result.history[-1]["test_acc"]


def test_a_seeded_cpu_run_repeats_exactly(full_run, tmp_path):
    result, _ = full_run
    again = train(make_config("fast", epochs=3, **TINY), tmp_path)
    assert strip_times(again.history) == strip_times(result.history)
    assert same_weights(again.model, result.model)


@pytest.mark.parametrize("epoch,batch,signum,saved", [
    (2, 1, signal.SIGINT, (1, 2)),   # mid-epoch: the fetched batch is trained, then the loop stops
    (2, 0, signal.SIGTERM, (1, 1)),
    (2, None, signal.SIGINT, (2, 0)),  # during evaluation: the epoch ends, the next one does not start
])
def test_a_real_signal_saves_a_consistent_state_that_resumes_exactly(full_run, tmp_path, monkeypatch, epoch, batch,
                                                                     signum, saved):
    result, _ = full_run
    signal_at(monkeypatch, epoch, batch, signum)
    with pytest.raises(Interrupted):
        train(make_config("fast", epochs=3, **TINY), tmp_path)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["epoch"], (ckpt["epoch_state"] or {}).get("batches", 0)) == saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = train(make_config("fast", epochs=3, **TINY), tmp_path, resume=True)
    assert strip_times(resumed.history) == strip_times(result.history)
    assert same_weights(resumed.model, result.model)


def test_s8_recipe_on_the_classic_loader_resumes_exactly(tmp_path, monkeypatch):
    """The notebook's default path: classic DataLoader (no workers), dropout, multistep, course transforms."""
    config = make_config("s8", epochs=2, milestones=(1,), num_workers=0, **{**TINY, "batch_size": 16})
    whole = train(config, tmp_path / "whole")
    signal_at(monkeypatch, 2, 2, loader=ClassicLoader)
    with pytest.raises(Interrupted):
        train(config, tmp_path / "cut")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch_state"]["batches"] == 3
    resumed = train(config, tmp_path / "cut", resume=True)
    assert strip_times(resumed.history) == strip_times(whole.history)
    assert same_weights(resumed.model, whole.model)


def test_resume_refuses_changed_settings_naming_each_and_allows_runtime_ones(full_run, tmp_path):
    _, out = full_run
    with pytest.raises(ConfigError) as e:
        train(make_config("fast", epochs=3, **{**TINY, "precision": "bf16"}, lr=0.2), out, resume=True)
    msg = str(e.value)
    assert "lr: 0.1 -> 0.2" in msg and "precision: 'fp32' -> 'bf16'" in msg and "\n" not in msg
    # runtime fields may change: here progress and gallery; nothing left to train, so it only reports
    again = train(make_config("fast", epochs=3, **{**TINY, "progress": True, "gallery": 4}), out, resume=True)
    assert len(again.history) == 3


def test_old_config_keys_are_dropped_with_one_warning():
    from eva_api import Config

    with pytest.warns(UserWarning, match="ignoring config keys from an earlier eva_api version: ema, lookahead"):
        config = Config.from_dict({**make_config("fast").to_dict(), "ema": 0.0, "lookahead": 0})
    assert config == make_config("fast")


def test_a_checkpoint_of_an_ema_run_loads_the_averaged_weights(full_run, tmp_path):
    """0.1's --ema runs stored the average as "ema"; load_model returned it then and still does."""
    _, out = full_run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["ema"] = {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "ema.pt")
    assert not load_model(tmp_path / "ema.pt", "cpu").conv1.weight.any()


def test_existing_checkpoint_is_never_overwritten_without_resume(full_run):
    _, out = full_run
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        train(make_config("fast", epochs=1, **TINY), out)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_run_folder_in_use_is_locked_and_a_dead_runs_lock_is_not(tmp_path):
    import subprocess
    import sys

    from eva_api import RunLock

    with RunLock(tmp_path):
        with pytest.raises(CheckpointError, match="already writing into this folder"):
            train(make_config("fast", epochs=1, **TINY), tmp_path)
    # a lock held by a process that was killed: the OS dropped it with the process
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from eva_api import RunLock; "
                             f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match="already writing"):
        RunLock(tmp_path).acquire()
    proc.kill()
    proc.wait()
    assert (tmp_path / ".lock").exists()
    train(make_config("fast", epochs=1, **TINY), tmp_path)


def test_nan_run_writes_no_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F

    from eva_api import TrainingError, runner

    monkeypatch.setattr(runner.Setup, "criterion", lambda self: lambda logits, y: F.cross_entropy(logits, y) * float("nan"))
    with pytest.raises(TrainingError, match="loss became nan in epoch 1"):
        train(make_config("fast", epochs=1, **TINY), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("precision, native, ns_dtype", [("fp32", True, torch.float32), ("bf16", True, torch.bfloat16),
                                                        ("bf16", False, torch.float32)])
def test_a_runs_muon_orthogonalizes_in_the_runs_precision(monkeypatch, precision, native, ns_dtype):
    from eva_api import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)  # bf16 emulated (AVX2): the iteration stays fp32
    setup = prepare(make_config("fast", **{**TINY, "precision": precision}), progress=False)
    assert setup.stepper.optimizer.ns_dtype is ns_dtype


@pytest.mark.slow
def test_full_resnet18_fast_recipe_smoke(tmp_path):
    """The one in-process run of the real ResNet18 (whitened, frozen stem; Muon; bf16 where the CPU has it)."""
    result = train(make_config("fast", epochs=1, **{**TINY, "model": "resnet18", "precision": "auto"}), tmp_path)
    assert result.metrics["parameters"] == 11_173_962
    assert load_model(tmp_path / "checkpoint.pt", "cpu").config.model == "resnet18"
    ev = evaluate(result.model, eval_loader(result.data.test, result.data.mean, result.data.std, "cpu",
                                            channels_last=True), precision=result.precision)
    assert ev["acc"] == pytest.approx(result.history[-1]["test_acc"])


def test_run_summary_is_built_from_the_config_and_results(full_run):
    from eva_api import format_summary, run_summary

    result, out = full_run
    table = run_summary(result.config, result.metrics)
    assert table["recipe / epochs"].startswith("fast / 3") and "Muon for the conv filters" in table["optimizer"]
    assert "one-cycle" in table["schedule"] and "2-px reflect-pad random crop" in table["augmentation"]
    assert f"{result.history[-1]['test_acc']:.2f}%" in table["final test accuracy"]
    assert "SYNTHETIC" in table["data"] and "fp32 on cpu" == table["precision / device"]
    s8 = run_summary(make_config("s8", cutout=8), {})
    assert "SGD lr 0.01" in s8["optimizer"] and "Muon" not in s8["optimizer"] and "MultiStepLR" in s8["schedule"]
    assert "dropout 0.25" in s8["regularization"] and "cutout 8x8" in s8["augmentation"]
    assert (out / "summary.md").read_text().strip() == format_summary(table)


def test_unfinished_run_finds_the_run_a_disconnect_left(full_run, tmp_path, monkeypatch):
    from eva_api import unfinished_run

    _, done = full_run
    assert unfinished_run(done) is None  # finished
    signal_at(monkeypatch, 2, 0)
    with pytest.raises(Interrupted):
        train(make_config("fast", epochs=3, **TINY), tmp_path / "runs" / "a")
    assert unfinished_run(tmp_path / "runs") == tmp_path / "runs" / "a"


def test_the_config_only_reads_map_the_checkpoint(full_run, monkeypatch):
    # unfinished_run walks every run under a (Drive) folder and resume_config reads the file that train then
    # loads in full: both need only config and epoch, so neither reads the ~86 MB of tensors
    from eva_api import unfinished_run
    from eva_api.runner import resume_config

    _, done = full_run
    maps, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: maps.append(k.get("mmap", False)) or real_load(*a, **k))
    assert unfinished_run(done) is None and resume_config(done / "checkpoint.pt").epochs == 3
    assert maps == [True, True]


def test_compile_where_torch_cannot_is_one_line_before_the_data_loads(monkeypatch, tmp_path):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)  # e.g. torch 2.5 on Python 3.13
    config = make_config("fast", **{**TINY, "dataset": "cifar10"}, data=str(tmp_path / "none"), download=False,
                         compile=True)
    with pytest.raises(ConfigError, match="--compile: torch.compile does not run with torch"):  # not a DataError
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sync_bn_on_cpu_ranks_is_refused_with_one_line_before_loading_data(monkeypatch):
    from eva_api import runner
    from eva_api.distributed import DistInfo

    # SyncBatchNorm's forward raises on CPU input, so gloo ranks would die with a traceback at the first batch
    monkeypatch.setattr(runner, "load_config_data", lambda *a, **k: pytest.fail("loaded data before refusing"))
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA GPUs"):
        runner.prepare(make_config(**TINY, sync_bn=True), dist=DistInfo(rank=1, world_size=2))
    monkeypatch.undo()
    setup = runner.prepare(make_config(**TINY, sync_bn=True))  # one process: nothing to sync, plain BatchNorm
    kinds = {type(m) for m in setup.model.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.SyncBatchNorm not in kinds
