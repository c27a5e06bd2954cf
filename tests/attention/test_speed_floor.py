"""The speed floor (attention that projects but mixes no tokens), the inference path of the zoo cores, and the
speed report's measurement library.

The floor is checked against a hand computation: each teacher attention replaced by ``proj(norm(v))`` built
from the teacher's own weights, everything else run by timm's own forward. The zoo's inference path (head
groups, no autograd) is checked against the float64 implicit-map oracle and against the autograd path.
Speed rows are checked for structure and invariants, never for timings.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import tiny_vit
from torch import nn

from attnxfer.errors import InputError
from attnxfer.models.efficient import build_efficient_student, create_attention, list_attentions
from attnxfer.models.efficient.floor import FloorAttention, floor_class, floor_model
from attnxfer.models.efficient.focused import FocusedLinearAttention
from attnxfer.models.efficient.kernels import head_groups
from attnxfer.train.speed import (
    RATIOS,
    break_even_resolution,
    break_even_sweep,
    break_even_sweeps,
    interleaved_forward_seconds,
    speed_against_floor,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


class HandFloor(nn.Module):
    """proj(norm(v)) from a teacher attention's own weights: the rows of v in its fused ``qkv`` (or ``kv``),
    their bias (EVA keeps it apart as ``v_bias``); any extra call arguments (rope, masks, grids) ignored."""

    def __init__(self, attn: nn.Module, v_rows: slice, v_bias: torch.Tensor | None, norm: nn.Module) -> None:
        super().__init__()
        fused = attn.qkv if hasattr(attn, "qkv") else attn.kv
        self.weight = fused.weight[v_rows]
        self.bias = v_bias if v_bias is not None else None if fused.bias is None else fused.bias[v_rows]
        self.norm = norm
        self.proj = attn.proj

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.proj(self.norm(F.linear(x, self.weight, self.bias)))


def hand_floor(model: nn.Module, slots) -> nn.Module:
    """A copy of ``model`` with each attention at ``slots`` (parent-block getter) replaced by `HandFloor`."""
    oracle = copy.deepcopy(model)
    for block in slots(oracle):
        attn = block.attn
        width = attn.proj.in_features
        if hasattr(attn, "kv"):  # PVTv2: kv holds k then v; its `norm` belongs to the key reduction
            block.attn = HandFloor(attn, slice(width, 2 * width), None, nn.Identity())
        else:  # the output norm (scale_norm) where the class has one; EVA keeps v's bias apart
            norm = getattr(attn, "norm", None) or nn.Identity()
            block.attn = HandFloor(attn, slice(2 * width, 3 * width), getattr(attn, "v_bias", None), norm)
    return oracle


def floors_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FloorAttention)]


# ----------------------------------------------------------------------------- the floor attention


def test_floor_attention_is_the_projection_of_v_after_the_norm():
    torch.manual_seed(0)
    attn = FloorAttention(32, num_heads=2, qkv_bias=True, scale_norm=True, norm_layer=nn.LayerNorm).eval()
    with torch.no_grad():
        attn.norm.weight.normal_()
        attn.norm.bias.normal_()
    x = torch.randn(2, 9, 32)
    v = x @ attn.qkv.weight[64:].T + attn.qkv.bias[64:]  # rows v of the fused projection, by hand
    want = F.layer_norm(v, (32,), attn.norm.weight, attn.norm.bias) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
    assert attn.attention_map(*attn.project(x, "qk").values()) is None  # no map: nothing mixes
    assert attn.operation_counts(9).mul == 0


def test_floor_is_not_a_registered_attention():
    """Measurement only: convert, search and the listings never offer it."""
    assert "floor" not in list_attentions()
    made = floor_class(type(create_attention("performer", dim=8, num_heads=2)))
    assert floor_class(made) is made and made.__mro__[1] is FloorAttention


# ----------------------------------------------------------------------------- floor_model, per family


def test_floor_of_a_vit_teacher_is_timms_forward_with_proj_v_attention():
    teacher = tiny_vit(depth=2, plain_timm=True, qkv_bias=True).eval()
    floor = floor_model(teacher)
    assert len(floors_of(floor)) == 2
    assert type(teacher.blocks[0].attn).__name__ == "Attention"  # the teacher is left as it was
    oracle = hand_floor(teacher, lambda m: m.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(floor(x), oracle(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(floor(x), teacher(x), atol=1e-3)


def test_floor_of_a_rope_teacher_keeps_its_v_bias_and_norm():
    torch.manual_seed(0)
    kw = dict(
        img_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=2, num_classes=5, scale_attn_inner=True
    )
    teacher = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **kw).eval()
    with torch.no_grad():
        for blk in teacher.blocks:
            blk.attn.v_bias.normal_()
            blk.attn.norm.weight.normal_()
    floor = floor_model(teacher)
    assert len(floors_of(floor)) == 2
    oracle = hand_floor(teacher, lambda m: m.blocks)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(floor(x), oracle(x), rtol=1e-5, atol=1e-5)


def _pvt():
    torch.manual_seed(0)
    args = dict(
        embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), sr_ratios=(2, 2, 1, 1)
    )
    return timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5, **args).eval()


def _swin():
    torch.manual_seed(0)
    args = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval()


@pytest.mark.parametrize("family", ["pvt", "swin"])
def test_floor_of_a_hierarchical_teacher_projects_every_token(family):
    """PVTv2 with spatial reduction: the floor's v covers every token (as its converted student's does), from
    the teacher's kv rows; Swin: per token, so windows and the shift mask change nothing."""
    teacher = _pvt() if family == "pvt" else _swin()
    floor = floor_model(teacher)
    stages = teacher.stages if family == "pvt" else teacher.layers

    def blocks(m):
        return [blk for stage in (m.stages if family == "pvt" else m.layers) for blk in stage.blocks]

    assert len(floors_of(floor)) == sum(len(stage.blocks) for stage in stages)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(floor(x), hand_floor(teacher, blocks)(x), rtol=1e-5, atol=1e-5)


def test_floor_of_a_student_is_the_floor_of_its_teacher_and_leaves_it_alone():
    teacher = tiny_vit(depth=2, plain_timm=True).eval()
    student = build_efficient_student(teacher, "performer").eval()
    floor = floor_model(student)
    assert [type(b.attn).__name__ for b in floor.blocks] == ["FloorPerformerAttention"] * 2
    assert [type(b.attn).__name__ for b in student.blocks] == ["PerformerAttention"] * 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(floor(x), floor_model(teacher)(x), rtol=1e-6, atol=1e-6)


def test_floor_of_a_student_that_kept_softmax_layers_points_to_the_teacher():
    teacher = tiny_vit(depth=2, plain_timm=True).eval()
    student = build_efficient_student(teacher, ["relu_linear", "softmax"])
    with pytest.raises(InputError, match=r"blocks\.1\.attn .*floor_model\(teacher\)"):
        floor_model(student)


def test_floor_of_a_model_that_is_not_a_vit_says_so():
    with pytest.raises(InputError, match="not a timm"):
        floor_model(nn.Sequential(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- the zoo's inference path


def test_head_groups_cover_the_grid_once_in_order():
    for batch, heads, per_head, budget in [(1, 6, 10, 1000), (3, 4, 30, 1000), (2, 6, 30, 200), (2, 3, 1, 2)]:
        groups = head_groups(batch, heads, per_head, budget)
        cells = [(b, h) for bs, hs in groups for b in range(batch)[bs] for h in range(heads)[hs]]
        assert cells == [(b, h) for b in range(batch) for h in range(heads)]
    every = slice(None)
    assert head_groups(3, 4, 10, 1000) == [(every, every)]  # 100 pairs fit: one group
    assert head_groups(3, 4, 100, 1000) == [(slice(0, 2), every), (slice(2, 3), every)]  # 10 pairs: 2 items
    assert head_groups(1, 12, 120, 1000) == [(slice(0, 1), slice(0, 8)), (slice(0, 1), slice(8, 12))]
    # a pair with an eighth of the budget or more runs alone
    assert head_groups(2, 6, 125, 1000) == [
        (slice(b, b + 1), slice(h, h + 1)) for b in range(2) for h in range(6)
    ]


INFERENCE = [n for n in list_attentions() if n not in ("none", "softmax")]


@pytest.mark.parametrize("name", INFERENCE)
def test_inference_core_equals_the_map_oracle_and_the_autograd_path(name):
    """Without autograd the kernel cores run in head groups (forced small here: single heads and whole batch
    items) and write the merged-heads layout; agent reuses its resized position biases. Both must compute
    what the float64 implicit map says, and what the autograd path computes."""
    options = {
        "agent": dict(agent_grid=2, bias_grid=3),
        "linformer": dict(seq_len=21),
        "nystrom": dict(num_landmarks=5),
    }
    torch.manual_seed(0)
    module = create_attention(
        name,
        dim=32,
        num_heads=4,
        qkv_bias=True,
        num_prefix_tokens=1,
        grid_size=(4, 5),
        **options.get(name, {}),
    ).double()
    with torch.no_grad():
        for pname in module.new_parameter_names():
            module.get_parameter(pname).add_(0.3 * torch.randn_like(module.get_parameter(pname)))
    x = torch.randn(3, 21, 32, dtype=torch.float64)
    q, k, v = (t.detach() for t in module.project(x).values())
    graph = module.attend(q, k, v)  # the module's parameters want gradients: the autograd path
    per_head = 21 * module.feature_width() if hasattr(module, "feature_width") else 1
    for budget in (per_head, 9 * per_head, 1 << 30):  # single heads, two batch items, one group
        module.feature_chunk_elements = budget
        for _ in range(2):  # the second call reuses whatever the first one kept
            with torch.no_grad():
                fast = module.attend(q, k, v)
            torch.testing.assert_close(fast, graph, rtol=1e-12, atol=1e-12)
    if module.map_kind.has_map:
        with torch.no_grad():
            oracle = module.attention_map(q, k) @ v
            if isinstance(module, FocusedLinearAttention):
                oracle = oracle + module.local_term(v)
        torch.testing.assert_close(fast, oracle, rtol=1e-9, atol=1e-10)


def test_agent_recomputes_its_position_biases_when_they_change():
    torch.manual_seed(0)
    module = create_attention(
        "agent", dim=32, num_heads=2, num_prefix_tokens=1, grid_size=(4, 5), bias_grid=3
    )
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        before = module(x)
        module.agent_key_bias.add_(1.0)  # an optimiser step or a loaded checkpoint changes the parameter
        after = module(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, module(x))  # with grad: computed afresh, the same


# ----------------------------------------------------------------------------- measurement library


class Counting(nn.Module):
    """A model that records its calls in a shared log (to check how rounds are interleaved)."""

    def __init__(self, name: str, log: list[str], width: int = 4) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        assert not self.training and not torch.is_grad_enabled()  # timed as inference
        return self.linear(x)


def test_interleaved_rounds_rotate_the_order_and_restore_training_modes():
    log: list[str] = []
    models = {n: Counting(n, log).train(n != "b") for n in "abc"}
    times = interleaved_forward_seconds(models, torch.randn(2, 4), warmup=1, repeats=4)
    assert {n: (len(t.times), len(t.cpu_times)) for n, t in times.items()} == {n: (4, 4) for n in "abc"}
    assert all(s > 0 for t in times.values() for s in t.times)
    rounds = [log[i : i + 3] for i in range(0, len(log), 3)]
    assert rounds == [
        list("abc"),
        list("abc"),
        list("bca"),
        list("cab"),
        list("abc"),
    ]  # warm-up, then rotated
    assert [m.training for m in models.values()] == [True, False, True]


def test_speed_row_reads_teacher_student_and_floor_consistently():
    teacher = tiny_vit(depth=2, plain_timm=True).eval()
    student = build_efficient_student(teacher, "relu_linear").train()
    row = speed_against_floor(teacher, student, torch.randn(2, 3, 32, 32), warmup=0, repeats=2)
    assert (row["resolution"], row["tokens"], row["batch"], row["repeats"]) == (32, 17, 2, 2)
    for key, (top, bottom) in RATIOS.items():
        assert row[key] == pytest.approx(row[f"{bottom}_ms"] / row[f"{top}_ms"])
        assert row[key] == pytest.approx(row[f"{top}_images_per_s"] / row[f"{bottom}_images_per_s"])
    assert row["student_over_teacher"] == pytest.approx(row["student_over_floor"] * row["floor_over_teacher"])
    assert set(RATIOS) | {f"{key}_cpu" for key in RATIOS} <= set(row)  # CPU-time ratios on the CPU
    assert student.training  # put back as it came


def test_break_even_is_the_smallest_size_where_the_student_is_faster():
    rows = [{"resolution": r, "student_over_teacher": s} for r, s in [(448, 1.3), (224, 0.9), (320, 1.05)]]
    assert break_even_resolution(rows) == 320
    assert break_even_resolution(rows[1:2]) is None


def test_break_even_sweep_builds_each_size_once_in_increasing_order():
    built = []

    def build(size: int):
        built.append(size)
        teacher = tiny_vit(depth=1, img_size=size, plain_timm=True).eval()
        return teacher, build_efficient_student(teacher, "relu_linear")

    sweep = break_even_sweep(build, [48, 32, 48], warmup=0, repeats=1)
    assert built == [32, 48]
    assert [row["resolution"] for row in sweep["rows"]] == [32, 48]
    assert [row["tokens"] for row in sweep["rows"]] == [17, 37]
    assert sweep["break_even"] == break_even_resolution(sweep["rows"])


def test_a_student_of_fixed_length_is_skipped_at_other_sizes_and_the_others_are_measured():
    def build(size: int):
        teacher = tiny_vit(depth=1, img_size=size, plain_timm=True).eval()
        try:  # built for the 32 px grid (16 patches + the class token): refused at 48 px's, as convert's sweep
            linformer = build_efficient_student(teacher, "linformer", seq_len=17, proj_len=8)
        except InputError as e:
            linformer = e
        return teacher, {
            "relu_linear": build_efficient_student(teacher, "relu_linear"),
            "linformer": linformer,
        }

    sweeps = break_even_sweeps(
        build, [32, 48], ["relu_linear", "linformer"], warmup=0, repeats=1, floor=False
    )
    assert [row["resolution"] for row in sweeps["relu_linear"]["rows"]] == [32, 48]
    assert sweeps["relu_linear"]["skipped"] == []
    assert [row["resolution"] for row in sweeps["linformer"]["rows"]] == [32]
    (skip,) = sweeps["linformer"]["skipped"]
    assert skip["resolution"] == 48 and "seq_len 17 is not the model's 37 tokens" in skip["reason"]


def test_break_even_sweep_skips_refused_sizes_and_keeps_to_its_budget():
    def build(size: int):
        if size == 40:
            raise InputError("40 px: not a whole number of 16 px patches")
        teacher = tiny_vit(depth=1, img_size=size, plain_timm=True).eval()
        return teacher, build_efficient_student(teacher, "relu_linear")

    sweep = break_even_sweep(build, [32, 40], warmup=0, repeats=1, floor=False)
    assert [row["resolution"] for row in sweep["rows"]] == [32]
    assert sweep["skipped"] == [{"resolution": 40, "reason": "40 px: not a whole number of 16 px patches"}]
    assert "floor_ms" not in sweep["rows"][0] and "student_over_floor" not in sweep["rows"][0]
    assert "student_over_teacher" in sweep["rows"][0]
    # a zero budget: the first size is measured, every later one (it would cost more) is left out, saying so
    sweep = break_even_sweep(build, [32, 48, 64], warmup=0, repeats=1, budget_s=0)
    assert [row["resolution"] for row in sweep["rows"]] == [32]
    assert [item["resolution"] for item in sweep["skipped"]] == [48, 64]
    assert all("budget" in item["reason"] for item in sweep["skipped"])
