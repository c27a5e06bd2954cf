"""The SAM ViT family: windowed blocks (the block pads the grid to whole windows and hands its attention a batch
of windows) beside global ones, and the decomposed relative-position bias, which depends on q."""

from __future__ import annotations

import copy

from attnxfer.models.attention import attention_maps
from attnxfer.transfer import TeacherStudent

from .cases import CASES


def test_sam_windows_are_padded_rows_of_the_batch_and_its_bias_takes_a_gradient():
    teacher, student, x = CASES["sam"].pair()
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert maps[0].shape == (2 * 4, 2, 16, 16)  # 6x6 patches padded to 2x2 windows of 4x4
    assert maps[1].shape == (2, 2, 36, 36)  # the global block
    pair = TeacherStudent(copy.deepcopy(teacher), student, mode="distill").train()
    pair(x).loss.backward()
    for blk in student.blocks:
        assert blk.attn.rel_pos_h.grad is not None and blk.attn.rel_pos_h.grad.abs().sum() > 0
