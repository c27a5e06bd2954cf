"""Refusals a user can trigger from a config key are `InputError`s: the CLI prints one `error:` line and
exits 2 (a bare ValueError would now print a traceback, as a bug does). One in-process CLI call per family
of refusal that raised a plain ValueError before: the zoo attentions' option checks, the hierarchical
conversion's per-stage names, the mirrored student's construction, the MAE's decoder."""

from __future__ import annotations

import pytest
import timm
from timm.models import save_for_hf

from attnxfer.launch.cli import main

_TINY_RUN = [
    "data.dataset=synthetic",
    "data.kwargs.length=16",
    "data.batch_size=8",
    "log.progress=false",
    "log.trackers=[]",
    "schedule.epochs=1",
    "schedule.max_steps=1",
]


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI in this process; the refusal must be exit code 2 and one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"attnxfer {argv[0]}: error: "), err
    return err


@pytest.fixture(scope="module")
def swin_teacher_dir(tmp_path_factory):
    """A micro Swin (2 stages x 2 blocks, 32 px) in timm's format."""
    folder = tmp_path_factory.mktemp("swin-teacher")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
        num_classes=10,
    )
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def test_a_zoo_attentions_bad_option_is_one_line(tiny_teacher_dir, tmp_path, capsys):
    err = _refused(
        [
            "convert",
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            *_TINY_RUN,
            "convert.attention=nystrom",
            "convert.attention_kwargs={num_landmarks: 0}",
        ],
        capsys,
    )
    assert "num_landmarks must be >= 1, got 0" in err
    assert not (tmp_path / "run" / "report.json").exists()


def test_per_stage_attention_names_that_do_not_fit_a_swin_teacher(swin_teacher_dir, tmp_path, capsys):
    err = _refused(
        [
            "convert",
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{swin_teacher_dir}",
            *_TINY_RUN,
            "data.img_size=32",
            "convert.attention=[relu_linear,relu_linear,relu_linear]",
        ],
        capsys,
    )
    assert "convert.attention lists 3 attentions but the teacher has 4 attention layers in 2 stages" in err


def test_a_mirrored_student_that_timm_cannot_build(tiny_teacher_dir, tmp_path, capsys):
    # the tiny teacher has 3 heads: a width of 32 does not split into them
    err = _refused(
        [
            "train",
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            *_TINY_RUN,
            "model.kwargs={embed_dim: 32}",
        ],
        capsys,
    )
    assert "embed_dim=32 is not divisible by num_heads=3" in err


def test_an_mae_decoder_width_the_sin_cos_embedding_cannot_take(tmp_path, capsys):
    err = _refused(
        [
            "pretrain",
            f"run_dir={tmp_path / 'run'}",
            "model.name=vit_micro_patch4_28",
            *_TINY_RUN,
            "mae.decoder_dim=30",
            "mae.decoder_heads=3",
        ],
        capsys,
    )
    assert "needs a width divisible by 4, got 30" in err
