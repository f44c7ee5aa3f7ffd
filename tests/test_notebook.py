"""Execute S8_Assignment.ipynb top to bottom in a real kernel, in a smoke configuration (no network)."""
import nbformat
from nbclient import NotebookClient

from conftest import REPO


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
    for key, value in {"EVA_DATASET": "synthetic", "EVA_RECIPE": "fast", "EVA_EPOCHS": "1", "EVA_BATCH_SIZE": "32",
                       "EVA_SYNTHETIC_TRAIN": "96", "EVA_SYNTHETIC_TEST": "48", "EVA_GALLERY": "8",
                       "EVA_OUT": str(tmp_path / "runs"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(REPO / "S8_Assignment.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "SYNTHETIC data" in _text(_cell(nb, "load_config_data"))
    assert "Total params: 11,173,962" in _text(_cell(nb, "summary(model_for_summary"))
    assert "Test set: Average loss:" in _text(_cell(nb, "eva_api.train("))
    summary = _text(_cell(nb, "summary_rows"))
    assert "best test accuracy" in summary and "11,173,962" in summary and "SYNTHETIC" in summary
    assert _has_image(_cell(nb, "plot_history"))
    assert _has_image(_cell(nb, "plot_misclassified"))
    assert _has_image(_cell(nb, "plot_gradcam_pairs"))
    assert "reloaded: Test set" in _text(_cell(nb, "load_model"))
    assert list(tmp_path.glob("runs/*/checkpoint.pt"))
