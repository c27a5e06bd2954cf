"""Pictures a training run draws after each evaluation, as callbacks the engine calls on rank 0 (it imports
no matplotlib itself)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...analysis import class_token_maps, layer_qk
from ...analysis.pictures import class_token_figure, display_image, figure_array
from ...train.objective import Pictures
from ...transfer.teacher_student import TeacherStudent


def class_token_pictures(pair: TeacherStudent, val_loader: Any, n: int, device: torch.device) -> Pictures:
    """Class-token maps (layer × head) of the first ``n`` validation images, the teacher's beside the
    student's (``attention/cls_maps_<i>``); the images are taken from ``val_loader`` at the first call."""
    held: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def draw(student: nn.Module) -> dict[str, Any]:
        if "x" not in held:
            held["x"] = next(iter(val_loader))[0][:n]
        x = held["x"].to(device)
        teacher, plan = pair.teacher, pair.plan
        was = student.training
        student.eval()
        try:
            borrow, t_cls = {}, None
            if teacher is not None:
                t_qk = layer_qk(teacher, x)
                t_cls = class_token_maps(teacher, x, qk=t_qk)
                chunks = plan.mode.borrow
                borrow = {  # q and k together bring the teacher's logit bias (relative-position tables)
                    s: {c: t_qk[t][c] for c in (*chunks, "bias") if c in "qk" or {"q", "k"} <= set(chunks)}
                    for s, t in plan.pairs
                    if chunks
                }
            s_cls = class_token_maps(student, x, borrow)
        finally:
            student.train(was)
        images = {}
        for b in range(x.shape[0]):
            pick = lambda maps, b=b: [m[b] if m is not None else None for m in maps]
            image = display_image(x[b])
            fig = (
                class_token_figure(image, pick(t_cls), pick(s_cls))
                if t_cls is not None
                else class_token_figure(image, pick(s_cls), names=("student", ""))
            )
            images[f"attention/cls_maps_{b}"] = figure_array(fig)
        return images

    return draw
