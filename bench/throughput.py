"""Training and evaluation throughput of ResNet18: the classic data path against the fast one.

    python bench/throughput.py            # full: several timed rounds, torch.compile included
    python bench/throughput.py --quick    # under a minute: few steps, real model, synthetic data

(a) classic: torchvision DataLoader + PIL transforms (4-px crop + flip), 2 workers, fp32, NCHW;
    ``--device cuda`` runs the same table on a GPU (auto precision: bf16 from compute capability 8.0,
    fp16 below);
(b) fast: in-memory uint8 batches augmented per batch (eva_api.TensorLoader), bf16 autocast where the
    device supports it, channels_last.
Also each optimization on its own over the classic path (auto precision, channels_last, batched augmentation)
and the fast path under torch.compile. Same model, same batch size, same process, after warm-up;
the two main paths alternate (A B A B ...) so drift on a noisy machine hits both. The last line is
``fast_vs_classic_train_speedup=<ratio>`` (median of the per-round ratios).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_api import (ClassicLoader, ConfigError, Precision, ResNet18, TensorLoader, classic_transforms,  # noqa: E402
                     pick_device, pick_precision)
from eva_api.data import Split, channel_stats  # noqa: E402
from eva_api.runtime import check_compile, configure_backends  # noqa: E402

GFLOP_PER_TRAIN_IMAGE = 3.3  # ~0.56 GMAC forward x 2 FLOP/MAC x 3 (forward + backward)


def make_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def train_rate(loader, device, precision: Precision, channels_last: bool, compiled: bool, steps: int, warmup: int) -> float:
    """Images/second of full training steps (data, forward, backward, SGD) after ``warmup`` steps."""
    torch.manual_seed(0)
    model = ResNet18().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    seen, start = 0, None
    epoch = 0
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i == warmup and start is None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, seen = time.perf_counter(), 0
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                loss = crit(run(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += y.shape[0]
            if start is not None and seen >= steps * loader_batch(loader):
                float(loss.detach())  # sync
                return seen / (time.perf_counter() - start)


def loader_batch(loader) -> int:
    return loader.batch_size if hasattr(loader, "batch_size") else loader.loader.batch_size


@torch.no_grad()
def eval_seconds(split: Split, mean, std, device, precision: Precision, batch: int = 500) -> float:
    model = ResNet18().to(device).to(memory_format=torch.channels_last).eval()
    loader = TensorLoader(split, mean, std, batch, train=False, device=device, channels_last=True)
    for x, _ in loader:  # warm-up
        with precision.autocast():
            model(x)
        break
    if device.type == "cuda":  # the warm-up's kernels finish before the clock starts
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, _ in loader:
        with precision.autocast():
            model(x).float().argmax(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, no torch.compile: under a minute")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=None, help="A/B rounds of classic vs fast")
    ap.add_argument("--eval-images", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 1 if args.quick else 2
    n_eval = args.eval_images or (1000 if args.quick else 10000)
    device = pick_device(args.device)
    configure_backends(device)
    amp = pick_precision(device, "auto")  # bf16 where native, fp16 on older GPUs, else fp32
    fp32 = Precision(device.type, None)
    bs = args.batch_size
    split = make_split(bs * (steps + warmup + 1))
    mean, std = channel_stats(split.images)

    def classic():
        return ClassicLoader(split, classic_transforms("crop_flip"), bs, mean=mean, std=std, train=True,
                             num_workers=2, device=device)

    def tensor(cl: bool):
        return TensorLoader(split, mean, std, bs, train=True, device=device, channels_last=cl)

    print(f"device {device} | threads {torch.get_num_threads()} | batch {bs} | {steps} timed steps after {warmup} "
          f"warm-up | autocast {amp.name} | torch {torch.__version__}", flush=True)
    rates: dict[str, list[float]] = {"classic": [], "fast": []}
    ratios = []
    for r in range(rounds):
        a = train_rate(classic(), device, fp32, False, False, steps, warmup)
        b = train_rate(tensor(True), device, amp, True, False, steps, warmup)
        rates["classic"].append(a)
        rates["fast"].append(b)
        ratios.append(b / a)
        print(f"round {r + 1}: classic {a:.1f} img/s, fast {b:.1f} img/s, ratio {b / a:.2f}", flush=True)
    singles = {
        f"classic + {amp.name} autocast": lambda: train_rate(classic(), device, amp, False, False, steps, warmup),
        "classic + channels_last": lambda: train_rate(classic(), device, fp32, True, False, steps, warmup),
        "batched augmentation (fp32, NCHW)": lambda: train_rate(tensor(False), device, fp32, False, False, steps, warmup),
    }
    if not args.quick and not args.no_compile:
        try:
            check_compile()
            singles["fast + torch.compile"] = lambda: train_rate(tensor(True), device, amp, True, True, steps, warmup + 3)
        except ConfigError as e:  # a Python/torch pair without torch.compile: the table without that row
            print(f"no torch.compile row: {e}")
    classic_med = statistics.median(rates["classic"])
    fast_med = statistics.median(rates["fast"])
    print(f"\n{'training path':<36}{'img/s':>8}{'vs classic':>12}")
    print(f"{'classic (DataLoader+PIL, fp32, NCHW)':<36}{classic_med:>8.1f}{1.0:>11.2f}x")
    for name, fn in singles.items():
        rate = fn()
        print(f"{name:<36}{rate:>8.1f}{rate / classic_med:>11.2f}x", flush=True)
    print(f"{'fast (batched aug + ' + amp.name + ' + channels_last)':<36}{fast_med:>8.1f}{fast_med / classic_med:>11.2f}x")
    eval_split = make_split(n_eval, seed=1)
    secs = eval_seconds(eval_split, mean, std, device, amp)
    print(f"\nevaluation: {n_eval} images in {secs:.1f} s ({n_eval / secs:.0f} img/s; {secs * 10000 / n_eval:.1f} s per 10,000)")
    print(f"fast path: {fast_med * GFLOP_PER_TRAIN_IMAGE:.0f} GFLOP/s of training at ~{GFLOP_PER_TRAIN_IMAGE} GFLOP per image")
    print(f"fast_vs_classic_train_speedup={statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
