
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TinyNet
from eva_api import (History, Precision, TensorLoader, TrainingError, evaluate, fit, format_test_line, make_synthetic,
                     pick_precision, seed_everything, train_one_epoch)
from eva_api.runner import LRSchedule


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


def test_tta_with_the_identity_view_equals_plain_evaluation():
    data = make_synthetic(64, 64)
    loader = TensorLoader(data.test, data.mean, data.std, 16, train=False)
    model = TinyNet().eval()
    m = evaluate(model, loader, tta=[lambda x: x])
    assert m["acc_tta"] == m["acc"]
    flip = evaluate(model, loader, tta=True)
    assert "acc_tta" in flip and flip["acc"] == m["acc"]


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


def test_precision_choice():
    assert pick_precision(torch.device("cpu"), "fp32").dtype is None
    assert pick_precision(torch.device("cpu"), "bf16").dtype is torch.bfloat16
    assert pick_precision(torch.device("cpu"), "auto").name in ("bf16", "fp32")
    with pytest.raises(Exception, match="GPUs"):
        pick_precision(torch.device("cpu"), "fp16")


def test_one_cycle_and_multistep_schedules():
    oc = LRSchedule("onecycle", total_steps=100, steps_per_epoch=25, warmup_pct=0.2, start=0.1)
    assert oc(0) == pytest.approx(0.1) and oc(20) == pytest.approx(1.0) and oc(100) == 0.0
    assert oc(60) == pytest.approx(0.5)
    ms = LRSchedule("multistep", total_steps=220, steps_per_epoch=10, milestones=(14, 18), gamma=0.1)
    assert ms(139) == 1.0 and ms(140) == pytest.approx(0.1) and ms(180) == pytest.approx(0.01)


def test_frozen_bn_scales_and_a_higher_bn_bias_lr_in_training_and_in_the_lr_finder():
    from eva_api import build_optimizer, build_scheduler, count_parameters, get_model, make_config
    from eva_api.lr_finder import lr_find

    torch.manual_seed(0)
    model = get_model("resnet18")
    config = make_config("fast", optimizer="sgd", freeze_bn_scale=True, bn_bias_lr=8.0, lr=0.5, momentum=0.0)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=2)
    bn = model.bn1
    bias_group = next(g for g in optimizer.param_groups if g.get("lr_scale"))
    assert any(p is bn.bias for p in bias_group["params"]) and bias_group["weight_decay"] == 0
    assert bias_group["lr"] == pytest.approx(8 * optimizer.param_groups[0]["lr"])
    data = make_synthetic(8, 4)
    x, y = data.train.images.float() / 255, data.train.labels
    bias = bn.bias.detach().clone()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad, lr = bn.bias.grad.clone(), bias_group["lr"]
    optimizer.step()
    scheduler.step()
    assert torch.allclose(bn.bias, bias - lr * grad)  # plain SGD (momentum 0) at 8x the LR
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))
    assert count_parameters(model) == 11_173_962  # frozen by the optimizer, still parameters

    seen = []
    step = optimizer.step
    optimizer.step = lambda: (seen.append([g["lr"] for g in optimizer.param_groups]), step())
    result = lr_find(model, ListLoader([(x, y)] * 3), optimizer, steps=3, start_lr=1e-3, end_lr=1e-1)
    for lrs, base in zip(seen, result.lrs):  # the sweep keeps the multiplier and the frozen LR 0
        assert lrs == [base, base, pytest.approx(8 * base), 0.0]


def test_seeded_cpu_runs_repeat_exactly():
    def run():
        seed_everything(5)
        m = TinyNet()
        return m(torch.randn(2, 3, 8, 8))

    assert torch.equal(run(), run())
