"""The SAM ViT family: windowed blocks (the block pads the grid to whole windows and hands its attention a batch
of windows) beside global ones, and the decomposed relative-position bias, which depends on q."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from attnxfer.models.attention import attention_maps
from attnxfer.transfer import PlanError, TeacherStudent, build_plan

from .cases import CASES, TINY, plain_vit
from .oracles import assert_shared_drop_path_keeps_the_maps, map_ce, oracle_maps


def test_sam_windows_are_padded_rows_of_the_batch_and_its_bias_takes_a_gradient():
    teacher, student, x = CASES["sam"].pair()
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert maps[0].shape == (2 * 4, 2, 16, 16)  # 6x6 patches padded to 2x2 windows of 4x4
    assert maps[1].shape == (2, 2, 36, 36)  # the global block
    pair = TeacherStudent(copy.deepcopy(teacher), student, mode="distill").train()
    pair(x).loss.backward()
    for blk in student.blocks:
        assert blk.attn.rel_pos_h.grad is not None and blk.attn.rel_pos_h.grad.abs().sum() > 0


def test_windowed_blocks_pair_only_with_layers_that_cut_the_same_windows():
    """A windowed block's keys are its window's: the plan refuses another window size, and pairs a student layer
    over all tokens (a plain ViT's) with the teacher's global block, whose map it then distils. Both used to
    fail at run time on the teacher's batch of windows (``batch sizes differ: teacher 8, student 2``)."""
    teacher = CASES["sam"].make(0)
    other = TINY["sam"]
    windows_3 = timm.create_model(
        other.arch, pretrained=False, num_classes=5, **{**other.kwargs, "window_size": 3}
    )
    with pytest.raises(PlanError, match="window_size teacher 4, student 3"):
        build_plan(copy.deepcopy(teacher), windows_3, "copy")
    vit = plain_vit(img_size=48)
    x = CASES["sam"].images(2)
    t_maps, s_maps = oracle_maps(teacher, x), oracle_maps(vit, x)
    plan = build_plan(copy.deepcopy(teacher), copy.deepcopy(vit), "distill")
    assert plan.pairs == ((0, 1), (1, 1))  # block 1 is the teacher's global block
    out = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(vit), mode="distill").train()(x)
    for i in range(2):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), map_ce(t_maps[1], s_maps[i]))


def test_shared_drop_path_reaches_the_windowed_blocks_batch_of_windows():
    """SAM's windowed blocks apply drop_path1 to their windows (B·windows rows): a shared per-image draw covers
    each image's windows (it did not broadcast: a RuntimeError), so a student with the teacher's weights keeps
    its maps (KL 0) under shared masks and not under its own."""
    teacher = CASES["sam"].make(0)
    x = torch.cat([CASES["sam"].images(2)] * 2)
    assert_shared_drop_path_keeps_the_maps(teacher, x)
