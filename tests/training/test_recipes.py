"""The paper recipes hold the reference's hyper-parameters, and the options they use do what they say.

REFERENCE is transcribed by hand from alexlioralexli/attention-transfer (commit 26963e8): the README's two
launch commands (8 nodes x 8 GPUs x 32 images), main_finetune.py's argument defaults for everything the
commands leave out, models_dual_vit.py (end_layer default -3, shared drop-path masks, GAP + fc_norm) and
util/lr_decay.py (layer ids on the teacher–student model). docs/recipes.md prints the same table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from helpers import fast_cells, tiny_run, tiny_vit
from timm.data.random_erasing import RandomErasing

from attnxfer.apps.run.parts import build_run_parts, build_student
from attnxfer.apps.run.training import base_lr
from attnxfer.config import ConfigError, describe_changes, load_config, to_dict
from attnxfer.data import build_dataset
from attnxfer.models import make_transfer_aware
from attnxfer.train.optim import student_param_groups
from attnxfer.transfer import build_plan

GPUS = 64  # the reference's 8 nodes x 8 GPUs

# Shared by both commands (main_finetune.py defaults or flags common to both).
_COMMON = dict(
    batch=32,
    beta1=0.9,
    mixup=0.8,
    cutmix=1.0,
    smoothing=0.1,
    reprob=0.25,
    remode="pixel",
    recount=1,
    randaug="rand-m9-mstd0.5-inc1",
    ema=0.9999,
    pooling="avg+fc_norm",
    clip_grad=None,
    share_drop_path=True,
)
_COPY = dict(
    _COMMON,
    mode="copy",
    epochs=100,
    blr=1e-3,
    min_lr=2e-3,
    beta2=0.999,
    wd=0.05,
    warmup=5,
    drop_path=0.0,
    layer_decay=0.75,
)
_DISTILL = dict(
    _COMMON,
    mode="distill",
    atd_weight=3.0,  # the reference's default, which copy reads nowhere (its recipes leave it out)
    epochs=200,
    blr=1e-4,
    min_lr=1e-6,
    beta2=0.95,
    wd=0.3,
    warmup=20,
    drop_path=0.2,
    layer_decay=1.0,
)
# end_layer: the README's value, and the builder default the published launcher actually ran with (-3).
REFERENCE = {
    "paper/vit_large_copy": dict(_COPY, arch="vit_large_patch16_224", depth=24, end_layer=0),
    "paper/vit_large_copy_end3": dict(_COPY, arch="vit_large_patch16_224", depth=24, end_layer=-3),
    "paper/vit_large_distill": dict(_DISTILL, arch="vit_large_patch16_224", depth=24, end_layer=-6),
    "paper/vit_large_distill_end3": dict(_DISTILL, arch="vit_large_patch16_224", depth=24, end_layer=-3),
    # ViT-B: the reference ships dual_vit_base_patch16 but no command; same recipe, the ViT-L ratio of layers
    "paper/vit_base_copy": dict(_COPY, arch="vit_base_patch16_224", depth=12, end_layer=0),
    "paper/vit_base_copy_end3": dict(_COPY, arch="vit_base_patch16_224", depth=12, end_layer=-3),
    "paper/vit_base_distill": dict(_DISTILL, arch="vit_base_patch16_224", depth=12, end_layer=-3),
    "paper/vit_base_distill_end3": dict(_DISTILL, arch="vit_base_patch16_224", depth=12, end_layer=-3),
}


def test_every_paper_recipe_is_in_the_table():
    from attnxfer.config import list_recipes

    assert {r for r in list_recipes() if r.startswith("paper/")} == set(REFERENCE)


def _resolved(cfg) -> dict:
    """The recipe's hyper-parameters in the reference's terms."""
    pool = cfg.model.global_pool
    fc_norm = cfg.model.fc_norm if cfg.model.fc_norm is not None else pool == "avg"
    return dict(
        mode=cfg.transfer.mode,
        arch=cfg.model.name,
        epochs=cfg.schedule.epochs,
        batch=cfg.data.batch_size,
        blr=cfg.optim.blr,
        min_lr=cfg.optim.min_lr,
        beta1=cfg.optim.beta1,
        beta2=cfg.optim.beta2,
        wd=cfg.optim.weight_decay,
        warmup=cfg.schedule.warmup_epochs,
        drop_path=cfg.model.drop_path_rate,
        mixup=cfg.aug.mixup,
        cutmix=cfg.aug.cutmix,
        smoothing=cfg.aug.label_smoothing,
        reprob=cfg.aug.reprob,
        remode=cfg.aug.remode,
        recount=cfg.aug.recount,
        randaug=cfg.aug.auto_augment,
        ema=cfg.ema.decay,
        pooling=f"{pool}+fc_norm" if fc_norm else str(pool),
        clip_grad=cfg.optim.clip_grad,
        layer_decay=cfg.optim.layer_decay or 1.0,
        end_layer=cfg.transfer.end_layer,
        share_drop_path=cfg.transfer.share_drop_path,
        **({"atd_weight": cfg.transfer.atd_weight} if cfg.transfer.mode == "distill" else {}),
    )


def _reference_lr_scale(name: str, depth: int, decay: float) -> float:
    """util/lr_decay.py on the teacher–student model, written out: num_layers = student depth; cls_token, pos_embed and
    patch_embed are layer 0, blocks.i is layer i+1, everything else (fc_norm, head) is layer `depth`;
    the scale is decay^(depth - layer)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth
    return decay ** (depth - layer)


#: one copy and one distillation recipe in the fast lane, the two ViT-B ones of two end layers (0, -3): on a quiet
#: 2-core machine the ViT-L cells (24 blocks on the meta device) take 0.7-1.4 s each, 5 s of the matrix's ~7 s
@pytest.mark.parametrize(
    "recipe", fast_cells(sorted(REFERENCE), keep=["paper/vit_base_copy", "paper/vit_base_distill_end3"])
)
def test_recipe_matches_the_reference(recipe, capsys):
    ref = REFERENCE[recipe]
    cfg = load_config(recipe)
    got = _resolved(cfg)
    assert {k: got[k] for k in got} == {k: ref[k] for k in got}, recipe
    assert cfg.optim.lr is None and math.isclose(base_lr(cfg, GPUS), ref["blr"] * ref["batch"] * GPUS / 256)

    # The student the recipe builds, and its optimiser groups, on the meta device (no weights, no memory).
    with torch.device("meta"):
        teacher = timm.create_model(cfg.teacher.spec, pretrained=False)
        student = build_student(cfg, teacher, 1000, 3, 224)
    assert len(student.blocks) == ref["depth"]
    assert "is not built" not in capsys.readouterr().err  # the recipe's model.name is the mirrored teacher's
    assert student.global_pool == "avg" and isinstance(student.fc_norm, torch.nn.LayerNorm)
    assert isinstance(student.norm, torch.nn.Identity)  # MAE: average, then fc_norm (no norm before)

    groups = student_param_groups(
        student,
        weight_decay=cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        layer_decay_rule=cfg.optim.layer_decay_rule,
    )
    names = {id(p): n for n, p in student.named_parameters()}
    scales = {names[id(p)]: g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    decays = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(scales) == set(names.values())
    for name, p in student.named_parameters():
        assert scales[name] == pytest.approx(_reference_lr_scale(name, ref["depth"], ref["layer_decay"])), (
            name
        )
        # reference: no decay on 1-D parameters and on the student's pos_embed / cls_token
        no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
        assert decays[name] == (0.0 if no_decay else ref["wd"]), name

    plan = build_plan(
        teacher,
        student,
        cfg.transfer.mode,
        end_layer=cfg.transfer.end_layer,
        weight=cfg.transfer.atd_weight,
        share_drop_path=cfg.transfer.share_drop_path,
    )
    # the reference transfers teacher activations [0, depth + end_layer) one to one
    expected = ref["depth"] + ref["end_layer"]
    assert plan.pairs == tuple((i, i) for i in range(expected))
    assert plan.share_drop_path and plan.weight == ref.get("atd_weight", 1.0)


def test_a_min_lr_above_the_base_lr_is_said_not_silently_climbed_to(capsys):
    """paper/vit_large_copy's min_lr 2e-3 is below its lr on the reference's 64 GPUs (8e-3), but above it on
    one (1.25e-4): there the cosine would raise the lr 16-fold after warm-up, so the run says so."""
    cfg = load_config("paper/vit_large_copy")
    base_lr(cfg, GPUS)
    assert "min_lr" not in capsys.readouterr().err
    assert math.isclose(base_lr(cfg, 1), 1.25e-4)
    said = capsys.readouterr().err
    assert (
        "optim.min_lr=0.002 is above the base lr 0.000125 (optim.blr=0.001 x global batch 32 / 256)" in said
    )
    assert "lower optim.min_lr" in said


def test_a_run_says_its_global_batch_how_it_is_split_and_the_lr_it_gives(capsys):
    """As MAE's main_finetune prints effective batch size, accumulation, base and actual lr: a run on 64
    processes whose lr follows blr says the lr that global batch gives, one set by optim.lr says that one."""
    cfg = load_config("paper/vit_large_copy", ["optim.accum_steps=2"])
    lr = base_lr(cfg, GPUS, say_it=True)
    batch = cfg.data.batch_size * GPUS * 2
    assert (
        f"batch: {batch} images an optimiser step ({cfg.data.batch_size} per process x {GPUS} processes x 2 "
        f"accumulation steps); lr {lr:.3g} (optim.blr={cfg.optim.blr:g} x global batch {batch} / 256)"
    ) in capsys.readouterr().out
    base_lr(cfg.with_overrides({"optim.lr": 3e-4, "optim.accum_steps": 1}), 1, say_it=True)
    said = capsys.readouterr().out
    assert (
        f"({cfg.data.batch_size} per process x 1 process x 1 accumulation step); lr 0.0003 (optim.lr=0.0003)"
        in said
    )
    base_lr(cfg, 1)
    assert "batch:" not in capsys.readouterr().out  # said once, where the run starts


def test_layer_decay_rules_on_a_meta_vit_large():
    """timm's / MAE's rule vs the reference's: one power of the decay apart for the stem and every block."""
    with torch.device("meta"):
        vit = timm.create_model("vit_large_patch16_224", global_pool="avg", num_classes=1000)
    d = 0.75

    def powers(rule):
        groups = student_param_groups(vit, 0.05, d, layer_decay_rule=rule)
        names = {id(p): n for n, p in vit.named_parameters()}
        return {
            names[id(p)]: round(math.log(g["lr_scale"]) / math.log(d), 9) for g in groups for p in g["params"]
        }

    timm_rule, ref_rule = powers("timm"), powers("attention_transfer")
    for name, want_timm, want_ref in [
        ("cls_token", 25, 24),
        ("patch_embed.proj.weight", 25, 24),
        ("blocks.0.attn.qkv.weight", 24, 23),
        ("blocks.12.mlp.fc1.weight", 12, 11),
        ("blocks.23.attn.proj.weight", 1, 0),
        ("fc_norm.weight", 0, 0),
        ("head.weight", 0, 0),
    ]:
        assert (timm_rule[name], ref_rule[name]) == (want_timm, want_ref), name
    with pytest.raises(ValueError, match="layer_decay_rule must be one of"):
        student_param_groups(vit, 0.05, d, layer_decay_rule="beit")


def test_config_rejects_unknown_choices():
    with pytest.raises(ConfigError, match="did you mean 'attention_transfer'"):
        load_config("paper/vit_large_copy", ["optim.layer_decay_rule=attention-transfer"])
    with pytest.raises(ConfigError, match="aug.remode: 'pixels' is not one of const, rand, pixel"):
        load_config("paper/vit_large_copy", ["aug.remode=pixels"])


def test_global_pool_avg_is_maes_head_even_when_mirroring_a_class_token_teacher():
    """model.global_pool=avg on a mirrored student: logits = head(fc_norm(mean of patch tokens)), computed
    here by hand from the blocks' output; not "norm, then average" (the mirrored teacher has a final norm)."""
    teacher = tiny_vit(depth=2, num_classes=10)
    assert teacher.global_pool == "token" and isinstance(teacher.norm, torch.nn.LayerNorm)
    cfg = load_config(None, ["model.global_pool=avg", "model.drop_path_rate=0"])
    student = build_student(cfg, teacher, 10, 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = student.blocks(student._pos_embed(student.patch_embed(x)))
        by_hand = student.head(student.fc_norm(tokens[:, 1:].mean(1)))
        torch.testing.assert_close(student(x), by_hand)
    # without the option, the mirrored student keeps the teacher's class-token head
    plain = build_student(load_config(None, ["model.drop_path_rate=0"]), teacher, 10, 3, 32)
    assert plain.global_pool == "token" and isinstance(plain.norm, torch.nn.LayerNorm)


def test_a_model_name_the_mirrored_student_is_not_is_said_not_dropped(capsys):
    """With a teacher, model.mirror_teacher=true builds the teacher's architecture: a model.name of another
    shape would silently go unused, so the run says which one it built and how to get the other."""
    teacher = tiny_vit(depth=2, num_classes=10)  # width 48
    student = build_student(load_config(None, ["model.name=vit_tiny_patch16_224"]), teacher, 10, 3, 32)
    err = capsys.readouterr().err
    assert student.num_features == 48 and "warning: model.name=vit_tiny_patch16_224 is not built" in err
    assert "(width 48, 2 blocks, against 192 and 12); model.mirror_teacher=false builds" in err
    named = load_config(None, ["model.name=vit_tiny_patch16_224", "model.mirror_teacher=false"])
    assert build_student(named, teacher, 10, 3, 32).num_features == 192
    build_student(load_config(None, []), teacher, 10, 3, 32)  # the default name: nothing to say
    assert capsys.readouterr().err == ""


def test_a_default_model_name_that_model_init_replaces_is_said(tiny_teacher_dir, capsys):
    """model.init of another architecture than the default model.name builds model.init's: the config the run
    records still reads the default name, so the run says it is not what was built."""
    spec = f"local-dir:{tiny_teacher_dir}"
    student = build_student(load_config(None, [f"model.init={spec}"]), None, 10, 3, 32)
    err = capsys.readouterr().err
    assert (
        student.num_features == 48
        and (
            f"warning: model.name=vit_micro_patch4_28 (the default) is not built: model.init={spec} gives the "
            "student its architecture (width 48, 2 blocks, against 96 and 6)"
        )
        in err
    ), err


def test_a_model_name_of_another_family_than_the_mirrored_teachers_is_said(capsys):
    """An EVA teacher mirrored (model.mirror_teacher=true) for model.name of a plain ViT of the same width and
    depth: an Eva was trained, and nothing said the name was not read."""
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=10)
    kw = "model.kwargs={depth: 2, embed_dim: 192, num_heads: 3, patch_size: 14, img_size: 28}"
    cfg = load_config(None, ["model.name=vit_tiny_patch16_224", kw])
    student = build_student(cfg, make_transfer_aware(eva), 10, 3, 28)
    err = capsys.readouterr().err
    assert type(student).__name__ == "Eva" and "model.name=vit_tiny_patch16_224 is not built" in err, err
    assert "(width 192, 2 blocks; Eva, not VisionTransformer); model.mirror_teacher=false builds" in err, err


def test_a_model_name_without_the_mirrored_teachers_registers_is_said(capsys):
    """A teacher with registers mirrored for model.name of a plain ViT of the same width, depth and family:
    the student took the registers, and nothing said the name was not read."""
    teacher = timm.create_model(
        "vit_small_patch14_reg4_dinov2", img_size=28, depth=2, embed_dim=48, num_heads=3, num_classes=10
    )
    kw = "model.kwargs={depth: 2, embed_dim: 48, num_heads: 3, patch_size: 14, img_size: 28}"
    cfg = load_config(None, ["model.name=vit_tiny_patch16_224", kw])
    student = build_student(cfg, make_transfer_aware(teacher), 10, 3, 28)
    err = capsys.readouterr().err
    assert student.num_prefix_tokens == 5 and "model.name=vit_tiny_patch16_224 is not built" in err, err
    assert "(width 48, 2 blocks; 5 tokens before the patches', not 1); model.mirror_teacher=false" in err, err


def test_a_mirrored_students_img_size_may_be_one_number_as_timm_takes_it():
    """model.kwargs.img_size=32 (timm's own spelling of 32x32) reaches the student's preprocessing as a size."""
    teacher = tiny_vit(depth=2, num_classes=10)
    student = build_student(load_config(None, ["model.kwargs={img_size: 32}"]), teacher, 10, 3, 32)
    assert student.pretrained_cfg["input_size"] == (3, 32, 32)


def _uniform_folder(root) -> list[str]:
    """Two classes of one uniform image a split under ``root``; the overrides that read it as the folder set."""
    from PIL import Image

    for cls in ("a", "b"):
        for split in ("train", "val"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200, 100, 50)).save(root / split / cls / "0.png")
    return ["data.dataset=folder", f"data.root={root}", "data.kwargs={}"]


@pytest.mark.parametrize("mode", ["const", "pixel"])
def test_random_erasing_mode_and_count_reach_the_transform(tmp_path, mode):
    """A uniform image stays uniform under crop/flip; erasing with p=1 fills a box with zeros (const) or
    with per-pixel normal noise (pixel)."""
    _uniform_folder(tmp_path)
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={tmp_path}",
            "aug.reprob=1.0",
            f"aug.remode={mode}",
            "aug.recount=2",
        ],
    )
    train = build_dataset(
        "folder",
        "train",
        root=tmp_path,
        img_size=32,
        re_prob=cfg.aug.reprob,
        re_mode=cfg.aug.remode,
        re_count=cfg.aug.recount,
    )
    erasers = [t for t in train.image_dataset.transform.transforms if isinstance(t, RandomErasing)]
    assert len(erasers) == 1 and erasers[0].mode == mode and erasers[0].max_count == 2
    x = train[0][0].numpy()
    distinct = len(np.unique(x[0]))
    if mode == "const":
        assert distinct == 2 and (x == 0).any()  # the image's value and the zero box
    else:
        assert distinct > 20  # noise


def test_the_datasets_own_options_win_over_the_aug_section_and_never_shadow_a_data_key(tmp_path):
    """docs/data.md: data.kwargs reach the builder as given (re_prob there beats aug.reprob, where both
    reached it as one argument twice); a data-section key spelled inside data.kwargs says where it goes."""
    from attnxfer.apps.run.loaders import build_loaders, data_info

    _uniform_folder(tmp_path)
    data = ["data.dataset=folder", f"data.root={tmp_path}", "data.batch_size=1"]
    cfg = load_config(None, [*data, "aug.reprob=0.5", "data.kwargs.re_prob=1.0"])
    loaders = build_loaders(
        cfg.data, cfg.aug, img_size=32, in_chans=3, mean=[0.5], std=[0.25], num_classes=2, seed=0
    )
    transforms = loaders.train_loader.dataset.image_dataset.transform.transforms
    assert [t.probability for t in transforms if isinstance(t, RandomErasing)] == [1.0]
    cfg = load_config(None, [*data, "data.kwargs.img_size=32"])
    with pytest.raises(ValueError, match="data.kwargs sets img_size: write data.img_size"):
        build_loaders(
            cfg.data, cfg.aug, img_size=32, in_chans=3, mean=[0.5], std=[0.25], num_classes=2, seed=0
        )
    # a class count the dataset takes as an option is the run's (the head's) count too
    assert (
        data_info(load_config(None, ["data.dataset=recall", "data.kwargs.num_classes=12"]).data).num_classes
        == 12
    )


def test_precision_is_one_switch_for_student_and_teacher():
    from attnxfer.train.runtime import teacher_dtype

    # teacher.dtype=auto follows the run's resolved precision; an explicit teacher.dtype wins
    assert teacher_dtype("auto", "fp32") is torch.float32
    assert teacher_dtype("auto", "bf16") is torch.bfloat16
    assert teacher_dtype("fp32", "bf16") is torch.float32
    assert teacher_dtype("auto") is None  # no run: TeacherStudent decides by device
    assert load_config("paper/vit_large_distill", ["precision=fp32"]).precision == "fp32"


def test_a_recipe_may_start_from_another_and_state_only_what_differs(tmp_path):
    """``base:`` applies the named recipe first: the child equals the base with its own keys changed."""
    from attnxfer.config import dump_config, recipe_chain

    child = tmp_path / "mine.yaml"
    child.write_text("base: paper/vit_large_distill\ndata:\n  root: /data/in1k\n", encoding="utf-8")
    cfg, ref = load_config(child), load_config("paper/vit_large_distill")
    assert cfg.data.root == "/data/in1k"
    assert to_dict(cfg) == to_dict(ref) | {"data": to_dict(ref)["data"] | {"root": "/data/in1k"}}
    # the paper recipes are such chains: vit_base_distill_end3 -> vit_base_distill -> vit_large_distill -> copy
    names = [p.stem for p, _ in recipe_chain("paper/vit_base_distill_end3")]
    assert names == ["vit_large_copy", "vit_large_distill", "vit_base_distill", "vit_base_distill_end3"]
    # a base given as a path beside the recipe
    (tmp_path / "sub.yaml").write_text("base: mine.yaml\nschedule:\n  epochs: 3\n", encoding="utf-8")
    sub = load_config(tmp_path / "sub.yaml")
    assert sub.schedule.epochs == 3 and sub.data.root == "/data/in1k"
    assert dump_config(sub).count("base") == dump_config(ref).count("base")  # `base` is not a config key


def test_a_config_named_without_yaml_is_found_here_as_base_finds_one_beside_its_recipe(
    tmp_path, monkeypatch, capsys
):
    """``-c mine`` reads ./mine.yaml as ``base: mine`` would; a built-in recipe's name still means the recipe
    for -c (and says that the file of that name here is not read), where ``base:`` takes the file beside its
    recipe first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("base: paper/vit_large_distill\nseed: 7\n", encoding="utf-8")
    assert load_config("mine").seed == 7
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "vit_large_distill.yaml").write_text("seed: 8\n", encoding="utf-8")
    assert load_config("paper/vit_large_distill").seed != 8
    said = "warning: -c paper/vit_large_distill reads the built-in recipe paper/vit_large_distill; the file "
    assert said + "paper/vit_large_distill.yaml here is not read" in capsys.readouterr().err
    # a recipe's base: means the file beside it, or a built-in recipe: one here is no -c of the user's
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "copy.yaml").write_text("seed: 9\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: demo/copy\n", encoding="utf-8")
    assert load_config("sub/child.yaml").seed != 9 and "warning" not in capsys.readouterr().err
    load_config("demo/copy")
    assert "warning: -c demo/copy reads the built-in recipe demo/copy" in capsys.readouterr().err
    # the other way round for base: (docs/training.md says both): the file beside the recipe comes first
    (tmp_path / "child.yaml").write_text("base: paper/vit_large_distill\n", encoding="utf-8")
    assert load_config("child").seed == 8


def test_a_recipes_mapping_is_merged_into_its_bases_as_a_dotted_override_is(tmp_path):
    """YAML cannot spell model.kwargs.depth: a recipe writes model: {kwargs: {depth: 4}}, and that must change
    the depth alone, not drop the base's patch size, width and position embedding (a different model)."""
    (tmp_path / "deeper.yaml").write_text(
        "base: recall/teacher\nmodel:\n  kwargs: {depth: 4}\ndata:\n  kwargs:\n    num_keys: 8\n"
        "    curriculum: [{epochs: 1, img_size: 32}]\n",
        encoding="utf-8",
    )
    deeper = load_config(tmp_path / "deeper.yaml")
    dotted = load_config(
        "recall/teacher",
        [
            "model.kwargs.depth=4",
            "data.kwargs.num_keys=8",
            "data.kwargs.curriculum=[{epochs: 1, img_size: 32}]",
        ],
    )
    assert to_dict(deeper) == to_dict(dotted)
    assert deeper.model.kwargs["patch_size"] == 4 and deeper.data.kwargs["distractors"] == 16
    assert deeper.data.kwargs["curriculum"] == [{"epochs": 1, "img_size": 32}]  # a list replaces the base's


def test_an_empty_mapping_in_a_recipe_empties_its_bases(tmp_path):
    """``{}`` merged key by key would change nothing: a recipe switching to an attention without options could
    not drop its base's, which the refusal of those options tells it to do by setting the key to {}."""
    (tmp_path / "relu.yaml").write_text(
        "base: convert/demo_hedgehog\nconvert:\n  attention: relu_linear\n  attention_kwargs: {}\n",
        encoding="utf-8",
    )
    assert load_config("convert/demo_hedgehog").convert.attention_kwargs  # the base has options to drop
    assert load_config(tmp_path / "relu.yaml").convert.attention_kwargs == {}


def test_an_empty_students_list_drops_the_bases_students_for_a_single_run(tmp_path):
    """A list in a recipe replaces its base's, so ``students: []`` must too: one run can then start from a
    study's recipe; a base's students left in place are still refused, naming the file that lists them."""
    (tmp_path / "one.yaml").write_text(
        "base: recall/convert_budgets\nstudents: []\nconvert: {attention: [softmax, hedgehog]}\n",
        encoding="utf-8",
    )
    assert load_config(tmp_path / "one.yaml").convert.attention == ["softmax", "hedgehog"]
    (tmp_path / "kept.yaml").write_text("base: recall/convert_budgets\nseed: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"convert_budgets\.yaml' lists students.*students: \[\] in"):
        load_config(tmp_path / "kept.yaml")
    # the study's own file: both keys a single run's config does not take are named at once
    with pytest.raises(ConfigError, match=r"without students: and command:\)$"):
        load_config("recall/convert_budgets")


def test_recipe_base_cycles_and_missing_bases_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: paper/vit_large_cpoy\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"base 'paper/vit_large_cpoy' not found.*did you mean.*vit_large_copy"
    ):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [x]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="base must be a recipe name"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("_base_: demo/copy\n", encoding="utf-8")  # MMEngine's spelling
    with pytest.raises(
        ConfigError, match="_base_: is how other tools start from a recipe; attnxfer's is base: NAME"
    ):
        load_config(tmp_path / "e.yaml")


def test_a_base_found_only_where_the_command_runs_is_refused_naming_its_path_from_the_recipe(
    tmp_path, monkeypatch
):
    """``base: mine`` with mine.yaml in the working folder, not beside the recipe, was read: the same recipe
    then read another file, or none, from another folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("seed: 7\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: mine\n", encoding="utf-8")
    with pytest.raises(
        ConfigError,
        match=r"base 'mine' is neither a file beside it \(sub/mine\.yaml\).*base: \.\./mine\.yaml$",
    ):
        load_config("sub/child.yaml")
    (tmp_path / "sub" / "child.yaml").write_text("base: ../mine.yaml\n", encoding="utf-8")
    assert load_config("sub/child.yaml").seed == 7


def test_a_dotted_override_inside_a_dict_key_sets_that_key_and_keeps_the_others():
    """``model.kwargs.depth=4`` on a recipe that sets model.kwargs changes the depth only (as in Hydra); the
    whole value given at once (``model.kwargs={...}``) still replaces it."""
    recipe = load_config("recall/teacher").model.kwargs
    deeper = load_config("recall/teacher", ["model.kwargs.depth=4"]).model.kwargs
    assert deeper == {**recipe, "depth": 4} and recipe["depth"] == 2
    assert load_config("recall/teacher", ["model.kwargs={depth: 4}"]).model.kwargs == {"depth": 4}
    nested = load_config("recall/teacher", ["data.kwargs.curriculum=[]", "data.kwargs.pairs=4"]).data.kwargs
    assert nested["curriculum"] == [] and nested["pairs"] == 4 and nested["num_keys"] == 16
    # a list inside the dict is not a mapping to merge into: an index would make it one, read as a wrong value
    with pytest.raises(ConfigError, match=r"^data.kwargs.curriculum.0: a list is not set item by item; give"):
        load_config("recall/teacher", ["data.kwargs.curriculum.0.epochs=1"])
    # nor is a value: an index into the recipe's number made it {'0': 3}; a key the recipe lacks may be made one
    with pytest.raises(
        ConfigError, match=r"^model.kwargs.patch_size.0: model.kwargs.patch_size holds a value, not a"
    ):
        load_config("recall/teacher", ["model.kwargs.patch_size.0=3"])
    with pytest.raises(ConfigError, match=r"set it whole: data.kwargs.length=3$"):
        load_config("recall/teacher", ["data.kwargs.length.0=3"])
    assert load_config("recall/teacher", ["model.kwargs.new_key.sub=1"]).model.kwargs["new_key"] == {"sub": 1}


def test_the_start_up_summary_names_the_entries_of_a_mapping_that_differ_not_both_mappings_whole():
    """recall/teacher's data.kwargs (curriculum included) printed twice whole hid the one knob changed; the
    summary says it as a refused resume does (`KeyChange`)."""
    base = load_config("recall/teacher")
    cfg = load_config("recall/teacher", ["data.kwargs.distractors=8", "data.kwargs.hops=2", "seed=1"])
    assert describe_changes(base, cfg, "recall/teacher").splitlines()[1:] == [
        "  seed: 0 -> 1",
        "  data.kwargs: distractors: 16 -> 8, hops: unset -> 2",
    ]
    # a YAML file given by its path (a run's own config.yaml) is named as the file, not as a recipe
    assert describe_changes(base, base, "runs/x/config.yaml") == "config: runs/x/config.yaml, unchanged"
    assert describe_changes(base, base, "recall/teacher") == "config: recipe recall/teacher, unchanged"


def test_fine_tuning_from_model_init_normalises_by_the_pretrained_models_statistics(tmp_path, capsys):
    """As timm's train.py does (resolve_data_config of the model): an encoder trained on other statistics
    than the dataset's (CLIP's, SigLIP's, a transformers processor's) is fine-tuned on the inputs it knows."""
    from timm.models import save_for_hf

    encoder = tiny_vit(depth=1, embed_dim=24, num_heads=2, plain_timm=True)
    stats = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    save_for_hf(encoder, tmp_path / "init", safe_serialization=True, model_config={"pretrained_cfg": stats})
    cfg = load_config(
        None, [*tiny_run(8, 4), "transfer.mode=none", f"model.init=local-dir:{tmp_path / 'init'}"]
    )
    parts = build_run_parts(cfg)
    assert tuple(parts.mean) == stats["mean"] and tuple(parts.std) == stats["std"]
    out = capsys.readouterr().out
    assert "normalised by model.init's mean/std" in out
    # and what it took, as MAE's fine-tuning prints its load_state_dict message: the encoder, a fresh head
    n = len(encoder.state_dict()) - 2  # all but the encoder's head (weight, bias): the student's is new
    assert f"model.init: {n} tensors loaded from local-dir:{tmp_path / 'init'}; fresh: head" in out, out


def test_a_run_says_how_its_images_are_made_and_by_whose_choice(tiny_teacher_dir, tmp_path, capsys):
    """The teacher decides the size, channels and normalisation unless the config does: a 1-channel teacher
    turns an RGB folder grey, so the run says so before it trains."""
    base = [*tiny_run(12, 4), f"run_dir={tmp_path / 'r'}", "transfer.mode=none"]
    with_teacher = build_run_parts(load_config(None, [*base, f"teacher.spec=local-dir:{tiny_teacher_dir}"]))
    size, out = with_teacher.img_size, capsys.readouterr().out
    assert (
        f"data: synthetic, 12 train / 12 val images, 10 classes; made 3-channel {size} px for the teacher, "
        in out
    )
    assert "normalised by the teacher's mean/std" in out
    build_run_parts(load_config(None, [*base, "data.img_size=16", "data.in_chans=1", "data.mean=[0.5]"]))
    out = capsys.readouterr().out
    assert (
        "made 1-channel 16 px for data.img_size/in_chans, normalised by data.mean and the dataset's std"
        in out
    )
    build_run_parts(load_config(None, [*base, "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"]))
    assert "normalised by data.mean/std" in capsys.readouterr().out
    # grey images of a folder, whose statistics are ImageNet's three: their average, one channel
    folder = [*base, *_uniform_folder(tmp_path / "folder"), "data.batch_size=1"]
    grey = build_run_parts(load_config(None, [*folder, "data.in_chans=1"]))
    rgb = build_run_parts(load_config(None, folder))
    assert (
        list(grey.mean) == [sum(rgb.mean) / 3] and list(grey.std) == [sum(rgb.std) / 3] and len(rgb.mean) == 3
    )
    # no teacher: a folder states no statistics, and timm's ImageNet ones are said to be what they are
    said = "px for the student, normalised by ImageNet's mean/std (timm's default: the dataset states none; "
    assert said + "data.mean / data.std set your data's)" in capsys.readouterr().out
    build_run_parts(load_config(None, [*folder, "data.mean=[0.5,0.5,0.5]"]))  # the other one is still timm's
    assert "normalised by data.mean and ImageNet's std (timm's default: " in capsys.readouterr().out
    # a report scoring runs after they trained (the demo's, a study's) does not say it again
    build_run_parts(load_config(None, base), quiet=True)
    assert "data:" not in capsys.readouterr().out


def test_statistics_the_teacher_was_not_trained_on_are_warned_of(tiny_teacher_dir, tmp_path, capsys):
    """data.mean/std replace the teacher's: other values make it see images as it never did, which lowers what
    it scores and shows its students with no other sign, so the run says so; the teacher's own values, even
    written once for every channel, draw no such line."""
    teacher = f"local-dir:{tiny_teacher_dir}"
    base = [*tiny_run(12, 4), f"run_dir={tmp_path / 'r'}", "transfer.mode=none", f"teacher.spec={teacher}"]
    own = build_run_parts(load_config(None, base))
    (mean,), (std,) = set(own.mean), set(own.std)  # the teacher's, the same on every channel
    build_run_parts(load_config(None, [*base, f"data.mean=[{mean}]", f"data.std=[{std}]"]))
    assert "normalised otherwise" not in capsys.readouterr().err
    build_run_parts(load_config(None, [*base, "data.mean=[0.25]"]))
    its = ", ".join(f"{v:.4g}" for v in own.mean)
    assert capsys.readouterr().err == (
        f"warning: the teacher {teacher} was trained on images normalised otherwise (data.mean [0.25] against "
        f"its [{its}]): leave data.mean and data.std out (data.mean=null data.std=null) to give it its own\n"
    )


def test_the_data_line_shows_no_data_root_for_a_dataset_that_reads_none(tmp_path, capsys):
    """A paper recipe's data.root (/path/to/imagenet) kept on a switch to synthetic data is not read: the
    run's data line would name a folder the run never opens."""
    base = [*tiny_run(8, 4), f"run_dir={tmp_path / 'r'}", "transfer.mode=none", "data.root=/path/to/imagenet"]
    build_run_parts(load_config(None, base))
    out = capsys.readouterr().out
    assert "data: synthetic, 8 train / 8 val images" in out and "/path/to/imagenet" not in out


def test_random_erasing_and_auto_augment_on_a_dataset_that_makes_its_own_tensors_are_said_unused(
    tmp_path, capsys
):
    """The paper's recipes set aug.reprob and aug.auto_augment; switched to synthetic (or animal_mnist) data,
    the run trained without them and said nothing. A folder's timm transforms read them: no warning there."""
    aug = ["aug.reprob=0.25", "aug.auto_augment=rand-m9-mstd0.5-inc1"]
    base = [*tiny_run(8, 4), f"run_dir={tmp_path / 'r'}", "transfer.mode=none", *aug]
    build_run_parts(load_config(None, base))
    assert (
        "warning: aug.reprob=0.25, aug.auto_augment=rand-m9-mstd0.5-inc1 unused with data.dataset=synthetic"
        in capsys.readouterr().err
    )
    folder = [*_uniform_folder(tmp_path / "folder"), "data.batch_size=1"]
    build_run_parts(load_config(None, [*base, *folder]))
    assert "unused" not in capsys.readouterr().err


def test_grey_images_average_only_the_rgb_statistics_the_config_does_not_give(tmp_path):
    """data.in_chans=1 on a folder (ImageNet's three statistics): a data.std or data.mean given is used as
    given and the other is averaged, in a training run and in MAE pre-training alike."""
    from attnxfer.apps.run.pretrain import build_pretrain_engine

    grey = [*tiny_run(2, 1), *_uniform_folder(tmp_path / "folder")]
    grey += ["data.in_chans=1", "transfer.mode=none", f"run_dir={tmp_path / 'r'}"]
    mean, std = [sum((0.485, 0.456, 0.406)) / 3], [sum((0.229, 0.224, 0.225)) / 3]
    parts = build_run_parts(load_config(None, [*grey, "data.std=[0.5]"]))
    assert list(parts.mean) == pytest.approx(mean) and list(parts.std) == [0.5]
    parts = build_run_parts(load_config(None, [*grey, "data.mean=[0.5]"]))
    assert list(parts.mean) == [0.5] and list(parts.std) == pytest.approx(std)
    mae = ["model.kwargs={depth: 1}", "mae.decoder_depth=1", "mae.pictures=0", f"run_dir={tmp_path / 'p'}"]
    info = build_pretrain_engine(load_config("demo/mae_pretrain", [*grey, *mae])).val_loader.dataset.info
    assert list(info.mean) == pytest.approx(mean) and list(info.std) == pytest.approx(std)
