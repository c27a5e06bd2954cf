"""Which attnxfer files one distillation step of ``attnxfer train`` passes, from the CLI to the optimiser step.

Runs ``attnxfer train`` in this process on a tiny attention distillation (a random 2-block teacher saved as
timm saves a Hub model, the synthetic dataset, one step, CPU) under a profiler hook (`sys.setprofile`) and
prints two lists:

- the call chain: the attnxfer files on the stack when the optimiser steps (CLI -> command -> engine);
- the step: the attnxfer files whose functions ran from the start of the step (`Engine._micro_step`) to the
  optimiser's step, the model's own forward (``attnxfer/models/``) counted apart;

and the loss's carriers: the attnxfer classes made during the step with a field that holds a loss
(``total``, ``loss`` or ``ce``). Then it runs ``attnxfer convert`` on the same teacher (one stage-1 step) and
prints the call chain at stage 1's first optimiser step: it ends in the engine's ``train_step`` too.

    python scripts/step_files.py            # the lists and the counts docs/architecture.md states
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PACKAGE = str(ROOT / "attnxfer") + os.sep
#: a field of one of these names holds a loss (a type with one carries it)
LOSS_FIELDS = ("total", "loss", "ce")


def _teacher(folder: Path) -> Path:
    import timm
    import torch
    from timm.models import save_for_hf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            num_classes=10,
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=48,
            num_heads=3,
        )
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def _relative(filename: str) -> str:
    return os.path.relpath(filename, ROOT)


def _is_optimiser_step(frame) -> bool:
    return frame.f_code.co_name == "step" and os.path.join("torch", "optim") in frame.f_code.co_filename


def _package_stack(frame) -> list[str]:
    """``file:function`` of the attnxfer frames on the stack, the innermost first."""
    stack = []
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE):
            stack.append(f"{_relative(frame.f_code.co_filename)}:{frame.f_code.co_name}")
        frame = frame.f_back
    return stack


def _stage1_chain(tmp: Path, teacher: Path) -> list[str]:
    """The attnxfer files and functions on the stack when conversion's stage 1 first steps its optimiser
    (``attnxfer convert``, one stage-1 step, one stage-2 step), the CLI first."""
    from attnxfer.launch.cli import main as cli

    found: list[str] = []

    def profile(frame, event, arg):
        if not found and event == "call" and _is_optimiser_step(frame):
            found.extend(reversed(_package_stack(frame)))

    argv = [
        "convert",
        f"run_dir={tmp / 'convert'}",
        f"teacher.spec=local-dir:{teacher}",
        "convert.attention=hedgehog",
        "convert.stage1_steps=1",
        "convert.agreement_batches=1",
        "convert.speed_repeats=1",
        "convert.speed_batch_size=2",
        "data.dataset=synthetic",
        "data.kwargs.length=16",
        "data.img_size=32",
        "data.batch_size=4",
        "schedule.max_steps=1",
        "device=cpu",
        "log.progress=false",
        "log.trackers=[]",
    ]
    sys.setprofile(profile)
    try:
        code = cli(argv)
    finally:
        sys.setprofile(None)
    if code != 0 or not found:
        raise SystemExit(f"the tiny conversion failed (exit {code}) or never stepped its optimiser")
    return list(dict.fromkeys(found))


def main() -> None:
    import torch

    from attnxfer.launch.cli import main as cli

    chain: list[str] = []
    step: dict[str, None] = {}
    carriers: dict[str, None] = {}
    state = {"in_step": False, "done": False}

    def profile(frame, event, arg):
        if state["done"] or event != "call":
            return
        code = frame.f_code
        name = code.co_filename
        if code.co_name == "_micro_step" and name.endswith(os.path.join("train", "engine.py")):
            state["in_step"] = True
        if not state["in_step"]:
            return
        if _is_optimiser_step(frame):
            chain.extend(where.split(":")[0] for where in _package_stack(frame))
            state["done"] = True
            return
        if name.startswith(PACKAGE):
            step[_relative(name)] = None
        made = None
        if code.co_name == "__init__":  # a dataclass's is generated code (no file of attnxfer)
            made = frame.f_locals.get("self")
        elif "_cls" in code.co_varnames[:1]:  # a named tuple's constructor (a generated lambda)
            made = frame.f_locals.get("_cls")
        if made is not None:
            cls = made if isinstance(made, type) else type(made)
            fields = getattr(cls, "__dataclass_fields__", None) or getattr(cls, "_fields", ())
            if cls.__module__.startswith("attnxfer") and any(f in fields for f in LOSS_FIELDS):
                carriers[cls.__qualname__] = None

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _teacher(Path(tmp) / "teacher")
        argv = [
            "train",
            f"run_dir={Path(tmp) / 'run'}",
            f"teacher.spec=local-dir:{teacher}",
            "model.name=vit_tiny_patch16_224",
            "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
            "model.mirror_teacher=false",
            "transfer.mode=distill",
            "transfer.ce_path=rows",
            "data.dataset=synthetic",
            "data.img_size=32",
            "data.batch_size=4",
            "schedule.max_steps=1",
            "device=cpu",
            "log.progress=false",
            "log.trackers=[]",
            "log.attention_images=0",
            "checkpoint.every_epoch=false",
        ]
        sys.setprofile(profile)
        try:
            code = cli(argv)
        finally:
            sys.setprofile(None)
        stage1 = _stage1_chain(Path(tmp), teacher) if code == 0 else []
    if code != 0 or not chain:
        raise SystemExit(f"the tiny run failed (exit {code}) or never stepped its optimiser")
    chain_files = list(dict.fromkeys(reversed(chain)))
    outside = [f for f in step if not f.startswith(os.path.join("attnxfer", "models"))]
    models = [f for f in step if f.startswith(os.path.join("attnxfer", "models"))]
    print("call chain at the optimiser step (CLI first):")
    print("".join(f"  {f}\n" for f in chain_files), end="")
    print("files the step ran (start of the step to optimizer.step), the model's forward apart:")
    print("".join(f"  {f}\n" for f in outside), end="")
    print(f"  + {len(models)} under attnxfer/models/ (the attention layers' forward)")
    between = list(dict.fromkeys([*chain_files, *outside]))
    print(f"files from the CLI to optimizer.step, the model's forward apart: {len(between)}")
    print(f"types carrying the loss: {len(carriers)} ({', '.join(carriers)})")
    print("conversion's stage 1: the call chain at its optimiser step (CLI first):")
    print("".join(f"  {f}\n" for f in stage1), end="")


if __name__ == "__main__":
    main()
