"""The command line end to end on synthetic data (the tiny test model through tests/tiny_cli.py, the real
``python -m eva_api`` where ResNet18 matters), and its one-line errors (exit 2, no traceback)."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_imagefolder

SMOKE = ["--dataset", "synthetic", "--synthetic-train", "96", "--synthetic-test", "48", "--batch-size", "32",
         "--gallery", "8", "--no-progress"]


def cli(*args, timeout=600, tiny=True):
    entry = [str(REPO / "tests" / "tiny_cli.py")] if tiny else ["-m", "eva_api"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = cli("train", "--recipe", "fast", "--model", "tiny", "--epochs", "1", "--out", out, *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC data" in proc.stdout and "Test set: Average loss:" in proc.stdout
    return out


def test_train_produces_every_artifact(run_dir):
    for name in ("config.json", "history.json", "metrics.json", "checkpoint.pt", "curves.png", "misclassified.png",
                 "confusion_matrix.png"):
        assert (run_dir / name).stat().st_size > 0, name


def test_rerun_into_an_existing_run_needs_resume(run_dir):
    proc = cli("train", "--recipe", "fast", "--model", "tiny", "--epochs", "1", "--out", run_dir, *SMOKE)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_resume_keeps_the_saved_settings_and_refuses_changed_ones(run_dir):
    same = cli("train", "--out", run_dir, "--resume", "--no-progress", "--num-workers", "0")
    assert same.returncode == 0, same.stderr[-2000:]  # runtime options may change; nothing left to train
    changed = cli("train", "--out", run_dir, "--resume", "--precision", "fp32", "--lr", "0.3")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "precision: 'auto' -> 'fp32'" in changed.stderr and "lr: 0.1 -> 0.3" in changed.stderr
    other = cli("train", "--out", run_dir, "--resume", "--recipe", "s8")
    assert other.returncode == 2 and "uses recipe 'fast', not 's8'" in other.stderr


def test_resume_from_a_checkpoint_path_continues_in_its_own_folder(run_dir, tmp_path, monkeypatch):
    # it went to runs/<recipe> before, overwriting whatever run was there
    import shutil
    import types

    from eva_api import CheckpointError, cli as cli_module, runner, train
    from eva_api.runner import resume_config

    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", elsewhere / "checkpoint.pt")
    seen = []
    with monkeypatch.context() as m:
        m.setattr(runner, "train", lambda config, out, **kw: seen.append(out) or types.SimpleNamespace(metrics=None))
        assert cli_module.main(["train", "--resume", str(elsewhere / "checkpoint.pt")]) == 0
    assert seen == [elsewhere]
    with pytest.raises(CheckpointError, match="holds another checkpoint"):  # the library refuses it too
        train(resume_config(elsewhere / "checkpoint.pt"), run_dir, resume=elsewhere / "checkpoint.pt")


def test_evaluate_warns_in_one_line_when_class_names_differ(run_dir, tmp_path):
    folder = write_imagefolder(tmp_path / "digits", n_per_class=2, classes=[str(i) for i in range(10)])
    ev = cli("evaluate", "--checkpoint", run_dir / "checkpoint.pt", "--data", folder, "--no-download")
    assert ev.returncode == 0, ev.stderr
    warned = [line for line in ev.stderr.splitlines() if "class names differ" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), ev.stderr  # not Python's two-line format
    assert "data/checkpoint: 0/airplane, 1/automobile, 2/bird, ...); labels are matched by position" in warned[0]


def test_evaluate_predict_interpret(run_dir, tmp_path):
    ev = cli("evaluate", "--checkpoint", run_dir / "checkpoint.pt", "--dataset", "synthetic")
    assert ev.returncode == 0, ev.stderr
    assert "SYNTHETIC data" in ev.stdout and "Test set: Average loss:" in ev.stdout and "flip TTA" in ev.stdout
    assert "class names differ" not in ev.stderr
    from PIL import Image

    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "mine.png")
    pr = cli("predict", "--checkpoint", run_dir / "checkpoint.pt", tmp_path / "mine.png")
    assert pr.returncode == 0 and pr.stdout.count(",") == 2, pr.stderr
    it = cli("interpret", "--checkpoint", run_dir / "checkpoint.pt", "--dataset", "synthetic", "--out", tmp_path / "i",
             "--n", "4")
    assert it.returncode == 0, it.stderr
    for name in ("gradcam_misclassified.png", "gradcam_class_airplane.png", "confusion_matrix.png", "top_losses.png",
                 "report.txt", "report.json"):
        assert (tmp_path / "i" / name).is_file(), name


def test_lr_find_writes_its_plot(tmp_path):
    proc = cli("lr-find", "--model", "tiny", "--out", tmp_path, "--steps", "12", *SMOKE)
    assert proc.returncode == 0, proc.stderr
    assert "suggested lr" in proc.stdout and (tmp_path / "lr_find.png").is_file()


def test_summary_shows_the_parameter_count():
    proc = cli("summary", tiny=False)
    assert proc.returncode == 0 and "Total params: 11,173,962" in proc.stdout


def _bad_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "ds")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


@pytest.mark.parametrize("args,match", [
    (["train", "--recipe", "nope"], "unknown recipe"),
    (["train", "--epochz", "3"], "unknown option --epochz"),
    (["train", "--lr", "abc"], "bad value 'abc' for lr"),
    (["train", "--data", "/no/such/dir", "--no-download"], "/no/such/dir"),
    (["train", "--data", "{bad}", "--no-download", "--out", "{tmp}/r"], "unreadable image"),
    (["evaluate", "--checkpoint", "{tmp}/missing.pt"], "no such checkpoint"),
    (["evaluate", "--checkpoint", "{tmp}/trunc.pt", "--dataset", "synthetic"], "truncated or corrupt"),
    (["evaluate", "--checkpoint", "{tmp}/empty.pt", "--dataset", "synthetic"], "empty file"),
    (["evaluate", "--checkpoint", "{tmp}/evil.pt", "--dataset", "synthetic"], "refused: loading it needs arbitrary"),
    (["evaluate", "--checkpoint", "{readme}", "--dataset", "synthetic"],
     "README.md: not a checkpoint (not a file written by torch.save)"),  # was "refused ... pass --trust-checkpoint"
    (["evaluate", "--checkpoint", "{ckpt}", "--data", "{tmp}/no/such", "--no-download"],
     "no/such: no such folder and download is off"),
    (["evaluate", "--checkpoint", "{ckpt}", "--data", "{split}"], "if it is one split, point --data at its parent"),
    (["train", "--epoch", "3"], "unknown option --epoch (did you mean --epochs?)"),
    (["predict", "--checkpoint", "{tmp}/evil.pt", "{tmp}/nope.png"], "Nothing in it was run"),
    (["evaluate", "--checkpoint", "{tmp}/other.pt", "--dataset", "synthetic"], "weights do not fit resnet18"),
    (["predict", "--checkpoint", "{ckpt}", "{tmp}/nope.png"], "no such image"),
    (["predict", "--checkpoint", "{ckpt}", "--top", "0", "{tmp}/nope.png"], "for top: must be >= 1"),
    (["evaluate", "--checkpoint", "{ckpt}", "--batch-size", "0"], "for --batch-size: must be >= 1"),
    (["train", "--label-smoothing", "1.5"], "label_smoothing: must be in [0, 1)"),
    (["train", "--model", "tiny", "--out", "{tmp}/empty.pt", *SMOKE], "is a file, not a folder"),
    (["lr-find", "--out", "{tmp}/lr", "--start-lr", "0"], "needs 0 < start-lr < end-lr"),
    (["lr-find", "--model", "tiny", "--out", "{tmp}/empty.pt", *SMOKE], "is a file, not a folder"),
    (["interpret", "--checkpoint", "{ckpt}", "--out", "{tmp}/empty.pt"], "is a file, not a folder"),
    (["interpret", "--checkpoint", "{ckpt}", "--out", "{tmp}/empty.pt/sub"], "empty.pt is a file"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, match, tmp_path, run_dir):
    (tmp_path / "trunc.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:3000])
    (tmp_path / "empty.pt").write_bytes(b"")
    _evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    other = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # the tiny model's weights, labelled resnet18
    other["config"]["model"] = "resnet18"
    torch.save(other, tmp_path / "other.pt")
    fill = {"{tmp}": str(tmp_path), "{ckpt}": str(run_dir / "checkpoint.pt"), "{readme}": str(REPO / "README.md")}
    if "{bad}" in args:
        fill["{bad}"] = str(_bad_imagefolder(tmp_path))
    if "{split}" in args:
        fill["{split}"] = str(write_imagefolder(tmp_path / "ds") / "test")
    args = [a.format(**{k.strip("{}"): v for k, v in fill.items()}) if "{" in a else a for a in args]
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and match in errors[0]
    assert not (tmp_path / "pwned").exists()  # the malicious file's code never ran
    assert not (tmp_path / "no").exists()  # a mistyped --data creates nothing


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what an attacker's pickle does: call a function of its choice while loading
        return (open, (self.marker, "w"))


def _evil_checkpoint(path, marker):
    """A checkpoint-shaped file whose unpickling would create ``marker`` (a stand-in for any code)."""
    torch.save({"model": {}, "config": {"model": "resnet18"}, "hook": _Payload(marker)}, path)
    assert not marker.exists()


def test_trust_checkpoint_reads_an_old_pickled_checkpoint(run_dir, tmp_path):
    old = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    old["format_version"] = 1
    import numpy as np  # earlier versions pickled numpy's RNG state: not loadable with weights_only

    old["rng"] = {"python": __import__("random").getstate(), "torch": torch.get_rng_state(),
                  "numpy": np.random.get_state()}
    old["config"]["ema"] = 0.0  # a retired switch
    torch.save(old, tmp_path / "old.pt")
    refused = cli("evaluate", "--checkpoint", tmp_path / "old.pt", "--dataset", "synthetic")
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr
    trusted = cli("evaluate", "--checkpoint", tmp_path / "old.pt", "--dataset", "synthetic", "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "ignoring config keys from an earlier eva_api version: ema" in trusted.stderr


def test_doctor_passes_here():
    proc = cli("doctor", tiny=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for line in ("torch:", "torchvision:", "CUDA:", "cuDNN:", "device:", "precision (auto):", "the fast recipe's Muon orthogonalizes in ", "PASS setup:", "PASS train:",
                 "PASS evaluate:", "PASS checkpoint:", "all checks passed"):
        assert line in proc.stdout, line
    line = next(x for x in proc.stdout.splitlines() if x.startswith("precision (auto):"))
    chosen, ns = line.split(":")[1].split(",")[0].strip(), line.rsplit(" ", 1)[1]
    assert ns == ("bf16" if chosen == "bf16" else "fp32"), line  # Muon follows the precision


def test_unknown_subcommand_flag_exits_2():
    proc = cli("summary", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_predict_reports_each_bad_file_on_its_own_line_and_predicts_the_rest(run_dir, tmp_path, monkeypatch, capsys):
    # one unreadable file used to abort the batch, a too large one ended in a traceback, a folder was no argument
    from PIL import Image

    from eva_api import cli as cli_module

    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        Image.new("RGB", (40, 30), (20, 200, 30)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either: skipped")
    Image.new("RGB", (64, 64)).save(folder / "huge.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "big.png")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64x64: past twice the limit (Pillow's error); 50x50: past it
    code = cli_module.main(["predict", "--checkpoint", str(run_dir), str(folder), str(tmp_path / "nope.png"),
                            str(tmp_path / "big.png"), str(tmp_path / "empty"), str(folder / "a.png")])
    out, err = capsys.readouterr()
    assert code == 2
    predicted = [line.split(": ")[0] for line in out.splitlines()]
    assert predicted == [str(folder / n) for n in ("a.png", "b.jpg", "c.png", "a.png")], out
    assert all(line.count(",") == 2 for line in out.splitlines())
    errors = err.splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors), err
    too_large = "image too large to decode safely"
    for path, what in ((folder / "broken.png", "unreadable image"), (folder / "huge.png", too_large),
                       (tmp_path / "nope.png", "no such image file"), (tmp_path / "big.png", too_large),
                       (tmp_path / "empty", "folder holds no images")):
        assert any(line.startswith(f"error: {path}: {what}") for line in errors), (path, errors)


def test_evaluate_and_interpret_read_only_the_test_split(run_dir, tmp_path, capsys):
    # they decoded the whole training split (154 MB of cache for CIFAR-10) and needed it to exist
    import shutil

    from eva_api import CIFAR10_CLASSES, cli as cli_module
    from conftest import write_official

    folder = write_imagefolder(tmp_path / "folder", n_per_class=2, classes=CIFAR10_CLASSES)
    shutil.rmtree(folder / "train")
    official = write_official(tmp_path / "official")
    for p in (official / "cifar-10-batches-py").glob("data_batch_*"):
        p.unlink()
    ckpt = str(run_dir / "checkpoint.pt")
    for root in (folder, official):
        assert cli_module.main(["evaluate", "--checkpoint", ckpt, "--data", str(root), "--no-download"]) == 0
        assert "Test set: Average loss:" in capsys.readouterr().out
    assert cli_module.main(["interpret", "--checkpoint", ckpt, "--data", str(official), "--no-download",
                            "--out", str(tmp_path / "i"), "--n", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "i" / "report.txt").is_file()


def test_checkpoint_accepts_a_run_folder(run_dir, capsys):
    from eva_api import cli as cli_module

    assert cli_module.main(["evaluate", "--checkpoint", str(run_dir), "--dataset", "synthetic", "--tta", "none"]) == 0
    assert "Test set: Average loss:" in capsys.readouterr().out


def test_train_help_shows_each_fields_type_default_and_no_form(capsys):
    import re

    from eva_api import cli as cli_module

    with pytest.raises(SystemExit) as e:
        cli_module.main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for line in (r"--epochs INT +default 4 \(s8 22, fast 3\)", r"--tta, --no-tta +default true",
                 r"--precision \{auto,bf16,fp16,fp32\} +default auto", r"--milestones INT,INT,\.\.\. +default 14,18",
                 r"--lr FLOAT +default 0\.1 \(s8 0\.01\)", r"--download, --no-download +default true"):
        assert re.search(line, out), line


def test_resuming_a_finished_run_has_nothing_to_do(run_dir, tmp_path, monkeypatch, capsys):
    # it used to load the data, evaluate again and rewrite every result file (with --data elsewhere: other data's)
    import shutil

    from eva_api import cli as cli_module, runner

    called = []
    monkeypatch.setattr(runner, "train", lambda config, out, **kw: called.append(out) or pytest.fail("trained"))
    expected = (f"nothing to do: {run_dir / 'checkpoint.pt'} has finished its 1/1 epochs; results in {run_dir}/ "
                f"(to train longer, start a new run with another --out)\n")
    for args in (["--out", run_dir, "--resume"], ["--resume", run_dir], ["--resume", run_dir, "--data", "elsewhere"]):
        assert cli_module.main(["train", *map(str, args)]) == 0
        assert capsys.readouterr().out == expected
    cut = tmp_path / "cut"  # stopped after its last checkpoint, before its results were written: train writes them
    shutil.copytree(run_dir, cut, ignore=shutil.ignore_patterns("metrics.json", ".lock"))
    monkeypatch.setattr(runner, "train", lambda config, out, **kw: called.append(out) or type("R", (), {"metrics": {}}))
    assert cli_module.main(["train", "--resume", str(cut)]) == 0 and called == [cut]
