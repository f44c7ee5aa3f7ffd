"""Figures and tables: plots (curves, confusion matrix, galleries), the run summary, the per-class and
Grad-CAM reports, and the SYNTHETIC label on each."""
import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eva_api import get_model, interpret, make_synthetic, metrics, plots  # noqa: E402
from eva_api.summary import format_summary  # noqa: E402


def test_the_summary_table_has_a_real_header_row():
    lines = format_summary({"data": "x (SYNTHETIC)", "a|b": "c"}).splitlines()
    assert lines[:2] == ["| item | value |", "| --- | --- |"] and lines[3] == r"| a\|b | c |"


def test_empty_confusion_cells_print_nothing():
    fig = plots.plot_confusion_matrix(torch.tensor([[299, 1, 0], [0, 5, 5], [0, 0, 0]]), ["a", "b", "c"])
    counts = plots.plot_confusion_matrix(torch.tensor([[3, 0], [1, 2]]), ["a", "b"], normalize=False)
    try:
        assert [t.get_text() for t in fig.axes[0].texts] == ["1.00", "<.01", "", "", "0.50", "0.50", "", "", ""]
        assert [t.get_text() for t in counts.axes[0].texts] == ["3", "", "1", "2"]
    finally:
        plt.close(fig), plt.close(counts)


def test_a_one_epoch_history_gets_one_whole_epoch_tick_and_the_lr_says_when_it_was_read():
    rec = {"epoch": 1, "lr": 0.075, "train_loss": 1.5, "train_acc": 50, "test_loss": 1.3, "test_acc": 55}
    fig = plots.plot_history([rec], peak_lr=0.1)
    try:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1]
        labels = fig.axes[2].get_legend_handles_labels()[1]
        assert labels == ["LR at epoch end", "peak LR 0.1 (schedule)"]
        assert fig.axes[2].get_ylim()[1] > 0.1
    finally:
        plt.close(fig)


def test_synthetic_labels_reach_every_figure_and_table():
    cm = torch.tensor([[3, 1], [0, 4]])
    data = make_synthetic(8, 16, num_classes=2)
    preds = 1 - data.test.labels
    figs = [plots.plot_confusion_matrix(cm, ["a", "b"], title="SYNTHETIC data"),
            plots.plot_misclassified(data.test.images, data.test.labels, preds, data.classes, n=4, title="SYNTHETIC data")]
    try:
        assert figs[0].axes[0].get_title().startswith("SYNTHETIC data - Confusion matrix")
        assert figs[1]._suptitle.get_text() == "SYNTHETIC data - 4 misclassified images"
    finally:
        for f in figs:
            plt.close(f)
    rows = metrics.per_class_accuracy(cm, ["a", "b"])
    assert metrics.format_per_class(rows, "SYNTHETIC data").splitlines()[0] == "SYNTHETIC data"
    assert metrics.format_per_class(rows).splitlines()[0].startswith("class")
    report = metrics.classification_report(cm, ["a", "b"])
    assert metrics.format_report(report, "SYNTHETIC data").splitlines()[0] == "SYNTHETIC data"


def test_per_class_gradcam_shows_n_images(tmp_path, monkeypatch):
    data = make_synthetic(8, 60, num_classes=2)
    model = get_model("tiny", num_classes=2)
    model.classes, model.mean, model.std = data.classes, data.mean, data.std
    seen, real = [], interpret.plot_gradcam_class
    monkeypatch.setattr(interpret, "plot_gradcam_class",
                        lambda m, imgs, *a, **k: (seen.append((len(imgs), k["title"])), real(m, imgs, *a, **k))[1])
    logits = torch.randn(len(data.test.labels), 2)
    interpret.interpret_predictions(model, data.test.images, logits, data.test.labels, tmp_path, n=16,
                                    title="SYNTHETIC data")
    assert seen == [(16, "SYNTHETIC data"), (16, "SYNTHETIC data")]
    assert (tmp_path / "report.txt").read_text().startswith("SYNTHETIC data\n")
