"""2-process DDP (gloo, CPU) through torchrun on tiny data: identical ranks, exact sums on odd shards, rank-0-only
data preparation and files, per-rank RNG, and resumes across world sizes."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, signal_at, write_imagefolder
from eva_api import (Interrupted, evaluate, load_checkpoint, load_model, make_config, make_synthetic, train)
from eva_api.loaders import TensorLoader

pytestmark = pytest.mark.ddp
WORKER = str(REPO / "tests" / "ddp_worker.py")
TINY = dict(model="tiny", dataset="synthetic", synthetic_train=96, synthetic_test=51, batch_size=32, precision="fp32",
            progress=False, gallery=4, device="cpu")


def torchrun(*args, nproc=2, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(str(out), "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


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
    data = make_synthetic(96, 51)
    # 51 test images on 2 ranks: shards of 26 and 25, so a mean of the two ranks' means would be off
    single = evaluate(model, TensorLoader(data.test, model.mean, model.std, 51, train=False))
    assert single["acc"] == pytest.approx(r0["history"][-1]["test_acc"], abs=1e-9)
    assert single["loss"] == pytest.approx(r0["history"][-1]["test_loss"], rel=1e-6)


def test_every_rank_saves_its_own_rng_state(ddp_run):
    out, _, _ = ddp_run
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # the rank is mixed into the seed


def test_rank_0_alone_decodes_the_data_and_writes_the_cache(tmp_path):
    root = write_imagefolder(tmp_path / "data", n_per_class=12, classes=("cat", "dog"))
    out = tmp_path / "run"
    out.mkdir()
    proc = torchrun(str(out), "1", env={"EVA_TEST_DATA": str(root), "EVA_API_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "decoded_by_rank0").read_text() == "xx"  # train/ and test/, by rank 0 only
    assert not (out / "decoded_by_rank1").exists()  # rank 1 waited, then read rank 0's cache
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_epoch_boundary_checkpoint_resumes_under_another_world_size(tmp_path, monkeypatch):
    """Epoch 1 in this process (world size 1), stopped before epoch 2's first step; epoch 2 under 2 ranks."""
    signal_at(monkeypatch, 1, None)  # lands in epoch 1's evaluation: the run stops at the boundary
    with pytest.raises(Interrupted):
        train(make_config("fast", epochs=2, **TINY), tmp_path)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and not ckpt["epoch_state"]
    proc = torchrun(str(tmp_path), "2", "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 1" in proc.stdout
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_mid_epoch_checkpoint_refuses_another_world_size_with_one_line(tmp_path, monkeypatch):
    signal_at(monkeypatch, 2, 0)
    with pytest.raises(Interrupted):
        train(make_config("fast", epochs=2, **TINY), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch_state"]["batches"] == 1
    proc = torchrun(str(tmp_path), "2", "resume")
    assert proc.returncode != 0
    assert "stopped in the middle of epoch 2 under 1 process(es); resume it with 1" in proc.stderr


def test_a_mid_epoch_ddp_resume_counts_every_ranks_sums_once(tmp_path):
    """Rank 0 alone gets the signal (during its 4th step of epoch 2); both ranks stop at the same step (on
    CPU the flag is asked after every step, 48 steps an epoch), the saved sums are both ranks', and the
    resumed History is the uninterrupted one."""
    env = {"EVA_TEST_BATCH": "2"}
    ref = torchrun(str(tmp_path / "ref"), "2", env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = torchrun(str(tmp_path / "cut"), "2", env={**env, "EVA_TEST_STOP_AT": "2:3"})
    assert cut.returncode != 0 and "interrupted: checkpoint saved" in cut.stdout
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch_state"]
    assert state["batches"] == 4 and state["samples"] == 8  # 4 steps of 1 image on each of 2 ranks (CUDA: 25)
    resumed = torchrun(str(tmp_path / "cut"), "2", "resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "rank0.pt", weights_only=True)["history"] for d in ("ref", "cut"))
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-12)  # sums added in another order
        for k in ("train_acc", "test_loss", "test_acc", "lr"):
            assert ra[k] == rb[k], k


def test_a_failing_rank_ends_the_job_with_a_message(tmp_path):
    proc = torchrun(str(tmp_path), "2", env={"EVA_TEST_FAIL_RANK": "1"}, timeout=240)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr + proc.stdout
