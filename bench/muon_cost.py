"""What Muon's Newton-Schulz orthogonalization costs per optimizer step, and what each lever saves.

    python bench/muon_cost.py                # ResNet18's filter-bank shapes, batch 64, ~3 min on 2 bf16 cores
    python bench/muon_cost.py --rounds 3 --batch-size 128
    python bench/muon_cost.py --rounds 2 --repeat 1   # CPUs without bf16 units: emulated bf16 is ~30 s a call
    python bench/muon_cost.py --device cuda

Side by side in one process, alternating round by round (A B C ... A B C ...) so drift hits every row:
- the model step alone (forward + backward + SGD in the precision a run picks here, channels_last,
  synthetic batch): the SGD epoch's cost per step;
- the package's whole Muon optimizer step as shipped (momentum, rescale, same-shape banks stacked into
  one batched Newton-Schulz, foreach updates), and its orthogonalization alone, stacked;
- the orthogonalization one bank at a time (0.2's loop: 19 banks, 171 matmuls), and the levers:
  2 iterations, the iteration in the other dtype (fp32 / bf16), orthogonalizing every other step (half
  the calls; its cost is measured as such, its effect on accuracy is not measured here), and 2
  iterations every other step together.
Each row prints the median milliseconds per optimizer step and the epoch's images/s predicted as
``batch / (model step + orthogonalization)``, as a share of the SGD step's images/s. On a CPU stacking
saves little (arithmetic dominates); on a GPU the step is launch-bound and it saves launches.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_api import ResNet18, build_optimizer, make_config, pick_device, pick_precision  # noqa: E402
from eva_api.optim import _as_matrix, ns_dtype_for, orthogonalize  # noqa: E402


def timed(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    fn()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="calls timed per row and round")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    device = pick_device(args.device)
    precision = pick_precision(device, "auto")
    ns = ns_dtype_for(precision)
    other = torch.float32 if ns is torch.bfloat16 else torch.bfloat16
    label = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    model = ResNet18().to(device).to(memory_format=torch.channels_last)
    # the banks `fast` orthogonalizes: every conv filter but the frozen stem, as 2-D momentum matrices
    banks = [_as_matrix(p.detach()).clone() for n, p in model.named_parameters() if p.ndim == 4 and n != "conv1.weight"]
    shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for g in banks:
        shapes.setdefault(tuple(g.shape), []).append(g)
    stacks = [torch.stack(v) for v in shapes.values()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    muon_model = ResNet18().to(device).to(memory_format=torch.channels_last)
    muon = build_optimizer(muon_model, make_config("fast"), precision)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def model_step() -> None:
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with precision.autocast():  # gradients for the Muon optimizer's own step (kept: each row steps again)
        F.cross_entropy(muon_model(x), y).backward()

    shipped_row = f"Muon optimizer step as shipped (stacked, foreach), {label[ns]}"
    per_bank_row = f"orthogonalization per bank (0.2's loop), {label[ns]}"
    rows: dict[str, Callable[[], object]] = {
        "model step (fwd + bwd + SGD), the SGD epoch": model_step,
        shipped_row: muon.step,
        f"orthogonalization stacked by shape, {label[ns]}": lambda: [orthogonalize(s, dtype=ns) for s in stacks],
        per_bank_row: lambda: [orthogonalize(g, dtype=ns) for g in banks],
        "2 NS iterations (per bank)": lambda: [orthogonalize(g, steps=2, dtype=ns) for g in banks],
        f"3 NS iterations in {label[other]} (per bank)": lambda: [orthogonalize(g, dtype=other) for g in banks],
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            times[name].append(timed(fn, args.repeat, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    step = med["model step (fwd + bwd + SGD), the SGD epoch"]
    shipped = med[shipped_row]
    med["every other step (half the per-bank calls)"] = med[per_bank_row] / 2
    med["2 NS iterations, every other step"] = med["2 NS iterations (per bank)"] / 2  # the two cheapest levers together

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {where}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; model step in {precision.name} ({precision.reason}); "
          f"batch {args.batch_size}; {len(banks)} filter banks "
          f"in {len(shapes)} shapes; medians of {args.rounds} rounds x {args.repeat} calls")
    print("| what | ms per step | vs shipped Muon | predicted epoch img/s | share of SGD img/s |")
    print("|---|---|---|---|---|")
    for name, ms in med.items():
        if name.startswith("model step"):
            print(f"| {name} | {ms:.0f} | | {args.batch_size / ms * 1000:.1f} | 100% |")
            continue
        rate = args.batch_size / (step + ms) * 1000
        print(f"| {name} | {ms:.0f} | {ms / shipped:.2f}x | {rate:.1f} | {step / (step + ms):.0%} |")
    print(f"muon_share_of_sgd_rate={step / (step + shipped):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
