"""Time to 85% / 90% test accuracy of a recipe, per epoch, over one or more seeds.

    python bench/time_to_accuracy.py --data PATH --recipe fast --seeds 0 1 --out runs/tta

Each seed is a full ``eva_api`` training run (its run directory holds every artifact). Per epoch it
reports train seconds (measured apart from evaluation) and test accuracy with and without flip TTA;
then the epochs and cumulative train seconds to first reach each threshold, the final accuracy (also
with ``--final-tta``: flip + ±1 px translations by default), and mean ± std over seeds. The JSON
summary is rewritten after every seed, so a cut-short run keeps the seeds that finished.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_api import eval_loader, evaluate, make_config, parse_overrides, train


def reach(records: list[dict], threshold: float, key: str) -> dict | None:
    seconds = 0.0
    for r in records:
        seconds += r["train_seconds"]
        if r.get(key, -1) >= threshold:
            return {"epoch": r["epoch"], "train_seconds": round(seconds, 1)}
    return None


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="./data", help="CIFAR-10 root (official files or ImageFolder)")
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/time_to_accuracy")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[85.0, 90.0])
    ap.add_argument("--final-tta", default="flip+translate", choices=["flip", "flip+translate"],
                    help="TTA views for one more evaluation of each seed's final model")
    args, extra = ap.parse_known_args(argv)
    overrides = parse_overrides(extra)  # any config field: --epochs 4 --lr 0.2 ...
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"recipe": args.recipe, "data": args.data, "overrides": overrides, "machine": (torch.cuda.get_device_name()
               if torch.cuda.is_available() else platform.processor() or platform.machine()), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "runs": []}
    for seed in args.seeds:
        config = make_config(args.recipe, dataset=args.dataset, data=args.data, seed=seed, tta=True, **overrides)
        result = train(config, out / f"seed{seed}")
        recs = result.history.records
        test = eval_loader(result.data.test, result.data.mean, result.data.std, next(result.model.parameters()).device,
                           channels_last=config.channels_last)
        final = evaluate(result.model, test, precision=result.precision, tta=args.final_tta, all_reduce=False)
        run = {"seed": seed, "epochs": recs, "final_test_acc": recs[-1]["test_acc"],
               "final_test_acc_tta": recs[-1].get("test_acc_tta"), "final_tta": args.final_tta,
               "final_test_acc_final_tta": final["acc_tta"],
               "train_seconds": round(sum(r["train_seconds"] for r in recs), 1)}
        for t in args.thresholds:
            run[f"reach_{t:g}"] = reach(recs, t, "test_acc")
            run[f"reach_{t:g}_tta"] = reach(recs, t, "test_acc_tta")
        summary["runs"].append(run)
        print(f"\nseed {seed}: " + " | ".join(
            f"ep{r['epoch']} {r['train_seconds']:.0f}s acc {r['test_acc']:.2f} tta {r.get('test_acc_tta', float('nan')):.2f}"
            for r in recs) + f" | final, {args.final_tta} TTA: {final['acc_tta']:.2f}", flush=True)
        runs = summary["runs"]
        summary["final_test_acc"] = mean_std([r["final_test_acc"] for r in runs])
        summary["final_test_acc_tta"] = mean_std([r["final_test_acc_tta"] for r in runs])
        summary["final_test_acc_final_tta"] = mean_std([r["final_test_acc_final_tta"] for r in runs])
        summary["train_seconds"] = mean_std([r["train_seconds"] for r in runs])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.recipe}: final test acc {summary['final_test_acc']} (flip TTA {summary['final_test_acc_tta']}, "
          f"{args.final_tta} TTA {summary['final_test_acc_final_tta']}), "
          f"train seconds {summary['train_seconds']} over seeds {args.seeds}")
    for t in args.thresholds:
        for key in ("", "_tta"):
            hits = [r[f"reach_{t:g}{key}"] for r in summary["runs"]]
            label = f"{t:g}%{' (flip TTA)' if key else ''}"
            if all(hits):
                print(f"reached {label}: epochs {[h['epoch'] for h in hits]}, "
                      f"train seconds {mean_std([h['train_seconds'] for h in hits])}")
            else:
                print(f"reached {label}: {sum(map(bool, hits))}/{len(hits)} seeds")
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
