"""Run by a test under torchrun: convert's per-image val hits (`top1_and_hits`) of a model on 11 images whose
labels are its own top-1 but for images 0, 5 and 7, each rank scoring its share; rank 0 writes the string."""

import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from attnxfer.data import ResumableSampler, build_loader
from attnxfer.launch.process_exit import end_program
from attnxfer.train.distributed import backend_for, barrier, cleanup_distributed, init_distributed
from attnxfer.train.measure import top1_and_hits

out = Path(sys.argv[1])
info = init_distributed(backend_for("cpu"))
torch.manual_seed(0)  # the same model and images on every rank
model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
model.num_classes = 4
x = torch.randn(11, 3, 2, 2)
with torch.no_grad():
    labels = model(x).argmax(-1)
labels[[0, 5, 7]] = (labels[[0, 5, 7]] + 1) % 4  # the images it gets wrong
sampler = ResumableSampler(
    11, shuffle=False, rank=info.rank, world_size=info.world_size, drop_last=False, exact=True
)
loader = build_loader(TensorDataset(x, labels), batch_size=3, sampler=sampler, drop_last=False)
_, hits = top1_and_hits(model, loader, torch.device("cpu"))
if info.rank == 0:
    (out / "hits").write_text(hits)
barrier()
cleanup_distributed()
end_program(0)
