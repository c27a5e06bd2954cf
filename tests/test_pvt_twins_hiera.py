"""PVTv2, Twins and Hiera adapters against first principles, on tiny randomly initialised timm models.

Spatial-reduction attention (PVTv2 and its linear variant, Twins' GSA: N_k < N_q keys), Twins' padded local
windows and Hiera's mask units with pooled queries (N_q < N_k). The oracle (`pvt_twins_hiera_oracles`) is
timm's own unfused modules with a hook on ``attn_drop``, or, for Hiera (no ``attn_drop``), the map recomputed
from the module's own weights — never attnxfer's code.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from family_oracles import assert_distill_matches_oracle, logits_of
from helpers import fast_cells
from pvt_twins_hiera_oracles import TINY_HIER, build, oracle_maps
from test_export import card

from attnxfer import load_student
from attnxfer.apps.training import train
from attnxfer.checkpoints import export_student
from attnxfer.config import load_config
from attnxfer.models.attention import attention_layers, attention_maps
from attnxfer.transfer import DualViT, PlanError, build_plan

FAMILIES = sorted(TINY_HIER)


def _pair(name: str):
    return build(name, seed=0), build(name, seed=1), TINY_HIER[name].images()


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("pvt_v2_linear",)))
def test_swapped_layers_keep_timms_forward_names_and_maps(name):
    """The class swap changes nothing timm computes; the adapters' maps on request (`attention_maps`) equal
    timm's softmax, each over its own key set (reduced keys, padded windows, pooled queries)."""
    teacher, _, x = _pair(name)
    expected = logits_of(teacher, x)
    oracle = oracle_maps(teacher, x)
    swapped = copy.deepcopy(teacher)
    assert all(type(a).__name__.startswith("Transfer") for _, a in attention_layers(swapped))
    assert list(swapped.state_dict()) == list(teacher.state_dict())
    torch.testing.assert_close(logits_of(swapped, x), expected, rtol=0, atol=0)
    maps = attention_maps(swapped, x)
    assert len(maps) == len(oracle)
    for i, ref in enumerate(oracle):
        torch.testing.assert_close(maps[i], ref, rtol=1e-5, atol=1e-6)
    assert any(m.shape[-1] != m.shape[-2] for m in oracle)  # the key set differs from the queries somewhere


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("pvt_v2_linear", "twins_svt")))
def test_copy_modes_with_the_teachers_own_weights_reproduce_its_logits(name):
    """copy, copy_q, copy_k, copy_v with the teacher as its own student: the borrowed q/k/v over the teacher's
    key set (reduced, windowed, pooled) put back exactly what the teacher computes."""
    teacher, _, x = _pair(name)
    expected = logits_of(teacher, x)
    # copy_q/k/v where the key set is not the queries' (reduced keys, pooled queries); plain copy everywhere
    for mode in ("copy", "copy_q", "copy_k", "copy_v") if name in ("pvt_v2", "hiera") else ("copy",):
        dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(teacher), mode=mode).train()
        torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5, msg=mode)


@pytest.mark.parametrize(
    "name", fast_cells(["hiera", "pvt_v2", "twins_svt"], ("pvt_v2",))
)  # the linear variant's copy is sr's
def test_copy_attends_the_students_values_with_the_teachers_maps(name):
    """A student with other weights: its logits equal timm's student run with each softmax map replaced by the
    teacher's (hooks on the student's maps); its borrowed q (and k rows of a fused kv) get no gradient and keep
    timm's names."""
    teacher, student, x = _pair(name)
    t_maps = oracle_maps(teacher, x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    keys = list(dual.student.state_dict())
    out = dual(x)
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
    frozen = {n for n, p in student.named_parameters()} - {n for n, p in dual.student.named_parameters()}
    assert frozen and all(".q." in n or ".qkv." in n or ".kv." in n for n in frozen), frozen
    assert all(p.grad is not None for n, p in dual.student.named_parameters() if ".kv." in n)  # v rows train


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("hiera",)))
def test_distill_ce_and_gradients_equal_the_materialised_maps(name):
    """Per layer, the exact CE over each attention's own key set = -Σ P_t log P_s from timm's maps, and the
    student's gradients = those of that materialised loss."""
    teacher, student, x = _pair(name)
    _, compared = assert_distill_matches_oracle(teacher, student, x, oracle_maps)
    assert compared


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


@pytest.mark.parametrize("name", fast_cells(["pvt_v2", "twins_svt", "hiera"], ("hiera",)))
def test_a_distilled_student_exports_to_plain_timm_and_loads_back(name, tmp_path):
    """After a distillation step (layers walked and swapped), the student exports through timm's own save:
    timm.create_model and load_student rebuild it with bit-identical logits and timm's own classes."""
    teacher, student, x = _pair(name)
    DualViT(teacher, student, mode="distill").train()(x)
    student.eval()
    out = export_student(student, tmp_path / "out", card=card())
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert all(
        type(m).__module__.startswith("timm.") for n, m in plain.named_modules() if n.endswith(".attn")
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student(x), rtol=0, atol=0)
        torch.testing.assert_close(load_student(str(out))(x), student(x), rtol=0, atol=0)


@pytest.mark.slow
def test_train_runs_copy_and_distill_steps_on_a_pvt_v2_teacher(tmp_path):
    """`train` in process on an exported tiny PVTv2 teacher (32 px: 8x8 tokens in stage 0): two copy steps
    and two distill steps. A fresh student's maps are near uniform, so each layer's logged CE is log N_k of
    its own key set: (8/2)², (4/2)², 2² keys."""
    teacher = build("pvt_v2", seed=0)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "input_size": (3, 32, 32)}
    spec = f"local-dir:{export_student(teacher, tmp_path / 'teacher', card=card())}"
    for mode in ("copy", "distill"):
        cfg = load_config(
            None,
            [
                f"run_dir={tmp_path / mode}",
                f"teacher.spec={spec}",
                f"transfer.mode={mode}",
                "data.dataset=synthetic",
                "data.img_size=32",
                "data.batch_size=4",
                "data.synthetic_length=8",
                "log.progress=false",
                "log.tensorboard=false",
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
