"""Operation counts (`operation_counts`): softmax, ReLU-linear and hashing against hand computations, every
registered attention counting its own, a formula counting what its zoo member counts, and a conversion's
measurements counting every layer."""

from __future__ import annotations

import pytest
from helpers import peaked_teacher

from attnxfer.apps.convert.report import _operations_section
from attnxfer.models.efficient import build_efficient_student, create_attention, list_attentions
from attnxfer.models.efficient.formula import HAND_DESIGNED
from attnxfer.train.measure import operation_counts

B, H, T, D = 2, 3, 5, 4  # batch, heads, tokens, head dim


def test_softmax_counts_by_hand():
    attn = create_attention("softmax", dim=H * D, num_heads=H)
    counts = attn.operation_counts(T, batch=B)
    # per (batch, head): q / sqrt(d): 5*4 mul; q k^T: 5*4*5 mul, 5*3*5 add; softmax: 5*4 max comparisons
    # and 25 exp (other), 25 shifts and 5*4 row-sum adds, 25 divisions; P v: 5*5*4 mul, 5*4*4 add
    assert counts.mul == B * H * (20 + 100 + 25 + 100)
    assert counts.add == B * H * (75 + 25 + 20 + 80)
    assert counts.other == B * H * (20 + 25)


def test_relu_linear_counts_by_hand_and_hashing_needs_fewer_multiplications():
    relu = create_attention("relu_linear", dim=H * D, num_heads=H).operation_counts(T, batch=B)
    # per (batch, head), m = d = 4: relu and + eps on q and k (40 other, 40 add); key state phi_k^T [v, 1]:
    # 4*5*5 mul, 4*4*5 add; read-out phi_q [KV | z]: 5*4*5 mul, 5*3*5 add; 5*4 divisions
    assert relu.mul == B * H * (100 + 100 + 20)
    assert relu.add == B * H * (40 + 80 + 75)
    assert relu.other == B * H * 40
    hashing_counts = create_attention("hashing", dim=H * D, num_heads=H, bits=D).operation_counts(T, batch=B)
    # per (batch, head), b = 4: hashing q and k 2*5*4*4 mul; (b + eps) [sum v, N] 5 mul; 5*4 divisions
    assert hashing_counts.mul == B * H * (160 + 5 + 20)
    assert hashing_counts.mul < relu.mul
    # at ViT-B's head size too; what remains are the hash projections (2 N d b), as many as ReLU-linear's
    # state and read-out, which the ±1 codes turn into additions
    relu_big = create_attention("relu_linear", dim=3 * 64, num_heads=3).operation_counts(197)
    hash_big = create_attention("hashing", dim=3 * 64, num_heads=3, bits=64).operation_counts(197)
    assert hash_big.mul < relu_big.mul
    assert hash_big.mul - 3 * (65 + 197 * 64) == 3 * 2 * 197 * 64 * 64  # (b + eps) terms, divisions


def test_conversion_measures_count_every_layer():
    teacher = peaked_teacher(depth=2, qkv_bias=True).eval()
    student = build_efficient_student(teacher, ["hashing", "relu_linear"])
    ops = operation_counts(teacher, student, batch=1)
    assert ops["tokens"] == 17 and [r["attention"] for r in ops["layers"]] == ["hashing", "relu_linear"]
    heads, d = 3, 16
    expect = create_attention("relu_linear", dim=heads * d, num_heads=heads).operation_counts(17)
    assert ops["layers"][1]["student"]["mul"] == expect.mul
    assert ops["total"]["student"]["mul"] == sum(r["student"]["mul"] for r in ops["layers"])
    assert (
        ops["total"]["teacher"]["mul"]
        == 2 * create_attention("softmax", dim=heads * d, num_heads=heads).operation_counts(17).mul
    )


def test_the_report_says_why_a_layer_has_no_counts():
    counted = {"mul": 8, "add": 8, "other": 0, "energy_pj": 1.0}
    layers = [{"layer": 0, "attention": "lab", "student": None, "teacher": counted}]
    text = "\n".join(
        _operations_section({"tokens": 17, "layers": layers, "total": {"student": None, "teacher": counted}})
    )
    assert (
        "| 0 | lab | — | — |" in text
        and "—: not counted: the attention defines no `operation_counts`" in text
    )


@pytest.mark.parametrize("name", [n for n in list_attentions() if n != "none"])  # none: 0 ops, tested apart
def test_every_registered_attention_counts_its_operations(name):
    options = {"linformer": dict(seq_len=17), "agent": dict(agent_grid=2, bias_grid=2)}.get(name, {})
    attn = create_attention(name, dim=48, num_heads=3, num_prefix_tokens=1, grid_size=4, **options)
    one, two = attn.operation_counts(17, batch=1), attn.operation_counts(17, batch=2)
    assert one is not None and one.mul > 0 and one.add > 0, (
        f"{name} does not count its operations: define operation_counts(num_tokens, batch) on its class "
        "(on a KernelAttention, feature_counts(num_tokens): its q and k features' counts and width)"
    )
    assert two.mul == 2 * one.mul and two.add == 2 * one.add  # per image: linear in the batch


def test_a_window_covering_the_grid_costs_what_softmax_costs():
    """One window over the whole grid plus exact prefix rows is softmax attention, operation for operation."""
    window = create_attention("window", dim=48, num_heads=3, num_prefix_tokens=1, grid_size=4, window_size=4)
    softmax = create_attention("softmax", dim=48, num_heads=3)
    assert window.operation_counts(17, batch=2) == softmax.operation_counts(17, batch=2)


@pytest.mark.parametrize("member", ["relu_linear", "elu_linear", "hedgehog", "cosformer", "focused_linear"])
def test_hand_designed_formulas_count_what_their_zoo_members_count(member):
    """Counted op by op from the program, a hand-designed formula costs what its zoo class counts from its
    own algorithm (window_linear's formula uses a 7x7 window, which the 5x5 test grid cannot hold)."""
    layout = dict(dim=48, num_heads=3, num_prefix_tokens=1, grid_size=5)
    paper = {"feature_dim": 16} if member == "hedgehog" else {}  # the formula's m = d (head dim 16)
    zoo = create_attention(member, **layout, **paper)
    formula = create_attention(HAND_DESIGNED[member], **layout)
    assert formula.operation_counts(26, batch=2) == zoo.operation_counts(26, batch=2)


def test_window_formula_counts_what_window_linear_counts():
    layout = dict(dim=48, num_heads=3, num_prefix_tokens=1, grid_size=(8, 8))
    zoo = create_attention("window_linear", window_size=4, kernel="hedgehog", **layout)
    formula = create_attention("formula:sum(proj.cat(softmax,neg.softmax)+win(4))", **layout)
    assert formula.operation_counts(65, batch=2) == zoo.operation_counts(65, batch=2)
