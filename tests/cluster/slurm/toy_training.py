"""A toy training ``main(cfg)`` standing in for attnxfer's: small enough for a loopback cluster.

A linear model trained with plain SGD on a fixed synthetic batch. Each rank takes an equal
slice of the global batch and the gradients are averaged with an all-reduce (what DDP does),
so any world size must reproduce the single-process run on the whole batch. Rank 0 writes
the weights and step atomically every ``ckpt_every`` steps into ``run_dir``; a restarted run
resumes from that file (``resume: auto``). Every rank writes its final weights, so tests can
compare ranks with each other and with the single-process reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from attnxfer.train.distributed import init_distributed

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class ToyConfig:
    """The smallest config satisfying ``attnxfer.launch.slurm.RunConfig``."""

    run_dir: str
    steps: int = 12
    ckpt_every: int = 4
    lr: float = 0.1
    global_batch: int = 8
    features: int = 6
    outputs: int = 3
    seed: int = 0
    step_sleep_s: float = 0.0  # slows the first run (not a requeued one) so a test can preempt it
    fail_rank: int = -1  # this rank raises at fail_at_step ...
    fail_at_step: int = -1
    fail_mode: str = "raise"  # ... or dies without a word ("exit")

    def with_overrides(self, overrides: Mapping[str, Any]) -> ToyConfig:
        hints = typing.get_type_hints(ToyConfig)
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KeyError(f"unknown config keys {unknown}; known: {sorted(known)}")
        cast = {k: v if not isinstance(v, str) else hints[k](v) for k, v in overrides.items()}
        return dataclasses.replace(self, **cast)


def toy_problem(cfg: ToyConfig) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.global_batch, cfg.features, generator=gen)
    w_true = torch.randn(cfg.outputs, cfg.features, generator=gen)
    y = x @ w_true.T + 0.1 * torch.randn(cfg.global_batch, cfg.outputs, generator=gen)
    torch.manual_seed(cfg.seed + 1)
    return torch.nn.Linear(cfg.features, cfg.outputs), x, y


def _sgd_step(model: torch.nn.Module, lr: float) -> None:
    """Plain SGD by hand (torch.optim's first use imports torch._dynamo: seconds per process)."""
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint_step(run_dir: str | Path) -> int:
    path = Path(run_dir) / CHECKPOINT
    return int(load_file(str(path))["step"].item()) if path.exists() else 0


def toy_main(cfg: ToyConfig) -> dict[str, Any]:
    info = init_distributed()  # already done by TrainingTask under submitit: then a no-op
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.global_batch % info.world_size:
        raise ValueError(f"global_batch={cfg.global_batch} must split evenly over {info.world_size} ranks")
    model, x, y = toy_problem(cfg)
    start = 0
    ckpt = run_dir / CHECKPOINT
    if ckpt.exists():
        state = load_file(str(ckpt))
        with torch.no_grad():
            model.weight.copy_(state["weight"])
            model.bias.copy_(state["bias"])
        start = int(state["step"].item())
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    per_rank = cfg.global_batch // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    x, y = x[rows], y[rows]
    for step in range(start, cfg.steps):
        if info.rank == cfg.fail_rank and step == cfg.fail_at_step:
            if cfg.fail_mode == "exit":
                os._exit(3)
            raise RuntimeError(f"toy failure on rank {info.rank} at step {step}")
        loss = torch.nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        if info.world_size > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= info.world_size
        _sgd_step(model, cfg.lr)
        if info.rank == 0 and (step + 1) % cfg.ckpt_every == 0:
            _save_atomic({"weight": model.weight, "bias": model.bias, "step": torch.tensor(step + 1)}, ckpt)
        if restart == 0:
            time.sleep(cfg.step_sleep_s)
    final = {"weight": model.weight, "bias": model.bias, "step": torch.tensor(cfg.steps)}
    _save_atomic(final, run_dir / f"final_rank{info.rank}.safetensors")
    summary = {
        "rank": info.rank,
        "world_size": info.world_size,
        "resumed_from": start,
        "steps_run": cfg.steps - start,
        "restart": restart,
    }
    with open(run_dir / f"summary_rank{info.rank}.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


def reference_weights(cfg: ToyConfig) -> dict[str, torch.Tensor]:
    """Single process, whole batch, no checkpoints: what every distributed run must end with."""
    model, x, y = toy_problem(cfg)
    for _ in range(cfg.steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        _sgd_step(model, cfg.lr)
    return {"weight": model.weight.detach(), "bias": model.bias.detach()}


def final_weights(run_dir: str | Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / f"final_rank{rank}.safetensors"))


def allreduce_check(out_dir: str) -> None:
    """Run under torchrun or srun: every rank all-reduces ``rank + 1`` and records what it saw."""
    info = init_distributed(backend="gloo")
    value = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(value)
    record = dataclasses.asdict(info) | {"sum": value.item(), "backend": dist.get_backend()}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    allreduce_check(sys.argv[1])
