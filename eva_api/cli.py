"""Command line: ``python -m eva_api {train,evaluate,summary,predict,interpret,lr-find} ...``.

Bad input (a path, a flag, a value, a corrupt file) ends with one ``error: ...`` line and exit code 2,
never a traceback; Ctrl-C during training saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EvaError


def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `train`")
    p.add_argument("--data", default="./data", help="CIFAR-10 root: official files, ImageFolder train/ + test/")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--no-download", dest="download", action="store_false", help="never try to download")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES, Config

    ap = argparse.ArgumentParser(prog="python -m eva_api", description="Train and inspect CIFAR image classifiers.",
                                 allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    sub_kw = dict(allow_abbrev=False)

    t = sub.add_parser("train", **sub_kw, help="train a model; any config field is an option (--epochs 5 --lr 0.05)",
                       description="Train. Besides the options below, every config field is accepted as "
                                   f"--key value: {', '.join(f.replace('_', '-') for f in Config.__dataclass_fields__)}")
    t.add_argument("--recipe", default="fast", help=f"one of: {', '.join(RECIPES)}")
    t.add_argument("--out", default=None, help="run directory (default runs/<recipe>)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out (or from CHECKPOINT)")

    e = sub.add_parser("evaluate", **sub_kw, help="test accuracy of a checkpoint")
    _add_eval_data_args(e)
    e.add_argument("--tta", choices=["none", "flip", "flip+translate"], default="flip")

    s = sub.add_parser("summary", **sub_kw, help="torchsummary table of the model")
    s.add_argument("--model", default="resnet18")
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--input-size", type=int, default=32)

    p = sub.add_parser("predict", **sub_kw, help="top-3 classes of your own images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", help="image files (any size or mode)")
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=3)

    i = sub.add_parser("interpret", **sub_kw, help="Grad-CAM, top losses, confusion matrix and per-class report")
    _add_eval_data_args(i)
    i.add_argument("--out", required=True)
    i.add_argument("--n", type=int, default=16, help="images per figure")

    lr = sub.add_parser("lr-find", **sub_kw, help="LR range test: plot and suggested LR",
                        description="LR range test on the training split. Config fields are accepted as --key value.")
    lr.add_argument("--recipe", default="fast")
    lr.add_argument("--out", required=True)
    lr.add_argument("--steps", type=int, default=200)
    lr.add_argument("--start-lr", type=float, default=1e-5)
    lr.add_argument("--end-lr", type=float, default=10.0)
    return ap


def _config_from(recipe: str, extra: list[str]):
    from .config import make_config, parse_overrides

    return make_config(recipe, **parse_overrides(extra))


def cmd_train(args, extra: list[str]) -> int:
    from .runner import train

    config = _config_from(args.recipe, extra)
    out = Path(args.out or f"runs/{config.recipe}")
    result = train(config, out, resume=args.resume)
    if result.metrics:
        m = result.metrics
        tta = f" (flip TTA {m['final_test_acc_tta']:.2f}%)" if m.get("final_test_acc_tta") is not None else ""
        print(f"final test accuracy {m['final_test_acc']:.2f}%{tta}; train time {m['train_seconds']:.0f}s; "
              f"artifacts in {out}/")
    return 0


def _eval_loader(args, model, ckpt_config):
    from .config import replace
    from .loaders import TensorLoader
    from .runner import load_config_data

    config = replace(ckpt_config, dataset=args.dataset, data=args.data, download=args.download)
    data = load_config_data(config)
    if len(data.classes) != len(model.classes):
        from .errors import DataError

        raise DataError(f"{args.data}: {len(data.classes)} classes, but the checkpoint was trained on {len(model.classes)}")
    device = next(model.parameters()).device
    # normalize with the *training* statistics stored in the checkpoint
    return data, TensorLoader(data.test, model.mean, model.std, args.batch_size, train=False, device=device)


def _load(args):
    from .checkpoint import load_checkpoint, load_model
    from .config import Config

    model = load_model(args.checkpoint, args.device)
    config = Config.from_dict(load_checkpoint(args.checkpoint)["config"])
    return model, config


def cmd_evaluate(args) -> int:
    from .engine import evaluate, format_test_line, pick_precision

    model, config = _load(args)
    data, loader = _eval_loader(args, model, config)
    device = next(model.parameters()).device
    metrics = evaluate(model, loader, precision=pick_precision(device, config.precision),
                       tta=False if args.tta == "none" else args.tta)
    print(f"{'SYNTHETIC data' if data.synthetic else 'data'}: {data.source}")
    print(format_test_line(metrics))
    return 0


def cmd_summary(args) -> int:
    from torchsummary import summary

    from .models import get_model

    model = get_model(args.model, num_classes=args.num_classes)
    summary(model, (3, args.input_size, args.input_size), device="cpu")
    return 0


def cmd_predict(args) -> int:
    from .checkpoint import load_model
    from .prediction import predict

    model = load_model(args.checkpoint, args.device)
    for path, top in zip(args.images, predict(model, args.images, top=args.top)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def cmd_interpret(args) -> int:
    import json

    import matplotlib.pyplot as plt

    from . import interpret, plots
    from .engine import evaluate, pick_precision

    model, config = _load(args)
    data, loader = _eval_loader(args, model, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    ev = evaluate(model, loader, precision=pick_precision(device, config.precision), tta="flip", return_outputs=True)
    logits, labels = ev["logits"], ev["labels"]
    preds = logits.argmax(1)
    classes = model.classes
    cm = plots.confusion_matrix(labels, preds, len(classes))
    figs = [plots.plot_confusion_matrix(cm, classes, save=out / "confusion_matrix.png")]
    wrong = plots.misclassified(data.test.images, labels, preds, n=args.n)
    if len(wrong):
        figs.append(interpret.plot_gradcam_pairs(model, data.test.images[wrong], labels[wrong], classes, model.mean,
                                                 model.std, save=out / "gradcam_misclassified.png"))
    for c in range(len(classes)):
        idx = (labels == c).nonzero().flatten()[:8]
        if len(idx):
            figs.append(interpret.plot_gradcam_class(model, data.test.images[idx], c, classes, model.mean, model.std,
                                                     save=out / f"gradcam_class_{classes[c]}.png"))
    tops = interpret.top_losses(logits, labels, classes, k=args.n)
    figs.append(plots.image_grid(data.test.images[[t.index for t in tops]],
                                 [f"{t.actual} -> {t.predicted}\nloss {t.loss:.2f} p {t.probability:.2f}" for t in tops],
                                 ncols=4, save=out / "top_losses.png", suptitle="Top losses (actual -> predicted)"))
    for f in figs:
        plt.close(f)
    report = interpret.classification_report(cm, classes)
    (out / "report.txt").write_text(interpret.format_report(report) + "\n")
    (out / "report.json").write_text(json.dumps(
        {"report": report, "accuracy": ev["acc"], "accuracy_flip_tta": ev["acc_tta"], "data_source": data.source,
         "most_confused": interpret.most_confused(cm, classes)[:10],
         "top_losses": [vars(t) for t in tops]}, indent=2))
    print(f"{'SYNTHETIC data' if data.synthetic else 'data'}: {data.source}")
    print(f"accuracy {ev['acc']:.2f}% (flip TTA {ev['acc_tta']:.2f}%)")
    print(interpret.format_report(report))
    print("most confused (actual -> predicted, count): "
          + "; ".join(f"{a} -> {p} {n}" for a, p, n in interpret.most_confused(cm, classes)[:5]))
    print(f"figures and report in {out}/")
    return 0


def cmd_lr_find(args, extra: list[str]) -> int:
    import matplotlib.pyplot as plt

    from .distributed import DistInfo
    from .engine import pick_device, pick_precision, seed_everything
    from .lr_finder import lr_find
    from .runner import build_loaders, build_model, build_optimizer, load_config_data

    config = _config_from(args.recipe, extra)
    seed_everything(config.seed)
    device = pick_device(config.device)
    data = load_config_data(config)
    model = build_model(config, len(data.classes), device, whiten_from=data)
    train_loader, _ = build_loaders(data, config, DistInfo(device=device), device)
    optimizer = build_optimizer(model, config)
    import torch.nn as nn

    result = lr_find(model, train_loader, optimizer, nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
                     start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps,
                     precision=pick_precision(device, config.precision))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt.close(result.plot(save=out / "lr_find.png"))
    print(f"{'SYNTHETIC data' if data.synthetic else 'data'}: {data.source}")
    print(f"suggested lr: {result.suggestion:.4g} (steepest descent of the smoothed loss; plot: {out / 'lr_find.png'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "lr-find"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "summary":
            return cmd_summary(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "interpret":
            return cmd_interpret(args)
        return cmd_lr_find(args, extra)
    except EvaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
