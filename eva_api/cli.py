"""Command line: ``python -m eva_api {train,evaluate,summary,predict,interpret,lr-find,doctor} ...``.

Bad input (a path, a flag, a value, a corrupt or untrusted file) ends with one ``error: ...`` line and exit
code 2, never a traceback; Ctrl-C or SIGTERM during training saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, EvaError


def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `train`")
    p.add_argument("--data", default="./data", help="CIFAR-10 root: official files, ImageFolder train/ + test/")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--no-download", dest="download", action="store_false", help="never try to download")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: by device)")
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also read checkpoints that need full unpickling (eva_api before format 2); this can run "
                        "code stored in the file: only for files you made yourself")


def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES, Config

    ap = argparse.ArgumentParser(prog="python -m eva_api", description="Train and inspect CIFAR image classifiers.",
                                 allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    sub_kw = dict(allow_abbrev=False)

    t = sub.add_parser("train", **sub_kw, help="train a model; any config field is an option (--epochs 5 --lr 0.05)",
                       description="Train. Besides the options below, every config field is accepted as "
                                   f"--key value: {', '.join(f.replace('_', '-') for f in Config.__dataclass_fields__)}")
    t.add_argument("--recipe", default=None, help=f"one of: {', '.join(RECIPES)} (default fast)")
    t.add_argument("--out", default=None, help="run directory (default runs/<recipe>; with --resume CHECKPOINT "
                                               "its folder)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out (or from CHECKPOINT) with its saved settings; only "
                        "runtime options (--data, --device, --num-workers, --no-progress, ...) may be changed")
    _add_trust_arg(t)

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
    _add_trust_arg(p)

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

    d = sub.add_parser("doctor", **sub_kw, help="check this machine: versions, device, precision, a short real run")
    d.add_argument("--device", default="auto")
    d.add_argument("--quick", action="store_true", help="versions, device and precision only (no training steps)")
    return ap


def _config_from(recipe: str, extra: list[str]):
    from .config import make_config, parse_overrides

    return make_config(recipe, **parse_overrides(extra))


def cmd_train(args, extra: list[str]) -> int:
    from .config import parse_overrides
    from .runner import CHECKPOINT, resume_config, train

    if args.resume:
        if args.out is None and args.resume is True:
            raise ConfigError("--resume needs --out (the run folder) or a checkpoint path")
        ckpt = Path(args.out) / CHECKPOINT if args.resume is True else Path(args.resume)
        config = resume_config(ckpt, parse_overrides(extra), recipe=args.recipe, trust=args.trust_checkpoint)
    else:
        config = _config_from(args.recipe or "fast", extra)
    if args.out:
        out = Path(args.out)
    else:  # a resumed checkpoint continues in its own folder, never over runs/<recipe>'s run
        out = ckpt.parent if args.resume else Path(f"runs/{config.recipe}")
    result = train(config, out, resume=args.resume, trust_checkpoint=args.trust_checkpoint)
    if result.metrics:
        m = result.metrics
        tta = f" (flip TTA {m['final_test_acc_tta']:.2f}%)" if m.get("final_test_acc_tta") is not None else ""
        print(f"final test accuracy {m['final_test_acc']:.2f}%{tta}; train time {m['train_seconds']:.0f}s; "
              f"artifacts in {out}/")
    return 0


def _checkpoint_and_test_data(args):
    """The checkpoint's model and the test split it is to be judged on (normalized with the training stats)."""
    from .checkpoint import load_model
    from .config import replace
    from .errors import DataError
    from .loaders import eval_loader
    from .runner import load_config_data

    for flag, value in (("--batch-size", args.batch_size), ("--n", getattr(args, "n", None))):
        if value is not None and value < 1:
            raise ConfigError(f"bad value {value} for {flag}: must be >= 1")
    model = load_model(args.checkpoint, args.device, trust=args.trust_checkpoint)
    data = load_config_data(replace(model.config, dataset=args.dataset, data=args.data, download=args.download))
    if len(data.classes) != len(model.classes):
        raise DataError(f"{args.data}: {len(data.classes)} classes, but the checkpoint was trained on {len(model.classes)}")
    if list(data.classes) != list(model.classes):  # e.g. folders named 0-9: labels still pair up by position
        diff = [f"{d}/{m}" for d, m in zip(data.classes, model.classes) if d != m]
        warnings.warn(f"{data.source}: class names differ from the checkpoint's (data/checkpoint: {', '.join(diff[:3])}"
                      f"{', ...' if len(diff) > 3 else ''}); labels are matched by position", stacklevel=2)
    device = next(model.parameters()).device
    return model, data, eval_loader(data.test, model.mean, model.std, device, args.batch_size,
                                    channels_last=model.config.channels_last)


def _data_line(data) -> str:
    return f"{'SYNTHETIC data' if data.synthetic else 'data'}: {data.source}"


def cmd_evaluate(args) -> int:
    from .engine import evaluate, format_test_line
    from .runtime import pick_precision

    model, data, loader = _checkpoint_and_test_data(args)
    device = next(model.parameters()).device
    metrics = evaluate(model, loader, precision=pick_precision(device, model.config.precision),
                       tta=False if args.tta == "none" else args.tta)
    print(_data_line(data))
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

    model = load_model(args.checkpoint, args.device, trust=args.trust_checkpoint)
    for path, top in zip(args.images, predict(model, args.images, top=args.top)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def cmd_interpret(args) -> int:
    from .checkpoint import out_folder
    from .engine import evaluate
    from .interpret import interpret_predictions
    from .metrics import format_report
    from .runtime import pick_precision

    out_folder(args.out)  # before the checkpoint loads and the test split is evaluated
    model, data, loader = _checkpoint_and_test_data(args)
    device = next(model.parameters()).device
    ev = evaluate(model, loader, precision=pick_precision(device, model.config.precision), tta="flip",
                  return_outputs=True)
    report = interpret_predictions(model, data.test.images, ev["logits"], ev["labels"], args.out, n=args.n)
    print(_data_line(data))
    print(f"accuracy {ev['acc']:.2f}% (flip TTA {ev['acc_tta']:.2f}%)")
    print(format_report(report["report"]))
    print("most confused (actual -> predicted, count): "
          + "; ".join(f"{a} -> {p} {n}" for a, p, n in report["most_confused"][:5]))
    print(f"figures and report in {args.out}/")
    return 0


def cmd_lr_find(args, extra: list[str]) -> int:
    import matplotlib.pyplot as plt

    from .checkpoint import out_folder
    from .lr_finder import check_sweep, lr_find
    from .runner import prepare

    check_sweep(args.start_lr, args.end_lr, args.steps)  # before the data loads and the model builds
    config = _config_from(args.recipe, extra)
    out = out_folder(args.out)
    setup = prepare(config)
    out.mkdir(parents=True, exist_ok=True)  # after the data loaded (a bad --data leaves no folder), before the sweep
    result = lr_find(setup.model, setup.train_loader, setup.stepper.optimizer, setup.criterion(),
                     start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, precision=setup.precision)
    plt.close(result.plot(save=out / "lr_find.png"))
    print(_data_line(setup.data))
    print(f"suggested lr: {result.suggestion:.4g} (steepest descent of the smoothed loss; plot: {out / 'lr_find.png'})")
    return 0


def cmd_doctor(args) -> int:
    from .doctor import doctor

    return doctor(args.device, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "lr-find"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _dispatch(args, extra)
    finally:  # tests call main in-process; pytest.warns still records (only the display changes)
        warnings.formatwarning = previous


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``warning: ...`` on one line, not Python's ``path:line: UserWarning: ...`` plus a source line."""
    kind = "" if category is UserWarning else f"{category.__name__}: "  # e.g. a library's FutureWarning
    return f"warning: {kind}{message}\n"


def _dispatch(args, extra: list[str]) -> int:
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
        if args.command == "doctor":
            return cmd_doctor(args)
        return cmd_lr_find(args, extra)
    except EvaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not e.filename:  # not about a path the user gave (too many open files, a library that fails to load)
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)  # e.g. no permission, a full disk
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
