"""CUDA paths, skipped where there is no GPU: fp16 and bf16 epochs, no hidden host-device syncs in the
training loop, exact resume, ``doctor``, and a single-process nccl run."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, signal_at
from eva_api import (EpochState, Interrupted, Precision, Stepper, TensorLoader, load_checkpoint, make_config, make_synthetic,
                     train, train_one_epoch)
from eva_api.models import get_model
from eva_api.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = dict(model="tiny", dataset="synthetic", synthetic_train=128, synthetic_test=64, batch_size=32, progress=False,
            gallery=4, device="cuda")


def strip(history):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_epoch_in_fp16_and_bf16(dtype):
    if dtype is torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 is only emulated below compute capability 8.0")
    data = make_synthetic(256, 64)
    torch.manual_seed(0)
    model = get_model("tiny").cuda().to(memory_format=torch.channels_last)
    precision = Precision("cuda", dtype)
    stepper = Stepper(build_optimizer(model, make_config("fast"), precision), scaler=precision.make_scaler())
    loader = TensorLoader(data.train, data.mean, data.std, 32, train=True, device="cuda", channels_last=True)
    loader.set_epoch(1)
    tr = train_one_epoch(model, loader, stepper, criterion=torch.nn.CrossEntropyLoss(), precision=precision,
                         progress=False)
    assert tr["samples"] == 256 and torch.isfinite(torch.tensor(tr["loss"]))
    assert (stepper.scaler is not None) == (dtype is torch.float16)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_training_loop_makes_no_hidden_host_device_sync(cuda_graph):
    """bf16 (the fp16 GradScaler's overflow check reads the GPU by design). With the loss read only at the
    epoch's end, every batch must run before the first sync, which the debug mode turns into an error.
    With ``cuda_graph`` the first epoch warms up and captures; the second replays."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 path")
    data = make_synthetic(24 * 16, 32)
    torch.manual_seed(0)
    model = get_model("resnet18").cuda().to(memory_format=torch.channels_last)
    precision = Precision("cuda", torch.bfloat16)
    optimizer = build_optimizer(model, make_config("fast"), precision)
    stepper = Stepper(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), cuda_graph=cuda_graph)
    loader = TensorLoader(data.train, data.mean, data.std, 16, train=True, device="cuda", channels_last=True,
                          crop_padding=2, cutout_size=8)
    kw = dict(criterion=torch.nn.CrossEntropyLoss(label_smoothing=0.1), precision=precision, progress=False,
              log_every=1000)
    loader.set_epoch(1)
    train_one_epoch(model, loader, stepper, **kw)  # warm-up: cuDNN autotuning, lazy init
    torch.cuda.synchronize()
    loader.set_epoch(2)
    state = EpochState()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            train_one_epoch(model, loader, stepper, state=state, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert state.batches == len(loader) == 24  # the one sync is the end-of-epoch read of the sums
    assert len(stepper._static) == cuda_graph  # the captured step served the second epoch


def test_tensor_loader_batches_need_no_sync():
    data = make_synthetic(128, 32)
    loader = TensorLoader(data.train, data.mean, data.std, 32, train=True, device="cuda", crop_padding=2,
                          cutout_size=8, channels_last=True)
    loader.set_epoch(1)
    it = loader.iter_from(0)
    next(it)  # the once-per-epoch draws and their copy happen here
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(it)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(rest) == 3


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_exact_resume_on_cuda(tmp_path, monkeypatch, cuda_graph):
    torch.backends.cudnn.deterministic = True  # cuDNN's autotuned kernels may differ from run to run
    config = make_config("fast", epochs=2, precision="fp32", cuda_graph=cuda_graph, **TINY)
    try:
        whole = train(config, tmp_path / "whole")
        signal_at(monkeypatch, 2, 1)
        with pytest.raises(Interrupted):
            train(config, tmp_path / "cut")
        monkeypatch.undo()
        assert "cuda" in load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["rng"][0]
        resumed = train(config, tmp_path / "cut", resume=True)
    finally:
        torch.backends.cudnn.deterministic = False
    assert strip(resumed.history) == strip(whole.history)


def test_doctor_passes_on_the_gpu():
    proc = subprocess.run([sys.executable, "-m", "eva_api", "doctor", "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "all checks passed" in proc.stdout


def test_single_process_nccl_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(REPO / "tests" / "tiny_cli.py"), "train", "--model", "tiny", "--dataset", "synthetic",
                           "--synthetic-train", "128", "--synthetic-test", "64", "--batch-size", "32", "--epochs", "1",
                           "--no-progress", "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda:0 x1" in proc.stdout and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def test_a_gpu_runs_checkpoint_holds_only_cpu_tensors(tmp_path):
    """A bare ``torch.load`` (no map_location) of a Colab run's checkpoint works on a laptop without a GPU."""
    train(make_config("fast", epochs=1, **TINY), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    devices = set()

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            devices.add(obj.device.type)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(ckpt)
    assert devices == {"cpu"}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_captured_run_matches_the_eager_run(tmp_path, precision):
    """The same steps replayed from a CUDA graph give the same History (within one test image and cuDNN's
    run-to-run rounding), the last partial batch (128 = 4 x 30 + 8) run eagerly in between."""
    if precision == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 is only emulated below compute capability 8.0")
    kw = dict(TINY, batch_size=30, epochs=2, precision=precision)
    torch.backends.cudnn.deterministic = True
    try:
        runs = [train(make_config("fast", cuda_graph=graph, **kw), tmp_path / str(graph)) for graph in (False, True)]
    finally:
        torch.backends.cudnn.deterministic = False
    for eager, captured in zip(*(strip(r.history) for r in runs)):
        assert eager.keys() == captured.keys()
        for key in eager:
            assert captured[key] == pytest.approx(eager[key], rel=1e-2, abs=1.6 if "acc" in key else 1e-3), key


def test_fp16_falls_back_to_eager_steps_with_one_line(tmp_path):
    with pytest.warns(UserWarning, match="runs eagerly: fp16's GradScaler"):
        result = train(make_config("fast", epochs=1, precision="fp16", cuda_graph=True, **TINY), tmp_path / "run")
    assert len(result.history) == 1
