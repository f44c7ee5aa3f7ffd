"""Training throughput of the `fast` step (ResNet18, Muon, crop + flip on whole batches, one-cycle):
eager, captured (one CUDA graph per step) and torch.compile'd, at batch 64 and 512, side by side.

    python bench/throughput.py --device cuda             # ~2 min on an H200, torch.compile included
    python bench/throughput.py --quick                   # CPU: few steps, no torch.compile

Each row is the real training step of the package (``Stepper.train_step`` over a ``TensorLoader``, the
optimizer and schedule ``build_optimizer``/``build_scheduler`` make for ``fast``) on synthetic images.
The rows of one batch size alternate round by round (A B C A B C ...) so drift hits each alike; every
row reports the median images/s of its rounds and the share of the device's peak: the TFLOP/s of a large
matmul in the run's precision, measured here first, against ~3.3 GFLOP per trained image. On a CPU the
"captured" row runs the same static step eagerly (no graphs there): it shows the bookkeeping costs nothing.
The classic DataLoader + PIL path (fp32, batch 64) is one more row, for the speed-up the fast path buys.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_api import (ClassicLoader, ResNet18, Stepper, TensorLoader, build_optimizer, build_scheduler,  # noqa: E402
                     classic_transforms, make_config, pick_device, pick_precision)
from eva_api.data import Split, channel_stats  # noqa: E402
from eva_api.runtime import Precision, check_compile, configure_backends  # noqa: E402

GFLOP_PER_TRAIN_IMAGE = 3.3  # ~0.56 GMAC forward x 2 FLOP/MAC x 3 (forward + backward)


def make_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, precision: Precision) -> float:
    """TFLOP/s of a square matmul in the run's compute dtype (bf16/fp16 where autocast uses it, else fp32)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = precision.dtype or torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class Run:
    """One row: a model, its optimizer, schedule and loader, stepped ``steps`` at a time after a warm-up."""

    def __init__(self, split: Split, device: torch.device, precision: Precision, batch: int, kind: str) -> None:
        torch.manual_seed(0)
        config = make_config("fast", batch_size=batch)
        self.device, self.precision, self.kind = device, precision, kind
        self.model = ResNet18().to(device).to(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if kind == "compiled" else self.model
        mean, std = channel_stats(split.images)
        if kind == "classic":
            self.loader = ClassicLoader(split, classic_transforms("crop_flip"), batch, mean=mean, std=std, train=True,
                                        num_workers=2, device=device)
        else:
            self.loader = TensorLoader(split, mean, std, batch, train=True, device=device, channels_last=True,
                                       crop_padding=2)
        optimizer = build_optimizer(self.model, config, precision)
        scheduler = build_scheduler(optimizer, config, len(self.loader))
        self.stepper = Stepper(optimizer, scheduler, cuda_graph=kind == "captured")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.epoch, self.batches = 0, iter(())

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            try:
                return next(self.batches)
            except StopIteration:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
                self.batches = iter(self.loader)
        raise RuntimeError("empty loader")

    def steps(self, n: int) -> float:
        """Seconds for ``n`` full training steps (data included), from a synchronized start to a synchronized end."""
        self.model.train()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            x, y = self.batch()
            if x.shape[0] != self.loader_batch:
                x, y = self.batch()  # a last partial batch is not what is measured
            self.stepper.train_step(self.net, x, y, self.criterion, self.precision)
        sync(self.device)
        return time.perf_counter() - start

    @property
    def loader_batch(self) -> int:
        return self.loader.batch_size if isinstance(self.loader, TensorLoader) else self.loader.loader.batch_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="few steps, one round, no torch.compile (CPU: ~2 min)")
    ap.add_argument("--batch-sizes", default="64,512")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row and round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    configure_backends(device)
    gpu = device.type == "cuda"
    steps = args.steps or (2 if args.quick else (50 if gpu else 4))
    rounds = args.rounds or (1 if args.quick else 3)
    precision = pick_precision(device, "auto")
    kinds = ["eager", "captured"]
    if not (args.quick or args.no_compile):
        try:
            check_compile()
            kinds.append("compiled")
        except Exception as e:  # a Python/torch pair without torch.compile: the table without that row
            print(f"no torch.compile row: {e}")
    peak = peak_tflops(device, precision)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"{name} | torch {torch.__version__} | {precision.name} ({precision.reason}) | threads "
          f"{torch.get_num_threads()} | {steps} timed steps x {rounds} rounds | {time.strftime('%Y-%m-%d')}")
    print(f"measured peak: {peak:.1f} TFLOP/s ({precision.name} matmul)\n")
    print(f"| batch | step | img/s | TFLOP/s | share of peak | vs eager | set-up s |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        split = make_split(batch * (steps + 8))
        # eager and captured first, then compiled against eager again: a slow compilation (tens of seconds)
        # or a failing one leaves the rows measured before it
        for kinds_now in (["eager", "captured"], ["eager", "compiled"] if "compiled" in kinds else []):
            rows: dict[str, Run] = {}
            setup: dict[str, float] = {}
            for kind in kinds_now:  # build, warm up (cuDNN search, capture, compilation): not timed as throughput
                start = time.perf_counter()
                rows[kind] = Run(split, device, precision, batch, kind)
                rows[kind].steps(5)
                setup[kind] = time.perf_counter() - start
            rates: dict[str, list[float]] = {k: [] for k in kinds_now}
            for _ in range(rounds):
                for kind, run in rows.items():
                    rates[kind].append(steps * batch / run.steps(steps))
            eager = statistics.median(rates["eager"])
            for kind in kinds_now if "captured" in kinds_now else kinds_now[1:]:  # eager is printed once
                rate = statistics.median(rates[kind])
                tflops = rate * GFLOP_PER_TRAIN_IMAGE / 1000
                print(f"| {batch} | {kind} | {rate:,.0f} | {tflops:.1f} | {tflops / peak:.1%} | {rate / eager:.2f}x | "
                      f"{setup[kind]:.1f} |", flush=True)
            del rows
            if gpu:
                torch.cuda.empty_cache()
    classic = Run(make_split(64 * (steps + 4)), device, Precision(device.type, None), 64, "classic")
    classic.steps(1)
    rate = steps * 64 / classic.steps(steps)
    print(f"\nclassic DataLoader + PIL, fp32, batch 64: {rate:,.0f} img/s (the course's data path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
