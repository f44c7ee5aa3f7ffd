"""Command line: ``python -m eva_api {train,evaluate,summary,predict,interpret,lr-find,doctor} ...``.

Bad input (a path, a flag, a value, a corrupt or untrusted file) ends with one ``error: ...`` line and exit
code 2, never a traceback; Ctrl-C or SIGTERM during training saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, EvaError

if TYPE_CHECKING:
    from .config import Config

CHECKPOINT_HELP = "checkpoint.pt written by `train`, or its run folder"


def _add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", default="./data", help="CIFAR-10 root: official files (only test_batch is read) or an "
                                                    "ImageFolder with test/ (train/ is not needed)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--no-download", dest="download", action="store_false", help="never try to download")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: by device)")
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also read checkpoints that need full unpickling (eva_api before format 2); this can run "
                        "code stored in the file: only for files you made yourself")


def _show(value: Any) -> str:
    """A config value as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _config_fields_help() -> str:
    """One line per config field (what ``train --help`` and ``lr-find --help`` list): the option with its type or
    choices (a boolean: both forms), the default and where a recipe sets another value."""
    from .config import CHOICES, RECIPES, Config

    metavars = {"int": "INT", "float": "FLOAT", "str": "TEXT", "tuple[int, ...]": "INT,INT,..."}
    lines = ["config fields (every one is an option; the recipe's value replaces the default):"]
    for f in fields(Config):
        if f.name == "recipe":  # an option of its own
            continue
        name = f.name.replace("_", "-")
        kind = str(f.type)
        metavar = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else metavars.get(kind, kind.upper())
        flag = f"--{name}, --no-{name}" if kind == "bool" else f"--{name} {metavar}"
        recipes = ", ".join(f"{r} {_show(v[f.name])}" for r, v in RECIPES.items()
                            if v.get(f.name, f.default) != f.default)
        lines.append(f"  {flag:<38} default {_show(f.default)}{f' ({recipes})' if recipes else ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES

    ap = argparse.ArgumentParser(prog="python -m eva_api", description="Train and inspect CIFAR image classifiers.",
                                 allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    sub_kw = dict(allow_abbrev=False)
    config_kw = dict(epilog=_config_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)

    t = sub.add_parser("train", **sub_kw, **config_kw,
                       help="train a model; any config field is an option (--epochs 5 --lr 0.05)",
                       description="Train. Besides the options below, every config field (listed after them) is "
                                   "an option.")
    t.add_argument("--recipe", default=None, help=f"one of: {', '.join(RECIPES)} (default fast)")
    t.add_argument("--out", default=None, help="run directory (default runs/<recipe>; with --resume CHECKPOINT "
                                               "its folder)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out (or from CHECKPOINT, a file or its run folder) with its saved "
                        "settings; only runtime options (--data, --device, --num-workers, --no-progress, ...) may be "
                        "changed")
    _add_trust_arg(t)

    e = sub.add_parser("evaluate", **sub_kw, help="test accuracy of a checkpoint")
    _add_eval_data_args(e)
    e.add_argument("--tta", choices=["none", "flip", "flip+translate"], default="flip")

    s = sub.add_parser("summary", **sub_kw, help="torchsummary table of the model")
    s.add_argument("--model", default="resnet18")
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--input-size", type=int, default=32)

    p = sub.add_parser("predict", **sub_kw, help="top-3 classes of your own images")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files (any size or mode) or folders of them")
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=3)
    _add_trust_arg(p)

    i = sub.add_parser("interpret", **sub_kw, help="Grad-CAM, top losses, confusion matrix and per-class report")
    _add_eval_data_args(i)
    i.add_argument("--out", required=True)
    i.add_argument("--n", type=int, default=16, help="images per figure")

    lr = sub.add_parser("lr-find", **sub_kw, **config_kw, help="LR range test: plot and suggested LR",
                        description="LR range test on the training split. Every config field (listed after the "
                                    "options) is an option.")
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


def _checkpoint_file(path: str | Path) -> Path:
    """A ``--checkpoint`` / ``--resume`` value: a checkpoint file, or a run folder standing for its checkpoint.pt."""
    from .runner import CHECKPOINT

    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def _nothing_to_do(ckpt: Path, config: Config, trust: bool) -> bool:
    """Whether resuming ``ckpt`` with ``config`` has nothing to do: the run trained all its epochs and wrote its
    results. A changed setting is left to ``train`` to refuse, results missing (a run stopped while writing
    them) to ``train`` to write."""
    from .checkpoint import load_checkpoint
    from .config import Config, resume_conflicts

    saved = load_checkpoint(ckpt, trust=trust, mmap=True)
    with warnings.catch_warnings():  # resume_config has already named any key of an earlier version
        warnings.simplefilter("ignore")
        saved_config = Config.from_dict(saved["config"])
    return (int(saved["epoch"]) >= config.epochs and not resume_conflicts(saved_config, config)
            and (ckpt.parent / "metrics.json").is_file())


def cmd_train(args, extra: list[str]) -> int:
    from .config import parse_overrides
    from .runner import CHECKPOINT, resume_config, train

    if args.resume:
        if args.out is None and args.resume is True:
            raise ConfigError("--resume needs --out (the run folder) or a checkpoint path")
        ckpt = Path(args.out) / CHECKPOINT if args.resume is True else _checkpoint_file(args.resume)
        config = resume_config(ckpt, parse_overrides(extra), recipe=args.recipe, trust=args.trust_checkpoint)
        if _nothing_to_do(ckpt, config, args.trust_checkpoint):
            done = f"{config.epochs}/{config.epochs}"
            print(f"nothing to do: {ckpt} has finished its {done} epochs; results in {ckpt.parent}/ (to train longer, "
                  f"start a new run with another --out)")
            return 0
    else:
        config = _config_from(args.recipe or "fast", extra)
    if args.out:
        out = Path(args.out)
    else:  # a resumed checkpoint continues in its own folder, never over runs/<recipe>'s run
        out = ckpt.parent if args.resume else Path(f"runs/{config.recipe}")
    result = train(config, out, resume=ckpt if args.resume else False, trust_checkpoint=args.trust_checkpoint)
    if result.metrics:
        m = result.metrics
        tta = f" (flip TTA {m['final_test_acc_tta']:.2f}%)" if m.get("final_test_acc_tta") is not None else ""
        print(f"final test accuracy {m['final_test_acc']:.2f}%{tta}; train time {m['train_seconds']:.0f}s; "
              f"artifacts in {out}/")
    return 0


def _checkpoint_and_test_data(args):
    """The checkpoint's model and the test split it is to be judged on (normalized with the training stats)."""
    from .checkpoint import load_model
    from .data import load_data
    from .errors import DataError
    from .loaders import eval_loader

    for flag, value in (("--batch-size", args.batch_size), ("--n", getattr(args, "n", None))):
        if value is not None and value < 1:
            raise ConfigError(f"bad value {value} for {flag}: must be >= 1")
    model = load_model(_checkpoint_file(args.checkpoint), args.device, trust=args.trust_checkpoint)
    c = model.config  # the test split alone: the checkpoint holds the training mean/std
    data = load_data(args.dataset, args.data, download=args.download, synthetic_train=c.synthetic_train,
                     synthetic_test=c.synthetic_test, seed=c.seed, test_only=True)
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
    """One line per image; an unreadable one gets an ``error:`` line of its own, the rest are still predicted and
    the exit code is 2."""
    from .checkpoint import load_model
    from .prediction import predict_files

    model = load_model(_checkpoint_file(args.checkpoint), args.device, trust=args.trust_checkpoint)
    failed = False
    for path, top in predict_files(model, args.images, top=args.top):
        if isinstance(top, EvaError):
            print(f"error: {top}", file=sys.stderr, flush=True)
            failed = True
        else:
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top), flush=True)
    return 2 if failed else 0


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
    report = interpret_predictions(model, data.test.images, ev["logits"], ev["labels"], args.out, n=args.n,
                                   title="SYNTHETIC data" if data.synthetic else None)
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
    from .lr_finder import SUGGESTION_RULE, check_sweep, lr_find
    from .runner import prepare

    check_sweep(args.start_lr, args.end_lr, args.steps)  # before the data loads and the model builds
    config = _config_from(args.recipe, extra)
    out = out_folder(args.out)
    setup = prepare(config)
    out.mkdir(parents=True, exist_ok=True)  # after the data loaded (a bad --data leaves no folder), before the sweep
    result = lr_find(setup.model, setup.train_loader, setup.stepper.optimizer, setup.criterion(),
                     start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, precision=setup.precision)
    title = f"{'SYNTHETIC data - ' if setup.data.synthetic else ''}LR range test"
    plt.close(result.plot(save=out / "lr_find.png", title=title))
    print(_data_line(setup.data))
    print(f"suggested lr: {result.suggestion:.4g} ({SUGGESTION_RULE}; plot: {out / 'lr_find.png'})")
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
