"""Refusals a user can trigger from a config key are `InputError`s: the CLI prints one `error:` line and
exits 2 (a bare ValueError would now print a traceback, as a bug does). One in-process CLI call per family
of refusal that raised a plain ValueError before: the zoo attentions' option checks, the hierarchical
conversion's per-stage names, the mirrored student's construction, the MAE's decoder. And the command
line's paths and inputs, each refusal naming the real problem in one line, nothing left behind: an empty,
folder or binary -c, a -c given twice, a run dir given without -c, a run_dir or output folder under a file,
and a table of other bad inputs (data, device, submit)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import ONE_BLOCK_RUN as S, once_each, run_cli, tiny_run, tiny_vit
from safetensors.torch import save_file
from timm.models import save_for_hf

from attnxfer.apps.run.training import plan_from_config
from attnxfer.config import ConfigError, list_recipes, load_config
from attnxfer.config.study_spec import load_study
from attnxfer.errors import InputError
from attnxfer.launch.cli import main
from attnxfer.sources.resolve import demo_hint

_TINY_RUN = [
    *tiny_run(16, 8),
    "schedule.epochs=1",
    "schedule.max_steps=1",
]


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI in this process; the refusal must be exit code 2 and one line on stderr."""
    code, _, err = run_cli(capsys, *once_each(argv))
    assert code == 2
    err = err.strip()
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


@pytest.mark.parametrize(
    "attention, options, said",
    [
        ("nystrom", "{num_landmarks: 0}", "num_landmarks must be >= 1, got 0"),
        ("window", "{window_size: 0}", "window_size must be an int or (height, width) of positive ints"),
        (
            "performer",
            "{num_features: 2.5}",
            "num_features must be an integer or None (null in a config) for performer, got 2.5",
        ),
    ],
)
def test_a_zoo_attentions_bad_option_is_one_line(
    tiny_teacher_dir, tmp_path, capsys, attention, options, said
):
    err = _refused(
        [
            "convert",
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            *_TINY_RUN,
            f"convert.attention={attention}",
            f"convert.attention_kwargs={options}",
        ],
        capsys,
    )
    assert said in err and "Traceback" not in err
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
    assert "embed_dim=32 is not divisible by num_heads=3 (the teacher's)" in err
    # a config's user is told which keys to change, not student_like's arguments alone
    assert "model.kwargs.embed_dim / model.kwargs.num_heads in a config" in err


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
    assert (
        "mae.decoder_dim=30: the decoder's 2-D sin-cos position embedding needs a width divisible by 4" in err
    )


#: how each command runs without a teacher (pretrain reads no transfer section: a key of it is refused)
_NO_TRANSFER = {"train": ["transfer.mode=none"], "pretrain": []}


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_model_init_that_cannot_load_names_model_init_not_a_teacher(tmp_path, capsys, command):
    """model.init is read by the teacher's loader, whose words name a teacher: a run that has one would be told
    to change the wrong key."""
    run = [command, f"run_dir={tmp_path / 'run'}", *_NO_TRANSFER[command], *_TINY_RUN]
    missing = tmp_path / "nope.safetensors"
    err = _refused([*run, f"model.init={missing}"], capsys)
    assert f"model.init='{missing}': checkpoint {missing} does not exist (" in err, err
    err = _refused([*run, "model.init=vit_tinny_patch16_224"], capsys)
    assert "unknown model.init 'vit_tinny_patch16_224' (did you mean 'vit_tiny_patch16_224'?)" in err, err
    assert "teacher" not in err and err.endswith("(model.name=NAME)"), err


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_pickled_model_init_file_is_told_to_come_back_as_model_init_not_a_teacher(
    tmp_path, capsys, command
):
    """A .pth with pickled training args is refused with a conversion recipe; where to give the converted file
    names model.init, the key it was given to (pretrain refuses teacher.spec, train would load a teacher)."""
    import argparse

    pickled = tmp_path / "mae_full.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3)}, pickled)
    run = [
        command,
        f"run_dir={tmp_path / 'run'}",
        *_NO_TRANSFER[command],
        *_TINY_RUN,
        f"model.init={pickled}",
    ]
    code, _, err = run_cli(capsys, *once_each(run))
    assert code == 2 and "argparse.Namespace" in err, err
    [then] = [line for line in err.splitlines() if line.startswith("then give")]
    assert then.startswith(
        f"then give {pickled.with_suffix('.safetensors')} where this file was (model.init="
    ), then
    assert "teacher" not in then, then


def test_a_model_init_weights_file_is_built_as_model_name_and_kwargs(tmp_path):
    """A bare weights file (MAE's mae_pretrain_vit_base.pth) names no architecture: model.name and model.kwargs
    build it, as they build pretrain's encoder, and a file they do not fit is refused naming them."""
    from safetensors.torch import save_file

    from attnxfer.apps.run.parts import init_from_pretrained
    from attnxfer.config import ModelConfig

    shape = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, **shape)
    save_file(encoder.state_dict(), str(tmp_path / "encoder.safetensors"))
    m = ModelConfig(name="vit_tiny_patch16_224", init=str(tmp_path / "encoder.safetensors"), kwargs=shape)
    student = init_from_pretrained(m, 10, None, None, dict(shape))
    assert student.head.out_features == 10
    for k, v in encoder.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    deeper = dataclasses.replace(m, kwargs={**shape, "depth": 3})
    with pytest.raises(
        InputError, match=r"(?s)built as model.name=vit_tiny_patch16_224 with model.kwargs=.*depth': 3"
    ):
        init_from_pretrained(deeper, 10, None, None, {})


def test_a_model_init_weights_file_of_other_channels_names_the_in_chans_that_builds_it(tmp_path):
    """An MAE of vit_micro_patch4_28 (1 channel by default) pre-trained on RGB images: its checkpoint's
    model.safetensors given with the kwargs its config records was refused in timm's words alone (input_size[0]=1),
    under advice to set the kwargs it already had; the channel count is not among them (the data set it)."""
    from attnxfer.apps.run.parts import init_from_pretrained
    from attnxfer.config import ModelConfig

    shape = {"depth": 1, "embed_dim": 24, "num_heads": 2}
    encoder = timm.create_model("vit_micro_patch4_28", num_classes=0, in_chans=3, **shape)
    save_file(encoder.state_dict(), str(tmp_path / "model.safetensors"))
    m = ModelConfig(name="vit_micro_patch4_28", init=str(tmp_path / "model.safetensors"), kwargs=shape)
    with pytest.raises(
        InputError, match=r"the file's patch_embed.proj takes 3-channel images \(in_chans=3\)"
    ):
        init_from_pretrained(m, 10, None, None, dict(shape))
    told = dataclasses.replace(m, kwargs={**shape, "in_chans": 3})  # as the message says
    student = init_from_pretrained(told, 10, None, None, dict(told.kwargs))
    for k, v in encoder.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k


@pytest.mark.parametrize(
    "keys, said",
    [
        (["data.in_chans=1"], "data.in_chans=1, but the teacher takes 3-channel images"),  # was silently 3
        (  # was a traceback in the first step
            [
                "model.mirror_teacher=false",
                "model.kwargs.in_chans=1",
                "model.kwargs.patch_size=8",
                "data.img_size=32",
            ],
            "the student takes 1-channel images and the teacher 3, but both read the same images: "
            "set model.kwargs.in_chans=3",
        ),
    ],
)
def test_a_channel_count_the_teacher_or_student_cannot_read_is_refused_before_work(
    tiny_teacher_dir, tmp_path, capsys, keys, said
):
    run = tmp_path / "run"
    argv = ["train", f"run_dir={run}", f"teacher.spec=local-dir:{tiny_teacher_dir}", *_TINY_RUN, *keys]
    assert said in _refused(argv, capsys)
    assert not (run / "checkpoints").exists()


# -- teacher paths: what is true of the path given -------------------------------------------------------


#: a fresh student alone (model.init's tests)
_NO_TEACHER = [*_TINY_RUN, "transfer.mode=none"]


def _teacher_refused(spec: str, tmp_path, capsys) -> str:
    return _refused(["train", f"run_dir={tmp_path / 'run'}", f"teacher.spec={spec}", *_TINY_RUN], capsys)


def test_an_onnx_file_given_as_a_model_is_named_for_onnx_runtime_before_any_architecture_is_asked(
    tmp_path, capsys
):
    onnx = tmp_path / "export" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"\x08\x07")  # read by nothing: the suffix says what it is
    err = _teacher_refused(str(onnx), tmp_path, capsys)
    assert f"{onnx} is an ONNX model, for ONNX Runtime" in err and f"local-dir:{onnx.parent}" in err, err
    assert "name the timm architecture" not in err


def test_a_checkpoints_weights_file_given_as_a_model_names_its_run_not_an_architecture(tmp_path, capsys):
    """A run's student is built from its config (model.kwargs too), which no timm architecture name restores:
    asking for one was a dead end; the run's export is the model."""
    weights = tmp_path / "r" / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    err = _teacher_refused(str(weights), tmp_path, capsys)
    assert f"is one of the checkpoints of the run {tmp_path / 'r'}" in err, err
    assert "name the timm architecture" not in err
    # with teacher.arch too, and the run's folder as local-dir: the run's export first, which takes no arch (its
    # weights loaded as the arch met a pooling hint, the folder was told only to drop teacher.arch)
    (tmp_path / "r" / "run.json").write_text("{}")
    save_file({"fc_norm.weight": torch.ones(4)}, str(weights))  # an average-pooled student's
    for spec in (str(weights), f"local-dir:{tmp_path / 'r'}"):
        argv = [
            "train",
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec={spec}",
            "teacher.arch=vit_micro_patch4_28",
        ]
        code, _, err = run_cli(capsys, *argv, *_TINY_RUN)
        assert code == 2 and "pool" not in err and "Traceback" not in err, err
        assert "mean/std" not in err  # of weights refused, their preprocessing is no news
        assert f"then use local-dir:{tmp_path / 'r' / 'export'}, without arch='vit_micro_patch4_28'" in err, (
            err
        )


def test_a_teacher_path_that_does_not_exist_says_so_and_shows_what_is_there(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs" / "demo" / "mae-1a2b3c" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for spec in ("local-dir:runs/demo/mae/export", "runs/demo/mae/export", "./runs/demo/mae"):
        path = spec.removeprefix("local-dir:").removeprefix("./")
        err = _teacher_refused(spec, tmp_path, capsys)
        assert f"{path} does not exist ({tmp_path / 'runs' / 'demo'} holds: mae-1a2b3c/)" in err, err
        assert "hf-hub" not in err and "config.json" not in err
    # RUNS/NAME, whose RUNS/ is a folder here, is a path mistyped, not a Hub repo (ORG/NAME) without its hf-hub:
    err = _teacher_refused("runs/dmo", tmp_path, capsys)
    assert f"runs/dmo does not exist ({tmp_path / 'runs'} holds: demo/)" in err and "hf-hub" not in err, err
    # a weights file mistyped beside the real one
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "teacher.safetensors").write_bytes(b"")
    err = _teacher_refused("models/teachr.safetensors", tmp_path, capsys)
    assert (
        f"models/teachr.safetensors does not exist ({tmp_path / 'models'} holds: teacher.safetensors)" in err
    ), err
    # the run dir this command made for itself beside it (a demo recipe's runs/demo/copy) is not listed
    argv = ["train", "run_dir=runs/demo/copy", "teacher.spec=local-dir:runs/demo/mae/export", *_TINY_RUN]
    assert "(runs/demo holds: mae-1a2b3c/)" in _refused(argv, capsys).replace(f"{tmp_path}/", "")
    # nor one made deeper (a search recipe's runs/search/demo) where the teacher's folder is missing higher up
    argv = ["train", "run_dir=runs/search/demo", "teacher.spec=local-dir:runs/mae/export", *_TINY_RUN]
    assert "(runs holds: demo/)" in _refused(argv, capsys).replace(f"{tmp_path}/", "")
    # nor a folder that holds nothing but it (runs/demo/ made for runs/demo/copy before the demo ever ran)
    monkeypatch.chdir(tmp_path / "models")
    argv = ["train", "run_dir=runs/demo/copy", "teacher.spec=local-dir:runs/demo/mae/export", *_TINY_RUN]
    err = _refused(argv, capsys)
    assert "runs/demo/mae/export does not exist;" in err and "holds:" not in err, err


def test_the_hierarchical_demos_missing_teacher_is_answered_with_the_commands_that_make_it():
    hint = demo_hint("runs/demo/hier_teacher/export")  # demo/hier_copy's and demo/hier_distill's teacher
    assert "attnxfer train -c demo/hier_teacher" in hint, hint
    assert "attnxfer export runs/demo/hier_teacher runs/demo/hier_teacher/export" in hint
    assert "MAE" not in hint  # the demo's MAE teacher is a plain ViT: no teacher for a PVTv2 student


def test_a_model_folder_given_without_local_dir_is_told_to_use_it(tiny_teacher_dir, tmp_path, capsys):
    err = _teacher_refused(str(tiny_teacher_dir), tmp_path, capsys)
    assert err.endswith(f"the folder exists; use local-dir:{tiny_teacher_dir}"), err
    (tmp_path / "empty").mkdir()
    err = _teacher_refused(str(tmp_path / "empty"), tmp_path, capsys)
    assert "the folder exists but holds no config.json" in err and "hf-hub" not in err
    # a run that never got past its start: its config.yaml, nothing trained
    (tmp_path / "empty" / "config.yaml").write_text("run_dir: x\n")
    for spec in (str(tmp_path / "empty"), f"local-dir:{tmp_path / 'empty'}"):
        err = _teacher_refused(spec, tmp_path, capsys)
        assert err.endswith(
            "holds a run's config.yaml alone: its run never got past its start, nothing to read"
        )


def test_a_conversions_stage_1_given_as_a_model_names_the_conversion_to_export(tmp_path, capsys):
    """Stage 1 keeps checkpoints of its own but no student: `attnxfer export` takes the conversion's folder."""
    conv = tmp_path / "conv"
    (conv / "stage1" / "checkpoints").mkdir(parents=True)
    (conv / "stage2" / "checkpoints").mkdir(parents=True)
    err = _teacher_refused(f"local-dir:{conv / 'stage1'}", tmp_path, capsys)
    assert (
        f"{conv / 'stage1'} is stage 1 of the conversion {conv}; its export would be {conv / 'stage2'}" in err
    )
    assert f"`attnxfer export {conv} {conv / 'stage2' / 'export'}`" in err, err
    # one of stage 1's checkpoints: the same export, not `attnxfer export CONV/stage1`, which export refuses
    (conv / "stage1" / "checkpoints" / "step-00000004").mkdir()
    err = _teacher_refused(f"local-dir:{conv / 'stage1' / 'checkpoints' / 'step-00000004'}", tmp_path, capsys)
    assert "one of the checkpoints of stage 1 of the conversion" in err, err
    assert f"`attnxfer export {conv} {conv / 'stage2' / 'export'}`" in err, err


def test_an_efficient_students_folder_is_no_teacher_but_a_student_given_it_is_told_to_export_it(
    tiny_teacher_dir, tmp_path, capsys
):
    """Exported, a mixed-attention student still loads as no teacher: a teacher is not told to export it; a
    student (inspect's) is, in no teacher's words."""
    conv = tmp_path / "conv"
    (conv / "stage1" / "checkpoints").mkdir(parents=True)
    (conv / "stage2" / "checkpoints").mkdir(parents=True)
    (conv / "stage2" / "run.json").write_text('{"student": {"attention": ["softmax", "hedgehog"]}}')
    for spec in (str(conv), f"local-dir:{conv / 'stage1'}"):
        err = _teacher_refused(spec, tmp_path, capsys)
        assert "attends with ['softmax', 'hedgehog'] (no teacher, exported or not" in err, err
        assert "attnxfer export" not in err
    teacher = f"local-dir:{tiny_teacher_dir}"
    for spec in (str(conv / "stage1"), f"local-dir:{conv / 'stage1'}"):
        err = _refused(["inspect", teacher, spec, "--out", str(tmp_path / "insp")], capsys)
        assert f"`attnxfer export {conv} {conv / 'stage2' / 'export'}`" in err, err
        assert "no teacher" not in err


@pytest.mark.parametrize("argv", [["eval", "-c", "{m}"], ["eval", "-c", "{m}/config.json"], ["train", "{m}"]])
def test_a_model_folder_given_as_a_config_names_the_run_config_and_the_teacher_spec(
    tiny_teacher_dir, capsys, argv
):
    """An export's config.json is timm's, not a run's: read as one it would fail on its first key."""
    err = _refused([a.format(m=tiny_teacher_dir) for a in argv], capsys)
    assert f"{tiny_teacher_dir} holds an exported model" in err, err
    assert err.endswith(
        f"-c RUN_DIR/config.yaml (as a teacher: teacher.spec=local-dir:{tiny_teacher_dir}; scored as a model: "
        f"attnxfer eval {tiny_teacher_dir} data.dataset=...)"
    )


@pytest.mark.slow
def test_a_students_run_folder_given_as_a_teacher_names_its_export(tiny_teacher_dir, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["train", f"run_dir={student}", "transfer.mode=none", *_TINY_RUN]) == 0
    capsys.readouterr()
    for spec in (str(student), f"local-dir:{student}"):
        err = _teacher_refused(spec, tmp_path, capsys)
        assert f"this is a student's run folder; its export would be {student / 'export'}" in err, err
        assert f"attnxfer export {student} {student / 'export'}" in err and "unknown teacher" not in err
    # one of its checkpoints (a state.json in it, as a search's folder has): the run's export, not a search
    checkpoint = next((student / "checkpoints").iterdir())
    err = _teacher_refused(f"local-dir:{checkpoint}", tmp_path, capsys)
    assert f"{checkpoint} is one of the checkpoints of the run {student}, not a model's folder" in err, err
    assert "search" not in err
    # the folder of them, as a teacher and as inspect's student: the run they belong to, not "no config.json"
    saves = student / "checkpoints"
    err = _teacher_refused(str(saves), tmp_path, capsys)
    assert (
        f"{saves} holds the checkpoints of {student}; {student} is a student's run folder; its export" in err
    )
    inspect = [
        "inspect",
        f"local-dir:{tiny_teacher_dir}",
        str(saves),
        "--data",
        "synthetic",
        "--num-images",
        "2",
    ]
    assert main([*inspect, "--out", str(tmp_path / "inspected")]) == 2
    assert f"{saves} holds the checkpoints of {student}" in capsys.readouterr().err
    # its config.yaml read as a weights file would ask for the architecture it was trained as
    err = _teacher_refused(str(student / "config.yaml"), tmp_path, capsys)
    assert err.endswith(f"is a file in the run folder {student}: give the folder itself"), err
    assert main(["export", str(student), str(student / "export"), "--checkpoint", "latest"]) == 0
    capsys.readouterr()
    err = _teacher_refused(str(student), tmp_path, capsys)
    assert err.endswith(
        f"this is a student's run folder; its export is {student / 'export'}: use "
        f"local-dir:{student / 'export'}"
    ), err


def test_a_pretraining_run_given_as_model_init_names_the_encoders_export_and_how_to_keep_its_decoder(
    tmp_path, capsys
):
    """An MAE pre-training's folder is no student's run: its export is the encoder alone, and one who meant to
    go on pre-training is told the checkpoint that holds the decoder; a teacher is the encoder alone."""
    mae = tmp_path / "mae"
    for step in ("step-00000002", "step-00000004"):  # saves that finished (a manifest), and one cut short
        (mae / "checkpoints" / step).mkdir(parents=True)
        (mae / "checkpoints" / step / "MANIFEST.json").write_text("{}")
    (mae / "checkpoints" / "step-00000006").mkdir()
    (mae / "run.json").write_text('{"objective": "mae", "mode": "mae-pretrain"}')
    err = _refused(["train", f"run_dir={tmp_path / 'run'}", f"model.init={mae}", *_NO_TEACHER], capsys)
    assert (
        f"this is an MAE pre-training's run folder (`attnxfer pretrain`); its encoder's export would be {mae}/export"
        in err
    )
    assert "student's run folder" not in err
    newest = mae / "checkpoints" / "step-00000004" / "model.safetensors"
    assert f"`attnxfer pretrain -c {mae}/config.yaml run_dir={mae} schedule.epochs=E`" in err, err
    assert f"`attnxfer pretrain -c {mae}/config.yaml model.init={newest} run_dir=NEW_DIR`" in err, err
    # one of its checkpoints: its weights file takes the decoder along
    step = mae / "checkpoints" / "step-00000002"
    err = _refused(["train", f"run_dir={tmp_path / 'run'}", f"model.init={step}", *_NO_TEACHER], capsys)
    assert f"give `attnxfer pretrain` its weights file: model.init={step}/model.safetensors" in err, err
    err = _teacher_refused(str(mae), tmp_path, capsys)
    assert f"its encoder's export would be {mae}/export" in err and "decoder" not in err, err


@pytest.mark.slow
def test_the_pretraining_command_a_pretraining_runs_hint_gives_loads_its_decoder(tmp_path, capsys):
    """The command the hint gives is one `attnxfer pretrain` runs, its decoder loaded from the checkpoint."""
    mae, tiny = tmp_path / "mae", [*_TINY_RUN, "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]
    assert main(["pretrain", f"run_dir={mae}", *tiny, "mae.pictures=0"]) == 0
    capsys.readouterr()
    err = _refused(
        ["train", f"run_dir={tmp_path / 'run'}", f"model.init={mae}", "transfer.mode=none", *tiny], capsys
    )
    assert f"its encoder's export is {mae}/export: use local-dir:{mae}/export" in err, err
    command = shlex.split(err.rsplit("`attnxfer ", 1)[1].rstrip("`"))
    assert command[0] == "pretrain" and command[-1] == "run_dir=NEW_DIR", command
    code, out, err = run_cli(capsys, *command[:-1], f"run_dir={tmp_path / 'again'}")
    assert code == 0 and "decoder loaded" in out, err


def test_a_forced_ce_path_that_cannot_run_here_is_refused_with_why(tiny_teacher_dir, tmp_path, capsys):
    """transfer.ce_path=triton on a CPU without Triton's interpreter: one line that says why, before the first
    step, rather than a run on another path."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter makes the triton path run on the CPU")
    err = _refused(
        [
            "train",
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            *_TINY_RUN,
            "transfer.ce_path=triton",
        ],
        capsys,
    )
    assert "transfer.ce_path=triton cannot run here: the triton CE path " in err
    assert "on cpu: use transfer.ce_path=auto" in err or "needs the `triton` package" in err
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


@pytest.mark.parametrize(
    "mode, keys, unused",
    [
        (
            "none",
            ["transfer.layers=[0]", "transfer.atd_weight=3"],
            "transfer.atd_weight=3.0, transfer.layers=[0]",
        ),
        ("copy", ["transfer.atd_weight=3", "transfer.end_layer=-1"], "transfer.atd_weight=3.0 unused"),
    ],
)
def test_a_transfer_key_the_mode_does_not_read_is_said_not_silently_dropped(
    tiny_teacher_dir, tmp_path, capsys, mode, keys, unused
):
    argv = ["train", f"run_dir={tmp_path / 'run'}", f"transfer.mode={mode}", *keys, *_TINY_RUN]
    code, _, err = run_cli(capsys, *argv, f"teacher.spec=local-dir:{tiny_teacher_dir}")
    assert code == 0, err
    assert f"warning: {unused}" in err and f"with transfer.mode={mode}: atd_weight weighs a distill" in err, (
        err
    )
    assert "end_layer" not in err.split("unused")[0]  # copy reads end_layer: its layers are the ones copied


def test_end_layer_choosing_a_transfer_losses_entrys_layers_is_not_said_unused(capsys):
    parts = SimpleNamespace(teacher=tiny_vit(depth=4, seed=1), student=tiny_vit(depth=4, seed=2))
    keys = ["teacher.spec=x", "transfer.mode=none", "transfer.end_layer=-2", "transfer.losses=[{name: map}]"]
    plan = plan_from_config(load_config(None, keys), parts)
    assert plan.comparisons[0].pairs == ((0, 0), (1, 1))  # end_layer chose the compared layers
    assert "end_layer" not in capsys.readouterr().err


def test_end_layer_beside_explicit_layers_and_ce_path_without_a_ce_are_said_unused(capsys):
    parts = SimpleNamespace(teacher=tiny_vit(depth=4, seed=1), student=tiny_vit(depth=4, seed=2))
    keys = ["teacher.spec=x", "transfer.layers=[0, 1]", "transfer.end_layer=-1"]
    assert plan_from_config(load_config(None, keys), parts).pairs == ((0, 0), (1, 1))  # layers win
    err = capsys.readouterr().err
    assert "warning: transfer.end_layer=-1 unused with transfer.mode=distill and transfer.layers set" in err
    plan_from_config(
        load_config(None, ["teacher.spec=x", "transfer.mode=copy", "transfer.ce_path=rows"]), parts
    )
    assert "warning: transfer.ce_path=rows unused with transfer.mode=copy" in capsys.readouterr().err  # no CE


def test_share_drop_path_where_no_layer_is_paired_is_said_unused(capsys):
    parts = SimpleNamespace(teacher=tiny_vit(depth=4, seed=1), student=tiny_vit(depth=4, seed=2))
    keys = ["teacher.spec=x", "transfer.mode=none", "transfer.share_drop_path=true"]
    assert not plan_from_config(load_config(None, keys), parts).share_drop_path
    assert "warning: transfer.share_drop_path=True unused with transfer.mode=none" in capsys.readouterr().err


def test_a_logit_temperature_without_logit_distillation_is_said_unused_and_no_recipe_sets_one(capsys):
    """The temperature softens the logits of logit distillation alone; a recipe setting it there would
    warn on every use."""
    parts = SimpleNamespace(teacher=tiny_vit(depth=2, seed=1), student=tiny_vit(depth=2, seed=2))
    plan_from_config(load_config(None, ["teacher.spec=x", "transfer.logit_temperature=2"]), parts)
    assert (
        "warning: transfer.logit_temperature=2 unused with transfer.logit_distill=0"
        in capsys.readouterr().err
    )
    keys = ["teacher.spec=x", "transfer.logit_distill=1", "transfer.logit_temperature=2"]
    [kd] = [c for c in plan_from_config(load_config(None, keys), parts).comparisons if c.loss == "logit_kd"]
    assert kd.options == {"temperature": 2.0} and "logit_temperature" not in capsys.readouterr().err
    for recipe in list_recipes():
        try:
            configs = [load_config(recipe)]
        except ConfigError:  # a study's recipe: its students
            spec = load_study(recipe)
            configs = [spec.config_of(student) for student in spec.students]
        assert all(c.transfer.logit_distill or c.transfer.logit_temperature == 1 for c in configs), recipe


def test_a_materialise_budget_that_no_ce_path_timing_reads_is_said_unused(capsys):
    parts = SimpleNamespace(teacher=tiny_vit(depth=2, seed=1), student=tiny_vit(depth=2, seed=2))
    for keys in (["transfer.mode=copy"], ["transfer.ce_path=rows"], ["deterministic=true"], []):
        plan_from_config(
            load_config(None, ["teacher.spec=x", "transfer.materialise_budget_gib=2", *keys]), parts
        )
        said = "warning: transfer.materialise_budget_gib=2.0 unused" in capsys.readouterr().err
        assert said == bool(keys), keys  # distill with ce_path=auto times the ways, the budget among them


def test_wait_says_each_reason_slurm_keeps_a_job_pending_once(tmp_path, monkeypatch, capsys):
    """A job SLURM can never start (pending for PartitionConfig, BadConstraints) is waited for without end:
    `submit --wait` says why it is pending, once a reason, rather than nothing."""
    import submitit

    from attnxfer.launch.slurm import JobTimeoutError, monitor

    reasons = iter(["None", "Priority", "Priority", "BadConstraints"])
    info = lambda job_id: {"JobState": "PENDING", "Reason": next(reasons, "BadConstraints")}
    monkeypatch.setattr(monitor, "slurm_job_info", info)
    with pytest.raises(JobTimeoutError):
        monitor.wait(submitit.SlurmJob(folder=tmp_path, job_id="7"), timeout=0.1, poll_s=0.01)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("job 7")]
    assert said == [
        "job 7: pending, SLURM's reason: Priority",
        "job 7: pending, SLURM's reason: BadConstraints",
    ]


def test_an_empty_tracker_project_is_refused_before_work_not_after_the_first_step(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "train",
        f"run_dir={run}",
        "transfer.mode=none",
        *_TINY_RUN,
        "log.trackers=[mlflow]",
        "log.project=''",  # quoted, as a YAML file's project: '' (an unquoted `log.project=` has no value)
    ]
    err = _refused(argv, capsys)
    assert err.endswith(
        "log.project is empty; mlflow log(s) into a named project: set one (default: attnxfer)"
    )
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["convert", "-c", "convert/demo_hedgehog", "search.generations=3"],
            "search.generations: only `attnxfer search` reads the search section, and attnxfer convert would "
            "drop it; remove it, or run attnxfer search",
        ),
        (
            ["train", "-c", "demo/distill", "mae.mask_ratio=0.5"],
            "only `attnxfer pretrain` reads the mae section",
        ),
        (  # without --command convert each student would be the same softmax student
            ["study", "-c", "demo/distill", "--vary", "convert.attention=relu_linear,hedgehog"],
            "student 'relu_linear': convert.attention: only `attnxfer convert` reads the convert section, and a "
            "study of `attnxfer train` would drop it; remove it, or give the study --command convert",
        ),
        (  # a study trains or converts: pre-training is not one of its commands
            ["study", "-c", "demo/distill", "--vary", "mae.mask_ratio=0.5,0.6"],
            "a study of `attnxfer train` would drop it; remove it, or run attnxfer pretrain alone",
        ),
        (  # submit runs the other command as its job: its own --command, not `attnxfer convert` here
            ["submit", "-c", "convert/demo_hedgehog", "--dry-run"],
            "and attnxfer train would drop them; remove them, or give submit --command convert",
        ),
        (
            ["submit", "-c", "demo/distill", "--dry-run", "--sweep", "mae.mask_ratio=0.5,0.6"],
            "and attnxfer train would drop it; remove it, or give submit --command pretrain",
        ),
        (  # a submitted study's students are converted where its YAML says so
            [
                "submit",
                "--command",
                "study",
                "-c",
                "demo/distill",
                "--dry-run",
                "--vary",
                "convert.stage1_lr=1,2",
            ],
            "would drop it; remove it, or write command: convert in the study's YAML",
        ),
        (  # MAE pre-training's whole config (its mae section at its defaults), given to train: not a teacher's
            # absence to mend (transfer.mode=none then trained a classifier from scratch, the mae section unread)
            ["train", "-c", "demo/mae_pretrain"],
            "attnxfer train: error: demo/mae_pretrain is MAE pre-training's config (its mae section only "
            "`attnxfer pretrain` reads): run attnxfer pretrain -c demo/mae_pretrain (submit --command pretrain",
        ),
        (  # every command but pretrain reads the transfer section
            ["pretrain", "-c", "demo/mae_pretrain", "transfer.mode=copy", "transfer.atd_weight=3"],
            "attnxfer pretrain: error: transfer.mode, transfer.atd_weight: attnxfer pretrain does not read the "
            "transfer section and would drop them; remove them",
        ),
    ],
)
def test_a_key_of_a_section_its_command_does_not_read_is_refused_not_dropped(tmp_path, capsys, argv, said):
    err = _refused([*argv, f"run_dir={tmp_path / 'run'}"], capsys)
    assert said in err, err
    assert not (tmp_path / "run").exists()


def test_a_new_command_that_reads_a_config_refuses_a_key_only_another_command_reads(monkeypatch, capsys):
    """A command added in a new file of launch/commands/ (its handler calls `load`) refuses, as train does, a
    key of a section it never reads: the forker's command would otherwise drop it without a word."""
    from attnxfer.launch.commands import COMMANDS, add_config_args, load, register_command

    monkeypatch.setitem(COMMANDS, "params", None)  # the test's command is gone after it

    @register_command("params", help="count the student's parameters", arguments=add_config_args)
    def params(args) -> int:
        load(args)
        return 0

    assert run_cli(capsys, "params", "model.attention=performer")[0] == 0
    code, _, err = run_cli(capsys, "params", "convert.attention=performer")
    assert code == 2, err
    assert "only `attnxfer convert` reads the convert section, and attnxfer params would drop it" in err


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise InputError("image 'val/0.png' cannot be read as an image")


def test_a_refusal_raised_in_a_dataloader_worker_is_its_one_line_not_the_workers_traceback(
    monkeypatch, capsys
):
    """torch re-raises a worker's error with the worker's traceback in its message (a corrupt val image read
    with data.num_workers > 0): the CLI prints the error's own line, as it would for one read in-process."""
    from attnxfer.launch.commands import COMMANDS, register_command

    monkeypatch.setitem(COMMANDS, "readall", None)  # the test's command is gone after it

    @register_command("readall", help="read every sample in a worker", arguments=lambda parser: None)
    def readall(args) -> int:
        return len(list(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))

    code, _, err = run_cli(capsys, "readall")
    assert code == 2 and err == "attnxfer readall: error: image 'val/0.png' cannot be read as an image\n", err


def test_a_blr_beside_an_lr_is_said_to_be_unused(tmp_path, capsys):
    """optim.lr wins over MAE's blr rule; every convert recipe sets lr, so a blr given there did nothing."""
    argv = ["train", f"run_dir={tmp_path / 'run'}", "transfer.mode=none", *_TINY_RUN, "optim.lr=1e-3"]
    code, _, err = run_cli(capsys, *argv, "optim.blr=5e-4")
    assert code == 0 and "warning: optim.blr=0.0005 unused: optim.lr=0.001 is set" in err, err


def test_a_blr_given_over_a_recipes_lr_is_refused_naming_both_keys_not_left_unread(tmp_path, capsys):
    """MAE's users scale optim.blr by the batch; over demo/copy, which sets optim.lr (and wins), a blr would go
    unread, without a word at blr's default value: one line naming both keys, whether the blr is given on the
    command line, by a recipe starting from demo/copy or by a study's --vary; beside optim.lr=null it counts."""
    err = _refused(["train", "-c", "demo/copy", "optim.blr=1e-3", "--print-config"], capsys)
    assert "optim.blr=0.001 would go unread: optim.lr=0.002 is already set" in err and "optim.lr=null" in err
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo/copy\noptim: {blr: 5.0e-4}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml.*optim.blr=0.0005 would go unread"):
        load_config(mine)
    with pytest.raises(ConfigError, match="optim.blr=0.002 would go unread"):
        load_study("demo/copy", vary={"optim.blr": ["2e-3"]})
    cfg = load_config("demo/copy", ["optim.blr=5e-4", "optim.lr=null"])
    assert (cfg.optim.lr, cfg.optim.blr) == (None, 5e-4)


def test_a_recipes_blr_counts_where_a_recipe_over_it_or_the_command_line_sets_optim_lr_null(tmp_path, capsys):
    """The refusal says to set optim.lr to null as well; done by the recipe that starts from the one setting
    blr (or by the command line), the chain was still refused at that middle file, before the null was read."""
    (tmp_path / "mine.yaml").write_text("base: demo/copy\noptim: {blr: 5.0e-4}\n")
    (tmp_path / "fixed.yaml").write_text("base: mine.yaml\noptim: {lr: null}\n")
    cfg = load_config(tmp_path / "fixed.yaml")
    assert (cfg.optim.lr, cfg.optim.blr) == (None, 5e-4)
    cfg = load_config(tmp_path / "mine.yaml", ["optim.lr=null"])
    assert (cfg.optim.lr, cfg.optim.blr) == (None, 5e-4)
    # through the CLI too, whose report of what the command line changes reads the recipe as written
    code, out, err = run_cli(
        capsys, "train", "-c", str(tmp_path / "mine.yaml"), "optim.lr=null", "--print-config"
    )
    assert code == 0 and "#   optim.lr: 0.002 -> null" in out, err
    # nothing sets lr to null: still refused, naming the file that sets blr
    (tmp_path / "over.yaml").write_text("base: mine.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"mine.yaml.*optim.blr=0.0005 would go unread"):
        load_config(tmp_path / "over.yaml")


def test_skip_stage1_is_stage1_steps_0_in_the_printed_config_and_replaces_a_given_value_with_a_warning(
    capsys,
):
    code, out, err = run_cli(
        capsys, "convert", "-c", "convert/demo_hedgehog", "--skip-stage1", "--print-config"
    )
    assert code == 0 and "  stage1_steps: 0\n" in out and "convert.stage1_steps: 150 -> 0" in out, err
    argv = [
        "convert",
        "-c",
        "convert/demo_hedgehog",
        "--skip-stage1",
        "convert.stage1_steps=5",
        "--print-config",
    ]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "  stage1_steps: 0\n" in out, err
    assert "warning: --skip-stage1 is convert.stage1_steps=0, which replaces convert.stage1_steps=5" in err
    assert "given twice" not in err  # the key --skip-stage1 adds is not the user's


def test_a_key_given_twice_on_the_command_line_is_said_once_and_the_last_is_taken(capsys):
    """A pasted second override of a key silently replaced the first: now one line names every such key."""
    argv = ["train", "-c", "demo/distill", "transfer.atd_weight=1", "optim.lr=1e-3", "transfer.atd_weight =3"]
    code, out, err = run_cli(capsys, *argv, "optim.lr=2e-3", "seed=4", "optim.lr=3e-3", "--print-config")
    assert code == 0 and "  atd_weight: 3.0\n" in out and "  lr: 0.003\n" in out, err
    assert err.count("given") == 2 and err.startswith(
        "warning: transfer.atd_weight given twice (1, then 3): the last, 3, is taken; "
        "optim.lr given 3 times (1e-3, 2e-3, then 3e-3): the last, 3e-3, is taken\n"
    ), err
    code, _, err = run_cli(capsys, "train", "-c", "demo/distill", "optim.lr=1e-3", "--print-config")
    assert code == 0 and "given" not in err, err


def test_a_config_given_twice_is_refused_not_the_first_dropped(tmp_path, capsys):
    """argparse kept the last -c and trained without the first file's keys, which a user expects merged."""
    (tmp_path / "a.yaml").write_text("seed: 1\noptim:\n  lr: 1.0e-3\n")
    (tmp_path / "b.yaml").write_text("seed: 2\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for second in (["-c", str(b)], [f"--config={b}"]):
        with pytest.raises(SystemExit) as refused:  # argparse's own way out, as for an unknown flag
            run_cli(capsys, "train", "-c", str(a), *second, "--print-config")
        out, err = capsys.readouterr()
        assert refused.value.code == 2 and not out and "Traceback" not in err, err
        assert (
            err.strip()
            .splitlines()[-1]
            .endswith(
                f"-c given twice ({a}, then {b}): a command reads one config; to apply {b} over {a}, "
                f"write base: {a} in {b} and give -c {b} alone"
            )
        ), err
    (tmp_path / "b.yaml").write_text(f"base: {a}\nseed: 2\n")  # the way the refusal names
    code, out, err = run_cli(capsys, "train", "-c", str(b), "--print-config")
    assert code == 0 and "\nseed: 2\n" in out and "  lr: 0.001\n" in out, err


# -- paths and files given on the command line: a config, a run dir, an output folder ------------------------


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_run_dir_or_recipe_given_without_c_names_the_c_to_pass(trained, capsys, command):
    """Export, inspect and eval take a run dir as it is (tests/analysis/test_eval.py); train reads a config,
    with -c, and so do both a recipe."""
    if command == "train":
        code, _, err = run_cli(capsys, command, str(trained))
        assert code == 2 and err.strip().endswith(f"pass -c {trained / 'config.yaml'}"), err
    code, _, err = run_cli(capsys, command, "demo/copy")
    assert code == 2 and err.strip().endswith("pass -c demo/copy"), err


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_a_folder_that_is_no_run_is_said_to_be_none_and_a_folder_of_runs_names_them(
    trained, tmp_path, capsys, command
):
    """A mistyped run path that exists (an empty folder, runs/ itself) was read as an override, eval's answer
    a dataset's data.root; inspect's asked for a teacher without saying the folder is no run."""
    (empty := tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, command, str(empty))
    assert code == 2 and f"{empty} is no run's folder (it has no config.yaml" in err, err
    assert "data.root" not in err and "key=value" not in err
    (runs := tmp_path / "runs").mkdir()
    (runs / trained.name).symlink_to(trained)
    code, _, err = run_cli(capsys, command, str(runs))
    assert code == 2 and f"it holds the runs {trained.name}: give one, e.g. {runs / trained.name}" in err, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "-c", ""], "-c was given an empty name"),
        (["train", "-c", "{tmp}"], "is a directory"),
        (["train", "-c", "{tmp}/binary"], "not a text YAML file"),
        (["train", *S, "run_dir={tmp}/afile"], "is a file, not a directory"),
        (["train", *S, "run_dir={tmp}/afile/run"], "afile is a file, not a directory"),
        (  # /proc takes no folders, for root too: the reason the folder cannot be made, not a traceback
            ["train", *S, "run_dir=/proc/attnxfer-run"],
            "run_dir=/proc/attnxfer-run cannot be made (/proc/attnxfer-run: No such file or directory)",
        ),
        (["demo", "--quick", "--out", "{tmp}/afile/demo"], "afile is a file, not a directory"),
        (["demo", "--quick", "--out", "{tmp}"], "holds other work (afile, binary) and no demo's runs"),
        (["submit", *S, "run_dir={tmp}/afile/run", "--dry-run"], "afile is a file, not a directory"),
        (["export", "{tmp}/missing", "{tmp}/out"], "does not exist"),
        (["train", *S, "data.dataset=folder", "run_dir={tmp}/r"], "set data.root"),
        (["train", *S, "device=cuda", "run_dir={tmp}/r"], "no CUDA device"),
        (["train", *S, "data.kwargs.length=3", "run_dir={tmp}/r"], "give the training split more images"),
        (["train", *S, "data.kwargs.lenght=3", "run_dir={tmp}/r"], "has no option(s) lenght (data.kwargs)"),
        (
            ["train", *S, "data.kwargs.length=2.5", "run_dir={tmp}/r"],
            "data.kwargs.length takes an integer, got 2.5",
        ),
        (
            ["train", *S, "data.kwargs.length=-3", "run_dir={tmp}/r"],
            "synthetic: need num_classes >= 1, length >= 0",
        ),
        (
            [
                "train",
                "transfer.mode=none",
                "data.dataset=animal_mnist",
                "data.kwargs.augment=maybe",
                "run_dir={tmp}/r",
            ],
            "data.kwargs.augment takes true/false or null, got 'maybe'",
        ),
        (["submit", *S, "--slurm", "foo bar=x; rm -rf /", "--cluster", "local"], "not an sbatch option"),
        (["submit", *S, "schedule.epochs=0"], "attnxfer submit: error: schedule.epochs"),
        (  # refused as the job would refuse it at its start, but before the queue's wait
            ["submit", *S, "transfer.mode=copy", "--dry-run"],
            "attnxfer submit: error: transfer.mode=copy needs a teacher",
        ),
        (["submit", "--command", "convert", *S, "--dry-run"], "attnxfer convert needs a teacher"),
        (  # not told to set transfer.mode=none, which no conversion runs without a teacher either
            ["convert", "run_dir={tmp}/r"],
            "attnxfer convert: error: attnxfer convert needs a teacher: set teacher.spec",
        ),
        (
            ["submit", *S, "data.dataset=nosuchset", "--dry-run"],
            "known datasets: animal_mnist, folder, recall",
        ),
        (
            ["submit", *S, "--sweep", "data.dataset=synthetic,synthtic", "--dry-run"],
            "did you mean 'synthetic'?",
        ),
        (  # timm would be handed num_classes twice: a TypeError from inside the student's build
            ["train", *S, "model.kwargs={num_classes: 5}"],
            "model.kwargs sets num_classes, which the model section sets itself: give model.num_classes=5",
        ),
    ],
)
def test_bad_input_names_the_real_problem(tmp_path, capsys, monkeypatch, argv, needle):
    if torch.cuda.is_available() and "device=cuda" in argv:
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    (tmp_path / "afile").write_text("x")
    argv = once_each([a.replace("{tmp}", str(tmp_path)) for a in argv])
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "binary"]  # nothing left behind


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{run}", "{tmp}/afile/out"],
        ["inspect", "{run}", "{run}", "--out", "{tmp}/afile/x"],
    ],
)
def test_an_output_folder_under_a_file_is_refused_before_anything_is_read(trained, tmp_path, capsys, argv):
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(trained)) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert (
        code == 2 and f"{tmp_path / 'afile'} is a file, not a directory" in err and "Traceback" not in err
    ), err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_study_given_as_the_teacher_beside_its_twin_is_told_a_pattern_matched_both(tmp_path, capsys):
    """`attnxfer inspect runs/demo/mae_study-*` where two demo studies are kept (--quick and full): the first
    was taken as the TEACHER, and the refusal told to give one of its students."""
    for name in ("mae_study-aaaa", "mae_study-bbbb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "study.json").write_text(json.dumps({"students": [{"folder": "distill"}]}))
    first, second = (str(tmp_path / n) for n in ("mae_study-aaaa", "mae_study-bbbb"))
    code, _, err = run_cli(capsys, "inspect", first, second)
    assert (
        code == 2
        and f"{first} is a study's folder, given as the TEACHER, beside {second}: if a pattern" in err
    )
    assert f"attnxfer inspect {first}" in err
    # export given two folders of one name (runs/demo/mae_study-*/distill): its extra argument is explained
    for name in ("mae_study-aaaa", "mae_study-bbbb"):
        (tmp_path / name / "distill").mkdir()
    with pytest.raises(SystemExit) as usage:  # argparse's own error, with the command's usage
        run_cli(capsys, "export", f"{first}/distill", f"{second}/distill", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert usage.value.code == 2 and "are both given: if a pattern (DIR/*) matched several folders" in err, (
        err
    )


def test_submit_says_the_jobs_global_batch_and_lr_for_its_processes_and_a_min_lr_above_it(tmp_path, capsys):
    """The lr follows the job's global batch, which only the job's start said: a recipe's min_lr above the lr
    that a smaller job gives (the cosine then raises the lr) was told after the queue's wait."""
    argv = ["submit", "-c", "paper/vit_large_copy", "data.dataset=synthetic", f"run_dir={tmp_path / 'r'}"]
    code, out, err = run_cli(capsys, *argv, "--nodes", "1", "--gpus-per-node", "8", "--dry-run")
    assert code == 0, err
    said = (
        "the job: batch: 256 images an optimiser step (32 per process x 8 processes x 1 accumulation step); "
    )
    assert said + "lr 0.001 (optim.blr=0.001 x global batch 256 / 256)" in out, out
    assert "the job: warning: optim.min_lr=0.002 is above the base lr 0.001" in err, err
