import pytest
import torch
import torch.nn.functional as F

from eva_api import ConfigError, count_parameters, get_model, make_synthetic
from eva_api.loaders import normalize
from eva_api.whitening import whiten_stem_


@pytest.fixture(scope="module")
def data():
    return make_synthetic(120, 10)


def test_whitened_stem_decorrelates_the_training_patches(data):
    torch.manual_seed(0)
    model = get_model("resnet18")
    before = model.conv1.weight.detach().clone()
    whiten_stem_(model, data.train.images, data.mean, data.std, eps=1e-8)
    w = model.conv1.weight.detach()
    d = 27  # 3 channels x 3 x 3
    out = F.conv2d(normalize(data.train.images, data.mean, data.std), w[:d])  # same patches, no padding
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(d, -1))
    assert torch.allclose(cov, torch.eye(d), atol=1e-2)
    assert torch.equal(w[d : 2 * d], -w[:d])  # both signs survive the ReLU
    assert torch.equal(w[2 * d :], before[2 * d :])  # the rest keep their random init
    assert count_parameters(model) == 11_173_962 and model.conv1.weight.requires_grad


def test_whitening_reads_images_from_every_class_not_just_the_first_folder(data):
    order = torch.argsort(data.train.labels, stable=True)  # as an ImageFolder lists them
    a, b = get_model("resnet18"), get_model("resnet18")
    whiten_stem_(a, data.train.images[order], data.mean, data.std, max_images=30)
    whiten_stem_(b, data.train.images[order][:30], data.mean, data.std, max_images=30)
    assert not torch.allclose(a.conv1.weight[:27], b.conv1.weight[:27])


def test_a_stem_too_narrow_for_the_basis_is_refused(data):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU())
    with pytest.raises(ConfigError, match=">= 54 stem filters"):
        whiten_stem_(model, data.train.images, data.mean, data.std)


def test_the_whiten_init_flag_whitens_the_stem_of_a_new_run_only(monkeypatch, tmp_path):
    from eva_api import make_config, runner, train

    calls = []
    monkeypatch.setattr(runner, "whiten_stem_", lambda model, images, mean, std: calls.append(len(images)))
    tiny = dict(model="tiny", dataset="synthetic", synthetic_train=64, synthetic_test=32, batch_size=32,
                progress=False, precision="fp32", gallery=0, tta=False)
    train(make_config("fast", epochs=1, whiten_init=True, **tiny), tmp_path)
    assert calls == [64]
    train(make_config("fast", epochs=1, whiten_init=True, **tiny), tmp_path, resume=True)
    assert calls == [64]  # a resumed run keeps its trained stem
    train(make_config("fast", epochs=1, whiten_init=False, **tiny), None)
    assert calls == [64]


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_stem_keeps_the_stem_weights_and_trains_the_rest(data, freeze):
    from eva_api import build_optimizer, build_scheduler, make_config

    torch.manual_seed(0)
    model = get_model("resnet18")
    config = make_config("fast", freeze_stem=freeze, lr=0.5)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=2)
    stem, head = model.conv1.weight.detach().clone(), model.linear.weight.detach().clone()
    x = normalize(data.train.images[:16], data.mean, data.std)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), data.train.labels[:16]).backward()
        optimizer.step()
        scheduler.step()
    assert torch.equal(model.conv1.weight, stem) == freeze
    assert not torch.equal(model.linear.weight, head)
    assert count_parameters(model) == 11_173_962  # frozen by the optimizer, still a parameter
