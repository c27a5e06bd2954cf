"""Every family at a second image size: the teacher a run loads at ``data.img_size`` is timm's own model at that
size, its mirrored student is built there and distils every layer, and a size the family cannot run at is one
refusal naming the nearest sizes that work, before any weight is read.

The reference is timm's, never attnxfer's: the saved teacher loaded by ``timm.create_model("local-dir:...",
img_size=X)`` through timm's checkpoint filter (``filter``), the model at its own size run on the larger input by
timm's forward (``forward``: SAM resizes its position embedding and tables per input, PVTv2's stems take any
size), or, where timm has no way (``resample``: CaiT's and Hiera's filters keep the checkpoint's embedding), the
model built at X with its position embedding resampled by timm's `resample_abs_pos_embed`. Each case's second
size and reference are its row of `cases.CASES`.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import timm
import torch
from helpers import card, fast_cells
from timm.layers import resample_abs_pos_embed
from timm.models import get_model_args, save_for_hf

from attnxfer import load_student
from attnxfer.apps.inspect.inspect import inspect_attention
from attnxfer.checkpoints import export_student
from attnxfer.errors import InputError
from attnxfer.models.attention import attention_layers
from attnxfer.models.efficient import build_efficient_student
from attnxfer.models.image_input import ImageSizeError, check_image_size, image_input, sizes_that_fit
from attnxfer.models.student import student_like
from attnxfer.sources import load_teacher
from attnxfer.transfer import build_plan

from .cases import CASES, NAMES, build_hier, build_swin
from .oracles import assert_distill_matches_oracle


def _timm_at(case, folder, side: int) -> torch.nn.Module:
    """timm's own model at ``side`` px with the saved weights (see the module docstring)."""
    spec = f"local-dir:{folder}"
    if case.size_oracle == "filter":
        return timm.create_model(spec, pretrained=True, img_size=side).eval()
    own = timm.create_model(spec, pretrained=True).eval()
    if case.size_oracle == "forward":
        return own
    model = timm.create_model(spec, pretrained=False, img_size=side).eval()
    weights = own.state_dict()
    grid = math.isqrt(model.pos_embed.shape[1])
    weights["pos_embed"] = resample_abs_pos_embed(weights["pos_embed"], [grid, grid], num_prefix_tokens=0)
    model.load_state_dict(weights)
    return model


def _plain_twin(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as plain timm builds it from its recorded arguments (timm's attention classes, which the
    oracle hooks), with its weights, its size record and no dropout."""
    cfg = dict(model.pretrained_cfg)
    args = {k: v for k, v in get_model_args(model).items() if k != "attn_layer"}  # timm's own attention
    twin = timm.create_model(
        cfg["architecture"], pretrained=False, pretrained_cfg=cfg, drop_path_rate=0.0, **args
    )
    twin.load_state_dict(model.state_dict())
    for m in twin.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return twin.eval()


def _images(side: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", fast_cells(NAMES, ("cait", "pvt_v2")))
def test_a_teacher_at_another_size_is_timms_model_there_and_its_student_distils_every_layer(name, tmp_path):
    case = CASES[name]
    own = case.make(0)
    own_side = image_input(own).img_size[0]
    save_for_hf(own, tmp_path, safe_serialization=True)
    side = case.other_size
    assert side != own_side

    teacher, record = load_teacher(f"local-dir:{tmp_path}", img_size=side)
    assert image_input(teacher).img_size == (side, side)
    assert tuple(record.input_size[-2:]) == (side, side) and tuple(record.source_img_size) == (own_side,) * 2
    x = _images(side)
    reference = _timm_at(case, tmp_path, side)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), rtol=1e-5, atol=1e-5)

    student = student_like(teacher, drop_path_rate=0.0)  # a fresh student mirrors the teacher, at its size
    assert image_input(student).img_size == (side, side)
    depth = len(attention_layers(teacher))
    assert build_plan(teacher, student, "distill").pairs == tuple((i, i) for i in range(depth))
    # distillation at this size against the materialised maps of timm's own modules (plain timm twins)
    layers, _ = assert_distill_matches_oracle(
        _plain_twin(teacher),
        _plain_twin(student),
        x,
        case.oracle,
        ce=case.ce,
        rel=case.distill_rel,
        float64_reference=case.float64_reference,
    )
    assert layers == depth


@pytest.mark.parametrize("name", fast_cells(["sam", "pvt_v2", "hiera"], ("sam",)))
def test_an_exported_student_records_its_size_and_loads_there(name, tmp_path):
    """A student trained at another size than its teacher's weights exports that size; `load_student` rebuilds
    it there (plain timm too, for a softmax student), with the trained weights' outputs."""
    case = CASES[name]
    save_for_hf(case.make(0), tmp_path / "teacher", safe_serialization=True)
    side = case.other_size
    teacher, _ = load_teacher(f"local-dir:{tmp_path / 'teacher'}", img_size=side)
    student = student_like(teacher).eval()
    out = export_student(student, tmp_path / "export", card=card())
    loaded = load_student(f"local-dir:{out}")
    assert image_input(loaded).img_size == (side, side)
    x = _images(side)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=0, atol=0)
        plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(plain(x), student(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("name", "side", "below", "above", "why"),
    [
        # 16x16 patches of 2 px in 4-token windows: stage grids X/2 and X/4 must be whole windows
        ("swin", 40, 32, 48, "the 1/4 stage: 40 px make 10 tokens of 4 px, not whole 4-token windows"),
        # PVTv2: strides 4, 8, 16 and a 2x2 key reduction on the first two stages: multiples of 16
        ("pvt_v2", 56, 48, 64, "not a multiple of 16 px"),
        # Hiera: 4 px patches in 4x4-token mask units, a token grid its three poolings halve: multiples of 32
        ("hiera", 48, 32, 64, "not a multiple of 32 px"),
    ],
)
def test_a_size_the_family_cannot_run_at_is_refused_naming_the_nearest_that_work(
    name, side, below, above, why
):
    model = build_swin(name) if name == "swin" else build_hier(name)
    with pytest.raises(ImageSizeError, match=why) as err:
        check_image_size(model, side)
    assert (err.value.below, err.value.above) == (below, above) == sizes_that_fit(model, side)
    assert f"nearest sizes that work: {below} px and {above} px" in str(err.value)
    assert err.value.restated("data.img_size").args[0].startswith(f"data.img_size={side}: ")
    for ok in (below, above):  # the sizes it names do run, as timm builds them
        check_image_size(model, ok)


def test_a_swin_stage_smaller_than_the_window_is_one_window_as_timm_makes_it(tmp_path):
    """8-token windows on 2 px patches, built at 32 px (16x16 then 8x8 tokens). At 16 px the second stage's 4x4
    grid is smaller than the window: timm makes it one 4x4 window (unshifted, its position table resized by
    timm's filter), which runs and is timm's model there; 20 px would pad 10x10 tokens to 16x16: refused."""
    model = build_swin("swin", window_size=8)
    assert sizes_that_fit(model, 20) == (16, 32)
    save_for_hf(model, tmp_path, safe_serialization=True)
    teacher, _ = load_teacher(f"local-dir:{tmp_path}", img_size=16)
    assert tuple(teacher.layers[1].blocks[1].window_size) == (4, 4)
    reference = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, img_size=16).eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(_images(16)), reference(_images(16)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_train_refuses_a_swin_size_before_any_work(tmp_path):
    """`attnxfer train` at a size the Swin teacher's windows cannot tile: one line naming data.img_size and the
    nearest sizes, exit 2, no run directory written."""
    save_for_hf(build_swin("swin"), tmp_path / "teacher", safe_serialization=True)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnxfer",
            "train",
            f"teacher.spec=local-dir:{tmp_path / 'teacher'}",
            "data.dataset=synthetic",
            "data.img_size=40",
            f"run_dir={run_dir}",
            "device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "attnxfer train: error: data.img_size=40: a Swin model (its weights were made for 32 px) cannot run at "
        "40 px: the 1/4 stage: 40 px make 10 tokens of 4 px, not whole 4-token windows; nearest sizes that "
        "work: 32 px and 48 px"
    ]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_inspect_runs_the_teacher_at_the_size_its_trained_students_were_trained_at(tmp_path):
    """An efficient student exported at 48 px from a 32 px teacher: `inspect` rebuilds the teacher at 48 px
    without being told (the export records its size); asked for 32 px, it refuses to resize the trained
    student and says which size to pass."""
    case = CASES["vit"]
    save_for_hf(case.make(0), tmp_path / "teacher", safe_serialization=True)
    teacher_spec = f"local-dir:{tmp_path / 'teacher'}"
    teacher, _ = load_teacher(teacher_spec, img_size=48)
    out = export_student(build_efficient_student(teacher, "relu_linear"), tmp_path / "export", card=card())
    settings = dict(data="synthetic", num_images=2, floor_images=2, batch_size=2)
    result = inspect_attention(teacher_spec, [f"local-dir:{out}"], **settings)
    assert result["tokens"]["grid"] == [6, 6]  # 48 px in 8 px patches
    assert len(result["students"]["export"]) == len(attention_layers(teacher))
    softmax = export_student(student_like(teacher), tmp_path / "softmax", card=card())  # timm's format
    for student in (out, softmax):
        with pytest.raises(InputError, match="was trained at 48 px .* pass --img-size 48"):
            inspect_attention(teacher_spec, [f"local-dir:{student}"], img_size=32, **settings)


def test_inspect_of_students_trained_at_two_sizes_names_each_and_says_to_inspect_them_apart(tmp_path):
    """Each trained student runs at its own size, the teacher rebuilt there: no --img-size serves students of
    32 and 48 px together, so the refusal names both, whatever --img-size says (not the other's size)."""
    save_for_hf(CASES["vit"].make(0), tmp_path / "teacher", safe_serialization=True)
    teacher_spec = f"local-dir:{tmp_path / 'teacher'}"
    students = []
    for side in (32, 48):
        teacher, _ = load_teacher(teacher_spec, img_size=side)
        students.append(str(export_student(student_like(teacher), tmp_path / f"at{side}", card=card())))
    for size in (None, 32, 48):
        with pytest.raises(InputError, match="trained at different image sizes") as refused:
            inspect_attention(teacher_spec, students, img_size=size, data="synthetic", num_images=2)
        assert f"({students[0]} at 32 px, {students[1]} at 48 px)" in str(refused.value)
        assert "inspect them separately, one `attnxfer inspect` per size" in str(refused.value)


def test_inspect_of_a_student_trained_where_the_teacher_cannot_run_names_the_student_not_img_size(tmp_path):
    """A student trained at 36 px (4 px patches) beside a teacher of 8 px patches: no --img-size was given, so
    the refusal says the size is the student's and to inspect it with a teacher that runs there (not to change
    an --img-size, which a trained student refuses)."""
    save_for_hf(CASES["vit"].make(0), tmp_path / "teacher", safe_serialization=True)
    student = timm.create_model("vit_tiny_patch16_224", img_size=36, patch_size=4, depth=1, embed_dim=24)
    out = export_student(student, tmp_path / "at36", card=card())
    with pytest.raises(InputError) as refused:
        inspect_attention(f"local-dir:{tmp_path / 'teacher'}", [str(out)], data="synthetic", num_images=2)
    msg = str(refused.value)
    assert "--img-size" not in msg and f"{out} was trained at 36 px" in msg, msg
    assert "cannot run at 36 px" in msg and "a teacher that runs at 36 px" in msg, msg


def test_a_refusal_names_its_family_with_the_article_it_takes():
    """'an EVA-02 / DINOv3 / PE model cannot run at ...', not 'a EVA-02'."""
    from timm.models.eva import Eva

    eva = Eva(img_size=28, patch_size=14, embed_dim=24, depth=1, num_heads=2)
    with pytest.raises(ImageSizeError) as err:
        check_image_size(eva, 30)
    assert str(err.value).startswith("an EVA-02 / DINOv3 / PE model (its weights were made for 28 px)"), (
        err.value
    )
    with pytest.raises(ImageSizeError, match="^a Swin model "):
        check_image_size(build_swin("swin"), 40)
