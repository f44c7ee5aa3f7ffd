"""Execute S8_Assignment.ipynb top to bottom in a real kernel, in a smoke configuration (no network)."""
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.notebook


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "".join(out)


def _has_image(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _cell(nb, needle):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def test_notebook_runs_top_to_bottom_on_synthetic_data(tmp_path, monkeypatch):
    for key, value in {"EVA_DATASET": "synthetic", "EVA_RECIPE": "fast", "EVA_EPOCHS": "2", "EVA_BATCH_SIZE": "32",
                       "EVA_SYNTHETIC_TRAIN": "96", "EVA_SYNTHETIC_TEST": "48", "EVA_GALLERY": "8",
                       "EVA_OUT": str(tmp_path / "runs"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(REPO / "S8_Assignment.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "precision (auto):" in _text(_cell(nb, "eva_api.doctor(quick=True)"))
    assert "SYNTHETIC data" in _text(_cell(nb, "load_config_data"))
    assert _has_image(_cell(nb, "plot_samples"))
    assert "Total params: 11,173,962" in _text(_cell(nb, "summary(model_for_summary"))
    assert "Muon for the conv filters" in _text(_cell(nb, "eva_api.prepare(config"))
    train_out = _text(_cell(nb, "eva_api.train("))
    assert "EPOCH: 1/2" in train_out and "EPOCH: 2/2" in train_out and train_out.count("Test set: Average loss:") == 2
    summary = _cell(nb, "format_summary")["outputs"][0]["data"]["text/markdown"]
    assert "best test accuracy" in summary and "11,173,962" in summary and "SYNTHETIC" in summary
    assert "Muon" in summary  # built from the config, not typed
    for needle in ("plot_history", "plot_misclassified", "plot_confusion_matrix", "plot_gradcam_pairs"):
        assert _has_image(_cell(nb, needle)), needle
    assert "reloaded: Test set" in _text(_cell(nb, "load_model"))
    assert list(tmp_path.glob("runs/*/checkpoint.pt"))


TINY = dict(model="tiny", dataset="synthetic", synthetic_train=64, synthetic_test=32, batch_size=32, progress=False,
            precision="fp32", gallery=4, epochs=2)


def _disconnected_run(config, folder, monkeypatch, mtime=None):
    """Train ``config`` into ``folder`` until a disconnect in epoch 2: an unfinished run (1 of 2 epochs done)."""
    import os
    import signal

    from eva_api import Interrupted, train
    from eva_api.loaders import TensorLoader

    original = TensorLoader.iter_from

    def disconnect(self, start):
        for item in original(self, start):
            if self.train and self.epoch == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    with monkeypatch.context() as m:
        m.setattr(TensorLoader, "iter_from", disconnect)
        with pytest.raises(Interrupted):
            train(config, folder)
    if mtime is not None:  # the order "newest" means, made explicit
        os.utime(folder / "checkpoint.pt", (mtime, mtime))
    return folder


def _train_cell_scope(config, out):
    import os
    import time

    return {"os": os, "time": time, "eva_api": __import__("eva_api"), "config": config, "data": None,
            "OUT": str(out), "RESUME": True}


def test_notebook_epochs_follow_the_recipe_and_it_continues_an_unfinished_run(tmp_path, monkeypatch):
    """The parameters cell alone: EPOCHS unset takes the recipe's; the train cell resumes what a disconnect left."""
    import os

    from eva_api import make_config

    nb = nbformat.read(REPO / "S8_Assignment.ipynb", as_version=4)
    params = _cell(nb, "RESUME = ").source
    scope = {"os": os, "eva_api": __import__("eva_api")}
    monkeypatch.delenv("EVA_EPOCHS", raising=False)
    monkeypatch.setenv("EVA_RECIPE", "fast")
    exec(params, scope)
    assert scope["config"].epochs == make_config("fast").epochs and scope["RESUME"] is True

    _disconnected_run(make_config("fast", **TINY), tmp_path / "runs" / "first", monkeypatch)
    scope = _train_cell_scope(make_config("fast", **TINY), tmp_path / "runs")
    exec(_cell(nb, "eva_api.train(").source, scope)
    assert scope["run_dir"] == tmp_path / "runs" / "first" and len(scope["history"]) == 2


def test_notebook_continues_only_a_run_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """RESUME leaves an unfinished run of other settings as it is (one line says which and why), starts a new
    run, and continues the newest unfinished run that has the notebook's settings, even behind another one."""
    import hashlib
    import os

    from eva_api import load_checkpoint, make_config

    nb = nbformat.read(REPO / "S8_Assignment.ipynb", as_version=4)
    cell = _cell(nb, "eva_api.train(").source
    runs = tmp_path / "runs"
    notebook_config = make_config("fast", **TINY)

    other_seed = _disconnected_run(make_config("fast", **{**TINY, "seed": 1}), runs / "seed1", monkeypatch, 1000)
    digest = hashlib.sha256((other_seed / "checkpoint.pt").read_bytes()).hexdigest()
    capsys.readouterr()
    scope = _train_cell_scope(notebook_config, runs)
    exec(cell, scope)
    lines = capsys.readouterr().out.splitlines()
    left = [line for line in lines if line.startswith("left alone")]
    assert left == [f"left alone: the unfinished run {other_seed} (1 of 2 epochs done) has other settings than this "
                    "notebook's (seed: 1 -> 0)"]
    new_run = scope["run_dir"]
    assert f"new run: {new_run}" in lines and not any(line.startswith("continuing") for line in lines)
    assert new_run != other_seed and str(new_run).startswith(str(runs)) and len(scope["history"]) == 2
    assert hashlib.sha256((other_seed / "checkpoint.pt").read_bytes()).hexdigest() == digest  # untouched
    os.utime(os.path.join(new_run, "checkpoint.pt"), (2000, 2000))  # finished: never continued

    # the notebook's unfinished run sits behind a newer unfinished run of another recipe: that one is left alone
    ours = _disconnected_run(notebook_config, runs / "ours", monkeypatch, 3000)
    s8 = _disconnected_run(make_config("s8", **{**TINY, "loader": "tensor", "augment": "crop_flip"}), runs / "s8",
                           monkeypatch, 4000)
    capsys.readouterr()
    scope = _train_cell_scope(notebook_config, runs)
    exec(cell, scope)
    lines = capsys.readouterr().out.splitlines()
    left = [line for line in lines if line.startswith("left alone")]
    assert len(left) == 1 and left[0].startswith(f"left alone: the unfinished run {s8} (1 of 2 epochs done)")
    assert "recipe: 's8' -> 'fast'" in left[0] and left[0].endswith(" more)")
    assert f"continuing {ours}" in lines and not any(line.startswith("new run") for line in lines)
    assert scope["run_dir"] == ours and len(scope["history"]) == 2
    assert load_checkpoint(s8 / "checkpoint.pt")["epoch"] == 1
