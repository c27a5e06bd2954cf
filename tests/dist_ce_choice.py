"""Run under torchrun by tests/objectives/test_ce_select.py: rank 0 decides the CE path, every rank writes what it uses."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from helpers import tiny_vit

from attnxfer.apps.run.ce_choice import decided_on_rank0
from attnxfer.train.distributed import cleanup_distributed, init_distributed
from attnxfer.transfer import TeacherStudent, build_plan
from attnxfer.transfer.ce_select import choose_ce_path

init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
teacher, student = tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2)
pair = TeacherStudent(teacher, student, build_plan(teacher, student, "distill"))
offered = ["sdpa"] if rank == 0 else ["rows"]  # what this rank would pick had it decided alone
choice = decided_on_rank0(lambda: choose_ce_path(pair, 2, "cpu", paths=offered, rounds=1))
pair.ce_path = choice.path
out = {**choice.record(), "world": world, "used": str(pair.ce_path)}
(Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(out))
dist.barrier()
cleanup_distributed()
