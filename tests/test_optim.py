"""The Muon + SGD optimizer (eva_api.optim) and its place in build_optimizer."""
import copy
import math

import pytest
import torch
from torch import nn

from eva_api import ConfigError, build_optimizer, get_model, make_config
from eva_api.optim import Muon, ns_dtype_for, orthogonalize
from eva_api import runtime
from eva_api.runtime import Precision, pick_precision


def test_orthogonalize_equalizes_the_singular_values():
    torch.manual_seed(0)
    g = torch.randn(64, 300) * torch.logspace(-3, 1, 300)  # singular values spread over ~4 decades
    for x in (g, g.T):
        s = torch.linalg.svdvals(orthogonalize(x).float())
        assert orthogonalize(x).shape == x.shape and s.min() > 0.4 and s.max() < 1.6


def test_groups_without_orthogonal_step_exactly_like_torch_sgd():
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
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


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
    assert type(build_optimizer(model, make_config("fast", optimizer="sgd"))) is torch.optim.SGD
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
