"""Run by the distributed test under torchrun: train, then write this rank's student weights."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from attnxfer.apps.training import build_engine
from attnxfer.config import load_config
from attnxfer.train.distributed import barrier, cleanup_distributed

cfg = load_config(None, sys.argv[1:])
trainer = build_engine(cfg)
trainer.run()
rank = trainer.accelerator.process_index
state = {k: v.contiguous() for k, v in trainer.dual.student.state_dict().items()}
save_file(state, str(Path(cfg.run_dir) / f"rank{rank}.safetensors"))
# Prove the ranks share one process group: the all-reduced rank sum is 0 + 1 + ... + (world-1).
t = torch.tensor([float(rank)])
t = trainer.accelerator.reduce(t, reduction="sum")
(Path(cfg.run_dir) / f"rank{rank}.allreduce").write_text(str(t.item()))
barrier()
cleanup_distributed()  # this script created the group (through build_engine): close it before exiting
# Everything the test reads is written and the group is closed. Skip interpreter finalization: with gloo,
# torch's C++ worker threads can still be torn down there and abort the process (SIGABRT/SIGSEGV in a
# non-Python thread, "terminate called without an active exception"; seen in ~1 of 15 runs on a loaded
# 2-core machine, also before the 2026-11-23 changes). That race is torch's, not what this test checks.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
