"""Grad-CAM, LR finder, interpretation report, TTA and predict, on data the tests make."""
import copy

import pytest
import torch
from torch import nn

from conftest import TinyNet
from eva_api import TensorLoader, fit, seed_everything
from eva_api.data import ImageData, channel_stats, synthetic_split
from eva_api.interpret import grad_cam
from eva_api.metrics import classification_report, most_confused, top_losses
from eva_api.lr_finder import lr_find
from eva_api import predict


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained on the synthetic set, whose only discriminative pixels are a coloured patch."""
    seed_everything(0)
    train, _ = synthetic_split(480, num_classes=4, seed=0)
    test, boxes = synthetic_split(64, num_classes=4, seed=1)
    mean, std = channel_stats(train.images)
    data = ImageData(train, test, ["a", "b", "c", "d"], mean, std, "synthetic")
    model = TinyNet(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hist = fit(model, TensorLoader(train, mean, std, 32, train=True), TensorLoader(test, mean, std, 64, train=False),
               opt, epochs=4, progress=False, verbose=False)
    assert hist[-1]["test_acc"] > 80
    return model, data, boxes


def test_grad_cam_maps_are_image_sized_in_unit_range_and_find_the_patch(trained):
    model, data, boxes = trained
    x = next(iter(TensorLoader(data.test, data.mean, data.std, 64, train=False)))[0]
    cams, logits = grad_cam(model, x)
    assert cams.shape == (64, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    inside, outside = [], []
    for cam, (top, left) in zip(cams, boxes.tolist()):
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[max(0, top - 2):top + 10, max(0, left - 2):left + 10] = True  # the 8x8 patch and a 2-px rim
        inside.append(cam[mask].mean())
        outside.append(cam[~mask].mean())
    inside, outside = torch.stack(inside), torch.stack(outside)
    assert (inside > outside).float().mean() > 0.8 and inside.mean() > 2 * outside.mean()


def test_grad_cam_for_a_chosen_class(trained):
    model, data, _ = trained
    x = next(iter(TensorLoader(data.test, data.mean, data.std, 8, train=False)))[0]
    cams, _ = grad_cam(model, x, target=2)
    assert cams.shape == (8, 32, 32)


def test_lr_finder_restores_weights_and_optimizer_bit_for_bit(trained):
    model, data, _ = trained
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = TensorLoader(data.train, data.mean, data.std, 32, train=True)
    for x, y in loader:  # give the optimizer some momentum state first
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        break
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    result = lr_find(model, loader, opt, steps=40, start_lr=1e-4, end_lr=10)
    assert len(result.lrs) > 5 and result.lrs == sorted(result.lrs) and result.suggestion > 0
    after = model.state_dict()
    assert all(torch.equal(before_model[k], after[k]) for k in before_model)
    after_opt = opt.state_dict()
    assert after_opt["param_groups"] == before_opt["param_groups"]
    for k, st in before_opt["state"].items():
        assert all(torch.equal(st[n], after_opt["state"][k][n]) for n in st)
    assert torch.equal(rng, torch.get_rng_state())


def test_report_matches_a_hand_computation():
    cm = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    rep = classification_report(cm, ["x", "y", "z"])
    assert rep["x"]["precision"] == pytest.approx(5 / 7) and rep["x"]["recall"] == pytest.approx(5 / 6)
    assert rep["y"]["precision"] == pytest.approx(3 / 4) and rep["y"]["recall"] == pytest.approx(3 / 6)
    assert rep["z"]["precision"] == pytest.approx(4 / 5) and rep["z"]["recall"] == pytest.approx(1.0)
    p, r = 3 / 4, 1 / 2
    assert rep["y"]["f1"] == pytest.approx(2 * p * r / (p + r)) and rep["y"]["support"] == 6
    assert rep["accuracy"]["value"] == pytest.approx(12 / 16)
    assert rep["macro avg"]["recall"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert most_confused(cm, ["x", "y", "z"]) == [("y", "x", 2), ("x", "y", 1), ("y", "z", 1)]


def test_top_losses_are_sorted_and_describe_the_mistakes():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    tops = top_losses(logits, labels, ["cat", "dog"], k=2)
    assert [t.index for t in tops] == [1, 2] and tops[0].actual == "cat" and tops[0].predicted == "dog"
    assert tops[0].loss > tops[1].loss and 0.5 < tops[0].probability <= 1


def test_predict_takes_any_size_or_mode(trained, tmp_path):
    from PIL import Image

    model, data, _ = trained
    paths = [tmp_path / "big.png", tmp_path / "grey.jpg"]
    Image.fromarray(data.test.images[0].permute(1, 2, 0).numpy()).resize((97, 61)).save(paths[0])
    Image.new("L", (20, 20), 128).save(paths[1])
    out = predict(model, paths, classes=data.classes, mean=data.mean, std=data.std)
    assert len(out) == 2 and all(len(o) == 3 for o in out)
    probs = [p for _, p in out[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    single = predict(model, data.test.images[0], classes=data.classes, mean=data.mean, std=data.std, top=1)
    assert single[0][0][0] == data.classes[int(data.test.labels[0])]
