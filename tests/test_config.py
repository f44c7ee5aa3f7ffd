import pytest

from eva_api import ConfigError, make_config, parse_overrides


def test_recipes_hold_the_course_settings():
    s8 = make_config("s8")
    assert (s8.batch_size, s8.lr, s8.momentum, s8.weight_decay, s8.epochs) == (64, 0.01, 0.9, 1e-3, 22)
    assert s8.schedule == "multistep" and s8.milestones == (14, 18) and s8.gamma == 0.1 and s8.dropout > 0
    fast = make_config("fast")
    assert fast.schedule == "onecycle" and fast.loader == "tensor" and fast.label_smoothing > 0
    assert fast.whiten_init and fast.freeze_stem and fast.crop_padding == 2
    assert fast.optimizer == "muon" and fast.muon_lr == 0.03 and fast.muon_momentum == 0.9


def test_cli_overrides_are_typed():
    c = make_config("fast", **parse_overrides(["--epochs", "5", "--lr=0.05", "--no-tta", "--milestones", "3,4",
                                               "--channels-last", "--batch-size", "64"]))
    assert (c.epochs, c.lr, c.tta, c.milestones, c.channels_last, c.batch_size) == (5, 0.05, False, (3, 4), True, 64)


@pytest.mark.parametrize("args,match", [
    (["--epoch", "3"], r"unknown option --epoch \(did you mean --epochs\?\); valid options: --recipe, .*--batch-size"),
    (["--epochs", "three"], "expected int"),
    (["--lr", "fast"], "expected float"),
    (["--tta", "maybe"], "expected bool"),
    (["--precision", "fp8"], "choose one of auto, bf16, fp16, fp32"),
    (["--epochs", "0"], ">= 1"),
    (["--crop-padding", "-1"], r"crop_padding: must be in \[0, 16\]"),
    (["--muon-lr", "0"], "muon_lr: must be > 0"),
    (["--label-smoothing", "1.5"], r"label_smoothing: must be in \[0, 1\)"),
    (["--momentum", "-0.1"], r"momentum: must be in \[0, 1\)"),
    (["--weight-decay", "-1"], "weight_decay: must be >= 0"),
    (["--num-workers", "-1"], "num_workers: must be >= 0"),
    (["--gallery", "-1"], "gallery: must be >= 0"),
    (["--cutout", "-4"], "cutout: must be >= 0"),
    (["--warmup-pct", "1.5"], r"warmup_pct: must be in \[0, 1\]"),
    (["--ema", "0.99"], "unknown option --ema"),
    (["--lr"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_keys_and_values_are_refused_with_the_valid_ones(args, match):
    with pytest.raises(ConfigError, match=match):
        make_config("fast", **parse_overrides(args))


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="s8, fast"):
        make_config("slow")


def test_linear_lr_scaling_is_explicit():
    c = make_config("fast", lr=0.1, batch_size=512, base_batch_size=128, lr_scaling="linear")
    assert c.effective_lr() == pytest.approx(0.4)
    assert make_config("fast", lr=0.1, batch_size=512).effective_lr() == pytest.approx(0.1)


@pytest.mark.parametrize("typed,meant", [("--epoch", "--epochs"), ("--batchsize", "--batch-size"),
                                         ("--label_smooth", "--label-smoothing"), ("--no-ttaa", "--no-tta")])
def test_an_unknown_option_suggests_the_closest_one_dashed(typed, meant):
    with pytest.raises(ConfigError, match=rf"unknown option {typed.replace('_', '-')} \(did you mean {meant}\?\)"):
        parse_overrides([typed, "1"])


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(ConfigError) as e:
        parse_overrides(["--ema", "0.99"])  # a retired switch: not "did you mean --gamma"
    assert str(e.value).startswith("unknown option --ema; valid options: --recipe, --dataset")
