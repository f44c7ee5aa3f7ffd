"""The LR range test's suggestion rule (on synthetic curves, no model), its short-sweep warning, its plot and
the CLI line that names the rule."""
import math
import warnings

import pytest
import torch
from torch import nn

from eva_api import cli
from eva_api.lr_finder import MIN_TRUSTED_POINTS, SUGGESTION_RULE, LRFinderResult, lr_find, suggest_lr


def diverging_curve(n: int = 200) -> tuple[list[float], list[float]]:
    """Smoothed loss vs LR (1e-5..10) as a real sweep draws it when the weights blow up: flat, a descent from
    1e-3 to its minimum at 10**-1.5, a divergence to 3.5 at 10**-0.7, then a steep collapse back to 2.3."""
    lrs = [1e-5 * 1e6 ** (i / (n - 1)) for i in range(n)]
    losses = []
    for lr in lrs:
        x = math.log10(lr)
        if x < -3:
            y = 2.3
        elif x < -1.5:
            y = 2.3 - 1.3 * (1 - math.cos(math.pi * (x + 3) / 1.5)) / 2
        elif x < -0.7:
            y = 1.0 + 2.5 * ((x + 1.5) / 0.8) ** 2
        elif x < 0:
            y = 3.5 - 1.2 * (x + 0.7) / 0.7  # steeper than the descent: the old steepest-slope rule picked it
        else:
            y = 2.3
        losses.append(y)
    return lrs, losses


def test_the_suggestion_comes_from_the_descent_before_the_minimum_not_the_collapse_after_it():
    lrs, smoothed = diverging_curve()
    lr_at_min = lrs[smoothed.index(min(smoothed))]
    lr = suggest_lr(lrs, smoothed)
    assert 1e-3 < lr < lr_at_min
    assert math.log10(lr) == pytest.approx(-3 + 2 / 3 * 1.5, abs=0.05)  # two-thirds of the way down, in log LR


def test_what_follows_a_blow_up_to_nan_is_ignored():
    lrs, smoothed = diverging_curve()
    cut = smoothed.index(min(smoothed)) + 10
    tail = [float("nan")] + [0.1] * (len(lrs) - cut - 1)  # "recovered" below the minimum after a NaN
    assert suggest_lr(lrs, smoothed[:cut] + tail) == suggest_lr(lrs, smoothed)


def test_too_few_finite_points_give_no_suggestion():
    assert math.isnan(suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [2.3, 2.0, 1.5, 1.2]))
    assert math.isnan(suggest_lr([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], [2.3, 2.0, 1.5, float("inf"), 1.0, 0.5]))


def test_the_plot_shows_the_suggested_point_on_the_curve_and_the_curve_up_to_its_minimum():
    import matplotlib.pyplot as plt

    lrs, smoothed = diverging_curve()
    result = LRFinderResult(lrs, smoothed, smoothed, suggest_lr(lrs, smoothed))
    fig = result.plot(title="SYNTHETIC data - LR range test")
    try:
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        assert all(lo <= s <= hi for s in smoothed[:smoothed.index(min(smoothed)) + 1])
        dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert len(dots) == 1 and dots[0].get_xdata()[0] == result.suggestion
        y = dots[0].get_ydata()[0]
        assert y == smoothed[lrs.index(result.suggestion)] and lo <= y <= hi
        assert "valley" in dots[0].get_label() and ax.get_title() == "SYNTHETIC data - LR range test"
    finally:
        plt.close(fig)


def _linear_sweep(steps: int, **kw) -> LRFinderResult:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = nn.Linear(4, 3)
    return lr_find(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), steps=steps, **kw)


def test_a_sweep_shorter_than_the_trusted_length_warns_once():
    with pytest.warns(UserWarning, match=rf"only 10 points recorded \(10 steps requested\).*fewer than "
                                         rf"{MIN_TRUSTED_POINTS}") as record:
        _linear_sweep(10, start_lr=1e-4, end_lr=1e-2)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _linear_sweep(MIN_TRUSTED_POINTS, start_lr=1e-4, end_lr=1e-2)
    assert len(result.lrs) == MIN_TRUSTED_POINTS


def test_an_empty_loader_is_one_error_not_an_endless_loop():
    from eva_api import ConfigError

    model = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="yields no batches"):
        lr_find(model, [], torch.optim.SGD(model.parameters(), lr=0.1), steps=5)


def test_the_cli_names_the_rule_and_warns_about_a_short_sweep(tmp_path, capsys):
    args = ["lr-find", "--model", "tiny", "--out", str(tmp_path), "--steps", "12", "--dataset", "synthetic",
            "--synthetic-train", "64", "--synthetic-test", "32", "--batch-size", "32", "--no-progress"]
    with pytest.warns(UserWarning, match="only 12 points recorded"):
        assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "suggested lr: " in out and SUGGESTION_RULE in out and (tmp_path / "lr_find.png").is_file()
