"""Run by the distributed test under torchrun: train, then write this rank's student weights."""

import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from attnxfer.apps.run.training import build_engine
from attnxfer.config import load_config
from attnxfer.launch.process_exit import end_program
from attnxfer.train import engine
from attnxfer.train.distributed import barrier, cleanup_distributed

cfg = load_config(None, sys.argv[1:])
# a test's STOPPED_CLOCK_RANK: that rank's clock stands still (its checkpoint.every_minutes save is never due)
if os.environ.get("STOPPED_CLOCK_RANK", "-") == os.environ.get("RANK"):
    engine.time = types.SimpleNamespace(monotonic=lambda: 0.0)
trainer = build_engine(cfg)
trainer.run()
rank = trainer.accelerator.process_index
state = {k: v.contiguous() for k, v in trainer.module.student.state_dict().items()}
save_file(state, str(Path(cfg.run_dir) / f"rank{rank}.safetensors"))
# the next draws of this rank's global torch stream (what its dropout and drop path would draw next)
(Path(cfg.run_dir) / f"rank{rank}.draws").write_text(str(torch.rand(4).tolist()))
# Prove the ranks share one process group: the all-reduced rank sum is 0 + 1 + ... + (world-1).
t = torch.tensor([float(rank)])
t = trainer.accelerator.reduce(t, reduction="sum")
(Path(cfg.run_dir) / f"rank{rank}.allreduce").write_text(str(t.item()))
barrier()
cleanup_distributed()  # this script created the group (through build_engine): close it before exiting
# Everything the test reads is written and the group is closed: exit as the attnxfer program does after a
# multi-process run, without interpreter finalization (attnxfer.launch.process_exit says why).
end_program(0)
