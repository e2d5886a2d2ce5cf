"""One rank of a data-parallel MutualTrainer step (test_hf.py): two ranks of 4 sequences each
make one batch of 8; rank 0 saves the peers' parameters to argv[1]."""

import sys
from pathlib import Path

import torch
from test_hf import Sequences, arguments, pair

from fastdml import FusedLinearMutualLoss
from fastdml.hf import MutualTrainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    models = pair()
    args = arguments(
        out / "run",
        per_device_train_batch_size=4,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
    )
    loss = FusedLinearMutualLoss(temperature=2.0)
    MutualTrainer(models=models, loss=loss, args=args, train_dataset=Sequences(8)).train()
    if torch.distributed.get_rank() == 0:
        torch.save([model.state_dict() for model in models], out / "peers.pt")
    torch.distributed.destroy_process_group()
