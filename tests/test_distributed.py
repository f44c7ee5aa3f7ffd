"""2-process DDP (gloo, CPU) through torchrun on synthetic data."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from eva_api import evaluate, load_checkpoint, load_model, make_config, make_synthetic, train
from eva_api.loaders import TensorLoader

WORKER = str(REPO / "tests" / "ddp_worker.py")


def torchrun(*args, nproc=2, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(str(out), "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_ranks_end_with_identical_weights_and_metrics(ddp_run):
    _, _, (r0, r1) = ddp_run
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]
    assert strip(r0["history"]) == strip(r1["history"]) and len(r0["history"]) == 2


def test_shards_are_disjoint_and_cover_the_training_set(ddp_run):
    _, _, (r0, r1) = ddp_run
    a, b = set(r0["indices"].tolist()), set(r1["indices"].tolist())
    assert not a & b and a | b == set(range(96))


def test_only_rank_0_prints_and_the_checkpoint_evaluates_in_one_process(ddp_run):
    out, proc, (r0, _) = ddp_run
    assert proc.stdout.count("Test set: Average loss:") == 2  # one line per epoch, not one per rank
    assert (out / "metrics.json").is_file() and (out / "curves.png").is_file()
    model = load_model(out / "checkpoint.pt", "cpu")  # no module. prefix
    data = make_synthetic(96, 50)
    acc = evaluate(model, TensorLoader(data.test, model.mean, model.std, 50, train=False))["acc"]
    assert acc == pytest.approx(r0["history"][-1]["test_acc"])  # all-reduced metrics = full test set


def test_single_process_checkpoint_resumes_under_ddp(tmp_path, monkeypatch):
    """Epoch 1 in this process (world size 1), stopped at the start of epoch 2; epoch 2 under 2 ranks."""
    config = make_config("fast", dataset="synthetic", synthetic_train=96, synthetic_test=50, batch_size=32, epochs=2,
                         precision="fp32", progress=False, gallery=4, device="cpu")
    original = TensorLoader.iter_from

    def stop_in_epoch_2(self, start):
        if self.train and self.epoch == 2:
            raise KeyboardInterrupt
        yield from original(self, start)

    monkeypatch.setattr(TensorLoader, "iter_from", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    proc = torchrun(str(tmp_path), "2", "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 1" in proc.stdout
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_a_failing_rank_ends_the_job_with_a_message(tmp_path):
    proc = torchrun(str(tmp_path), "2", env={"EVA_TEST_FAIL_RANK": "1"}, timeout=240)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr + proc.stdout
