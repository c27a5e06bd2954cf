"""A new comparison loss is one file and its registry entry: this file registers ``feat_l2`` (a mean squared
difference of the two models' final tokens) and nothing else in the package knows it, yet a run asks for it
through the config alone (``transfer.losses``), logs its term and trains on its gradient. The config's own
distillation keys (``transfer.mode`` / ``atd_weight``, ``logit_distill`` / ``logit_temperature``,
``feature_distill``) are entries of the built-in losses: spelled either way, the same plan and the same step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import peaked_teacher, tiny_run, tiny_vit

import attnxfer
from attnxfer.apps.run.training import train
from attnxfer.config import load_config
from attnxfer.models.attention.capture import attention_maps
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.engine import NonFiniteLossError
from attnxfer.transfer import (
    ComparisonLoss,
    Loss,
    PlanError,
    Signal,
    TeacherStudent,
    build_plan,
    comparison_loss,
    compose_loss,
)


@comparison_loss("feat_l2")
class FeatureL2(ComparisonLoss):
    """Mean squared difference of the final tokens (``forward_features``)."""

    signals = (Signal.FEATURES,)

    def compare(self, comparison, student, teacher, step) -> Loss:
        loss = (student.float() - teacher.float()).pow(2).mean()
        return Loss(loss, {"feat_l2": loss})


@pytest.mark.slow
def test_a_loss_registered_in_a_test_file_trains_through_the_config(tmp_path, tiny_teacher_dir):
    """Two steps of ``attnxfer.apps.run.training.train`` with ``transfer.losses=[{name: feat_l2, weight: 0.5}]``:
    the plan says so, each logged step has the term, and the transfer loss is half of it."""
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            *tiny_run(8, 4),
            "transfer.mode=none",
            "transfer.losses=[{name: feat_l2, weight: 0.5}]",
            "schedule.max_steps=2",
            "log.every_steps=1",
        ],
    )
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["feat_l2"] > 0 and r["transfer"] == pytest.approx(0.5 * r["feat_l2"], rel=1e-6)
        assert r["total"] == pytest.approx(r["task"] + r["transfer"], rel=1e-6)


def test_the_registered_loss_adds_its_gradient_to_the_step():
    """The student's gradient with the entry is the gradient without it plus 0.5 × the gradient of the L2
    written out by hand."""
    teacher, x = (
        peaked_teacher(depth=2),
        torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    )
    grads = {}
    for losses in ([], [{"name": "feat_l2", "weight": 0.5}]):
        student = tiny_vit(depth=2, seed=2)
        plan = build_plan(teacher, student, "distill", losses=losses)
        out = TeacherStudent(teacher, student, plan).train()(x)
        assert ("feat_l2" in out.terms) == bool(losses)
        params = [p for p in student.parameters() if p.requires_grad]
        grads[bool(losses)] = torch.autograd.grad(out.loss + out.logits.square().mean(), params)
    student = tiny_vit(depth=2, seed=2)
    with torch.no_grad():
        target = teacher.forward_features(x)
    by_hand = (student.forward_features(x) - target).pow(2).mean()
    params = [p for p in student.parameters() if p.requires_grad]
    added = torch.autograd.grad(0.5 * by_hand, params, allow_unused=True)  # the head is not in it
    added = [torch.zeros_like(p) if a is None else a for a, p in zip(added, params)]
    assert sum(a.abs().sum() > 0 for a in added) > len(added) // 2
    for with_it, without, extra in zip(grads[True], grads[False], added):
        torch.testing.assert_close(with_it, without + extra, rtol=1e-5, atol=1e-7)


def test_the_config_keys_are_entries_of_the_built_in_losses():
    """``mode=distill, atd_weight=2, logit_distill=0.5, logit_temperature=2, feature_distill=0.3`` and the same
    three entries of ``transfer.losses`` (beside mode=none) make the same comparisons and the same step,
    bit for bit."""
    teacher, x = (
        peaked_teacher(depth=3),
        torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
    )
    keys = dict(weight=2.0, logit_weight=0.5, logit_temperature=2.0, feature_weight=0.3)
    entries = [
        {"name": "map", "weight": 2.0},
        {"name": "logit_kd", "weight": 0.5, "temperature": 2.0},
        {"name": "feature_distill", "weight": 0.3},
    ]
    plans = {
        "keys": build_plan(teacher, tiny_vit(depth=3, seed=2), "distill", end_layer=-1, **keys),
        "entries": build_plan(teacher, tiny_vit(depth=3, seed=2), "none", end_layer=-1, losses=entries),
    }
    what = {k: [(c.signal, c.loss, c.weight, c.pairs) for c in p.comparisons] for k, p in plans.items()}
    assert (
        what["keys"]
        == what["entries"]
        == [
            (Signal.MAPS, "map", 2.0, ((0, 0), (1, 1))),
            (Signal.LOGITS, "logit_kd", 0.5, ()),
            (Signal.FEATURES, "feature_distill", 0.3, ()),
        ]
    )
    assert plans["keys"].comparisons[1].option("temperature") == 2.0
    said = plans["entries"].describe()
    assert "map of maps: weight 2, student layers 0<-0, 1<-1" in said
    assert "loss, layers 0-1: softmax: CE between teacher and student attention rows" in said
    assert (
        "logit distillation: weight 0.5, temperature 2" in said and "feature distillation: weight 0.3" in said
    )
    outs = {k: TeacherStudent(teacher, tiny_vit(depth=3, seed=2), p).train()(x) for k, p in plans.items()}
    assert torch.equal(outs["keys"].loss, outs["entries"].loss)
    assert outs["keys"].terms.keys() == outs["entries"].terms.keys() >= {"attn_ce/0", "logit_kd", "feat_cos"}
    for key, value in outs["keys"].terms.items():
        assert torch.equal(value, outs["entries"].terms[key]), key


def test_a_layer_entry_compares_at_the_transfer_layers_beside_copy():
    """``mode=copy`` borrows q and k; an ``mse`` entry on v compares the student's own v at the same layers."""
    teacher, x = peaked_teacher(depth=2), torch.randn(2, 3, 32, 32)
    student = tiny_vit(depth=2, seed=2)
    plan = build_plan(teacher, student, "copy", losses=[{"name": "mse", "signal": "v", "weight": 0.25}])
    assert "mse of v: weight 0.25, student layers 0<-0, 1<-1" in plan.describe()
    out = TeacherStudent(teacher, student, plan).train()(x)
    assert set(out.terms) == {"mse_v/0", "mse_v/1"}  # each layer's term under its comparison's name
    with torch.no_grad():  # layer 0's input is the same with or without borrowed maps
        v_s, v_t = (_block_v(m, x) for m in (student, teacher))
    torch.testing.assert_close(out.terms["mse_v/0"], (v_s - v_t).pow(2).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, 0.25 * (out.terms["mse_v/0"] + out.terms["mse_v/1"]))


@pytest.mark.parametrize(
    "mode, entry, others",
    [
        ("copy", {"name": "map"}, "v, features"),
        ("copy", {"name": "mse", "signal": "q"}, "v, features"),
        ("copy_v", {"name": "mse", "signal": "v"}, "q, k, maps, features"),
    ],
)
def test_a_layer_entry_on_what_a_copy_mode_borrows_is_refused(mode, entry, others):
    """The copied layer attends with the teacher's q/k (or v): the student's own is frozen and unused, so a
    loss on it compared nothing the student runs (its term was the same as under mode none)."""
    with pytest.raises(PlanError) as refused:
        build_plan(peaked_teacher(depth=2), tiny_vit(depth=2, seed=2), mode, losses=[entry])
    assert str(refused.value).startswith(
        f"transfer.losses[0]: transfer.mode={mode} attends with the teacher's"
    )
    assert str(refused.value).endswith(f"compare {others}, or set transfer.mode=distill or none")


def test_a_maps_loss_of_ones_own_builds_its_maps_from_the_handed_q_and_k_as_the_docs_say():
    """docs/distillation.md: a loss of ``Signal.MAPS`` gets q and k (no layer hands over a map) and builds the
    rows with ``pair.student_attn.attention_map(q, k)``: the maps ``attention_maps`` shows, with a gradient."""

    @comparison_loss("map_l2")
    class MapL2(ComparisonLoss):
        signals = (Signal.MAPS,)

        def compare_layer(self, comparison, pair, step) -> Loss:
            assert "maps" not in pair.student and {"q", "k"} <= set(pair.teacher)
            s = pair.student_attn.attention_map(pair.student["q"], pair.student["k"])
            t = pair.teacher_attn.attention_map(pair.teacher["q"], pair.teacher["k"])
            loss = (s - t).pow(2).mean()
            return Loss(loss, {f"map_l2/{pair.student_layer}": loss})

    teacher, student, x = peaked_teacher(depth=2), tiny_vit(depth=2, seed=2), torch.randn(2, 3, 32, 32)
    out = TeacherStudent(teacher, student, build_plan(teacher, student, "none", losses=[{"name": "map_l2"}]))(
        x
    )
    want = {
        f"map_l2/{i}": (s - t).pow(2).mean()
        for i, (s, t) in enumerate(
            zip(attention_maps(student, x).values(), attention_maps(teacher, x).values())
        )
    }
    torch.testing.assert_close({k: out.terms[k] for k in want}, want, rtol=1e-5, atol=1e-8)
    assert out.loss.requires_grad


def _documented_logits():
    """The ``logits(pair, side)`` recipe of docs/distillation.md, run as the page writes it."""
    page = (Path(__file__).parents[2] / "docs" / "distillation.md").read_text()
    block = next(b for b in page.split("```python")[1:] if "def logits(pair" in b).split("```")[0]
    scope: dict = {}
    exec(block, scope)
    return scope["logits"]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)),
        ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(2,), num_heads=(3,))),
    ],
)
def test_the_documented_logits_of_a_biased_layer_give_the_map_timm_attends_with(name, kwargs):
    """docs/distillation.md's ``logits(pair, side)`` adds a layer's bias (BEiT's relative positions, Swin's
    and its shifted windows' mask), which ``attention_map(q, k)`` leaves out: softmaxed, it is timm's own map
    (its unfused path, read where its attention dropout takes it)."""
    import timm

    logits, got = _documented_logits(), {}

    @comparison_loss("biased_rows")
    class BiasedRows(ComparisonLoss):
        signals = (Signal.MAPS,)

        def compare_layer(self, comparison, pair, step) -> Loss:
            got[pair.teacher_layer] = logits(pair, "teacher").softmax(-1)
            unbiased[pair.teacher_layer] = pair.teacher_attn.attention_map(
                pair.teacher["q"], pair.teacher["k"]
            )
            loss = (logits(pair, "student").softmax(-1) - got[pair.teacher_layer]).pow(2).mean()
            return Loss(loss, {f"biased_rows/{pair.student_layer}": loss})

    torch.manual_seed(0)
    teacher, student = (timm.create_model(name, **kwargs) for _ in range(2))
    with torch.no_grad():  # a bias that matters (BEiT's table starts at zero)
        for param_name, param in teacher.named_parameters():
            if "relative_position_bias_table" in param_name:
                param.normal_()
    x, timms, unbiased = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"]), {}, {}
    layers = [m for m in teacher.modules() if hasattr(m, "attn_drop")]
    for i, layer in enumerate(layers):
        layer.fused_attn = False
        layer.attn_drop.register_forward_hook(lambda _, inputs, __, i=i: timms.setdefault(i, inputs[0]))
    with torch.no_grad():
        teacher.eval()(x)
    plan = build_plan(teacher, student, "none", losses=[{"name": "biased_rows"}])
    TeacherStudent(teacher, student, plan)(x)
    assert sorted(got) == list(range(len(layers))) == [0, 1]
    for i, rows in got.items():
        torch.testing.assert_close(rows, timms[i].float(), rtol=1e-5, atol=1e-6)
        assert (unbiased[i] - rows).abs().max() > 0.05  # the map without the bias is another


def _block_v(model: torch.nn.Module, x: torch.Tensor, block: int = 0) -> torch.Tensor:
    """Block ``block``'s v, from its input as timm's VisionTransformer makes it (the blocks before it run)."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for earlier in model.blocks[:block]:
        h = earlier(h)
    return model.blocks[block].attn.project(model.blocks[block].norm1(h), "v")["v"]


@pytest.mark.parametrize("layers", [[1], [-1]])
def test_an_entrys_layers_limit_its_comparison_to_those_layers(layers):
    """``{name: mse, signal: v, layers: [1]}`` (or ``[-1]``, the last of 2, as transfer.layers counts it)
    compares v at student layer 1 only, while the transfer pairs layers 0 and 1; the plan says so."""
    teacher, student, x = peaked_teacher(depth=2), tiny_vit(depth=2, seed=2), torch.randn(2, 3, 32, 32)
    entry = {"name": "mse", "signal": "v", "weight": 0.5, "layers": layers}
    plan = build_plan(teacher, student, "distill", losses=[entry])
    assert plan.pairs == ((0, 0), (1, 1)) and plan.comparisons[1].pairs == ((1, 1),)
    assert "  mse of v: weight 0.5, student layers 1<-1" in plan.describe().splitlines()
    out = TeacherStudent(teacher, student, plan).train()(x)
    assert not any(k.startswith("mse_v/0") for k in out.terms)
    with torch.no_grad():  # mode distill borrows nothing: block 1's v from the student's own block 0
        want = (_block_v(student, x, 1) - _block_v(teacher, x, 1)).pow(2).mean()
    torch.testing.assert_close(out.terms["mse_v/1"], want, rtol=1e-5, atol=1e-7)


def test_an_entrys_layers_spare_a_student_layer_its_loss_could_not_compare():
    """A student whose block 0 has no map (hydra) takes a map comparison limited to block 1."""
    teacher = peaked_teacher(depth=2)
    student = build_efficient_student(teacher, ["hydra", "softmax"])
    with pytest.raises(PlanError, match="'hydra' attention has no attention map"):
        build_plan(teacher, student, "none", losses=[{"name": "map"}])
    plan = build_plan(teacher, student, "none", losses=[{"name": "map", "layers": [1]}])
    assert plan.comparisons[0].pairs == ((1, 1),)


def test_a_maps_loss_of_ones_own_on_a_block_without_a_map_is_refused_as_the_plan_is_built(registries_kept):
    """A block without a map (hydra) hands a maps loss q and k whose ``attention_map`` is None: a loss of one's
    own failed at its first step, the teacher loaded, with torch's 'NoneType' object has no attribute 'size'."""

    @comparison_loss("own_maps")
    class OwnMaps(ComparisonLoss):
        signals = (Signal.MAPS,)

        def compare_layer(self, comparison, pair, step) -> Loss:
            s = pair.student_attn.attention_map(pair.student["q"], pair.student["k"])
            t = pair.teacher_attn.attention_map(pair.teacher["q"], pair.teacher["k"])
            return Loss((s - t).pow(2).mean())

    teacher = peaked_teacher(depth=2)
    student = build_efficient_student(teacher, ["hydra", "softmax"])
    with pytest.raises(
        PlanError,
        match=r"^student block 0 <- teacher block 0: 'hydra' attention has no attention map for own_maps to "
        r"compare \(map kind 'none'\); remove transfer.losses\[0\] \(own_maps\), limit transfer.losses\[0\].layers",
    ):
        build_plan(teacher, student, "none", losses=[{"name": "own_maps"}])
    plan = build_plan(teacher, student, "none", losses=[{"name": "own_maps", "layers": [1]}])
    assert TeacherStudent(teacher, student, plan).train()(torch.randn(2, 3, 32, 32)).loss.requires_grad


@pytest.mark.parametrize(
    "entry, transfer_layers, message",
    [
        (
            {"name": "mse", "signal": "v", "layers": [0, 2]},
            None,
            r"^transfer.losses\[0\].layers: 2 not among the student layers the transfer pairs with a teacher "
            r"layer; name some of 0, 1 \(negatives count from the end of the student's 2 blocks\), or widen "
            r"transfer.layers / transfer.end_layer$",
        ),
        (
            {"name": "mse", "signal": "v", "layers": [-2, -3]},
            None,
            r"^transfer.losses\[0\].layers: -3 not among .* name some of 0, 1 ",
        ),
        (  # a layer of the student the transfer leaves out
            {"name": "map", "layers": [0]},
            [1],
            r"^transfer.losses\[0\].layers: 0 not among .* name some of 1 ",
        ),
        (
            {"name": "feature_distill", "layers": [0]},
            None,
            r"^transfer.losses\[0\].layers: features is a whole-model signal, it has no layers; remove layers$",
        ),
        *(
            ({"name": "mse", "signal": "v", "layers": bad}, None, r"^transfer.losses\[0\].layers: a list of")
            for bad in ([], [True], "0", 1, [0.5])
        ),
    ],
)
def test_an_entrys_layers_outside_the_transfers_or_of_a_whole_model_signal_are_refused(
    entry, transfer_layers, message
):
    with pytest.raises(PlanError, match=message):
        build_plan(
            tiny_vit(depth=2, seed=1),
            tiny_vit(depth=2, seed=2),
            "none",
            layers=transfer_layers,
            losses=[entry],
        )


@pytest.mark.parametrize(
    "entry, message",
    [
        (  # a loss of one's own: a fork's file or an installed package's module
            {"name": "nope"},
            r"^transfer.losses\[0\].name: unknown comparison loss 'nope'; choose one of: .*feat_l2.*logit_kd.* "
            r"@comparison_loss in a file "
            r"of attnxfer/transfer/ or in a module named by an 'attnxfer.losses' entry point\)$",
        ),
        (  # an example a config reads as it is: an entry of logit_kd is transfer.logit_distill's old spelling
            {"weight": 1.0},
            r"^transfer.losses\[0\]: write a mapping with the loss's name, "
            r"e.g. \{name: mse, signal: v, weight: 1.0\}$",
        ),
        ({"name": None}, r"^transfer.losses\[0\].name: expected a loss's name \(a string\), got None$"),
        ({"name": 3}, r"^transfer.losses\[0\].name: expected a loss's name \(a string\), got 3$"),
        (
            {"name": "logit_kd", "temperatur": 2},
            r"logit_kd takes name, weight, signal, layers, temperature; not temperatur",
        ),
        ({"name": "mse", "wieght": 2}, r"mse takes name, weight, signal, layers; not wieght"),
        ({"name": "mse", "signal": "maps"}, r"mse compares q, k, v, not 'maps'"),
        ({"name": "map", "weight": -1}, r"weight must be a finite number >= 0, got -1"),
        (
            {"name": "mse", "signal": "v", "weight": float("inf")},
            r"weight must be a finite number >= 0, got inf",
        ),
        (
            {"name": "logit_kd", "temperature": 0},
            r"transfer.losses\[0\]: logit distillation needs temperature > 0, got 0",
        ),
        (
            {"name": "logit_kd", "temperature": "abc"},
            r"transfer.losses\[0\].temperature: expected a number \(as logit_kd's default 1.0\), got 'abc'$",
        ),
        ({"name": "logit_kd", "temperature": True}, r"temperature: expected a number .*, got True$"),
        (
            {"name": "not_a_number", "returns": 1},
            r"transfer.losses\[0\].returns: expected a string \(as not_a_number's default 'vector'\), got 1$",
        ),
        ({"name": "feat_l2"}, r"transfer.losses\[0\] compares with a teacher; set teacher.spec"),
        ({"name": "mse", "signal": "v"}, r"transfer.losses\[0\] compares with a teacher; set teacher.spec"),
    ],
)
def test_a_bad_entry_is_one_plan_error_that_names_it(entry, message):
    teacher = None if "compares with a teacher" in message else tiny_vit(depth=2, seed=1)
    with pytest.raises(PlanError, match=message):
        build_plan(teacher, tiny_vit(depth=2, seed=2), "none", losses=[entry])


def test_one_entry_not_in_a_list_is_told_to_be_put_in_one():
    """Its keys were read as entries: {'name': 'mse', ...} was told "write a mapping with the loss's name"."""
    teacher, student = tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2)
    for losses in ({"name": "mse", "signal": "v"}, "mse"):
        with pytest.raises(
            PlanError, match=r"^build_plan: losses is a list of entries, got one (dict|str) .* list"
        ):
            build_plan(teacher, student, "none", losses=losses)


@comparison_loss("scaled_l2")
class ScaledL2(ComparisonLoss):
    """Final tokens' mean squared difference, divided by a number option (a temperature's kind)."""

    signals = (Signal.FEATURES,)
    options: ClassVar = {"scale": 1.0}

    def compare(self, comparison, student, teacher, step) -> Loss:
        loss = (student.float() - teacher.float()).pow(2).mean() / comparison.option("scale")
        return Loss(loss, {"scaled_l2": loss})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_number_option_that_is_not_finite_is_refused_as_the_plan_is_built_not_at_the_first_save(value):
    """YAML's .inf / .nan are floats: the run trained its first epoch on them, then its checkpoint state (which
    holds the config) could not be written as JSON, a traceback that lost the epoch."""
    entry = {"name": "scaled_l2", "scale": value}
    with pytest.raises(PlanError, match=r"transfer.losses\[0\].scale: expected a finite number .*got"):
        build_plan(tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2), "none", losses=[entry])


def test_the_plan_says_an_option_left_at_its_default_with_the_value_the_run_uses():
    """The plan's text is what run.json and the model card keep of a loss: an option the entry left out was
    missing from it, so a run did not record the value it trained with."""
    teacher, student = tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2)
    plan = build_plan(teacher, student, "none", losses=[{"name": "scaled_l2", "weight": 0.5}])
    assert "scaled_l2 of features: weight 0.5, scale 1.0" in plan.describe()


def test_an_option_given_an_integer_for_a_number_is_that_number():
    """As a config key's: a loss's code may divide by a float option; an int is widened, not refused."""
    entry = {"name": "logit_kd", "temperature": 2}
    plan = build_plan(tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2), "none", losses=[entry])
    assert type(plan.comparisons[0].option("temperature")) is float


@pytest.mark.parametrize(
    "weights", [{"weight": -1.0}, {"weight": float("nan")}, {"task_weight": float("inf")}]
)
def test_a_negative_or_non_finite_weight_of_the_mode_or_the_task_is_refused(weights):
    """Python callers skip the config's range checks: a negative weight would train away from the teacher."""
    with pytest.raises(
        PlanError, match=r"loss weights must be finite and >= 0, got \{'(weight|task_weight)'"
    ):
        build_plan(tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2), "distill", **weights)


@pytest.mark.parametrize(
    "numbers", [{"weight": "3"}, {"task_weight": None}, {"logit_weight": True}, {"logit_temperature": "2"}]
)
def test_a_weight_or_temperature_that_is_not_a_number_names_its_argument(numbers):
    """Python callers skip the config's type checks: a str weight was a TypeError from a comparison inside."""
    ((name, value),) = numbers.items()
    with pytest.raises(
        PlanError, match=rf"^build_plan: {name} must be a number \(int or float\), got {value!r}$"
    ):
        build_plan(tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2), "distill", **numbers)


@pytest.mark.parametrize("value", ["no", 0, None])
def test_a_share_drop_path_that_is_not_a_bool_is_refused_not_read_as_true(value):
    """Python callers skip the config's type checks: bool("no") was True, the teacher took the student's masks."""
    with pytest.raises(
        PlanError, match=rf"^build_plan: share_drop_path must be True or False, got {value!r}$"
    ):
        build_plan(tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2), "distill", share_drop_path=value)


def test_a_second_loss_under_a_taken_name_is_refused():
    with pytest.raises(
        ValueError, match=rf"'feat_l2' is already registered by {__name__}.FeatureL2; register"
    ):

        @comparison_loss("feat_l2")
        class Other(ComparisonLoss):
            signals = (Signal.FEATURES,)


def test_a_taken_name_refused_says_which_module_holds_it_where_both_classes_share_a_name():
    """A fork's copy of a script's loss (the same class name in another module): the message must tell the two
    apart and say what to change, not 'already registered by FeatureL2' while registering FeatureL2."""
    copy = type("FeatureL2", (ComparisonLoss,), {"signals": (Signal.FEATURES,), "__module__": "lab.losses"})
    with pytest.raises(
        ValueError,
        match=rf"by {__name__}.FeatureL2; register lab.losses.FeatureL2 under another name, or import only one",
    ):
        comparison_loss("feat_l2")(copy)


@pytest.mark.parametrize("name", ["MSE", "v_mse ", "v-mse", ""])
def test_a_name_a_config_entry_could_not_match_as_written_is_refused_where_it_is_registered(name):
    """Attention names are lower-case words already; a loss's 'MSE' or trailing blank registered silently,
    and `transfer.losses` then answered the name a user typed with 'not a comparison loss'."""
    with pytest.raises(ValueError, match=rf"lower-case words \(a-z, 0-9, _\), got {re.escape(repr(name))}"):
        comparison_loss(name)(type("Odd", (ComparisonLoss,), {"signals": (Signal.FEATURES,)}))


def test_a_loss_of_a_signal_no_layer_hands_over_is_refused_where_it_is_registered():
    """A layer's input or output is a `Signal` too (objectives name it), but no attention layer hands it to a
    comparison: its compare_layer failed on a missing key at the first step."""
    with pytest.raises(
        ValueError, match="'block_out': output is not handed to comparison losses; compare maps"
    ):

        @comparison_loss("block_out")
        class BlockOutput(ComparisonLoss):
            signals = (Signal.K, Signal.OUTPUT)


@pytest.mark.parametrize("signals", [(Signal.FEATURES), ("k", "q")], ids=["no comma", "strings"])
def test_signals_that_are_no_tuple_of_signals_are_refused_in_words_where_the_loss_is_registered(signals):
    """``signals = (Signal.FEATURES)`` (no comma) is one Signal, a str, whose letters were read as signals:
    the registration failed with 'str' object has no attribute 'of_layer'."""
    with pytest.raises(
        ValueError,
        match=r"^comparison loss 'own': signals must be a tuple of Signal members, e\.g\. \(Signal\.K,\) \(the comma",
    ):
        comparison_loss("own")(type("Own", (ComparisonLoss,), {"signals": signals, "compare": _compares_gap}))


def _compares_mse_v(self, comparison, pair, step) -> Loss:
    return Loss((pair.student["v"] - pair.teacher["v"]).pow(2).mean())


def _compares_gap(self, comparison, student, teacher, step) -> Loss:
    return Loss((student.mean() - teacher.mean()).pow(2))


@pytest.mark.parametrize(
    "signals, method, said",
    [
        (
            (Signal.LOGITS,),
            {"compare_layer": _compares_mse_v},
            "logits, a whole-model signal, comes to compare(comparison, student, teacher, step), which it does "
            "not define",
        ),
        (
            (Signal.V, Signal.FEATURES),
            {"compare": _compares_gap},
            "v, a layer's signal, comes to compare_layer(comparison, pair, step), which it does not define",
        ),
    ],
)
def test_a_loss_without_the_method_its_signals_come_to_is_refused_where_it_is_registered(
    signals, method, said, registries_kept
):
    """A KL on logits written as compare_layer failed at the first step, after the teacher had loaded, with
    'comparison loss ... compares no whole-model signal' for a class that lists one."""
    with pytest.raises(ValueError, match=rf"^comparison loss 'own': {re.escape(said)}$"):
        comparison_loss("own")(type("Own", (ComparisonLoss,), {"signals": signals, **method}))


@pytest.mark.parametrize("option", ["weight", "signal", "name", "layers"])
def test_an_option_named_as_an_entrys_own_key_is_refused_where_it_is_registered(option, registries_kept):
    """An option ``weight`` registered silently: ``{name: ..., weight: 0.5}`` set the comparison's weight, the
    option kept its default whatever an entry said, and the plan printed two weights."""
    with pytest.raises(
        ValueError,
        match=rf"^comparison loss 'own': option '{option}' is a key of every transfer.losses entry "
        rf"\(name, weight, signal, layers\), so no entry could set it; name it otherwise, e.g. 'own_{option}'$",
    ):
        comparison_loss("own")(
            type("Own", (ComparisonLoss,), {"signals": (Signal.FEATURES,), "options": {option: 0.5}})
        )


@pytest.mark.parametrize("name", ["total", "step"])
def test_a_loss_named_as_a_key_the_step_logs_itself_is_refused_where_it_is_registered(name, registries_kept):
    """The run's log record holds ``task``, ``total``, ``step``, ...: a loss of that name overwrote one (a
    ``step`` of 1.94 in metrics.jsonl) or was overwritten, so the logged total no longer added up."""
    with pytest.raises(ValueError, match=rf"comparison loss '{name}': the step logs '{name}' itself"):
        comparison_loss(name)(type("Own", (ComparisonLoss,), {"signals": (Signal.FEATURES,)}))


def test_a_loss_whose_logged_term_is_another_losss_is_refused_where_it_is_registered(registries_kept):
    """mse logs its v comparison as ``mse_v``: a plug-in registered as mse_v logged beside it as ``mse_v#2``,
    the two told apart only by their order in transfer.losses."""
    with pytest.raises(
        ValueError, match=r"^comparison loss 'mse_v' would log 'mse_v', as comparison loss 'mse'"
    ):
        comparison_loss("mse_v")(type("Own", (ComparisonLoss,), {"signals": (Signal.FEATURES,)}))
    comparison_loss("cos_k")(
        type("CosK", (ComparisonLoss,), {"signals": (Signal.FEATURES,), "compare": lambda self, *args: None})
    )
    with pytest.raises(
        ValueError, match=r"^comparison loss 'cos' would log 'cos_k', as comparison loss 'cos_k'"
    ):
        comparison_loss("cos")(type("Cos", (ComparisonLoss,), {"signals": (Signal.K, Signal.Q)}))


def test_a_term_named_as_a_key_the_step_logs_itself_is_refused_where_the_loss_returns_it():
    with pytest.raises(
        ValueError,
        match=r"^transfer.losses\[0\]: comparison loss 'not_a_number' returned from compare_layer "
        r"a term named 'task', which the step logs itself; name it otherwise",
    ):
        _forward_returning("task term")


def _forward_returning(returns: str) -> None:
    """A training forward of a 2-block pair whose one comparison is `NotANumber` returning as ``returns`` says."""
    teacher, student = peaked_teacher(depth=2), tiny_vit(depth=2, seed=2)
    plan = build_plan(teacher, student, "none", losses=[{"name": "not_a_number", "returns": returns}])
    TeacherStudent(teacher, student, plan).train()(torch.randn(2, 3, 32, 32))


@comparison_loss("not_a_number")
class NotANumber(ComparisonLoss):
    """A loss that breaks the contract as its ``returns`` option says: a vector, a vector term, a float, NaN,
    a bare tensor, one term name at every layer, a term named as the step's own, a term and a log of one name, a
    term named as the comparison whose total the step logs under that name."""

    signals = (Signal.K,)
    options: ClassVar = {"returns": "vector"}

    def compare_layer(self, comparison, pair, step) -> Loss:
        diff = (pair.student["k"] - pair.teacher["k"]).float().pow(2).mean(dim=(-2, -1))
        returns = comparison.option("returns")
        if returns == "vector":
            return Loss(diff)
        if returns == "nan":
            return Loss(diff.mean() * float("nan"))
        if returns == "tensor":
            return diff.mean()
        if returns == "one name":
            return Loss(diff.mean(), {"k_l2": diff.mean()})
        if returns == "task term":
            return Loss(diff.mean(), {"task": diff.mean()})
        if returns == "detached":  # a copy of the docs' .detach() on the student's side too
            return Loss(diff.mean().detach())
        if returns == "attn_kl term":  # the name mode=distill's map comparison logs its KL under
            return Loss(diff.mean(), {f"attn_kl/{pair.student_layer}": diff.mean()})
        if returns == "term and log":  # a detached copy of a term logged under the term's own name
            name = f"k_l2/{pair.student_layer}"
            return Loss(diff.mean(), {name: diff.mean()}, {name: diff.mean().detach()})
        if returns == "own name":  # its unscaled part under the name the step logs the total under
            return Loss(2 * diff.mean(), {"not_a_number": diff.mean()})
        return Loss(diff.mean(), {"per_head": diff}) if returns == "vector term" else Loss(1.0)


@pytest.mark.parametrize(
    "returns, got",
    [
        ("vector", r"a Loss whose 'total' is a tensor of shape \(2, 3\)"),
        ("vector term", r"a Loss whose 'per_head' is a tensor of shape \(2, 3\)"),
        ("float", "a Loss whose 'total' is a float"),
        ("tensor", r"a Tensor, not a Loss\(total, terms\)"),
    ],
)
def test_a_loss_that_returns_no_single_number_is_named_where_it_returns(returns, got):
    """A vector total was summed over the layers without a word, a vector term failed in the logger, a float
    in the sum and a bare tensor where its total is read: each is refused as the loss returns it, naming the
    entry, the loss and its method."""
    said = r"transfer.losses\[0\]: comparison loss 'not_a_number' returned from compare_layer "
    with pytest.raises(TypeError, match=said + got):
        _forward_returning(returns)


def test_a_layer_loss_that_names_every_layers_term_alike_is_refused_not_logged_as_the_last_layers():
    """Each layer's ``{"k_l2": ...}`` overwrote the one before: the run logged ``k_l2`` as layer 1's value
    alone, a name that reads as the whole comparison's; the entry is refused and told to name the layers."""
    with pytest.raises(
        ValueError,
        match=r"^transfer.losses\[0\]: comparison loss 'not_a_number' returned from compare_layer 'k_l2' at "
        r"student layer 1 and at an earlier one; name each layer's term apart, e\.g\. f'k_l2/\{pair",
    ):
        _forward_returning("one name")


def test_a_loss_that_carries_no_gradient_is_refused_not_trained_on_as_if_it_were_nothing():
    """A total computed from detached tensors (or under no_grad) trained nothing beside a task loss, without
    a word, and alone failed in backward with torch's 'element 0 of tensors does not require grad'."""
    with pytest.raises(
        ValueError,
        match=r"^transfer.losses\[0\]: comparison loss 'not_a_number' returned a total that carries no gradient "
        r"to the student \(detached, or computed under torch.no_grad\(\)\), so it would train nothing; "
        r"compute it from the student's tensors as handed over, not detached copies$",
    ):
        _forward_returning("detached")
    with torch.no_grad():  # where no gradient is asked for, none is missing
        _forward_returning("detached")


def test_a_term_and_a_log_of_one_name_are_refused_not_logged_as_the_log_alone():
    """The step logs a comparison's terms and logs as one record, so a log named like a term replaced the
    term's value in metrics.jsonl without a word (while the term was the one summed and watched)."""
    with pytest.raises(
        ValueError,
        match=r"^transfer.losses\[0\]: comparison loss 'not_a_number' returned from compare_layer 'k_l2/0' as a "
        r"term and as a log, and the log keeps one value under that name \(the log's\); name the log otherwise, "
        r"e\.g\. 'k_l2_log/0'$",
    ):
        _forward_returning("term and log")


def test_a_part_named_as_its_comparison_is_refused_not_replaced_by_the_total_in_the_log():
    """The step logs each comparison's total under its name (``not_a_number``): a part of another value named so
    showed as itself in ``TransferOutput.terms`` and as the total in metrics.jsonl, without a word."""
    with pytest.raises(
        ValueError,
        match=r"^transfer.losses\[0\]: comparison loss 'not_a_number' returned from compare_layer a part named "
        r"'not_a_number', the name the step logs the comparison's total under, which would replace it; name the "
        r"part otherwise, e\.g\. 'not_a_number_part'$",
    ):
        _forward_returning("own name")


def test_a_term_named_as_another_comparisons_is_refused_not_logged_in_its_place():
    """A KL of one's own logged as ``attn_kl/0`` beside ``transfer.mode=distill``: the map comparison logs its
    KL under that name too, and the log kept one of the two values under a name that read as both."""
    teacher, student = peaked_teacher(depth=2), tiny_vit(depth=2, seed=2)
    plan = build_plan(
        teacher, student, "distill", losses=[{"name": "not_a_number", "returns": "attn_kl term"}]
    )
    out = TeacherStudent(teacher, student, plan).train()(torch.randn(2, 3, 32, 32))
    with pytest.raises(
        ValueError,
        match=r"^comparisons 'map' and 'not_a_number' both log 'attn_kl/0', and the log keeps one value under "
        r"that name: name the terms of one of them apart, e\.g\. after its loss \('not_a_number/0'\)$",
    ):
        compose_loss(out.compared)


def test_a_loss_that_is_nan_on_the_first_step_is_named_and_not_blamed_on_the_learning_rate(
    tmp_path, tiny_teacher_dir
):
    """Before any update the optimiser's settings cannot have made it: the advice points at the loss."""
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            *tiny_run(8, 4),
            "transfer.mode=none",
            "transfer.losses=[{name: not_a_number, returns: nan}]",
            "schedule.max_steps=2",
        ],
    )
    with pytest.raises(NonFiniteLossError) as said:
        train(cfg)
    assert "non-finite loss term 'not_a_number' = nan at step 1" in str(said.value)
    assert "before any update: check the loss that computes that term" in str(said.value)
    assert "optim.lr" not in str(said.value)


_FORKED_LOSS = """
import torch.nn.functional as F

from ..models.handover import Signal
from .comparisons import ComparisonLoss, comparison_loss
from .step_loss import Loss


@comparison_loss("cosine")
class Cosine(ComparisonLoss):
    signals = (Signal.Q, Signal.K)

    def compare_layer(self, comparison, pair, step) -> Loss:
        s, t = pair.student[comparison.signal], pair.teacher[comparison.signal].detach()
        loss = 1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean()
        return Loss(loss, {f"cosine_{comparison.signal}/{pair.student_layer}": loss})
"""

_FORKED_DATASET = """
from .registry import DatasetInfo, register_dataset
from .synthetic import build_synthetic

INFO = DatasetInfo(name="blobs", num_classes=4, class_names=None, mean=(0.5,), std=(0.25,), in_chans=3, img_size=32)


@register_dataset("blobs", info=INFO)
def build_blobs(split, *, root=None, img_size=None, in_chans=None, mean=None, std=None, seed=0):
    return build_synthetic(split, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed,
                           num_classes=4, length=8)
"""


@pytest.mark.slow
def test_a_loss_and_a_dataset_in_new_files_of_a_forked_package_reach_the_cli(tmp_path, tiny_teacher_dir):
    """What a fork adds is one file each: ``transfer/cosine.py`` and ``data/blobs.py`` in a copy of the
    package, and ``attnxfer train`` (the CLI, in a child process that imports the copy) checks the names as
    the config loads, trains with the loss on the dataset, and logs the loss's term at each layer."""
    fork = tmp_path / "fork"
    shutil.copytree(
        Path(attnxfer.__file__).parent, fork / "attnxfer", ignore=shutil.ignore_patterns("__pycache__")
    )
    (fork / "attnxfer" / "transfer" / "cosine.py").write_text(_FORKED_LOSS)
    (fork / "attnxfer" / "data" / "blobs.py").write_text(_FORKED_DATASET)
    argv = [
        "train",
        f"run_dir={tmp_path / 'run'}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        *tiny_run(8, 4),
        "data.dataset=blobs",
        "data.kwargs={}",
        "transfer.mode=none",
        "transfer.losses=[{name: cosine, signal: k}]",
        "schedule.max_steps=1",
        "log.every_steps=1",
    ]
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from attnxfer.launch.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv,
        ],
        cwd=fork,
        env={**os.environ, "PYTHONPATH": str(fork)},
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr
    assert "data: blobs, 8 train / 8 val images, 4 classes" in child.stdout + child.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["split"] == "train")
    assert 0 < step["cosine_k/0"] <= 2 and 0 < step["cosine_k/1"] <= 2
    assert step["transfer"] == pytest.approx(step["cosine_k/0"] + step["cosine_k/1"], rel=1e-6)
