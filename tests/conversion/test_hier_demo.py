"""The hierarchical demo: its recipes resolve to what they say, its PVTv2 micro-teacher is a
PVTv2 with full attention (sr_ratio 1) at 56 px, and the whole chain — teacher, scratch / copy / distill
students, conversion to hashing and relu_linear — runs in process at a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_run
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from attnxfer.apps.run.parts import build_student
from attnxfer.config import load_config

STUDENTS = ("hier_scratch", "hier_copy", "hier_distill")
CONVERSIONS = ("demo_pvt_hashing", "demo_pvt_relu_linear")


@pytest.mark.parametrize("name", ("hier_teacher", *STUDENTS))
def test_demo_recipes_resolve(name):
    cfg = load_config(f"demo/{name}", [])
    assert (cfg.data.dataset, cfg.data.img_size, cfg.model.name) == ("animal_mnist", 56, "pvt_v2_micro_56")
    if name in ("hier_copy", "hier_distill"):
        assert cfg.teacher.spec == "local-dir:runs/demo/hier_teacher/export"
        assert cfg.transfer.mode == name.split("_")[1]
    if name in STUDENTS:  # equal budgets
        assert (cfg.schedule.max_steps, cfg.data.batch_size, cfg.optim.lr) == (25, 128, 2.0e-3)


@pytest.mark.parametrize("name", CONVERSIONS)
def test_conversion_recipes_resolve(name):
    cfg = load_config(f"convert/{name}", [])
    assert cfg.teacher.spec == "local-dir:runs/demo/hier_teacher/export"
    assert cfg.convert.attention == name.removeprefix("demo_pvt_")
    assert (cfg.data.img_size, cfg.schedule.max_steps) == (56, 25)


def test_the_micro_teacher_is_a_full_attention_pvt_v2_at_56_px():
    """The training app's no-teacher path builds timm's PVTv2 (it takes neither img_size nor attn_layer),
    sr_ratio 1 in every stage (so the conversion swaps attention over all tokens), 14², 7², 4², 2² tokens."""
    cfg = load_config("demo/hier_teacher", [])
    model = build_student(cfg, None, num_classes=10, in_chans=1, img_size=56).eval()
    assert isinstance(model, PyramidVisionTransformerV2)
    attns = [b.attn for s in model.stages for b in s.blocks]
    assert len(attns) == 5 and all(a.sr is None and a.pool is None for a in attns)
    tokens = []
    for s in model.stages:
        s.register_forward_hook(lambda m, i, o: tokens.append(o.shape[-2] * o.shape[-1]))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 56, 56)).shape == (2, 10)
    assert tokens == [14 * 14, 7 * 7, 4 * 4, 2 * 2]


_TINY = [
    *tiny_run(16, 8),
    "data.in_chans=1",
    "schedule.max_steps=2",
    "device=cpu",
]


@pytest.mark.slow
def test_the_chain_runs_at_a_few_steps(tmp_path, monkeypatch):
    from attnxfer.apps.run.training import train
    from attnxfer.checkpoints.export import export_run
    from attnxfer.launch.cli import main

    monkeypatch.chdir(tmp_path)  # the recipes' relative runs/ paths land in tmp_path
    assert train(load_config("demo/hier_teacher", _TINY)).steps == 2
    export_run("runs/demo/hier_teacher", "runs/demo/hier_teacher/export", weights="raw", checkpoint="latest")
    for name in STUDENTS:
        assert train(load_config(f"demo/{name}", _TINY)).steps == 2
    logged = json.loads(Path("runs/demo/hier_distill/metrics.jsonl").read_text().splitlines()[0])
    assert [k for k in logged if k.startswith("attn_ce/")] == [f"attn_ce/{i}" for i in range(5)]
    for name in CONVERSIONS:
        tiny = [
            *_TINY,
            "convert.stage1_steps=2",
            "convert.stage1_batch_size=8",
            "convert.agreement_batches=1",
        ]
        assert main(["convert", "-c", f"convert/{name}", *tiny, "convert.speed_repeats=1"]) == 0
        report = json.loads(Path(f"runs/convert/{name}/report.json").read_text())
        assert len(report["agreement"]["teacher_input"]) == 5  # every block of every stage swapped
        assert report["stage1"]["steps"] == 2 and report["stage2"]["steps"] == 2
