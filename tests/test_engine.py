
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TinyNet, signal_at
from eva_api import (ConfigError, History, Precision, Stepper, TensorLoader, TrainingError, evaluate, fit, format_test_line,
                     make_synthetic, pick_precision, seed_everything, train_one_epoch)
from eva_api import distributed, runtime
from eva_api.optim import LRSchedule


class FixedLogits(nn.Module):
    """Returns preset logits for the images it sees (keyed by the images' first pixel)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        idx = x[:, 0, 0, 0].round().long()
        return self.logits[idx] + 0 * self.w


class ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_evaluate_averages_over_samples_not_batches(capsys):
    torch.manual_seed(0)
    logits = torch.randn(7, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 3])
    x = torch.arange(7).float().view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    loader = ListLoader([(x[:5], labels[:5]), (x[5:], labels[5:])])  # unequal batches: mean of means is wrong
    m = evaluate(FixedLogits(logits), loader)
    hand_loss = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(7)) / 7
    hand_correct = sum(int(logits[i].argmax() == labels[i]) for i in range(7))
    assert m["loss"] == pytest.approx(hand_loss, rel=1e-6)
    assert (m["correct"], m["total"]) == (hand_correct, 7)
    assert m["acc"] == pytest.approx(100 * hand_correct / 7)
    line = format_test_line(m)
    assert line == f"Test set: Average loss: {hand_loss:.4f}, Accuracy: {hand_correct}/7 ({100 * hand_correct / 7:.2f}%)"


def test_loss_sums_use_float32_on_mps_which_has_no_float64(monkeypatch):
    from eva_api import engine

    assert engine._sum_dtype(torch.device("mps")) is torch.float32
    assert engine._sum_dtype(torch.device("cpu")) is engine._sum_dtype(torch.device("cuda", 0)) is torch.float64
    asked = []

    def float32_sums(device):  # what mps gets; both loops must ask for their sum dtype, not assume float64
        asked.append(device.type)
        return torch.float32

    monkeypatch.setattr(engine, "_sum_dtype", float32_sums)
    data = make_synthetic(32, 32)
    model = TinyNet()
    tr = train_one_epoch(model, TensorLoader(data.train, data.mean, data.std, 16, train=True),
                         Stepper(torch.optim.SGD(model.parameters(), lr=0.01)), criterion=F.cross_entropy,
                         precision=Precision("cpu", None), progress=False)
    ev = evaluate(model, TensorLoader(data.test, data.mean, data.std, 16, train=False))
    assert asked == ["cpu", "cpu"]
    assert math.isfinite(tr["loss"]) and math.isfinite(ev["loss"]) and ev["total"] == 32


def test_tta_with_the_identity_view_equals_plain_evaluation():
    data = make_synthetic(64, 64)
    loader = TensorLoader(data.test, data.mean, data.std, 16, train=False)
    model = TinyNet().eval()
    m = evaluate(model, loader, tta=[lambda x: x])
    assert m["acc_tta"] == m["acc"]
    flip = evaluate(model, loader, tta=True)
    assert "acc_tta" in flip and flip["acc"] == m["acc"]
    assert "with flip TTA:" in format_test_line(flip)  # the line names the TTA it measured
    assert "with flip+translate TTA:" in format_test_line(evaluate(model, loader, tta="flip+translate"))


def test_short_fit_on_synthetic_data_learns_far_above_chance(capsys):
    seed_everything(0)
    data = make_synthetic(512, 200, size=32)
    train = TensorLoader(data.train, data.mean, data.std, 32, train=True)
    test = TensorLoader(data.test, data.mean, data.std, 100, train=False)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hist = fit(model, train, test, opt, epochs=3, progress=False)
    assert isinstance(hist, History) and [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[-1]["test_acc"] > 60  # chance is 10%
    assert set(hist[0]) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds", "eval_seconds"}
    assert capsys.readouterr().out.count("Test set: Average loss:") == 3


def test_progress_bar_uses_the_course_format(capsys):
    data = make_synthetic(64, 10)
    train = TensorLoader(data.train, data.mean, data.std, 16, train=True)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, train, opt, criterion=nn.CrossEntropyLoss(), precision=Precision("cpu", None),
                    progress=True, log_every=2)
    err = capsys.readouterr().err
    assert "Loss=" in err and "Batch_id=3" in err and "Accuracy=" in err


def test_nan_loss_stops_with_a_clear_error():
    data = make_synthetic(64, 10)
    train = TensorLoader(data.train, data.mean, data.std, 16, train=True)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    nan_loss = lambda logits, y: F.cross_entropy(logits, y) * float("nan")
    with pytest.raises(TrainingError, match="loss became nan in epoch 1"):
        train_one_epoch(model, train, opt, criterion=nan_loss, precision=Precision("cpu", None), progress=False)


@pytest.mark.parametrize("capability,name", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"),
                                             ((9, 0), "bf16")])
def test_auto_precision_on_cuda_follows_native_support(monkeypatch, capability, name):
    # torch.cuda.is_bf16_supported() says True on a T4 (7.5) too, where bf16 is only emulated: never asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = pick_precision(torch.device("cuda"), "auto")
    assert p.name == name and f"{capability[0]}.{capability[1]}" in p.reason
    assert (p.dtype is torch.float16) == (name == "fp16")  # fp16 makes a GradScaler (tested on the CPU below)
    asked = pick_precision(torch.device("cuda"), "bf16")  # honoured, but the banner says it is emulated
    assert asked.dtype is torch.bfloat16 and ("emulated" in asked.reason) == (name == "fp16")


@pytest.mark.parametrize("has_bf16,name", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_and_explicit_choices(monkeypatch, has_bf16, name):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert pick_precision(torch.device("cpu"), "auto").name == name
    assert pick_precision(torch.device("cpu"), "fp32").dtype is None
    bf16 = pick_precision(torch.device("cpu"), "bf16")
    assert bf16.dtype is torch.bfloat16 and ("emulated" in bf16.reason) == (not has_bf16)  # the banner says so
    fp16 = pick_precision(torch.device("cpu"), "fp16")  # works on a CPU too, with a CPU GradScaler
    assert fp16.dtype is torch.float16 and fp16.make_scaler().is_enabled()
    assert pick_precision(torch.device("cpu"), "bf16").make_scaler() is None
    with pytest.raises(Exception, match="choose auto, bf16, fp16 or fp32"):
        pick_precision(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("name,match", [("gpu", "bad device 'gpu'"), ("meta", "bad device 'meta'"),
                                        ("mps", r"MPS \(Apple GPUs\) is not available"), ("cuda:0", "CUDA is not available")])
def test_devices_that_cannot_run_here_are_refused_with_one_line(monkeypatch, name, match):
    monkeypatch.setattr(runtime, "_mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=match):
        runtime.pick_device(name)
    assert runtime.pick_device("auto").type == "cpu" and runtime.pick_device("cpu").type == "cpu"


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="more processes on this machine than it has GPUs"):
        distributed.init_distributed("auto")


def test_torchrun_on_mps_is_one_line_and_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "pick_device", lambda name: torch.device("mps"))
    with pytest.raises(ConfigError, match="cannot share MPS"):  # no collective backend runs on MPS tensors
        distributed.init_distributed("mps")
    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    info = distributed.init_distributed("auto")  # "auto" on a Mac: the ranks share the CPU, which the run's first line says
    assert joined == ["gloo"] and info.device == torch.device("cpu")


def test_mixed_precision_on_mps_needs_a_torch_with_mps_autocast(monkeypatch):
    # older torch fails mid-run ("unsupported autocast device_type 'mps'", below 2.5) or silently runs fp32
    # labelled bf16 (2.5); fp32 always works
    from torch.torch_version import TorchVersion

    mps = torch.device("mps")
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.4.1"))
    for name, need in (("fp16", "2.5"), ("bf16", "2.6")):
        with pytest.raises(ConfigError, match=f"--precision {name} on mps needs torch >= {need}"):
            pick_precision(mps, name)
    assert pick_precision(mps, "fp32").dtype is None and pick_precision(mps).dtype is None
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    assert pick_precision(mps, "fp16").dtype is torch.float16
    with pytest.raises(ConfigError, match="needs torch >= 2.6"):
        pick_precision(mps, "bf16")
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.10.0"))  # compared as a version, not as text
    assert pick_precision(mps, "bf16").dtype is torch.bfloat16


def test_the_mps_generator_is_saved_and_restored_for_resume(monkeypatch):
    generator = {"state": torch.arange(4, dtype=torch.uint8)}  # dropout on mps draws from it
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *a, **k: generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, *a, **k: generator.update(state=state))
    mps = torch.device("mps")
    states = runtime.rng_states(mps)
    generator["state"] = torch.zeros(4, dtype=torch.uint8)
    runtime.set_rng_states(states, mps)
    assert torch.equal(generator["state"], torch.arange(4, dtype=torch.uint8))
    assert "mps" not in runtime.rng_states(torch.device("cpu"))


def test_doctor_waits_for_the_mps_queue_before_reading_its_timings(monkeypatch):
    doctor = importlib.import_module("eva_api.doctor")  # the package's `doctor` is the function

    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    doctor._sync(torch.device("mps"))
    doctor._sync(torch.device("cpu"))
    assert waited == ["mps"]


def test_under_ddp_on_cpu_the_stop_flag_is_asked_every_step(monkeypatch):
    # torchrun SIGKILLs its workers 30 s after passing on a signal and a CPU step takes seconds: asking every
    # 25 steps, as on CUDA, would lose the unfinished epoch
    from eva_api import EpochState, Interrupted, StopRequest, engine

    class AfterFirstStep(StopRequest):
        asked = 0

        def check(self, device):
            self.asked += 1
            return self.asked > 1  # no at the epoch's start, yes from the first step on

    monkeypatch.setattr(engine, "dist_ready", lambda: True)  # the loop's view of a DDP group (gloo: CPU)
    data = make_synthetic(64, 16)
    model, state = TinyNet(), EpochState()
    with pytest.raises(Interrupted):
        train_one_epoch(model, TensorLoader(data.train, data.mean, data.std, 8, train=True),
                        Stepper(torch.optim.SGD(model.parameters(), lr=0.01)), criterion=F.cross_entropy,
                        precision=Precision("cpu", None), state=state, progress=False, stop=AfterFirstStep())
    assert state.batches == 1


def test_fp16_epoch_on_the_cpu_skips_and_counts_an_overflowing_step():
    data = make_synthetic(64, 16)
    train = TensorLoader(data.train, data.mean, data.std, 16, train=True)
    torch.manual_seed(0)
    model = TinyNet()
    precision = pick_precision(torch.device("cpu"), "fp16")
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.01), scaler=precision.make_scaler())
    calls = []

    def criterion(logits, y):  # the second batch's gradients overflow fp16's range
        calls.append(1)
        return F.cross_entropy(logits, y) * (1e30 if len(calls) == 2 else 1.0)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = train_one_epoch(model, train, stepper, criterion=criterion, precision=precision, progress=False)
    assert tr["skipped"] == 1 and len(calls) == 4
    assert stepper.scaler.get_scale() < 2.0**16  # halved once after the overflow
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the other steps applied


def test_fp16_run_saves_the_scaler_and_resumes_exactly(tmp_path, monkeypatch):
    from eva_api import Interrupted, load_checkpoint, make_config, train

    tiny = dict(model="tiny", dataset="synthetic", synthetic_train=96, synthetic_test=48, batch_size=32,
                progress=False, precision="fp16", gallery=4, epochs=2)
    whole = train(make_config("fast", **tiny), tmp_path / "whole")
    signal_at(monkeypatch, 2, 0)
    with pytest.raises(Interrupted):
        train(make_config("fast", **tiny), tmp_path / "cut")
    monkeypatch.undo()
    scaler = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    resumed = train(make_config("fast", **tiny), tmp_path / "cut", resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]
    assert strip(resumed.history) == strip(whole.history)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()))


def test_one_cycle_and_multistep_schedules():
    oc = LRSchedule("onecycle", total_steps=100, steps_per_epoch=25, warmup_pct=0.2, start=0.1)
    assert oc(0) == pytest.approx(0.1) and oc(20) == pytest.approx(1.0) and oc(100) == 0.0
    assert oc(60) == pytest.approx(0.5)
    ms = LRSchedule("multistep", total_steps=220, steps_per_epoch=10, milestones=(14, 18), gamma=0.1)
    assert ms(139) == 1.0 and ms(140) == pytest.approx(0.1) and ms(180) == pytest.approx(0.01)


def test_the_lr_finder_keeps_muons_multiplier_and_the_frozen_stem_at_zero():
    from eva_api import build_optimizer, get_model, make_config
    from eva_api.lr_finder import lr_find

    torch.manual_seed(0)
    model = get_model("tiny")
    optimizer = build_optimizer(model, make_config("fast", lr=0.5, muon_lr=0.05))  # Muon, frozen stem
    data = make_synthetic(8, 4)
    x, y = data.train.images.float() / 255, data.train.labels
    stem = model.conv1.weight.detach().clone()
    seen = []
    step = optimizer.step
    optimizer.step = lambda: (seen.append([g["lr"] for g in optimizer.param_groups]), step())
    result = lr_find(model, ListLoader([(x, y)] * 3), optimizer, steps=3, start_lr=1e-3, end_lr=1e-1)
    for lrs, base in zip(seen, result.lrs):  # decay, no-decay, Muon filters (0.1x), frozen stem
        assert lrs == [base, base, pytest.approx(0.1 * base), 0.0]
    assert torch.equal(model.conv1.weight, stem)


def test_seeded_cpu_runs_repeat_exactly():
    """A real short fit (shuffle, augmentation, SGD with momentum, BN) twice from the same seed."""
    def run():
        seed_everything(5)
        data = make_synthetic(64, 32)
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train = TensorLoader(data.train, data.mean, data.std, 16, train=True, seed=5, cutout_size=4)
        test = TensorLoader(data.test, data.mean, data.std, 32, train=False)
        hist = fit(model, train, test, opt, epochs=2, progress=False, verbose=False)
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in hist], model.state_dict()

    (h1, w1), (h2, w2) = run(), run()
    assert h1 == h2 and all(torch.equal(w1[k], w2[k]) for k in w1)
