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


def test_notebook_epochs_follow_the_recipe_and_it_continues_an_unfinished_run(tmp_path, monkeypatch):
    """The parameters cell alone: EPOCHS unset takes the recipe's; the train cell resumes what a disconnect left."""
    import os
    import signal

    from eva_api import Interrupted, make_config, train
    from eva_api.loaders import TensorLoader

    nb = nbformat.read(REPO / "S8_Assignment.ipynb", as_version=4)
    params = _cell(nb, "RESUME = ").source
    scope = {"os": os, "eva_api": __import__("eva_api")}
    monkeypatch.delenv("EVA_EPOCHS", raising=False)
    monkeypatch.setenv("EVA_RECIPE", "fast")
    exec(params, scope)
    assert scope["config"].epochs == make_config("fast").epochs and scope["RESUME"] is True

    tiny = dict(model="tiny", dataset="synthetic", synthetic_train=64, synthetic_test=32, batch_size=32,
                progress=False, precision="fp32", gallery=4, epochs=2)
    original = TensorLoader.iter_from

    def disconnect(self, start):
        for b, item in enumerate(original(self, start)):
            if self.train and self.epoch == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    monkeypatch.setattr(TensorLoader, "iter_from", disconnect)
    with pytest.raises(Interrupted):
        train(make_config("fast", **tiny), tmp_path / "runs" / "first")
    monkeypatch.undo()
    scope.update(config=make_config("fast", **tiny), data=None, OUT=str(tmp_path / "runs"), RESUME=True,
                 time=__import__("time"))
    exec(_cell(nb, "eva_api.train(").source, scope)
    assert scope["run_dir"] == tmp_path / "runs" / "first" and len(scope["history"]) == 2
