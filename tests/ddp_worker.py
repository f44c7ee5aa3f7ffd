"""Run under torchrun by tests/test_distributed.py: one eva_api training rank on synthetic data.

usage: ddp_worker.py OUT_DIR EPOCHS [resume]; each rank writes OUT_DIR/rank<R>.pt with its weights,
its History and the training sample indices it visited in epoch 1.
"""
import os
import sys

import torch

from eva_api import make_config, train
from eva_api.runner import build_loaders
from eva_api.distributed import DistInfo

out, epochs = sys.argv[1], int(sys.argv[2])
resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if os.environ.get("EVA_TEST_FAIL_RANK") == str(rank):
    raise RuntimeError(f"rank {rank} failed on purpose")
config = make_config("fast", dataset="synthetic", synthetic_train=96, synthetic_test=50, batch_size=32, epochs=epochs,
                     precision="fp32", progress=False, gallery=4, device="cpu")
result = train(config, out, resume=resume)
train_loader, _ = build_loaders(result.data, config, DistInfo(rank, rank, world), torch.device("cpu"))
train_loader.set_epoch(1)
torch.save({"state": result.model.state_dict(), "history": result.history.records,
            "indices": train_loader.indices()}, os.path.join(out, f"rank{rank}.pt"))
