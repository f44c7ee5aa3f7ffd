"""The command line end to end on synthetic data, and its one-line errors (exit 2, no traceback)."""
import subprocess
import sys

import pytest

from conftest import REPO, write_imagefolder

SMOKE = ["--dataset", "synthetic", "--synthetic-train", "96", "--synthetic-test", "48", "--batch-size", "32",
         "--gallery", "8", "--no-progress"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "eva_api", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = cli("train", "--recipe", "fast", "--epochs", "1", "--out", out, *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC data" in proc.stdout and "Test set: Average loss:" in proc.stdout
    return out


def test_train_produces_every_artifact(run_dir):
    for name in ("config.json", "history.json", "metrics.json", "checkpoint.pt", "curves.png", "misclassified.png",
                 "confusion_matrix.png"):
        assert (run_dir / name).stat().st_size > 0, name


def test_rerun_into_an_existing_run_needs_resume(run_dir):
    proc = cli("train", "--recipe", "fast", "--epochs", "1", "--out", run_dir, *SMOKE)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_evaluate_predict_interpret(run_dir, tmp_path):
    ev = cli("evaluate", "--checkpoint", run_dir / "checkpoint.pt", "--dataset", "synthetic")
    assert ev.returncode == 0, ev.stderr
    assert "SYNTHETIC data" in ev.stdout and "Test set: Average loss:" in ev.stdout and "flip TTA" in ev.stdout
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
    proc = cli("lr-find", "--out", tmp_path, "--steps", "12", *SMOKE)
    assert proc.returncode == 0, proc.stderr
    assert "suggested lr" in proc.stdout and (tmp_path / "lr_find.png").is_file()


def test_summary_shows_the_parameter_count():
    proc = cli("summary")
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
    (["predict", "--checkpoint", "{ckpt}", "{tmp}/nope.png"], "no such image"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, match, tmp_path, run_dir):
    (tmp_path / "trunc.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:3000])
    fill = {"{tmp}": str(tmp_path), "{ckpt}": str(run_dir / "checkpoint.pt")}
    if "{bad}" in args:
        fill["{bad}"] = str(_bad_imagefolder(tmp_path))
    args = [a.format(**{k.strip("{}"): v for k, v in fill.items()}) if "{" in a else a for a in args]
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and match in errors[0]


def test_unknown_subcommand_flag_exits_2():
    proc = cli("summary", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
