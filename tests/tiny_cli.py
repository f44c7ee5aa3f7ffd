"""``python tests/tiny_cli.py ARGS``: the eva_api CLI with the ``tiny`` test model registered, and test hooks
(``forked_main`` runs the same in a process forked from a server that imported it once).

EVA_TEST_SIGNAL="PHASE:N:SIG[,PHASE:N:SIG...]" sends this process the real signal SIG (INT, TERM or KILL) at
the N-th time (1-based) it reaches PHASE: ``batch`` (a training batch is fetched), ``step`` (inside the optimizer step, at the Muon update:
before any parameter moves), ``save`` (inside a checkpoint write, before the file is complete) or
``eval`` (inside an evaluation).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinymodel  # noqa: E402,F401  (registers the model)

from eva_api import cli, engine, loaders, optim  # noqa: E402
from eva_api import checkpoint as ckpt_mod  # noqa: E402


def install_hook(specs: str) -> None:
    plan = [(phase, int(count), getattr(signal, f"SIG{sig}")) for phase, count, sig in
            (spec.split(":") for spec in specs.split(","))]
    seen: dict[str, int] = {}

    def tick(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        for phase, count, signum in plan:
            if phase == name and seen[name] == count:
                os.kill(os.getpid(), signum)

    orig_iter = loaders.TensorLoader.iter_from

    def iter_from(self, start):
        for batch in orig_iter(self, start):
            if self.train:
                tick("batch")
            yield batch

    loaders.TensorLoader.iter_from = iter_from
    orig_muon = optim._muon_update

    def muon(*args, **kwargs):
        tick("step")
        return orig_muon(*args, **kwargs)

    optim._muon_update = muon
    orig_save = ckpt_mod.torch.save

    class HookedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(obj, f, *a, **k):
            result = orig_save(obj, f, *a, **k)
            tick("save")  # the bytes are written but neither synced nor renamed
            return result

    ckpt_mod.torch = HookedTorch()
    orig_eval = engine.evaluate

    def evaluate(*args, **kwargs):
        tick("eval")
        return orig_eval(*args, **kwargs)

    engine.evaluate = evaluate


def forked_main(argv: list[str], signals: str | None, log: str) -> None:
    """The body of a process forked from a server that imported this module (and torch) once: output to
    ``log``, one thread (as ``OMP_NUM_THREADS=1``), the hooks, the CLI; exits with the CLI's code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    if signals:
        install_hook(signals)
    try:
        code = cli.main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if os.environ.get("EVA_TEST_SIGNAL"):
        install_hook(os.environ["EVA_TEST_SIGNAL"])
    sys.exit(cli.main())
