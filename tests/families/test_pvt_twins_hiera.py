"""The PVTv2, Twins and Hiera families against first principles, on tiny randomly initialised timm models.

Spatial-reduction attention (PVTv2 and its linear variant, Twins' GSA: N_k < N_q keys), Twins' padded local
windows and Hiera's mask units with pooled queries (N_q < N_k): key sets other than the queries', copy that
attends the student's values with the teacher's maps over them, one plan-time message for a student that
partitions its tokens otherwise, `train` on a PVTv2 teacher. The oracle (`oracles`) is timm's own unfused
modules with a hook on ``attn_drop``, or, for Hiera (no ``attn_drop``), the map recomputed from the module's
own weights — never attnxfer's code. The suites every family runs are ``test_adapters.py``'s.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import card, fast_cells, tiny_run

from attnxfer.apps.run.training import train
from attnxfer.checkpoints import export_student
from attnxfer.config import load_config
from attnxfer.transfer import PlanError, TeacherStudent, build_plan

from .cases import TINY_HIER, build_hier, plain_vit
from .oracles import logits_of, oracle_maps

FAMILIES = sorted(TINY_HIER)


def _pair(name: str):
    return build_hier(name, seed=0), build_hier(name, seed=1), TINY_HIER[name].images()


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("pvt_v2_linear",)))
def test_key_sets_differ_from_the_queries(name):
    """Reduced keys (PVTv2, Twins' GSA) and pooled queries (Hiera): timm's own maps are not square somewhere,
    so the suites' equality with them (`test_adapters.py`) holds over each layer's own key set."""
    teacher, x = build_hier(name), TINY_HIER[name].images()
    assert any(m.shape[-1] != m.shape[-2] for m in oracle_maps(teacher, x))


@pytest.mark.parametrize(
    "name", fast_cells(["hiera", "pvt_v2", "twins_svt"], ("pvt_v2",))
)  # the linear variant's copy is sr's
def test_copy_attends_the_students_values_with_the_teachers_maps(name):
    """A student with other weights: its logits equal timm's student run with each softmax map replaced by the
    teacher's (hooks on the student's maps); its borrowed q (and k rows of a fused kv) get no gradient and keep
    timm's names."""
    teacher, student, x = _pair(name)
    t_maps = oracle_maps(teacher, x)
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    keys = list(pair.student.state_dict())
    out = pair(x)
    if not name.startswith("hiera"):  # timm's own forward with the teacher's maps put in at attn_drop
        ref = copy.deepcopy(student)
        hooked = [m for n, m in ref.named_modules() if hasattr(m, "attn_drop") and n.endswith("attn")]
        for m in hooked:
            m.fused_attn = False
        it = iter(t_maps)
        hooks = [
            m.attn_drop.register_forward_hook(lambda mod, a, r: next(it).reshape(r.shape)) for m in hooked
        ]
        expected = logits_of(ref, x)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(out.logits, logits_of(student, x), atol=1e-4)
    assert keys == list(student.state_dict())
    out.logits.square().mean().backward()
    frozen = {n for n, p in student.named_parameters()} - {n for n, p in pair.student.named_parameters()}
    assert frozen and all(".q." in n or ".qkv." in n or ".kv." in n for n in frozen), frozen
    assert all(p.grad is not None for n, p in pair.student.named_parameters() if ".kv." in n)  # v rows train


@pytest.mark.parametrize(
    ("name", "kwargs", "says"),
    [
        ("pvt_v2", dict(sr_ratios=(2, 1, 1)), "stage stages.1 (|sr_ratio teacher 2, student 1"),
        (
            "pvt_v2",
            dict(linear=True),
            "stage stages.0 (|linear teacher False, student True; sr_ratio teacher 2",
        ),
        ("twins_svt", dict(wss=(3, 2)), "stage blocks.1 (|window_size teacher 3, student 2"),
        ("hiera", dict(q_pool=2), "student layer 3 <- teacher layer 3|q_stride teacher 4, student 1"),
    ],
)
def test_a_student_with_other_key_sets_is_refused_at_plan_time_naming_the_stage(name, kwargs, says):
    fam = TINY_HIER[name]
    teacher = fam.build(peaked=False)
    student = type(fam)(fam.arch, {**fam.kwargs, **kwargs}, fam.img_size).build(peaked=False)
    for mode in ("copy", "distill"):
        with pytest.raises(PlanError) as refused:
            build_plan(teacher, student, mode)
        for part in says.split("|"):
            assert part in str(refused.value), str(refused.value)


def test_a_student_of_one_stage_pairs_only_with_the_teachers_first_stage():
    """A plain ViT with the token grid of a PVTv2 teacher's first stage (56x56 at its 224 px): its later
    student layers would pair with teacher layers of the coarser stages. The plan says which student layers
    pair within the first stage (it used to pass, and the first step stopped on "token counts differ ...
    need the same image size", which both had); those alone plan."""
    teacher = build_hier("pvt_v2")
    student = plain_vit(img_size=224, patch_size=4, depth=3)
    with pytest.raises(PlanError, match=r"teacher layer 1 \(stage stages.1\).*transfer.layers=\[0\]"):
        build_plan(teacher, student, "distill")
    assert build_plan(teacher, student, "distill", layers=[0]).pairs == ((0, 0),)


@pytest.mark.slow
def test_train_runs_copy_and_distill_steps_on_a_pvt_v2_teacher(tmp_path):
    """`train` in process on an exported tiny PVTv2 teacher (32 px: 8x8 tokens in stage 0): two copy steps
    and two distill steps. A fresh student's maps are near uniform, so each layer's logged CE is log N_k of
    its own key set: (8/2)², (4/2)², 2² keys."""
    teacher = build_hier("pvt_v2", seed=0)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "input_size": (3, 32, 32)}
    spec = f"local-dir:{export_student(teacher, tmp_path / 'teacher', card=card())}"
    for mode in ("copy", "distill"):
        cfg = load_config(
            None,
            [
                f"run_dir={tmp_path / mode}",
                f"teacher.spec={spec}",
                f"transfer.mode={mode}",
                *tiny_run(8, 4),
                "data.img_size=32",
                "checkpoint.every_epoch=false",
                "schedule.max_steps=2",
                "device=cpu",
                "deterministic=true",
            ],
        )
        assert train(cfg).steps == 2
        logged = json.loads((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()[0])
        assert math.isfinite(logged["total"])
        if mode == "distill":
            for i, keys in enumerate((16, 4, 4)):
                assert abs(logged[f"attn_ce/{i}"] - math.log(keys)) < 0.01, (i, logged)
