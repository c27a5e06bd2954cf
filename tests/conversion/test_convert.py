"""attnxfer convert: implicit-map losses against materialised oracles, stage 1 (lowers the map loss, moves
only what it should), the engine's new pieces (logit distillation, efficient students), the CLI end to end,
and clear errors."""

import json
import re

import pytest
import torch
import yaml
from helpers import (
    CONVERT_OPTIONS,
    peaked_teacher,
    rewrite_checkpoint_state,
    run_cli,
    tiny_convert_report,
    tiny_run,
    tiny_vit,
)
from safetensors.torch import load_file

from attnxfer.apps.convert.convert import conversion_plan_from_config
from attnxfer.apps.run.parts import build_student
from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.config import list_recipes, load_config, resolve_recipe
from attnxfer.config.study_spec import load_study
from attnxfer.errors import InputError
from attnxfer.models import attention_maps, capture_attention
from attnxfer.models.attention import registry
from attnxfer.models.efficient import (
    build_efficient_student,
    check_softmax_teacher,
    new_parameters,
    with_attention,
)
from attnxfer.models.efficient.linear import ReLULinearAttention
from attnxfer.train.measure import map_agreement
from attnxfer.train.speed import forward_speed
from attnxfer.train.stage1 import stage1_transfer
from attnxfer.transfer import PlanError, TeacherStudent, build_plan
from attnxfer.transfer.conversion import ConversionPlan, build_conversion_plan
from attnxfer.transfer.map_losses import agreement, implicit_map_loss


def _teacher(depth=2, **kw):
    return peaked_teacher(depth=depth, qkv_bias=True, **kw).eval().requires_grad_(False)


def _plan(teacher, student, **kw) -> ConversionPlan:
    return build_conversion_plan(teacher, student, **{"stage1_batch_size": 8, **kw})


def _inputs(n=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n)]


def _forever(xs):
    while True:
        yield from xs


def _teacher_qk_input(teacher, x, layer):
    with torch.no_grad(), capture_attention(teacher, [layer], ("input", "q", "k")) as store:
        teacher.forward_features(x)
    return store[layer]


# ------------------------------------------------------------------------------------- implicit-map losses
@pytest.mark.parametrize(
    "name,loss",
    [
        ("hedgehog", "ce"),
        ("window_linear", "ce"),
        ("performer", "ce"),
        pytest.param("nystrom", "mse", marks=pytest.mark.slow),  # its pseudo-inverse: seconds
        ("hedgehog", "mse"),
    ],
)
def test_implicit_map_loss_matches_the_materialised_oracle(name, loss):
    """Chunked, checkpointed loss == the loss on explicit N x N maps, in value, KL and gradients."""
    teacher = _teacher(depth=1)
    student = build_efficient_student(teacher, name, **CONVERT_OPTIONS.get(name, {}))
    attn = student.blocks[0].attn
    for p in attn.parameters():  # move off the init so the gradients are not special
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    sig = _teacher_qk_input(teacher, x, 0)
    q, k = attn.project(sig["input"], "qk").values()
    res = implicit_map_loss(attn, q, k, sig["q"], sig["k"], loss, chunk=5)  # 17 rows: chunks of 5, 5, 5, 2
    grads = torch.autograd.grad(res.total, [q, k, *attn.parameters()], allow_unused=True, retain_graph=True)

    p_t = attention_maps(teacher, x)[0]  # the teacher's oracle: explicit softmax maps
    a_s = attn.attention_map(q, k)  # the whole implicit map at once
    if loss == "ce":
        ref = -(p_t * a_s.log()).sum(-1).mean()
        ref_metric = (p_t * (p_t.log() - a_s.log())).sum(-1).mean()
    else:
        ref = ref_metric = (a_s - p_t).pow(2).mean()
    ref_grads = torch.autograd.grad(ref, [q, k, *attn.parameters()], allow_unused=True)
    torch.testing.assert_close(res.total, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(agreement(res), ref_metric.detach(), rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_map_agreement_teacher_inputs_is_kl_of_explicit_maps():
    teacher = _teacher()
    student = build_efficient_student(teacher, "hedgehog")
    xs = _inputs(2)
    rows = map_agreement(teacher, student, xs, inputs="teacher")
    for layer in range(2):
        kls = []
        for x in xs:
            sig = _teacher_qk_input(teacher, x, layer)
            attn = student.blocks[layer].attn
            q, k = attn.project(sig["input"], "qk").values()
            p_t, a_s = attention_maps(teacher, x)[layer], attn.attention_map(q, k)
            kls.append((p_t * (p_t.log() - a_s.log())).sum(-1).mean())
        assert rows[layer]["metric"] == "kl"
        assert rows[layer]["value"] == pytest.approx(float(torch.stack(kls).mean().detach()), rel=1e-4)
        assert rows[layer]["value"] > 0.05  # a peaked teacher is not a hedgehog at init


def test_a_window_students_kl_floor_is_the_least_kl_its_zeros_allow_and_the_report_says_it():
    """Outside its window a window student's map is 0 where the teacher attends, which KL counts at
    log(p / fp32's tiny): ``kl_floor`` is the least KL a map with those zeros can reach (p's mass there at that
    cost, plus m log m for the mass m kept), reached by the teacher's own q/k (softmax in the window is p
    renormalised), and report.md says how much of the KL is that floor; a map without zeros has none."""
    from attnxfer.apps.convert.convert import _merge_agreement
    from attnxfer.apps.convert.report import _agreement_section

    teacher, xs = _teacher(), _inputs(2)
    student = build_efficient_student(teacher, ["window", "hedgehog"], window_size=2)
    rows = map_agreement(teacher, student, xs, inputs="teacher")
    tiny = torch.finfo(torch.float32).tiny
    floors = []
    for x in xs:
        attn = student.blocks[0].attn
        q, k = attn.project(_teacher_qk_input(teacher, x, 0)["input"], "qk").values()
        p, a = attention_maps(teacher, x)[0], attn.attention_map(q, k)
        zero = a <= tiny
        kept = (p * ~zero).sum(-1)
        floors.append(((p * zero * (p / tiny).log()).sum(-1) + kept * kept.log()).mean())
    window, hedgehog = rows
    assert window["kl_floor"] == pytest.approx(float(torch.stack(floors).mean()), rel=1e-4)
    assert window["kl_floor"] > 10 and window["value"] == pytest.approx(window["kl_floor"], rel=1e-4)
    assert hedgehog["kl_floor"] is not None and hedgehog["kl_floor"] < 1e-6 < hedgehog["value"]
    merged = _merge_agreement({"before_stage1": rows, "after_stage1": None, "after_stage2": None})
    said = "\n".join(_agreement_section({"agreement": {"teacher_input": merged}}, "teacher_input", "inputs"))
    assert "Block 0 (window): its map is 0 on keys the teacher attends to" in said
    assert f"its KL cannot fall below {window['kl_floor']:.4g}" in said and "Block 1" not in said


# ------------------------------------------------------------------------------------- stage 1
@pytest.mark.slow
def test_stage1_lowers_the_map_loss_on_a_tiny_model():
    teacher = _teacher()
    student = build_efficient_student(teacher, "hedgehog")
    plan = _plan(teacher, student, stage1_steps=30, stage1_lr=5e-2)
    train, held_out = _inputs(4, seed=0), _inputs(2, seed=1)
    before = map_agreement(teacher, student, held_out)
    result = stage1_transfer(teacher, student, plan, _forever(train), warmup_steps=2)
    after = map_agreement(teacher, student, held_out)
    assert result.steps == 30 and result.history[-1]["loss"] < result.history[0]["loss"]
    for b, a in zip(before, after):  # on held-out images: the fit generalises
        assert a["value"] < 0.8 * b["value"], (b, a)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage1_moves_only_the_new_parameters():
    teacher = _teacher()
    teacher_before = _snapshot(teacher)
    student = build_efficient_student(teacher, "window_linear", window_size=2)
    new = {name for name, _ in new_parameters(student)}
    assert new and all(".feature_map_" in n or "linear_log_weight" in n for n in new)
    before = _snapshot(student)
    stage1_transfer(teacher, student, _plan(teacher, student, stage1_steps=5), _forever(_inputs(2)))
    after = _snapshot(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == new
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    # afterwards everything trains again (stage 2 is end to end)
    assert all(p.requires_grad for p in student.parameters())


def test_stage1_qk_moves_only_q_and_k_rows():
    teacher = _teacher()
    student = build_efficient_student(teacher, "relu_linear")
    assert not list(new_parameters(student))
    with pytest.raises(ValueError, match="nothing to train.*stage1_train=qk"):
        _plan(teacher, student)
    softmax = build_efficient_student(teacher, "softmax")  # the teacher's own: nothing to convert
    with pytest.raises(ValueError, match=r"no block's attention \(softmax\) has a map to fit"):
        _plan(teacher, softmax, stage1_train="qk")
    attention_free = build_efficient_student(
        teacher, "none"
    )  # no map at all: not "softmax, the teacher's own"
    with pytest.raises(ValueError, match=r"no block's attention \(none\) has a map to fit"):
        _plan(teacher, attention_free, stage1_train="qk")
    plan = _plan(teacher, student, stage1_train="qk", stage1_steps=5, stage1_lr=1e-3)
    before = _snapshot(student)
    xs = _inputs(2)
    kl_before = sum(r["value"] for r in map_agreement(teacher, student, xs))
    stage1_transfer(teacher, student, plan, _forever(xs), weight_decay=0.1)
    after = _snapshot(student)
    d = 48
    for k in before:
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            assert not torch.equal(before[k][: 2 * d], after[k][: 2 * d]), k
            assert torch.equal(before[k][2 * d :], after[k][2 * d :]), k  # v rows: bit-identical
        else:
            assert torch.equal(before[k], after[k]), k
    assert sum(r["value"] for r in map_agreement(teacher, student, xs)) < kl_before


@pytest.mark.slow
def test_stage1_output_loss_for_attentions_without_maps():
    teacher = _teacher()
    student = build_efficient_student(teacher, "hydra")
    plan = _plan(teacher, student, stage1_steps=30, stage1_lr=5e-2)
    assert [layer.loss for layer in plan.layers] == ["output", "output"]
    xs = _inputs(2)
    before = map_agreement(teacher, student, xs)
    stage1_transfer(teacher, student, plan, _forever(xs))
    after = map_agreement(teacher, student, xs)
    assert all(r["metric"] == "output_mse" for r in after)
    assert sum(r["value"] for r in after) < sum(r["value"] for r in before)


# ------------------------------------------------------------------------------------- the engine's new pieces
def test_logit_distillation_and_efficient_attention_distillation_in_one_teacher_student_pass():
    teacher = _teacher()
    student = build_efficient_student(teacher, "hedgehog")
    for p in student.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    plan = build_plan(teacher, student, "distill", weight=0.5, logit_weight=2.0, logit_temperature=3.0)
    assert "logit distillation: weight 2, temperature 3" in plan.describe()
    pair = TeacherStudent(teacher, student, plan).train()
    x = torch.randn(4, 3, 32, 32)
    out = pair(x)
    assert set(out.terms) == {"attn_ce/0", "attn_ce/1", "logit_kd"}
    t_logits, s_logits = teacher(x), student(x)
    T = 3.0
    p_t = (t_logits / T).softmax(-1)
    kd = T * T * (p_t * (p_t.log() - (s_logits / T).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(out.terms["logit_kd"], kd, rtol=1e-5, atol=1e-6)
    # attention terms: CE between the teacher's explicit maps and the student's implicit maps, each model on
    # its own hidden states
    t_maps = attention_maps(teacher, x)
    with torch.no_grad(), capture_attention(student, fields=("q", "k")) as s:
        student.forward_features(x)
    for i in range(2):
        a_s = student.blocks[i].attn.attention_map(s[i]["q"], s[i]["k"])
        torch.testing.assert_close(
            out.terms[f"attn_ce/{i}"], -(t_maps[i] * a_s.log()).sum(-1).mean(), rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(
        out.loss, 0.5 * (out.terms["attn_ce/0"] + out.terms["attn_ce/1"]) + 2.0 * kd, rtol=1e-5, atol=1e-6
    )
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    # mode none + logit distillation: the teacher runs only for its logits; eval runs the student alone
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "none", logit_weight=1.0)).train()
    assert set(pair(x).terms) == {"logit_kd"}
    torch.testing.assert_close(pair.eval()(x).logits, student(x))


def test_plan_errors_for_efficient_students():
    teacher = _teacher()
    student = build_efficient_student(teacher, "hedgehog")
    with pytest.raises(PlanError, match="needs softmax attention in the student.*'hedgehog'.*mode=distill"):
        build_plan(teacher, student, "copy")
    with pytest.raises(
        PlanError, match="no attention map to distil.*out of transfer.layers.*transfer.mode=none"
    ):
        build_plan(teacher, build_efficient_student(teacher, "hydra"), "distill")
    with pytest.raises(PlanError, match="no classifier head.*logit_distill=0"):
        headless = tiny_vit(depth=2, num_classes=0)
        build_plan(headless, build_efficient_student(headless, "hedgehog"), "none", logit_weight=1.0)
    with pytest.raises(PlanError, match="needs a teacher"):
        build_plan(None, student, "none", logit_weight=1.0)


def test_a_logit_or_feature_comparison_that_cannot_run_says_how_to_leave_it_out_in_the_words_that_asked():
    """A weight is set to 0 and an entry removed: the advice once read 'set remove transfer.losses[0]'."""
    teacher, student = tiny_vit(depth=2, num_classes=10), tiny_vit(depth=2, num_classes=5)
    with pytest.raises(
        PlanError, match=r"student 5; remove transfer.losses\[0\] \(logit_kd\), or use a teacher trained on"
    ):
        build_plan(teacher, student, "none", losses=[{"name": "logit_kd"}])
    with pytest.raises(
        PlanError, match=r"student 5; set transfer.logit_distill=0, or use a teacher trained on"
    ):
        build_plan(teacher, student, "none", logit_weight=1.0)
    headless = tiny_vit(depth=2, num_classes=0)
    with pytest.raises(
        PlanError, match=r"no teacher logits to distil; remove transfer.losses\[0\] \(logit_kd\)$"
    ):
        build_plan(headless, student, "none", losses=[{"name": "logit_kd"}])
    with pytest.raises(
        PlanError, match=r"embed_dim \(\d+\), or remove transfer.losses\[0\] \(feature_distill\)$"
    ):
        build_plan(
            teacher,
            tiny_vit(depth=2, embed_dim=24, num_heads=2),
            "none",
            losses=[{"name": "feature_distill"}],
        )


def test_stage_2_distils_the_maps_of_the_blocks_that_have_one():
    """convert.attention=[none, hashing]: stage 1 fits block 1 alone, and stage 2's default distillation
    leaves out block 0 (no map) rather than refusing the plan; named layers, mode none, or a student without
    any map are left as they are (the plan says what to change for the last)."""
    from attnxfer.apps.convert.stage2 import stage2_layers
    from attnxfer.config import TrainConfig, apply_overrides

    teacher = _teacher(depth=4)
    mixed = build_efficient_student(teacher, ["none", "hashing", "hydra", "hedgehog"])
    cfg = TrainConfig()
    with pytest.raises(PlanError, match="no attention map to distil"):
        build_plan(teacher, mixed, "distill")
    layers = stage2_layers(cfg, mixed)["transfer.layers"]
    assert layers == [1, 3]
    build_plan(teacher, mixed, "distill", layers=layers)  # the plan stage 2 builds from them stands
    assert stage2_layers(apply_overrides(cfg, {"transfer.end_layer": -1}), mixed) == {"transfer.layers": [1]}
    assert stage2_layers(apply_overrides(cfg, {"transfer.layers": [1]}), mixed) == {}
    assert stage2_layers(apply_overrides(cfg, {"transfer.mode": "none"}), mixed) == {}
    assert stage2_layers(cfg, build_efficient_student(teacher, "hydra")) == {}
    assert stage2_layers(cfg, build_efficient_student(teacher, "hashing")) == {}


# ------------------------------------------------------------------------------------- bad input
def test_clear_errors_for_bad_conversions():
    teacher = _teacher()
    with pytest.raises(ValueError, match="unknown attention 'performr'.*performer"):
        build_efficient_student(teacher, "performr")
    with pytest.raises(ValueError, match="one per block"):
        build_efficient_student(teacher, ["hedgehog"] * 3)
    with pytest.raises(TypeError, match="got str 'vit_tiny_patch16_224': build it first"):
        build_efficient_student("vit_tiny_patch16_224", "hedgehog")
    with pytest.raises(ValueError, match="attention_kwargs.*num_featurs"):
        build_efficient_student(teacher, "performer", num_featurs=8)
    nystrom = build_efficient_student(teacher, "nystrom", num_landmarks=4)
    with pytest.raises(
        ValueError, match="map loss 'ce' does not apply to a 'signed' attention.*'mse' or 'output'"
    ):
        _plan(teacher, nystrom, map_loss="ce", stage1_train="qk")
    with pytest.raises(ValueError, match="blocks.0.attn is 'hedgehog', not softmax attention"):
        check_softmax_teacher(build_efficient_student(teacher, "hedgehog"))
    with pytest.raises(ValueError, match="classifies 10 classes but the data has 7"):
        build_efficient_student(teacher, "hedgehog", num_classes=7)
    headless = build_efficient_student(tiny_vit(depth=2, num_classes=0), "hedgehog", num_classes=7)
    assert headless.num_classes == 7  # a headless (MAE-style) teacher's student gets a new head


@pytest.mark.parametrize(
    "name, option, said",
    [
        (
            "performer",
            dict(num_features=2.5),
            "num_features must be an integer or None (null in a config) for performer, got 2.5",
        ),
        ("performer", dict(orthogonal="no"), "orthogonal must be true or false for performer, got 'no'"),
        (
            "hedgehog",
            dict(feature_dim=True),
            "feature_dim must be an integer or None (null in a config) for hedgehog, got True",
        ),
        ("nystrom", dict(num_landmarks="4"), "num_landmarks must be an integer for nystrom, got '4'"),
        (
            "window",
            dict(window_size=[2.5, 2]),
            "window_size must be an integer or a list of integers for window",
        ),
        ("hashing", dict(temperature=True), "temperature must be a number for hashing, got True"),
    ],
)
def test_an_option_of_another_kind_is_refused_not_coerced(name, option, said):
    # not cut to 2, read as 4 or taken as 1 (or a truthy "no") without a word
    with pytest.raises(InputError, match=f"^convert.attention_kwargs: {re.escape(said)}"):
        build_efficient_student(_teacher(depth=1), name, **option)


def test_a_formula_in_a_list_that_does_not_parse_is_named_by_its_item():
    with pytest.raises(InputError, match=r"^convert\.attention\[1\]: formula syntax error at position 17"):
        build_efficient_student(_teacher(depth=2), ["softmax", "formula:sum(relu.)"])


def test_option_errors_read_for_a_python_caller_as_for_a_config():
    # with_attention's refusals name Python's None and its way to drop an option, a config's beside them
    with pytest.raises(
        TypeError, match=re.escape("num_features must be an integer or None (null in a config)")
    ):
        with_attention(_teacher(depth=1), "performer", num_features="x")
    with pytest.raises(TypeError, match=re.escape("drop them (or, in a config, set the key to {}")):
        with_attention(_teacher(depth=1), "performer", bogus=1)


def test_an_option_of_another_kind_is_refused_where_annotations_are_not_deferred(monkeypatch):
    """A new attention's module without ``from __future__ import annotations`` (as this file is) annotates its
    options with the types themselves: they are checked as the zoo's strings are, not passed unchecked."""
    monkeypatch.setattr(registry, "_ATTENTIONS", dict(registry._ATTENTIONS))

    @registry.register_attention("test_undeferred_linear")
    class UndeferredLinear(ReLULinearAttention):
        def __init__(self, dim: int, num_heads: int = 8, *, beta: float = 1.0, **kwargs) -> None:
            super().__init__(dim, num_heads, **kwargs)
            self.beta = beta

    with pytest.raises(InputError, match="beta must be a number for test_undeferred_linear, got 'abc'"):
        build_efficient_student(_teacher(depth=1), "test_undeferred_linear", beta="abc")


def test_forward_speed_reports_medians_and_ratio():
    teacher = _teacher()
    student = build_efficient_student(teacher, "relu_linear")
    models = {"teacher": teacher, "student": student}
    speed = forward_speed(models, torch.randn(2, 3, 32, 32), repeats=3, warmup=1)
    assert speed["tokens"] == 17 and speed["repeats"] == 3 and speed["student_ms"] > 0
    assert speed["student_over_teacher"] == pytest.approx(speed["teacher_ms"] / speed["student_ms"])
    assert speed["student_images_per_s"] == pytest.approx(2 * 1000 / speed["student_ms"])
    assert speed["teacher_images_per_s"] == pytest.approx(2 * 1000 / speed["teacher_ms"])
    assert speed["precision"] == "no autocast"


def test_forward_speed_runs_both_models_under_the_given_autocast():
    """On GPU the report measures in the run's precision (bf16 autocast): the forwards it times really run
    under it (the heads compute in bf16), and the models are left as they were."""
    teacher = _teacher()
    student = build_efficient_student(teacher, "relu_linear")
    seen = []
    for model in (teacher, student):
        model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    speed = forward_speed(
        {"teacher": teacher, "student": student},
        torch.randn(2, 3, 32, 32),
        repeats=2,
        warmup=0,
        autocast=torch.bfloat16,
    )
    assert speed["precision"] == "bfloat16 autocast"
    assert seen and set(seen) == {torch.bfloat16}
    assert next(student.parameters()).dtype == torch.float32


def test_recipes_load_and_validate():
    from attnxfer.models import create_vit

    names = [r for r in list_recipes() if r.startswith("convert/")]
    assert {
        "convert/demo_performer",
        "convert/demo_hedgehog",
        "convert/demo_relu_linear",
        "convert/demo_window_linear",
    } <= set(names)
    micro = create_vit("vit_micro_patch4_28").eval()
    mae_like = create_vit("vit_base_patch16_224", num_classes=0, depth=2).eval()  # headless, 2 blocks: quick
    # the hierarchical demo's conversions start from its PVTv2 micro-teacher, built as that recipe builds it
    pvt = build_student(
        load_config("demo/hier_teacher"), None, num_classes=10, in_chans=1, img_size=56
    ).eval()
    configs = []
    for name in names:  # a study recipe (students:) holds one conversion per student
        if "students" in yaml.safe_load(resolve_recipe(name).read_text()):
            study = load_study(name)
            assert study.command == "convert" and len(study.students) > 1, name
            configs += [cfg for _, cfg in study.configs()]
        else:
            configs.append(load_config(name))
    for cfg in configs:
        spec = cfg.teacher.spec
        if spec.startswith("local-dir:runs/demo/hier_teacher"):
            teacher = pvt
        else:
            teacher = (
                micro
                if spec.startswith(("local-dir:runs/demo/teacher", "local-dir:runs/demo/mae"))
                else mae_like
            )
        student = build_efficient_student(
            teacher, cfg.convert.attention, num_classes=10, **cfg.convert.attention_kwargs
        )
        conversion_plan_from_config(cfg, teacher, student)
        build_plan(
            teacher,
            student,
            cfg.transfer.mode,
            weight=cfg.transfer.atd_weight,
            logit_weight=cfg.transfer.logit_distill,
            logit_temperature=cfg.transfer.logit_temperature,
        )


# ------------------------------------------------------------------------------------- the command
def _convert_args(run_dir, teacher_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"teacher.spec=local-dir:{teacher_dir}",
        *tiny_run(64, 16),
        "convert.attention=hedgehog",
        "convert.stage1_steps=6",
        "schedule.epochs=1",
        "schedule.max_steps=2",
        "transfer.mode=distill",
        "transfer.logit_distill=1.0",
        "transfer.logit_temperature=2.0",
        *tiny_convert_report(2, 4),
        *extra,
    ]


@pytest.mark.slow
def test_convert_command_end_to_end_writes_its_report(tmp_path, tiny_teacher_dir, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "convert", *_convert_args(run, tiny_teacher_dir))
    assert code == 0, err[-3000:]
    assert "conversion plan: softmax teacher -> hedgehog student (2 blocks)" in out
    assert "logit distillation: weight 1, temperature 2" in out
    teacher_line = re.search(r"^teacher val top-1 (\d+\.\d\d)$", out, re.M)
    # stage 2 fine-tunes the teacher's weights: its 2 steps are no student left untrained
    assert "fewer than 100" not in out
    # its 6 stage-1 steps are fewer than stage 1's default warm-up: the plan's lr 0.01 is never reached
    said = "warning: convert.stage1_warmup_steps=10 is longer than stage 1 (convert.stage1_steps=6): its lr only "
    assert said + "rises, to 0.006 of 0.01, and never decays; set convert.stage1_warmup_steps below 6" in err
    report = json.loads((run / "report.json").read_text())
    top1 = report["top1"]
    assert teacher_line and teacher_line[1] == f"{top1['teacher']:.2f}", out
    assert set(top1) == {"teacher", "before_stage1", "after_stage1", "after_stage2"}
    assert all(isinstance(v, float) and 0 <= v <= 100 for v in top1.values())
    assert report["recovered_pct"] == pytest.approx(100 * top1["after_stage2"] / top1["teacher"])
    # an untrained teacher on 10 classes: said when it scores under 20 %, and only then
    assert ("under twice chance (10.0 % of 10 classes)" in err) == (top1["teacher"] < 20.0), err
    for which in ("teacher_input", "end_to_end"):
        rows = report["agreement"][which]
        assert [r["layer"] for r in rows] == [0, 1] and all(r["metric"] == "kl" for r in rows)
        for r in rows:
            assert all(isinstance(r[s], float) for s in ("before_stage1", "after_stage1", "after_stage2"))
    assert sum(r["after_stage1"] for r in report["agreement"]["teacher_input"]) < sum(
        r["before_stage1"] for r in report["agreement"]["teacher_input"]
    )
    speed = report["speed"]
    assert speed["speedup"] == pytest.approx(speed["teacher_ms"] / speed["student_ms"])
    assert speed["student_images_per_s"] == pytest.approx(4 * 1000 / speed["student_ms"])  # batch 4
    assert speed["precision"] == "no autocast"  # the CPU runs fp32
    assert report["stage1"]["steps"] == 6 and report["stage2"]["steps"] == 2
    assert ResumePoint.find(run / "stage1").record("complete") and (run / "stage2" / "checkpoints").is_dir()
    md = (run / "report.md").read_text()
    assert "| block | attention | metric | before stage 1 | after stage 1 | after stage 2 |" in md
    assert f"## Stage 2's transfer plan\n\n```text\n{report['stage2']['plan']}\n```" in md
    # a speed-up is claimed unless its rounds fall on both sides of 1 (a loaded machine): then withheld, saying why
    withheld = speed["speedup_withheld"]
    claim = f"no speed-up is claimed: {withheld}" if withheld else "x** the teacher's speed"
    assert "Recovered:" in md and claim in md
    lo, hi = speed["speedup_range"]  # the student x teacher ratio with its [min, max] over the rounds
    assert (
        f"| student | {speed['student_ms']:.2f} | {speed['student_images_per_s']:.1f} | {speed['speedup']:.2f} "
        f"[{lo:.2f}, {hi:.2f}] |" in md
    )
    # run again into the same run dir: both stages at their ends, so nothing trains and the report stands as
    # measured (an attention option written out at its default changes neither stage's plan)
    from attnxfer.launch.cli import main

    default = _convert_args(run, tiny_teacher_dir, "convert.attention_kwargs={feature_dim: null}")
    written = (run / "report.json").read_bytes()
    assert main(["convert", *default]) == 0
    assert f"nothing to do: {run} has run both stages to their ends" in capsys.readouterr().out
    assert (run / "report.json").read_bytes() == written
    # submitted again: refused at once, not after the job's wait in the queue
    assert main(["submit", "--command", "convert", *default, "--dry-run"]) == 2
    refusal = f"nothing to do: {run} has run both stages to their ends (stage 2 at step 2 of 2)"
    assert refusal in capsys.readouterr().err
    # the conversion's folder exports its final student (its stage-2 run), which loads back with its attention
    # and options; given as a teacher, the folder is named for what it is
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--checkpoint", "latest", "--weights", "raw"]) == 0
    assert f"{run} is a conversion; exporting its final student, {run / 'stage2'}" in capsys.readouterr().out
    card = (out / "README.md").read_text()  # it tells the conversion, with its report's figures
    assert (
        "Mode: **conversion** (`attnxfer convert`) into hedgehog attention, stage 2 in mode distill" in card
    )
    assert "by attention distillation (stage 1), then labelled fine-tuning" in card
    assert f"top-1 {report['student_top1']:.2f} ({report['recovered_pct']:.1f}% of the teacher's)" in card
    # inspect reads the folder as export does: its final student, named for the folder, on its own data
    flags = ["--num-images", "2", "--floor-images", "1", "--batch-size", "2", "--out", str(tmp_path / "insp")]
    assert main(["inspect", f"local-dir:{tiny_teacher_dir}", str(run), *flags]) == 0
    assert list(json.loads((tmp_path / "insp" / "metrics.json").read_text())["students"]) == ["run"]
    assert main(["eval", "-c", str(run / "config.yaml")]) == 0  # and so does eval
    said = capsys.readouterr().out
    assert f"{run} is a conversion; evaluating its final student" in said
    # it scores the checkpoint (not "resumed from"), the student its convert section names (no "not the config's")
    assert (
        "scoring checkpoint step 2" in said and "resumed from" not in said and "not the config's" not in said
    )
    assert [p.name for p in (run / "stage2").glob("eval-*.json")] == ["eval-00000002.json"]
    assert main(["eval", f"run_dir={run}"]) == 0  # the folder named by its key: the same student scored
    assert "scoring checkpoint step 2" in capsys.readouterr().out
    stage1 = next((run / "stage1" / "checkpoints").iterdir())  # the student alone, no optimiser state
    assert main(["eval", "-c", str(run / "config.yaml"), f"checkpoint.resume={stage1}"]) == 2
    assert "holds no optimiser state: not a checkpoint of a training run" in capsys.readouterr().err
    # its student is the one run.json records: a convert key given to eval changes nothing scored, and says so
    assert main(["eval", "-c", str(run / "config.yaml"), "convert.stage1_lr=0.5"]) == 2
    assert f"convert.stage1_lr: eval of {run / 'stage2'} does not read it" in capsys.readouterr().err
    # a training run of its own in the folder would stand for its final student: refused, nothing written
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["train", "-c", str(run / "config.yaml")]) == 2
    assert "only `attnxfer convert` reads the convert section" in capsys.readouterr().err
    assert main(["train", "transfer.mode=none", f"run_dir={run}"]) == 2  # with a teacher's mode: named first
    assert f"run_dir={run} holds a conversion (stage2), which attnxfer train" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    (run / "stage2" / "run.json").rename(tmp_path / "stage2-run.json")  # as if stage 2 had not started
    assert main(["export", str(run), str(tmp_path / "export2")]) == 2
    assert f"{run} is a conversion whose stage 2 has not run" in capsys.readouterr().err
    (tmp_path / "stage2-run.json").rename(run / "stage2" / "run.json")
    assert (
        main(["export", str(run / "stage1"), str(tmp_path / "export3")]) == 2
    )  # a stage: the folder is meant
    assert f"is a stage of the conversion {run}, whose final student is read" in capsys.readouterr().err
    bad = _convert_args(tmp_path / "bad", run)
    assert main(["convert", *bad]) == 2
    err = capsys.readouterr().err
    # its hedgehog student is no teacher even exported: the message says so and where its teacher is named
    assert f"local-dir:{run}: this is a conversion's run folder, whose student attends with hedgehog" in err
    assert f"the teacher it was converted from is teacher.spec in {run / 'config.yaml'})" in err
    from attnxfer import load_student, load_teacher

    loaded = load_student(f"local-dir:{out}")
    teacher, _ = load_teacher(f"local-dir:{tiny_teacher_dir}")
    rebuilt = build_efficient_student(teacher, "hedgehog", num_classes=teacher.num_classes).eval()
    final = sorted((run / "stage2" / "checkpoints").glob("step-*"))[-1]
    rebuilt.load_state_dict(load_file(str(final / "model.safetensors")))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), rebuilt(x))
    # checkpoint.resume=none starts both stages over, stage 1 keeping what it saved before aside (stage 2 does
    # where its new weights differ), the folder its earlier config.yaml; the new one continues the run afterwards
    capsys.readouterr()
    assert main(["convert", *_convert_args(run, tiny_teacher_dir), "checkpoint.resume=none", "seed=5"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint.resume=none: stage 1 starts over; kept its earlier step-00000006 as" in err, err
    kept = [p.name.split(".")[1][:9] for p in (run / "stage1" / "checkpoints").glob("step-*.*")]
    assert kept == ["replaced-"]
    [earlier] = run.glob("config.yaml.replaced-*")
    assert "\nseed: 0\n" in earlier.read_text() and "\nseed: 5\n" in (run / "config.yaml").read_text()
    assert "resume: auto" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_convert_skip_stage1_and_bad_names_through_the_cli(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    import attnxfer.apps.convert.convert
    from attnxfer.launch.cli import main

    run = tmp_path / "skip"
    assert (
        main(["convert", *_convert_args(run, tiny_teacher_dir, "transfer.mode=none"), "--skip-stage1"]) == 0
    )
    report = json.loads((run / "report.json").read_text())
    assert report["stage1"]["skipped"] and report["top1"]["after_stage1"] is None
    assert all(r["after_stage1"] is None for r in report["agreement"]["end_to_end"])
    assert not (run / "stage1").exists()
    capsys.readouterr()

    # Ctrl-C as it runs again: the advice finds the checkpoints in stage2/, not "none saved, starts over"
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, here as the conversion starts

    with monkeypatch.context() as patch:
        patch.setattr(attnxfer.apps.convert.convert, "convert", ctrl_c)
        argv = ["convert", *_convert_args(run, tiny_teacher_dir, "transfer.mode=none"), "--skip-stage1"]
        assert main(argv) == 130
    stage2_step = run / "stage2" / "checkpoints" / "step-00000002"
    assert f"continues from step 2 ({stage2_step})" in capsys.readouterr().err
    # stage 2 runs the teacher in teacher.dtype (bf16 here, as on GPU by default); the measurements after it still
    # run it in fp32, on the same fp32 inputs (this once failed on GPU: fp32 input into a bf16 teacher)
    low = tmp_path / "bf16"
    assert (
        main(
            [
                "convert",
                *_convert_args(low, tiny_teacher_dir, "transfer.mode=none", "teacher.dtype=bf16"),
                "--skip-stage1",
            ]
        )
        == 0
    )
    low_report = json.loads((low / "report.json").read_text())
    assert isinstance(low_report["top1"]["after_stage2"], float)
    assert (
        low_report["agreement"]["end_to_end"][0]["before_stage1"]
        == report["agreement"]["end_to_end"][0]["before_stage1"]
    )
    capsys.readouterr()
    assert (
        main(["convert", *_convert_args(tmp_path / "bad", tiny_teacher_dir, "convert.attention=performr")])
        == 2
    )
    err = capsys.readouterr().err
    assert "convert.attention: 'performr' is not a registered attention; did you mean 'performer'?" in err
    assert "Traceback" not in err
    assert (
        main(
            [
                "convert",
                *_convert_args(
                    tmp_path / "bad2",
                    tiny_teacher_dir,
                    "convert.attention=nystrom",
                    "convert.attention_kwargs={num_landmarks: 4}",
                    "convert.map_loss=ce",
                    "convert.stage1_train=qk",
                ),
            ]
        )
        == 2
    )
    assert "does not apply to a 'signed' attention" in capsys.readouterr().err
    bad_option = ["convert.attention=hashing", "convert.attention_kwargs={bits: 0}"]
    assert main(["convert", *_convert_args(tmp_path / "bad3", tiny_teacher_dir, *bad_option)]) == 2
    assert "convert.attention_kwargs: bits must be >= 1, got 0" in capsys.readouterr().err
    # 4 batches an epoch cannot make one step of 8: refused before stage 1, as train refuses it (it was
    # "stage 2: skipped", a report of a student never fine-tuned, and exit 0)
    few = tmp_path / "few"
    assert main(["convert", *_convert_args(few, tiny_teacher_dir, "optim.accum_steps=8")]) == 2
    assert (  # with the images and batch that make them, and the batch that would make a step
        "gives 4 batches per epoch (64 images a process, in whole batches of 16), fewer than "
        "optim.accum_steps=8; lower data.batch_size to 8 or less" in capsys.readouterr().err
    )
    assert not (few / "stage1").exists() and not (few / "report.json").exists()


@pytest.mark.slow
def test_skip_stage1_into_a_run_that_saved_a_stage_1_is_refused_not_silently_set_aside(
    tmp_path, tiny_teacher_dir, capsys, monkeypatch
):
    """--skip-stage1 (convert.stage1_steps=0) into a run whose stage 1 was saved once went on without it: the
    saved fit was ignored, config.yaml rewritten to 0 steps, and stage 2 then refused the run's own command.
    The refusal names the flag: giving convert.stage1_steps its recorded value back beside it changes nothing."""
    import attnxfer.apps.convert.convert
    from attnxfer.launch.cli import main

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C as stage 2 starts: a complete stage 1 saved, no stage 2

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(attnxfer.apps.convert.convert, "_stage2", ctrl_c)
        assert main(["convert", *_convert_args(run, tiny_teacher_dir, "convert.stage1_steps=2")]) == 130
    saved = ResumePoint.find(run / "stage1")
    assert saved.record("complete") and not (run / "stage2" / "checkpoints").exists()
    capsys.readouterr()
    code, _, err = run_cli(
        capsys, "convert", *_convert_args(run, tiny_teacher_dir, "convert.stage1_steps=2"), "--skip-stage1"
    )
    assert code == 2 and "convert.stage1_steps=2)" in err and "Traceback" not in err, err
    assert "drop --skip-stage1" in err and "give them the values it recorded" not in err, err
    assert (
        ResumePoint.find(run / "stage1").path == saved.path and not (run / "stage2" / "checkpoints").exists()
    )
    assert "stage1_steps: 2" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("refusal", ["damaged", "missing"])
def test_a_resume_refused_for_its_checkpoints_keeps_the_runs_config(
    tmp_path, tiny_teacher_dir, capsys, refusal
):
    """A conversion refused before any work for its checkpoints (stage 1's none usable, a checkpoint.resume that
    names nothing) once left config.yaml rewritten with the refused command's values: the next
    ``-c RUN/config.yaml`` would run them as the run's own. Only a refused value kept it."""
    run = tmp_path / "run"
    run.mkdir()
    config = "# the run's own config\n"
    (run / "config.yaml").write_text(config)
    if refusal == "damaged":
        (run / "stage1" / "checkpoints" / "step-00000006").mkdir(parents=True)  # a save that never finished
    extra = [f"checkpoint.resume={tmp_path / 'nowhere'}"] if refusal == "missing" else []
    code, _, err = run_cli(capsys, "convert", *_convert_args(run, tiny_teacher_dir, *extra))
    said = "does not exist" if refusal == "missing" else "none usable"
    assert code == 2 and said in err and "Traceback" not in err, err
    assert (run / "config.yaml").read_text() == config


@pytest.mark.slow
def test_a_stage_1_stopped_on_other_processes_is_refused_with_the_counts_not_resumed_on_another_global_batch(
    tmp_path, tiny_teacher_dir, capsys, monkeypatch
):
    """Stage 1 has no accumulation steps: a stage 1 stopped on 2 processes, resumed on 1, went on at half its
    global batch and another place in the data, unsaid. Its checkpoint records its processes; a resume on others
    is refused before the teacher is measured, naming both counts."""
    import attnxfer.apps.convert.convert
    from attnxfer.launch.cli import main

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    run, args = tmp_path / "run", _convert_args(tmp_path / "run", tiny_teacher_dir, "convert.stage1_steps=2")
    with monkeypatch.context() as patch:
        patch.setattr(attnxfer.apps.convert.convert, "_stage2", ctrl_c)
        assert main(["convert", *args]) == 130
    saved = ResumePoint.find(run / "stage1")
    assert saved.world_size == 1
    capsys.readouterr()
    rewrite_checkpoint_state(
        saved.path / "state.json", lambda state: state.update(complete=False, world_size=2)
    )
    code, out, err = run_cli(capsys, "convert", *args)
    assert code == 2 and "Traceback" not in err and "before stage 1:" not in out, err
    assert "stopped at step 2 on 2 process(es) (global batch 32 = 16 per rank x 2) and this run has 1" in err
    assert "Resume it on 2 process(es)" in err
    # submit says it before the queue's wait, for the job's processes; on the recorded ones it submits
    submit = ["submit", "--command", "convert", *args, "--dry-run"]
    code, _, err = run_cli(capsys, *submit, "--nodes", "3")
    assert code == 2 and "on 2 process(es) (global batch 32 = 16 per rank x 2) and this run has 3" in err, err
    assert run_cli(capsys, *submit, "--nodes", "2")[0] == 0


@pytest.mark.slow
def test_convert_with_a_formula_attention_and_an_unparsable_one(tmp_path, tiny_teacher_dir, capsys):
    from attnxfer.launch.cli import main

    program = "formula:sum(proj.relu.cat(x,square)+win(2))"
    run = tmp_path / "formula"
    args = _convert_args(run, tiny_teacher_dir, f"convert.attention={program}", "schedule.max_steps=1")
    assert main(["convert", *args]) == 0
    assert f"conversion plan: softmax teacher -> {program} student (2 blocks)" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    rows = report["agreement"]["teacher_input"]
    assert sum(r["after_stage1"] for r in rows) < sum(r["before_stage1"] for r in rows)
    assert ResumePoint.find(run / "stage1").record("complete")
    bad = tmp_path / "bad"
    assert (
        main(["convert", *_convert_args(bad, tiny_teacher_dir, "convert.attention=formula:sum(relu.)")]) == 2
    )
    err = capsys.readouterr().err
    assert "error: convert.attention: formula syntax error at position 17 of 'formula:sum(relu.)'" in err
    assert "expected an op (relu," in err and "Traceback" not in err
    assert not (bad / "stage1").exists()
    # a program that parses but cannot be a row-stochastic attention is stopped before any training
    assert (
        main(["convert", *_convert_args(bad, tiny_teacher_dir, "convert.attention=formula:sum(proj)")]) == 2
    )
    err = capsys.readouterr().err
    assert "error:" in err and "sum normalisation of signed features" in err and "Traceback" not in err
    assert not (bad / "stage1").exists()


@pytest.mark.slow
def test_another_data_batch_size_is_refused_by_stage_2_not_a_stage_1_with_its_own_batch_before_the_teacher_is_measured(
    tmp_path, tiny_teacher_dir, capsys
):
    """Stage 1 read convert.stage1_batch_size, never data.batch_size: a changed data.batch_size is stage 2's
    to refuse, not stage 1's (whose refusal named a key it never read); refused before the teacher is
    measured, as stage 1's refusals are (on ImageNet, minutes of work the refusal would throw away)."""
    from attnxfer.launch.cli import main

    own = ["convert.stage1_batch_size=8", "convert.stage1_steps=2"]
    args = ["convert", *_convert_args(tmp_path / "run", tiny_teacher_dir, *own)]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "data.batch_size=8"]) == 2  # stage 2's batch: a training run's, fixed on resume
    said = capsys.readouterr()
    assert f"{tmp_path / 'run' / 'stage2'} already holds a run" in said.err
    assert "teacher val top-1" not in said.out and "before stage 1:" not in said.out, said.out


def test_a_stage_1_batch_over_the_training_set_is_refused_before_the_teacher_is_measured(
    tmp_path, tiny_teacher_dir, capsys
):
    """Stage 1 drops its last short batch, so a batch above the training set gives it none: refused with the
    key to lower before the teacher's measurement (minutes on ImageNet), not when stage 1 asks for its first."""
    args = _convert_args(tmp_path / "run", tiny_teacher_dir, "convert.stage1_batch_size=65")  # 64 images
    code, out, err = run_cli(capsys, "convert", *args)
    assert (
        code == 2
        and "convert.stage1_batch_size=65 per rank x 1 rank(s) is larger than the training set (64 images)"
        in err
    ), err
    assert "lower convert.stage1_batch_size" in err and "before stage 1:" not in out, out
