"""Run by a test under torchrun: the MAE val loss (`evaluate_loss`) of `mae_val_case`'s model on its 11
images, each rank scoring its exact share in batches of 3; rank 0 writes the loss summed over ranks."""

import sys
from pathlib import Path

from helpers import mae_val_case

from attnxfer.launch.process_exit import end_program
from attnxfer.train.distributed import barrier, cleanup_distributed
from attnxfer.train.evaluation import evaluate_loss
from attnxfer.train.runtime import create_runtime

out = Path(sys.argv[1])
acc = create_runtime("cpu", "fp32").accelerator
mae, loader = mae_val_case(3, acc.process_index, acc.num_processes)
loss = evaluate_loss(mae, loader, acc, seed=5)["loss"]
if acc.process_index == 0:
    (out / "loss").write_text(repr(loss))
barrier()
cleanup_distributed()
end_program(0)
