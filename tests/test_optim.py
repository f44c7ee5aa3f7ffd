"""The Muon + SGD optimizer (eva_api.optim) and its place in build_optimizer."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from eva_api import ConfigError, build_optimizer, get_model, make_config
from eva_api.optim import Muon, Stepper, graph_fallback, ns_dtype_for, orthogonalize
from eva_api import optim, runtime
from eva_api.runtime import Precision, pick_precision


def test_orthogonalize_equalizes_the_singular_values():
    torch.manual_seed(0)
    g = torch.randn(64, 300) * torch.logspace(-3, 1, 300)  # singular values spread over ~4 decades
    for x in (g, g.T):
        s = torch.linalg.svdvals(orthogonalize(x).float())
        assert orthogonalize(x).shape == x.shape and s.min() > 0.4 and s.max() < 1.6


def test_groups_without_orthogonal_step_like_torch_sgd():
    """The same math; the last bit can differ (torch fuses ``param - lr * grad`` into one multiply-add)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 5))
    b = copy.deepcopy(a)
    groups = lambda m: [{"params": [m[0].weight, m[2].weight], "weight_decay": 5e-4},
                        {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0, "nesterov": False}]
    ours = Muon(groups(a), lr=0.1, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD(groups(b), lr=0.1, momentum=0.9, nesterov=True)
    for step in range(3):
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_an_orthogonal_group_rescales_the_weight_then_steps_by_the_orthogonalized_momentum(ns_dtype):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 3, 3, 3))
    opt = Muon([{"params": [w], "orthogonal": True, "momentum": 0.6}], lr=0.05, ns_dtype=ns_dtype)
    grads = [torch.randn_like(w) for _ in range(2)]
    expected, buf = w.detach().clone(), None
    for g in grads:
        buf = g.clone() if buf is None else 0.6 * buf + g
        expected = expected * math.sqrt(8) / expected.norm()
        expected = expected - 0.05 * orthogonalize((g + 0.6 * buf).reshape(8, -1), dtype=ns_dtype).view_as(w)
        w.grad = g
        opt.step()
    assert torch.allclose(w, expected, atol=1e-6)  # bf16 and fp32 steps differ by ~1e-3: the dtype is used
    assert w.detach().norm() == pytest.approx(math.sqrt(8), rel=0.1)  # rescaled each step; the step itself is small


def test_build_optimizer_gives_muon_the_conv_filters_only():
    model = get_model("resnet18")
    config = make_config("fast", muon_lr=0.04)  # the fast recipe uses Muon
    opt = build_optimizer(model, config)
    assert isinstance(opt, Muon)
    muon = next(g for g in opt.param_groups if g["orthogonal"])
    filters = [p for p in model.parameters() if p.ndim == 4 and p is not model.conv1.weight]  # stem frozen
    assert {id(p) for p in muon["params"]} == {id(p) for p in filters}
    assert muon["lr"] == 0.04 and muon["lr_scale"] == pytest.approx(0.04 / config.lr) and muon["momentum"] == config.muon_momentum
    sgd = build_optimizer(model, make_config("fast", optimizer="sgd"))
    assert isinstance(sgd, Muon) and not any(g["orthogonal"] for g in sgd.param_groups)
    with pytest.raises(ConfigError, match="choose one of sgd, muon"):
        make_config("fast", optimizer="adam")


def test_muon_orthogonalizes_in_bf16_only_where_the_run_computes_in_native_bf16(monkeypatch):
    # emulated bf16 (CPUs without AVX512-BF16/AMX, GPUs below sm80) made a fast epoch ~6 h on a 2-core AVX2 CPU
    model, config = get_model("resnet18"), make_config("fast")
    assert ns_dtype_for(Precision("cpu", torch.bfloat16)) is torch.bfloat16
    for precision in (Precision("cpu", None), Precision("cuda", torch.float16), None):
        assert ns_dtype_for(precision) is torch.float32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)  # --precision bf16 asked for on such a CPU
    asked = pick_precision(torch.device("cpu"), "bf16")
    assert asked.dtype is torch.bfloat16 and asked.emulated and ns_dtype_for(asked) is torch.float32
    bf16 = build_optimizer(model, config, Precision("cpu", torch.bfloat16))
    fp32 = build_optimizer(model, config, Precision("cpu", None))
    assert (bf16.ns_dtype, fp32.ns_dtype) == (torch.bfloat16, torch.float32)
    fp32.load_state_dict(bf16.state_dict())  # a checkpoint from a bf16 machine resumed on an fp32 one
    assert fp32.ns_dtype is torch.float32 and "ns_dtype" not in str(bf16.state_dict()["param_groups"])


def per_bank_step(params, bufs, lr, momentum, ns_dtype):
    """Muon as 0.2 stepped it, one bank at a time (the reference for the stacked step)."""
    for p, buf in zip(params, bufs):
        buf.mul_(momentum).add_(p.grad)
        g = p.grad.add(buf, alpha=momentum)
        p.mul_(math.sqrt(p.size(0)) / (p.norm() + 1e-12))
        p.add_(orthogonalize(g.reshape(len(g), -1), dtype=ns_dtype).view_as(p), alpha=-lr)


def conv_banks() -> list[nn.Parameter]:
    """Filter banks in three shapes, one wide bank alone, two of a kind, two tall 1x1 ones, channels_last."""
    torch.manual_seed(0)
    shapes = [(16, 8, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (32, 16, 1, 1), (32, 16, 1, 1)]
    return [nn.Parameter(torch.randn(s).contiguous(memory_format=torch.channels_last)) for s in shapes]


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("ns_dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_the_stacked_step_matches_the_per_bank_step(ns_dtype, tol, stack):
    """Stacking same-shape banks into one batched Newton-Schulz (GPUs), or not (CPUs), on memory-order
    (channels_last) views, changes only rounding (in bf16 a few units of bf16's 2^-8 resolution)."""
    banks = conv_banks()
    ref = [p.detach().clone() for p in banks]
    bufs = [torch.zeros_like(r) for r in ref]
    opt = Muon([{"params": banks, "orthogonal": True}], lr=0.03, momentum=0.9, ns_dtype=ns_dtype, stack=stack)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) for p in banks]
        for p, r, grad in zip(banks, ref, grads):
            p.grad, r.grad = grad.contiguous(memory_format=torch.channels_last), grad
        opt.step()
        per_bank_step(ref, bufs, 0.03, 0.9, ns_dtype)
    for p, r in zip(banks, ref):
        assert p.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=tol * r.abs().max().item())


class ComputeOps(TorchDispatchMode):
    """Counts the compute ops dispatched (a kernel launch each on a GPU); views launch nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.__name__.startswith("_unsafe_view") or func.namespace == "profiler"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_fast_optimizer_step_dispatches_few_ops():
    """On a GPU each op is a launch from Python and the ResNet18 step at batch 64 is launch-bound: 0.2's
    per-bank Muon dispatched 913 ops per optimizer step, the stacked foreach one 175 (this count, taken
    on the meta device, which runs no arithmetic, with the bf16 Newton-Schulz of a bf16 GPU run)."""
    model = get_model("resnet18").to("meta").to(memory_format=torch.channels_last)
    opt = build_optimizer(model, make_config("fast"), Precision("cuda", torch.bfloat16))
    for step in range(2):  # the first step creates the momentum buffers
        opt.zero_grad()
        model(torch.randn(2, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)).sum().backward()
        with ComputeOps() as ops:
            opt.step()
    assert ops.count <= 200, ops.count


def run_steps(cuda_graph: bool, sizes: list[int], reload_at: int = -1):
    """Steps of the tiny model with Muon, a per-step schedule and label smoothing on batches of ``sizes``
    (before step ``reload_at`` the stepper's state is saved and loaded back, as a resume or an LR finder does)."""
    torch.manual_seed(0)
    model = get_model("tiny").to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, make_config("fast"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    stepper = Stepper(optimizer, scheduler, cuda_graph=cuda_graph)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i, n in enumerate(sizes):
        if i == reload_at:
            stepper.load_state_dict(copy.deepcopy(stepper.state_dict()))
        x = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (n,), generator=g)
        loss, logits = stepper.train_step(model, x, y, criterion, Precision("cpu", None))
        losses.append((loss.item(), logits.sum().item()))
    return model, stepper, losses


def test_the_static_step_is_the_eager_step_on_fixed_buffers():
    """What a CUDA graph replays, run eagerly on the CPU: after 3 warm-up steps of a shape its steps go
    through the static buffers; the LR schedule, the momentum and a partial batch in between (eager)
    give the same weights and outputs, bit for bit, as plain eager steps."""
    sizes = [8, 8, 8, 8, 5, 8, 8, 5, 8, 5, 5, 8]
    eager_model, _, eager = run_steps(False, sizes)
    static_model, stepper, static = run_steps(True, sizes)
    assert [s.x.shape[0] for s in stepper._static.values()] == [8]  # the partial batch 5 (4 times) stays eager
    assert static == eager
    for p, q in zip(static_model.state_dict().values(), eager_model.state_dict().values()):
        assert torch.equal(p, q)


def test_a_cuda_graph_needs_device_lrs_and_no_scaler():
    model = get_model("tiny")
    with pytest.raises(ValueError, match="device LRs"):
        Stepper(torch.optim.SGD(model.parameters(), lr=0.1), cuda_graph=True)
    with pytest.raises(ValueError, match="GradScaler"):
        Stepper(build_optimizer(model, make_config("fast")), scaler=torch.amp.GradScaler("cpu"), cuda_graph=True)
    assert graph_fallback(Precision("cuda", torch.float16), False, False).startswith("fp16")
    assert "DDP" in graph_fallback(Precision("cuda", torch.bfloat16), True, False)
    assert graph_fallback(Precision("cuda", torch.bfloat16), False, False) is None


def test_a_loaded_state_is_captured_anew(monkeypatch):
    """Loading a state replaces the momentum buffers and LR tensors a captured step holds (a resume, the LR
    finder's restore): the next steps warm up and capture again, and still match plain eager steps."""
    captures = []

    class Counted(optim.StaticStep):
        def __init__(self, *args, **kwargs):
            captures.append(args[3].shape[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optim, "StaticStep", Counted)
    sizes = [8] * 10
    _, _, eager = run_steps(False, sizes, reload_at=6)
    _, stepper, static = run_steps(True, sizes, reload_at=6)
    assert static == eager
    assert captures == [8, 8]  # at step 4, and at step 10: 3 warm-up steps after the reload


def test_the_warm_up_cannot_be_skipped():
    with pytest.raises(ValueError, match="warmup"):
        Stepper(build_optimizer(get_model("tiny"), make_config("fast")), cuda_graph=True, warmup=0)
