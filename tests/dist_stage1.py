"""Run by tests/conversion/test_stage1_steps.py under torchrun (2 CPU ranks, gloo): stage 1 once clean, once with a NaN
input on rank 1 only at step 3; writes what each rank saw (history or error, weights) to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import peaked_teacher

from attnxfer.launch.process_exit import end_program
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.distributed import barrier, cleanup_distributed, init_distributed
from attnxfer.train.stage1 import stage1_transfer, teacher_signals
from attnxfer.train.terms import NonFiniteLossError
from attnxfer.transfer.conversion import build_conversion_plan

out = Path(sys.argv[1])
rank = init_distributed("gloo").rank
teacher = peaked_teacher(depth=2, qkv_bias=True).eval().requires_grad_(False)
g = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
signals = [
    teacher_signals(teacher, torch.randn(4, 3, 32, 32, generator=g), [0, 1], ("input", "q", "k"))
    for _ in range(4)
]
seen = {}
for case in ("clean", "nan"):
    torch.manual_seed(0)
    student = build_efficient_student(teacher, "hedgehog")
    plan = build_conversion_plan(
        teacher, student, stage1_steps=8, stage1_lr=1e-2, stage1_batch_size=4, stage1_train="new+qk"
    )
    items = signals * 2
    if case == "nan" and rank == 1:
        items[3] = {
            0: signals[3][0],
            1: {**signals[3][1], "input": torch.full_like(signals[3][1]["input"], torch.nan)},
        }
    try:
        result = stage1_transfer(teacher, student, plan, iter(items), log_every=4)
        seen[case] = {"history": result.history}
    except NonFiniteLossError as e:
        seen[case] = {"error": str(e)}
    state = student.state_dict()
    seen[case]["finite"] = all(bool(torch.isfinite(v).all()) for v in state.values())
    seen[case]["weights"] = {k: v.flatten()[:64].tolist() for k, v in state.items() if v.is_floating_point()}
(out / f"rank{rank}.json").write_text(json.dumps(seen))
barrier()
cleanup_distributed()
end_program(0)  # as the attnxfer program exits after a multi-rank run (attnxfer.launch.process_exit)
