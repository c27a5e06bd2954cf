"""Load a student that `attnxfer export` wrote (a local folder or a Hub repo): efficient attention does
not load in plain timm, so the spec its config.json carries is turned back into the same model first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ..errors import InputError, MissingPathError
from ..models.student import student_from_spec
from ..run_layout import missing_path
from .resolve import parse_teacher_spec, read_state_dict, resolve


def load_student(
    spec: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """The exported student at ``spec`` (``local-dir:PATH``, a folder path, or ``hf-hub:ORG/NAME[@REV]``),
    in eval mode; Hub repos resolve through the Hugging Face cache exactly as teachers do."""
    spec = str(spec)
    if ":" not in spec and Path(spec).expanduser().is_dir():
        spec = f"local-dir:{spec}"
    if not spec.startswith(("local-dir:", "hf-hub:")):
        if "/" in spec and not Path(spec).expanduser().exists():  # a mistyped folder: say so, not the forms
            raise MissingPathError(f"load_student {spec!r}: {missing_path(Path(spec).expanduser())}")
        raise InputError(
            f"load_student reads `attnxfer export` folders: 'local-dir:PATH' (or a folder path) or "
            f"'hf-hub:ORG/NAME[@REV]', got {spec!r}"
        )
    parsed = parse_teacher_spec(spec, revision)
    res = resolve(parsed, cache_dir=None if cache_dir is None else str(cache_dir), role="student")
    config = json.loads(Path(res.files[0]).read_text(encoding="utf-8"))
    student = (config.get("attnxfer") or {}).get("student")
    if not student:
        raise InputError(
            f"{spec}: config.json has no attnxfer.student block, so `attnxfer export` did not write it; "
            "load a plain timm model with timm.create_model or attnxfer.load_teacher"
        )
    model = student_from_spec(student)
    state, _ = read_state_dict(res.weights)
    # tensors of other shapes: torch raises on them even where strict=False, in lines of its own
    own = model.state_dict()
    reshaped = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the student"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if reshaped or missing or unexpected:
        raise InputError(
            f"{spec}: the weights do not fit the student its config.json describes (missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, other shapes {reshaped[:4]}); was the folder edited?"
        )
    model.load_state_dict(state)
    return model.eval()
