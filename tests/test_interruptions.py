"""Stress test of the interruption promises, on real processes and real signals (tiny model, seeded CPU).

A run is interrupted by SIGINT or SIGTERM at many moments: while a batch is fetched, inside the optimizer
step, inside a checkpoint write, during evaluation, and by a second signal while the interruption's own
checkpoint is being written; it is also killed with SIGKILL at such moments. After each, the folder must
hold a loadable checkpoint, and resuming (as often as it takes) must end with weights and History
bit-identical to the uninterrupted run. The counts are printed and asserted.
"""
import itertools
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import tiny_cli

pytestmark = pytest.mark.slow  # 29 short processes
TRAIN = ["train", "--recipe", "fast", "--model", "tiny", "--dataset", "synthetic", "--synthetic-train", "96",
         "--synthetic-test", "32", "--batch-size", "16", "--epochs", "3", "--precision", "fp32", "--gallery", "4",
         "--no-progress"]  # 6 steps an epoch, 18 in all

# each scenario: the signals of successive pieces of one run (each piece after the first resumes)
SCENARIOS = {
    "INT while batch 2 is fetched": ["batch:2:INT"],
    "TERM while batch 9 is fetched": ["batch:9:TERM"],
    "INT inside optimizer step 4": ["step:4:INT"],
    "TERM inside optimizer step 13": ["step:13:TERM"],
    "INT inside the epoch-1 checkpoint write": ["save:1:INT"],
    "TERM inside the epoch-2 checkpoint write": ["save:2:TERM"],
    "INT during evaluation 1": ["eval:1:INT"],
    "second INT while the interrupt's checkpoint is written": ["batch:5:INT,save:1:INT"],
    "three pieces: INT, TERM, INT": ["batch:3:INT", "step:4:TERM", "eval:1:INT"],
    "KILL while batch 8 is fetched": ["batch:8:KILL"],
    "KILL inside optimizer step 15": ["step:15:KILL"],
    "KILL inside the epoch-2 checkpoint write": ["save:2:KILL"],
    "KILL during evaluation 3": ["eval:3:KILL"],
}


# Each run is a real process forked from a server that imported torch and eva_api once (multiprocessing's
# forkserver): real signals and kill -9 as before, without paying ~2 s of imports 29 times.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["tiny_cli"])
RUNS = itertools.count()


def run(out, *extra, signals=None):
    log = f"{out}.{next(RUNS)}.log"
    proc = FORKS.Process(target=tiny_cli.forked_main, args=([*TRAIN, "--out", str(out), *extra], signals, log))
    proc.start()
    proc.join(300)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail(f"{out}: the run did not end within 300 s")
    with open(log) as f:
        output = f.read()
    return SimpleNamespace(returncode=proc.exitcode, stdout=output, stderr=output)


def final_state(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    history = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in ckpt["history"]]
    return ckpt["model"], history


def interrupt_and_resume(out, name, pieces):
    """Run the scenario's pieces, then resume to the end; the counts of this one scenario."""
    counts = dict(interruptions=0, signalled_exits_130=0, killed=0, loadable_after=0, exact=0)
    for signals in pieces:
        proc = run(out, *(["--resume"] if (out / "checkpoint.pt").exists() else []), signals=signals)
        counts["interruptions"] += 1
        if "KILL" in signals:
            assert proc.returncode == -9, (name, proc.returncode, proc.stderr[-1500:])
            counts["killed"] += 1
        else:
            assert proc.returncode == 130, (name, proc.returncode, proc.stderr[-1500:])
            assert "interrupted: checkpoint saved" in proc.stdout and "Traceback" not in proc.stderr, name
            counts["signalled_exits_130"] += 1
        try:
            torch.load(out / "checkpoint.pt", weights_only=True)
            counts["loadable_after"] += 1
        except Exception as e:  # noqa: BLE001 - counted and asserted below
            print(f"{name}: checkpoint not loadable ({type(e).__name__})")
    done = run(out, "--resume")
    assert done.returncode == 0, (name, done.stderr[-2000:])
    return counts, final_state(out)


def test_every_interruption_resumes_to_the_same_end_state(tmp_path):
    ref = run(tmp_path / "reference")
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_weights, ref_history = final_state(tmp_path / "reference")
    assert len(ref_history) == 3
    counts = dict(interruptions=0, signalled_exits_130=0, killed=0, loadable_after=0, exact=0)
    # two scenarios at a time: each process is single-threaded, and most of its time is starting Python and torch
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {name: pool.submit(interrupt_and_resume, tmp_path / f"s{i}", name, pieces)
                for i, (name, pieces) in enumerate(SCENARIOS.items())}
        for name, job in jobs.items():
            scenario, (weights, history) = job.result()
            for k, v in scenario.items():
                counts[k] += v
            # the weights include BatchNorm's running statistics: before 0.2 a signal could land after a
            # batch's forward pass (which updates them) but before its step was counted, so the resumed
            # run ran that forward twice: same weights and train losses, different test metrics
            exact = history == ref_history and weights.keys() == ref_weights.keys() and all(
                torch.equal(weights[k], ref_weights[k]) for k in weights)
            counts["exact"] += exact
            if not exact:
                print(f"{name}: resumed run differs from the uninterrupted one")
    print("interruption stress test:", ", ".join(f"{k} {v}" for k, v in counts.items()))
    n = sum(len(p) for p in SCENARIOS.values())
    assert counts == dict(interruptions=n, signalled_exits_130=n - 4, killed=4, loadable_after=n, exact=len(SCENARIOS))
