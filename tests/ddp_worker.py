"""Run under torchrun by tests/test_distributed.py: one eva_api training rank of the tiny model.

usage: ddp_worker.py OUT_DIR EPOCHS [resume]; each rank writes OUT_DIR/rank<R>.pt with its weights, its
History and the training sample indices it visited in epoch 1. EVA_TEST_DATA=PATH
trains on that ImageFolder instead of synthetic data and records which ranks decoded it;
EVA_TEST_BATCH sets the global batch size; EVA_TEST_STOP_AT=EPOCH:BATCH sends rank 0 alone a real SIGINT
when it fetches that training batch.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinymodel  # noqa: E402,F401  (registers the model)
from conftest import signal_at  # noqa: E402

from eva_api import data as data_mod  # noqa: E402
from eva_api import make_config, train  # noqa: E402
from eva_api.distributed import DistInfo  # noqa: E402
from eva_api.runner import build_loaders  # noqa: E402

out, epochs = sys.argv[1], int(sys.argv[2])
resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if os.environ.get("EVA_TEST_FAIL_RANK") == str(rank):
    raise RuntimeError(f"rank {rank} failed on purpose")
source = dict(dataset="synthetic", synthetic_train=96, synthetic_test=51)
if os.environ.get("EVA_TEST_DATA"):
    source = dict(dataset="cifar10", data=os.environ["EVA_TEST_DATA"], download=False)
    decode = data_mod._read_imagefolder_split

    def recording(*args, **kwargs):
        with open(os.path.join(out, f"decoded_by_rank{rank}"), "a") as f:
            f.write("x")
        return decode(*args, **kwargs)

    data_mod._read_imagefolder_split = recording
if os.environ.get("EVA_TEST_STOP_AT") and rank == 0:
    stop_epoch, stop_batch = map(int, os.environ["EVA_TEST_STOP_AT"].split(":"))
    signal_at(pytest.MonkeyPatch(), stop_epoch, stop_batch)
config = make_config("fast", model="tiny", batch_size=int(os.environ.get("EVA_TEST_BATCH", "32")), epochs=epochs, precision="fp32", progress=False, gallery=4,
                     device="cpu", **source)
result = train(config, out, resume=resume)
train_loader, _ = build_loaders(result.data, config, DistInfo(rank, rank, world), torch.device("cpu"))
train_loader.set_epoch(1)
torch.save({"state": result.model.state_dict(), "history": result.history.records,
            "indices": train_loader.indices()},
           os.path.join(out, f"rank{rank}.pt"))
