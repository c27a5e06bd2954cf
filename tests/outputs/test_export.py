"""Export of students in timm's Hub format, model cards, and export from a run directory (CPU, no network);
through the CLI, of the session's `trained` run: its own folder refused as the output, a push without the
Hub, the card of a run without a teacher, the export as a teacher, and a folder that is not a run."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from helpers import MAE_TEACHER, ONE_BLOCK_RUN as S, PLAN, RECIPE, card, run_cli, tiny_run
from safetensors.torch import load_file, save_file
from timm.layers import Attention

from attnxfer.checkpoints.export import _install, export_run, export_student, select_checkpoint
from attnxfer.checkpoints.run_lock import _start_time, run_lock
from attnxfer.checkpoints.store import CheckpointError, CheckpointManager
from attnxfer.errors import InputError, MissingPathError, UserError
from attnxfer.models.attention import TransferAttention, registry
from attnxfer.models.efficient import efficient_student_from_teacher
from attnxfer.models.efficient.linear import ReLULinearAttention
from attnxfer.models.student import student_like, student_spec
from attnxfer.run_layout import LOCK_NAME
from attnxfer.sources.exported_student import load_student
from attnxfer.sources.resolve import weights_digest
from attnxfer.transfer import TeacherStudent

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def teacher_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    t = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        reg_tokens=2,
        qk_norm=True,
        init_values=1e-5,
        **TINY,
    )
    t.pretrained_cfg.update(mean=MAE_TEACHER.mean, std=MAE_TEACHER.std, license="cc-by-nc-4.0")
    return t


def trained_student(seed: int = 1, steps: int = 3, **kwargs) -> nn.Module:
    """A student that has moved away from its initialisation (and has a copy-style frozen q/k layer)."""
    teacher = teacher_model()
    torch.manual_seed(seed)
    student = student_like(teacher, num_classes=10, **kwargs)
    if isinstance(student.blocks[0].attn, TransferAttention):
        student.blocks[0].attn.freeze_projections("qk")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


def test_export_loads_in_plain_timm_with_bit_identical_logits(tmp_path):
    student = trained_student()
    out = export_student(student, tmp_path / "out", card=card())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # the weights as readable as the card

    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert all(type(b.attn) is Attention for b in plain.blocks)  # timm's own attention
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(plain(x), student(x))
    assert plain.reg_token.shape == (1, 2, 48) and plain.blocks[0].attn.q_norm.weight.shape == (16,)

    saved = load_file(str(out / "model.safetensors"))
    sd = student.state_dict()
    assert sorted(saved) == sorted(sd) and all(torch.equal(saved[k], sd[k]) for k in sd)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["reg_tokens"] == 2
    assert "attn_layer" not in config["model_args"]
    assert "TransferAttention" not in json.dumps(config) and "attnxfer.models" not in json.dumps(config)
    assert config["pretrained_cfg"]["mean"] == list(MAE_TEACHER.mean)
    assert config["pretrained_cfg"]["license"] == "cc-by-nc-4.0"
    assert config["attnxfer"]["loads_in_plain_timm"] is True


@pytest.mark.slow
def test_export_loads_in_a_process_without_attnxfer(tmp_path):
    student = trained_student(seed=2)
    out = export_student(student, tmp_path / "out", card=card())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        save_file({"x": x, "logits": student(x)}, str(tmp_path / "io.safetensors"))
    code = textwrap.dedent(f"""
        import json, sys, timm, torch
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / "io.safetensors")!r})
        m = timm.create_model("local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            same = torch.equal(m(io["x"]), io["logits"])
        print(json.dumps(dict(same=same, attnxfer=any(n.startswith("attnxfer") for n in sys.modules))))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"same": True, "attnxfer": False}


def test_model_card_holds_teacher_licence_mode_plan_recipe_metrics(tmp_path):
    out = export_student(trained_student(), tmp_path / "card", card=card())
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "cc-by-nc-4.0" and front["library_name"] == "timm"
    assert front["base_model"] == "timm/vit_large_patch16_224.mae"
    body = text.split("---", 2)[2]
    assert "inherits that licence: CC-BY-NC-4.0" in body and "non-commercial" in body
    assert (
        "timm/vit_large_patch16_224.mae" in body
        and MAE_TEACHER.hf_commit in body
        and MAE_TEACHER.sha256 in body
    )
    assert "| format | `timm` |" in body  # the weights' own format: nothing converted
    assert "Mode: **distill**" in body and PLAN in body
    assert RECIPE.strip() in body
    assert "| val/top1 | 0.8125 |" in body and "| val/loss | 0.61 |" in body
    assert "animal-mnist, 10 classes" in body
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in body


def test_the_card_names_the_format_the_teachers_weights_came_in(tmp_path):
    """A transformers checkpoint's names and layout were converted to timm's to make the teacher: the card's
    teacher table says which format its weights came in, as run.json does."""
    hf = dataclasses.replace(MAE_TEACHER, source_format="transformers vit_mae (ViTMAEModel)")
    out = export_student(trained_student(), tmp_path / "card", card=card(teacher=hf))
    assert "| format | `transformers vit_mae (ViTMAEModel)` |" in (out / "README.md").read_text()


def test_the_card_of_a_student_trained_from_a_teacher_without_attention_transfer_names_none(tmp_path):
    out = export_student(trained_student(), tmp_path / "card", card=card(transfer_mode="none"))
    text = (out / "README.md").read_text()
    assert "attention transfer (none)" not in text
    assert f"trained from the teacher {MAE_TEACHER.hf_repo}@{MAE_TEACHER.hf_commit}, with attnxfer" in text


def test_a_conversions_card_says_it_converted_the_teacher_in_two_stages_with_its_reports_figures(tmp_path):
    """A conversion's final student is its stage 2, which runs in mode none: its card tells the conversion (stage
    1's attention distillation, stage 2's objective and logit distillation) and the figures of its report.json."""
    report = {  # the parts of a conversion's report.json the card reads, as `attnxfer convert` writes them
        "stage1": {"steps": 6, "skipped": False},
        "stage2": {"steps": 2, "objective": "labelled fine-tuning (the teacher's 10-class head)"},
        "top1": {"teacher": 80.0, "after_stage2": 76.0},
        "student_top1": 76.0,
        "recovered_pct": 95.0,
        "knn": {"after_stage2": {"knn_top1": 70.5, "knn_teacher_top1": 72.25}},
        "features": {"after_stage2": {"feat_cos_patch": 0.98765}},
        "speed": {"speedup": 1.5, "speedup_withheld": None, "device": "cuda", "batch": 64},
        "logit_distill": 1.0,  # stage 2's, which the export adds from its recipe
    }
    conversion = card(transfer_mode="none", conversion=report, plan="transfer plan: mode=none")
    out = export_student(efficient_student("hedgehog"), tmp_path / "card", card=conversion)
    text = (out / "README.md").read_text()
    assert "Mode: **none**" not in text and "knowledge-distillation" in text
    assert (
        f"with hedgehog attention, converted from the teacher {MAE_TEACHER.hf_repo}@{MAE_TEACHER.hf_commit} by "
        "attention distillation (stage 1), then labelled fine-tuning (the teacher's 10-class head), logit "
        "distillation (weight 1) (stage 2), with attnxfer." in text
    )
    assert "Mode: **conversion** (`attnxfer convert`) into hedgehog attention, stage 2 in mode none" in text
    assert "1. stage 1, 6 steps: attention distillation" in text and "2. stage 2, 2 steps: labelled" in text
    assert (
        "Measured by the conversion (its report.json): top-1 76.00 (95.0% of the teacher's); k-NN top-1 70.50 "
        "(teacher 72.25); final-feature cosine to the teacher 0.9877; 1.50x the teacher's speed (cuda, batch 64)."
    ) in text
    assert "Stage 2's transfer plan:\n\n```text\ntransfer plan: mode=none" in text


@pytest.mark.parametrize(
    "choice", [{}, {"weights": "raw"}, {"checkpoint": "latest"}], ids=["as-measured", "raw", "latest"]
)
def test_a_conversions_card_credits_its_reports_quality_only_to_the_weights_the_conversion_measured(
    tmp_path, choice
):
    """convert measures the weights an export takes by default (the best checkpoint, its EMA): the raw weights or
    the newest checkpoint, exported by choice, scored otherwise, and their card must not claim that top-1."""
    fake_run(tmp_path / "conversion" / "stage2", mode="none")  # best: step 100, with EMA weights
    report = {
        "stage2": {"steps": 2, "measured": "step-00000100 (best val top-1 70.00), ema weights"},
        "student_top1": 70.0,
        "recovered_pct": 87.5,
        "knn": {"after_stage2": {"knn_top1": 65.0, "knn_teacher_top1": 66.0}},
        "features": {"after_stage2": {"feat_cos_patch": 0.9}},
        "speed": {"speedup": 1.5, "speedup_withheld": None, "device": "cuda", "batch": 64},
    }
    (tmp_path / "conversion" / "report.json").write_text(json.dumps(report))
    with pytest.warns(UserWarning, match="step-00000300"):  # fake_run's broken newest checkpoint
        out = export_run(tmp_path / "conversion" / "stage2", tmp_path / "out", **choice)
    text = (out / "README.md").read_text()
    if not choice:
        assert "(its report.json): top-1 70.00 (87.5% of the teacher's); k-NN top-1 65.00" in text
        assert "are of other weights" not in text
    else:
        assert "top-1 70.00 (87.5%" not in text and "k-NN top-1 65.00" not in text and "cosine" not in text
        assert "(its report.json): 1.50x the teacher's speed (cuda, batch 64)." in text
        assert "are of other weights (step-00000100 (best val top-1 70.00), ema weights)" in text


def test_a_bf16_student_exports_and_its_weights_load_back_in_timm(tmp_path):
    """The export's check runs the student and its rebuilt twin in the student's own dtype."""
    student = trained_student().to(torch.bfloat16)
    out = export_student(student, tmp_path / "bf16", card=card())
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).state_dict()
    assert all(torch.equal(loaded[k].to(torch.bfloat16), v) for k, v in student.state_dict().items())


def test_a_headless_students_card_says_features_and_a_teachers_other_licence_is_no_licence(tmp_path):
    """Our own MAE export's metadata says `other` (none set): a student of it must not claim to inherit a
    licence called "other", and an encoder without a head is no image classifier."""
    teacher = {
        "spec": "local-dir:runs/demo/mae/export",
        "architecture": "vit_micro_patch4_28",
        "license": "other",
    }
    encoder = trained_student()
    encoder.reset_classifier(0)
    out = export_student(encoder, tmp_path / "enc", card=card(teacher=teacher))
    text = (out / "README.md").read_text()
    front, body = yaml.safe_load(text.split("---")[1]), text.split("---", 2)[2]
    assert front["pipeline_tag"] == "image-feature-extraction" and "image-classification" not in front["tags"]
    assert (
        "licensed other" not in body and "(local-dir:runs/demo/mae/export) have no recorded licence" in body
    )


def test_non_commercial_teacher_licence_cannot_be_replaced(tmp_path):
    with pytest.raises(ValueError, match="inherits"):
        export_student(trained_student(), tmp_path / "out", card=card(license="apache-2.0"))
    assert not (tmp_path / "out").exists()


def test_export_records_the_size_the_model_was_built_at_not_its_pretrained_default(tmp_path):
    """timm keeps samvit's pretrained input_size (1024 px) when the model is built at 48 px; the export must
    say 48, or whoever loads it (inspect, eval) runs a 48-px model's weights on 1024-px images."""
    kw = dict(img_size=48, patch_size=8, depth=2, embed_dim=32, num_heads=2, window_size=4, neck_chans=16)
    model = timm.create_model("samvit_base_patch16", pretrained=False, global_attn_indexes=(1,), **kw)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 1024, 1024)  # the trap: timm's record
    export_student(model, tmp_path / "sam", card=card())
    recorded = json.loads((tmp_path / "sam" / "config.json").read_text())["attnxfer"]["student"]
    assert recorded["pretrained_cfg"]["input_size"] == [3, 48, 48]
    loaded = load_student(f"local-dir:{tmp_path / 'sam'}")
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 48, 48)


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    student = trained_student()
    with pytest.raises(FileExistsError, match=r"pass --overwrite \(from Python: overwrite=True\)"):
        export_student(student, out, card=card())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_student(student, out, card=card(), overwrite=True)
    assert {"config.json", "model.safetensors", "README.md", "notes.txt"} == {p.name for p in out.iterdir()}
    export_student(student, out, card=card(), overwrite=True)  # an earlier export's card: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")  # a README of the user's own: --overwrite never replaces it
    with pytest.raises(FileExistsError, match=r"holds README.md of no earlier export"):
        export_student(student, mine, card=card(), overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["README.md"] and (
        mine / "README.md"
    ).read_text() == "my notes\n"


def test_an_export_into_a_folder_another_export_filled_meanwhile_is_refused_and_replaces_nothing(tmp_path):
    """Two exports find the same new folder free before their (long) work: the second to install its files
    is refused, rather than replacing the first's without --overwrite."""
    first = export_student(trained_student(), tmp_path / "out", card=card())
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    staged = export_student(trained_student(seed=2), tmp_path / "staged", card=card())  # the second's files
    with pytest.raises(FileExistsError, match="written by another export meanwhile.*pass --overwrite"):
        _install(staged, first)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def efficient_student(names, **attn_kwargs) -> nn.Module:
    """A zoo-attention student made from a softmax student, every weight moved off its initialisation."""
    base = student_like(teacher_model(), num_classes=10)
    student = efficient_student_from_teacher(base, names, **attn_kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student.eval()


def _logits(model, seed=7):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_efficient_student_export_needs_attnxfer_and_load_student_rebuilds_it(tmp_path):
    student = efficient_student("relu_linear")
    out = export_student(student, tmp_path / "eff", card=card())
    config = json.loads((out / "config.json").read_text())
    assert (
        config["attnxfer"]["attention"] == "relu_linear"
        and config["attnxfer"]["loads_in_plain_timm"] is False
    )
    assert config["model_args"]["attn_layer"] == "attnxfer:relu_linear"
    readme = (out / "README.md").read_text()
    assert "timm does not provide" in readme and f'load_student("local-dir:{out}")' in readme
    # plain timm refuses instead of loading into softmax, and says what loads it
    with pytest.raises(TypeError, match=r"relu_linear attention.*load it with attnxfer\.load_student"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (
        config["attnxfer"]["student"]["architecture"] == "vit_tiny_patch16_224"
    )  # what load_student builds on
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())
    loaded = load_student(f"local-dir:{out}")
    assert all(type(b.attn).__name__ == "ReLULinearAttention" for b in loaded.blocks)
    assert torch.equal(_logits(loaded), _logits(student))
    assert torch.equal(_logits(load_student(str(out))), _logits(student))  # a bare folder path works too


def test_an_exports_weights_of_other_shapes_are_refused_in_one_line_as_missing_ones_are(tmp_path):
    """torch refuses tensors of another shape even where strict=False, in lines of its own: the weights of an
    edited export folder (another head here) get load_student's sentence naming the tensor, not torch's."""
    out = export_student(efficient_student("relu_linear"), tmp_path / "eff", card=card())
    saved = load_file(str(out / "model.safetensors"))
    saved["head.weight"], saved["head.bias"] = torch.zeros(5, 48), torch.zeros(5)
    save_file(saved, str(out / "model.safetensors"))
    with pytest.raises(
        UserError, match=r"do not fit the student .*head\.weight: \(5, 48\) in the file"
    ) as err:
        load_student(str(out))
    assert "\n" not in str(err.value)


def test_an_exports_options_its_attentions_code_no_longer_takes_are_named_not_a_traceback(tmp_path):
    """An option renamed in a fork after the export: the recorded options are said as what changed, with no
    advice to drop them (the student would load with other settings than it was trained with)."""
    out = export_student(efficient_student("window", window_size=3), tmp_path / "eff", card=card())
    config = json.loads((out / "config.json").read_text())
    config["attnxfer"]["student"]["attention_options"] = [{"window_sz": 3}] * 2  # as the old code named it
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"recorded attention options \{'window_sz': 3\} do not") as err:
        load_student(str(out))
    assert "saved by other code of that attention" in str(err.value) and "drop them" not in str(err.value)


def test_a_student_of_an_attention_not_registered_here_is_refused_in_one_line(tmp_path, monkeypatch):
    """An attention a fork or a script registered (here: this test, then forgotten) is named, with what to do,
    where its student is loaded without it: `load_student`, and `attnxfer export` / `inspect` of its run."""
    monkeypatch.setattr(registry, "_ATTENTIONS", dict(registry._ATTENTIONS))

    @registry.register_attention("lab_linear")
    class LabLinear(ReLULinearAttention):
        pass

    out = export_student(efficient_student("lab_linear"), tmp_path / "eff", card=card())
    del registry._ATTENTIONS["lab_linear"]
    with pytest.raises(
        UserError, match="attention 'lab_linear' is not registered here: import the module"
    ) as e:
        load_student(f"local-dir:{out}")
    assert str(e.value).endswith(
        "or install the package that names it in an 'attnxfer.attentions' entry point"
    )


def test_mixed_attention_student_with_options_round_trips(tmp_path):
    student = efficient_student(
        ["window_linear", "performer"], window_size=2, num_features=24, feature_seed=5, feature_dim=8
    )
    out = export_student(student, tmp_path / "mixed", card=card())
    config = json.loads((out / "config.json").read_text())
    spec = config["attnxfer"]["student"]
    assert config["attnxfer"]["attention"] == ["window_linear", "performer"]
    assert config["model_args"]["attn_layer"] == "attnxfer:mixed"
    assert spec["attention_options"][0] == {"window_size": [2, 2], "kernel": "hedgehog", "feature_dim": 8}
    assert spec["attention_options"][1] == {
        "num_features": 24,
        "orthogonal": True,
        "redraw_interval": None,
        "feature_seed": 5,
    }
    assert "| 1 | performer |" in (out / "README.md").read_text()
    loaded = load_student(f"local-dir:{out}")
    assert [type(b.attn).__name__ for b in loaded.blocks] == ["WindowLinearAttention", "PerformerAttention"]
    assert [b.attn.options() for b in loaded.blocks] == spec["attention_options"]
    assert loaded.blocks[0].attn.num_prefix_tokens == 3 and loaded.blocks[0].attn.grid_size == (4, 4)
    assert torch.equal(_logits(loaded), _logits(student))


def test_export_refuses_a_student_its_spec_cannot_rebuild(tmp_path):
    student = efficient_student("performer", num_features=16)
    student.blocks[1].attn.eps = 1e-2  # state outside parameters, buffers and options: a rebuild would differ
    with pytest.raises(RuntimeError, match="rebuilt from the export gives different logits"):
        export_student(student, tmp_path / "bad", card=card())
    assert not (tmp_path / "bad").exists()


def test_export_refuses_the_student_of_a_copy_pair_until_it_trains_alone(tmp_path):
    teacher, student = (timm.create_model("vit_tiny_patch16_224", **TINY) for _ in range(2))
    TeacherStudent(teacher, student, mode="copy")  # its q/k frozen: it attends with the teacher's
    with pytest.raises(UserError, match="attends with its teacher's qk .* untrained projections"):
        export_student(student, tmp_path / "copy", card=card())
    assert not (tmp_path / "copy").exists()
    TeacherStudent(teacher, student, mode="none")  # a pair of another mode trains its own q/k again
    assert load_student(str(export_student(student, tmp_path / "alone", card=card()))) is not None


def test_export_of_a_teacher_student_pair_or_a_name_says_what_to_pass(tmp_path):
    teacher, student = (timm.create_model("vit_tiny_patch16_224", **TINY) for _ in range(2))
    with pytest.raises(TypeError, match="pass pair.student, not the TeacherStudent"):
        export_student(TeacherStudent(teacher, student), tmp_path / "pair", card=card())
    with pytest.raises(TypeError, match="got str 'vit_tiny_patch16_224': build it first"):
        export_student("vit_tiny_patch16_224", tmp_path / "name", card=card())
    with pytest.raises(
        TypeError, match=r"card: a ModelCardInfo, got dict: pass .*ModelCardInfo\(model_name=\.\.\.\)"
    ):
        export_student(student, tmp_path / "card", card={"model_name": "my-student"})
    assert not any((tmp_path / name).exists() for name in ("pair", "name", "card"))


def test_load_student_says_what_it_reads(tmp_path):
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    from timm.models import save_for_hf

    save_for_hf(plain, tmp_path / "plain", safe_serialization=True)
    with pytest.raises(ValueError, match="no attnxfer.student block"):
        load_student(str(tmp_path / "plain"))
    for not_a_folder in ("vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k"):
        with pytest.raises(ValueError, match="reads `attnxfer export` folders"):
            load_student(not_a_folder)
    for missing in (f"local-dir:{tmp_path / 'missing'}", str(tmp_path / "missing")):  # a folder path mistyped
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} does not exist .*holds: plain/"):
            load_student(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_student(f"local-dir:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------------------------
# From a run directory


def fake_run(run_dir: Path, mode: str = "distill") -> dict:
    """A run directory in the layout the training engine writes; returns the weights per checkpoint."""
    base = trained_student(steps=0).state_dict()
    spec = student_spec(trained_student(steps=0))
    run_dir.mkdir(parents=True)
    # a config the run's own commands load (export and inspect judge it against the checkpoints)
    (run_dir / "config.yaml").write_text("data:\n  dataset: animal_mnist\n  img_size: 32\n")
    (run_dir / "run.json").write_text(
        json.dumps({"teacher": MAE_TEACHER.to_dict(), "student": spec, "plan": PLAN, "mode": mode})
    )
    rows, weights = [], {}
    manager = CheckpointManager(run_dir, keep_last=5)
    for step, top1, complete in ((100, 70.0, True), (200, 60.0, True), (300, 90.0, False)):
        groups = {}
        for kind, seed in (("model", step), ("ema", step + 1)):
            g = torch.Generator().manual_seed(seed)  # distinct weights per checkpoint and kind
            groups[kind] = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
            weights[(step, kind)] = groups[kind]
        ckpt = manager.save(step, groups, {"step": step}, metric=top1)
        if not complete:  # a save that never finished: its manifest is missing, so it is not intact
            (Path(ckpt) / "MANIFEST.json").unlink()
        rows.append({"split": "train", "step": step, "loss": 2.0 - step / 1000})
        rows.append({"split": "val", "step": step, "epoch": step // 100, "val_top1": top1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return weights


def assert_exported(out: Path, expected: dict) -> None:
    saved = load_file(str(out / "model.safetensors"))
    assert sorted(saved) == sorted(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)


def test_export_run_picks_checkpoint_and_weights(tmp_path):
    run = tmp_path / "run"
    weights = fake_run(run)
    with pytest.warns(UserWarning, match="step-00000300"):  # the broken newest one is reported and skipped
        assert select_checkpoint(run, "best")[0].name == "step-00000100"  # best intact one
    with pytest.warns(UserWarning, match="step-00000300"):
        assert select_checkpoint(run, "latest")[0].name == "step-00000200"

    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "best-ema")
    assert_exported(out, weights[(100, "ema")])
    text = (out / "README.md").read_text()
    assert "step-00000100 (best val top-1 70.00), ema weights" in text and "| val_top1 | 70 |" in text
    assert "| epochs trained | 1 |" in text  # not "| epoch | 1 |", where the log said "epoch 0: step 100"
    assert "dataset: animal_mnist" in text and PLAN in text and "inherits that licence" in text
    plain = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert_exported(out, plain.state_dict())

    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "latest-raw", weights="raw", checkpoint="latest")
    assert_exported(out, weights[(200, "model")])


def test_a_damaged_best_checkpoint_is_not_reported_as_no_metric_recorded(tmp_path):
    """The only checkpoint with a metric is damaged: the latest intact one is chosen, and the card does not
    claim that no checkpoint recorded a metric (one did; it is unreadable)."""
    manager = CheckpointManager(tmp_path, keep_last=5)
    weights = {"model": trained_student(steps=0).state_dict()}
    manager.save(100, weights, {"step": 100})
    damaged = manager.save(200, weights, {"step": 200}, metric=70.0)
    (damaged / "MANIFEST.json").unlink()
    with pytest.warns(UserWarning, match="step-00000200"):
        path, why = select_checkpoint(tmp_path, "best")
    assert path.name == "step-00000100"
    assert why == "step-00000100 (latest: no intact checkpoint records a metric)"


def test_checkpoints_only_their_hashes_show_damaged_are_refused_saying_what_to_do(tmp_path):
    """A flipped byte passes the size checks the run's config is judged with, then fails the sha256 that export
    and inspect read under: that said only 'no intact checkpoint under RUN/checkpoints', where train and eval
    say the folder holds checkpoints none of which is usable, and what to do with them."""
    manager = CheckpointManager(tmp_path)
    saved = manager.save(100, {"model": trained_student(steps=0).state_dict()}, {"step": 100}, metric=70.0)
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(CheckpointError, match="none usable") as e:
        select_checkpoint(tmp_path, "best")
    assert f"move them out of {manager.dir}" in str(e.value) and saved.is_dir()
    with pytest.raises(MissingPathError, match="no intact checkpoint under"):  # nothing saved at all
        select_checkpoint(tmp_path / "new", "best")


def test_a_run_whose_objective_holds_the_student_as_a_submodule_exports_the_student(tmp_path):
    """A new objective's module (``ModuleObjective``) keeps its encoder as ``self.encoder`` beside parts of its own;
    the engine checkpoints that module's state dict, and the student is the encoder inside it."""

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.pixel_head = trained_student(steps=0), nn.Linear(48, 8)

    run, model = tmp_path / "run", Denoiser()
    run.mkdir()
    record = {"teacher": None, "student": student_spec(model.encoder), "mode": "denoise", "best_mode": "min"}
    (run / "run.json").write_text(json.dumps(record))
    CheckpointManager(run).save(2, {"model": model.state_dict()}, {"step": 2}, metric=1.0)
    out = export_run(run, tmp_path / "export", weights="raw")
    assert_exported(out, model.encoder.state_dict())
    assert_exported(out, load_student(f"local-dir:{out}").state_dict())


def test_exporting_a_run_still_training_names_the_checkpoint_taken_and_says_to_export_again(tmp_path, capsys):
    """Its lock held by another live process (pytest's parent, as a stand-in): the export goes ahead, saying the
    weights are not the run's final ones. A lock this process holds says nothing: a run exporting itself at
    its end (pretrain's encoder) has its final weights."""
    run = tmp_path / "run"
    weights = fake_run(run)
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "pid_started": _start_time(os.getppid())}
    (run / LOCK_NAME).write_text(json.dumps({**holder, "command": "train", "started": "2026-11-29T00:00:00"}))
    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "during")
    (run / LOCK_NAME).unlink()
    err = capsys.readouterr().err
    assert f"{run} is still training (`attnxfer train` on host" in err and f"pid {os.getppid()}" in err
    assert (
        "exporting its checkpoint step-00000100 (best val top-1 70.00); export again when the run ends" in err
    )
    assert_exported(out, weights[(100, "ema")])
    assert "ema weights, of a run that was still training (unfinished)" in (out / "README.md").read_text()
    with run_lock(run, "train"), pytest.warns(UserWarning, match="step-00000300"):
        export_run(run, tmp_path / "own")  # this process's run, exporting itself
    with pytest.warns(UserWarning, match="step-00000300"):
        export_run(run, tmp_path / "after")  # the run ended: nothing to say
    cards = "".join((tmp_path / d / "README.md").read_text() for d in ("own", "after"))
    assert "still training" not in capsys.readouterr().err + cards


def test_exporting_a_run_that_stopped_before_its_end_says_so_and_its_card_too(tmp_path, capsys):
    """A run killed mid-way (no live lock, its newest checkpoint short of run.json's total_steps) exports its
    checkpoint, saying it is not the run's final one, on stderr and on the card; a finished run says nothing."""
    run = tmp_path / "run"
    fake_run(run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "total_steps": 400}))
    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "stopped")
    assert f"{run} stopped at step 200 of its 400 and is not running" in capsys.readouterr().err
    assert "of a run that stopped at step 200 of 400 (unfinished)" in (out / "README.md").read_text()
    (run / "run.json").write_text(json.dumps({**record, "total_steps": 200}))
    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "finished")
    assert "stopped" not in capsys.readouterr().err + (out / "README.md").read_text()


def test_an_mae_pretrainings_card_leaves_out_the_transfer_block_its_objective_never_reads(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(
        json.dumps({**record, "teacher": None, "objective": "mae", "mode": "mae-pretrain"})
    )
    (run / "config.yaml").write_text(
        "data:\n  dataset: animal_mnist\ntransfer:\n  mode: distill\n  losses: []\n"
    )
    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "out", weights="raw")
    recipe = (out / "README.md").read_text().split("## Recipe", 1)[1].split("## How to load", 1)[0]
    assert "dataset: animal_mnist" in recipe and "transfer" not in recipe


def test_overwrite_never_replaces_a_model_attnxfer_did_not_export_nor_the_runs_teacher(tmp_path, monkeypatch):
    """--overwrite replaces an earlier export; a teacher saved in timm's layout (or a model of the user's own)
    is not one, and the run's own teacher folder, an attnxfer export or not, is what its resume checks: known
    by its weights, as the run's relative local-dir: spec names another folder from elsewhere."""
    teacher_dir = tmp_path / "teacher"
    timm.models.save_for_hf(teacher_model(), teacher_dir)
    before = {p.name: p.read_bytes() for p in teacher_dir.iterdir()}
    with pytest.raises(
        FileExistsError, match="of no earlier export \\(no attnxfer block in its config.json\\)"
    ):
        export_student(trained_student(), teacher_dir, card=card(), overwrite=True)
    assert {p.name: p.read_bytes() for p in teacher_dir.iterdir()} == before
    exported_teacher = export_student(
        trained_student(), tmp_path / "exported", card=card()
    )  # as the demo's MAE
    before = {p.name: p.read_bytes() for p in exported_teacher.iterdir()}
    run = tmp_path / "run"
    fake_run(run)
    record = json.loads((run / "run.json").read_text())
    record["teacher"] |= {
        "spec": "local-dir:exported",
        "sha256": weights_digest(exported_teacher / "model.safetensors"),
    }
    (run / "run.json").write_text(json.dumps(record))
    monkeypatch.chdir(run)  # not where the run was trained: local-dir:exported is no folder here
    with pytest.raises(FileExistsError, match="is the run's teacher"):
        export_run(run, exported_teacher, overwrite=True)
    assert {p.name: p.read_bytes() for p in exported_teacher.iterdir()} == before


def test_a_card_credits_the_weights_with_their_own_steps_metrics_or_none(tmp_path):
    """Weights whose step logged no row (the run stopped between evaluations) get no figures on the card:
    another step's top-1 would stand in the Hub's model-index for weights it does not describe."""
    run = tmp_path / "run"
    fake_run(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["step"] != 200]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    with pytest.warns(UserWarning, match="step-00000300"):
        out = export_run(run, tmp_path / "latest", checkpoint="latest")
    card = (out / "README.md").read_text()
    assert "step-00000200 (latest)" in card and "val_top1" not in card and "| 90 |" not in card


def test_export_run_refuses_copy_mode_students(tmp_path):
    fake_run(tmp_path / "run", mode="copy")
    with pytest.raises(ValueError, match="teacher"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_copy_run_is_told_the_command_that_makes_its_student_exportable_and_the_command_runs(
    tmp_path, tiny_teacher_dir, capsys
):
    """A copy student needs its teacher: export refuses it, and model.init=local-dir:RUN was told to export it.
    Both now give the fine-tune that makes it a model alone, and that command, run as given, trains a student
    that exports."""
    run = tmp_path / "copy"
    data = [*tiny_run(16, 8), "schedule.max_steps=1"]
    code, _, err = run_cli(
        capsys,
        "train",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "transfer.mode=copy",
        *data,
    )
    assert code == 0, err[-2000:]
    # a checkpoint's weights file as a teacher is refused as the folder is, also where teacher.arch builds it
    # (its weights fit: it had taught with the copy student's untrained q/k, without a word)
    weights = run / "checkpoints" / "step-00000001" / "model.safetensors"
    arch = json.loads((run / "run.json").read_text())["student"]["architecture"]
    for given in ([], [f"teacher.arch={arch}"]):
        code, _, err = run_cli(capsys, "train", f"teacher.spec={weights}", *given, *data, "run_dir=x")
        assert code == 2 and "is no model alone: fine-tune it without the teacher first" in err, err
    # a newer save killed before its manifest: the command names the newest checkpoint that finished
    killed = run / "checkpoints" / "step-99999999"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"cut short")
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "refused"))
    assert code == 2 and "fine-tune it without the teacher first" in err, err
    command = shlex.split(err.strip().split("`")[-2])
    assert "model.init=" in command[4] and "step-99999999" not in command[4], command
    code, _, told = run_cli(capsys, "train", f"model.init=local-dir:{run}", "transfer.mode=none", *data)
    assert code == 2 and shlex.split(told.strip().split("`")[-2]) == command, told
    assert (
        command[:4] == ["attnxfer", "train", "-c", str(run / "config.yaml")]
        and f"run_dir={run}-alone" in command
    )
    code, _, err = run_cli(capsys, *command[1:])  # the copy run's data and keys come with its config
    assert code == 0, err[-2000:]
    alone = yaml.safe_load((tmp_path / "copy-alone" / "config.yaml").read_text())
    assert (alone["data"]["dataset"], alone["data"]["kwargs"], alone["teacher"]["spec"]) == (
        "synthetic",
        {"length": 16},
        None,
    )
    code, _, err = run_cli(capsys, "export", f"{run}-alone", str(tmp_path / "alone"))
    assert code == 0 and (tmp_path / "alone" / "model.safetensors").is_file(), err
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "refused"))  # the fine-tune is there
    assert (
        code == 2 and f"({run}-alone holds it already: export it, attnxfer export {run}-alone OUT_DIR" in err
    )
    # a study's copy student: its fine-tune goes beside the study's folder, not in it as another student
    study = tmp_path / "study"
    shutil.copytree(run, study / "copy")
    (study / "study.json").write_text("{}")
    code, _, err = run_cli(capsys, "export", str(study / "copy"), str(tmp_path / "refused"))
    assert code == 2 and f"run_dir={tmp_path / 'study-copy-alone'}`" in err, err


@pytest.mark.slow
def test_push_to_hub_offline_is_a_clear_error_after_a_complete_export(tmp_path):
    student = trained_student()
    torch.save({"state": student.state_dict()}, tmp_path / "student.pt")  # read back with weights_only=True
    code = textwrap.dedent(f"""
        import json, torch
        from attnxfer.checkpoints.export import ModelCardInfo, export_student
        from attnxfer.models.student import student_like
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})  # the tests' own modules, as pytest finds them
        from helpers import card
        from outputs.test_export import teacher_model
        student = student_like(teacher_model(), num_classes=10)
        student.load_state_dict(torch.load({str(tmp_path / "student.pt")!r}, weights_only=True)["state"])
        try:
            export_student(student, {str(tmp_path / "out")!r}, card=card(), push_to_hub="acme/student")
            print(json.dumps(dict(raised=None)))
        except RuntimeError as e:
            print(json.dumps(dict(raised=type(e).__name__, message=str(e))))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] == "HubUnreachableError"  # a RuntimeError, so scripts catching that still do
    assert "HF_HUB_OFFLINE=1" in result["message"] and "hf upload acme/student" in result["message"]
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "hf-hub:acme/student" in (tmp_path / "out" / "README.md").read_text()


def test_a_student_missing_from_the_hub_cache_offline_is_said_as_a_student(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(UserError, match=r"^student 'hf-hub:acme/not-cached': config.json of Hub repo") as e:
        load_student("hf-hub:acme/not-cached", cache_dir=tmp_path)
    assert "cache_dir=... in Python" in str(e.value) and "teacher.cache_dir" not in str(e.value)  # no key


@pytest.mark.slow
def test_load_student_from_the_hub_cache_offline(tmp_path):
    """The real huggingface_hub cache layout, offline: the exported folder as a Hub repo snapshot."""
    import hashlib

    student = efficient_student(["hedgehog", "softmax"])
    out = export_student(student, tmp_path / "export", card=card())
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--hedgehog-student"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in out.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    torch.save(_logits(student), tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import torch
        from attnxfer import load_student
        from attnxfer.sources.teacher import TeacherNotAvailable
        m = load_student("hf-hub:acme/hedgehog-student")
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert torch.equal(m(x), torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True))
        print([type(b.attn).__name__ for b in m.blocks])
        try:
            load_student("hf-hub:acme/not-cached")
        except TeacherNotAvailable as e:
            print("NOT CACHED:", str(e).splitlines()[0])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['HedgehogAttention', 'TransferAttention']" in proc.stdout
    assert "NOT CACHED:" in proc.stdout and "acme/not-cached" in proc.stdout


def test_card_and_config_name_the_students_real_shape_which_plain_timm_builds(tmp_path):
    """A 48-wide, 3-block, patch-4, 28-px grayscale student derived from an architecture only attnxfer
    registers: the card and config.json say what it is (not the timm name config.json builds it on), and
    plain timm builds exactly that from config.json's architecture + model_args."""
    from attnxfer.models import create_vit

    teacher = create_vit("vit_micro_patch4_28", num_classes=10)
    student = student_like(teacher, embed_dim=48, depth=3, num_heads=3).eval()
    out = export_student(student, tmp_path / "out", card=card(description=None))
    what = "a ViT of width 48, 3 blocks, 3 heads, patch 4, 28 px, 1 channel"
    config = json.loads((out / "config.json").read_text())
    assert config["attnxfer"]["description"] == what
    assert config["attnxfer"]["shape"] == dict(
        family="ViT", width=48, blocks=3, heads=3, patch=[4, 4], in_chans=1, img_size=[28, 28]
    )
    readme = (out / "README.md").read_text()
    assert f"\n{what[0].upper()}{what[1:]}, trained by attention transfer (distill)" in readme
    assert f"- model: {what}\n" in readme and "trained as: `vit_micro_patch4_28`" in readme
    assert f"A {config['architecture']} student" not in readme

    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert (plain.embed_dim, len(plain.blocks), plain.blocks[0].attn.num_heads) == (48, 3, 3)
    assert (plain.patch_embed.patch_size, plain.patch_embed.img_size, plain.patch_embed.proj.in_channels) == (
        (4, 4),
        (28, 28),
        1,
    )
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(x), student(x))


def _micro_student(**kwargs) -> nn.Module:
    from attnxfer.models import create_vit

    return student_like(create_vit("vit_micro_patch4_28", num_classes=10), depth=1, **kwargs).eval()


@pytest.mark.parametrize(
    "make",
    [
        # one channel, teacher's fixed_input_size=False though timm's ViT is fixed; one-value mean
        lambda: _micro_student(),
        # the one-value mean of a grey teacher on a three-channel student
        lambda: _micro_student(in_chans=3),
        # the three-value mean of an RGB teacher on a one-channel student, softmax and efficient
        lambda: student_like(teacher_model(), num_classes=10, in_chans=1).eval(),
        lambda: efficient_student_from_teacher(
            student_like(teacher_model(), in_chans=1), "relu_linear"
        ).eval(),
    ],
    ids=["grey", "grey-teacher-rgb-student", "rgb-teacher-grey-student", "rgb-teacher-grey-linear"],
)
def test_timms_config_and_the_students_say_the_same_input_size_and_a_mean_and_std_per_channel(make, tmp_path):
    """config.json's pretrained_cfg (what timm reads) and attnxfer.student's (what load_student reads) agree
    with timm's own view of the model, and normalise each input channel with its own value."""
    from timm.data import resolve_model_data_config
    from timm.models import get_model_input_config

    student = make()
    out = export_student(student, tmp_path / "out", card=card())
    config = json.loads((out / "config.json").read_text())
    top, ours = config["pretrained_cfg"], config["attnxfer"]["student"]["pretrained_cfg"]
    keys = ("input_size", "fixed_input_size", "mean", "std")
    assert {k: top[k] for k in keys} == {k: ours[k] for k in keys}
    timms = get_model_input_config(student)
    chans = timms["input_size"][0]
    assert ours["input_size"] == list(timms["input_size"])
    assert ours["fixed_input_size"] == timms["fixed_input_size"]
    assert len(ours["mean"]) == len(ours["std"]) == chans
    if config["attnxfer"]["loads_in_plain_timm"]:
        data = resolve_model_data_config(timm.create_model(f"local-dir:{out}", pretrained=True))
    else:
        data = resolve_model_data_config(load_student(f"local-dir:{out}"))
    assert len(data["mean"]) == len(data["std"]) == chans and list(data["mean"]) == ours["mean"]


def test_a_hierarchical_students_shape_names_its_stage_widths():
    from attnxfer.checkpoints.model_card import shape_phrase
    from attnxfer.models import create_vit
    from attnxfer.models.student import student_shape

    model = create_vit("pvt_v2_micro_56", num_classes=10)
    shape = student_shape(model)
    widths = [f["num_chs"] for f in model.feature_info]
    assert shape["family"] == "PVTv2" and shape["widths"] == widths and "heads" not in shape
    assert shape_phrase(shape).startswith(f"a PVTv2 of stage widths {'-'.join(map(str, widths))}, ")
    assert shape_phrase(dict(shape, family="EVA-02")).startswith("an EVA-02 of ")
    one = {"family": "ViT", "width": 24, "blocks": 1, "heads": 1}
    assert shape_phrase(one).startswith("a ViT of width 24, 1 block, 1 head")  # not "1 blocks, 1 heads"


@pytest.mark.slow
def test_the_cards_code_loads_an_architecture_only_attnxfer_registers_in_a_new_process(tmp_path):
    from attnxfer.models import create_vit

    out = export_student(create_vit("pvt_v2_micro_56", num_classes=10).eval(), tmp_path / "out", card=card())
    loading = (out / "README.md").read_text().split("## How to load")[1]
    snippet = loading.split("```python\n")[1].split("```")[0]  # the timm block
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "dataset, named",
    [
        ("hfds/acme/pets", "acme/pets"),
        ("hfids/acme/pets", "acme/pets"),  # streamed from the Hub, the same Hub dataset
        ("wds/imagenet", "imagenet"),  # shards on disk: their name, no Hub id with a prefix
        ("animal_mnist", "animal_mnist"),
        ("torch/cifar10", "cifar10"),  # torchvision's download: the Hub's id of the same dataset
    ],
)
def test_a_model_card_names_the_dataset_as_the_hub_does(dataset, named):
    from attnxfer.checkpoints.model_card import _recipe_data

    assert _recipe_data(yaml.safe_load(f"data:\n  dataset: {dataset}\n"))[1] == named


def test_an_out_dir_that_cannot_be_written_is_refused_before_the_export_in_one_line():
    """/proc takes no folders, for root too (a read-only or another user's folder is the everyday case):
    refused by name before the student is verified, not a traceback from the staging mkdir."""
    with pytest.raises(FileExistsError, match=r"OUT_DIR=/proc/attnxfer-export cannot be written \(/proc: "):
        export_student(trained_student(), "/proc/attnxfer-export", card=card())


def test_an_export_into_an_existing_folder_on_another_filesystem_stages_its_files_inside_it(
    tmp_path, monkeypatch
):
    """A mounted volume (or a folder in a read-only one): files staged beside it could not be moved in
    (os.replace across filesystems), so they are staged inside it, and nothing is left beside it."""
    out = tmp_path / "volume"
    out.mkdir()
    replace = os.replace

    def within_one_filesystem(src, dst):
        if Path(dst).parent == out and out not in Path(src).parents:
            raise OSError(18, "Invalid cross-device link", str(src))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", within_one_filesystem)
    export_student(trained_student(), out, card=card())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["volume"]


@pytest.mark.parametrize("ema_in", ["best", "newest"])
def test_the_cli_takes_ema_weights_where_the_exported_checkpoint_kept_them_not_where_the_newest_did(
    tmp_path, capsys, ema_in
):
    """`attnxfer export RUN` exports the best checkpoint: whether it falls back to the raw weights is that
    checkpoint's to say. Judged by the newest one, a best with EMA was exported raw ("the run kept no EMA
    weights"), and a best without EMA under a newest with one stopped on a missing ema.safetensors."""
    run, student = tmp_path / "run", trained_student(steps=0)
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  dataset: animal_mnist\n  img_size: 32\n")
    record = {
        "teacher": MAE_TEACHER.to_dict(),
        "student": student_spec(student),
        "plan": PLAN,
        "mode": "distill",
    }
    (run / "run.json").write_text(json.dumps(record))
    raw = student.state_dict()
    ema = {k: v + 1 for k, v in raw.items()}
    manager = CheckpointManager(run)
    for step, top1, kept in ((100, 70.0, ema_in == "best"), (200, 60.0, ema_in == "newest")):
        manager.save(step, {"model": raw, **({"ema": ema} if kept else {})}, {"step": step}, metric=top1)
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "out"))
    assert code == 0, err
    text = (tmp_path / "out" / "README.md").read_text()
    if ema_in == "best":
        assert_exported(tmp_path / "out", ema)
        assert "step-00000100 (best val top-1 70.00), ema weights" in text and "kept no EMA" not in err
    else:
        assert_exported(tmp_path / "out", raw)
        assert "step-00000100 (best val top-1 70.00), raw weights" in text
        assert err.strip().endswith(
            "attnxfer export: step-00000100 holds no EMA weights: its raw weights were exported"
        ), err


def test_the_cli_says_nothing_of_ema_for_an_mae_pretraining_which_never_keeps_one(tmp_path, capsys):
    """Pretrain refuses ema.decay: 'holds no EMA weights' told of a choice the run never had."""
    run, student = tmp_path / "run", trained_student(steps=0)
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  dataset: animal_mnist\n  img_size: 32\n")
    record = {"teacher": None, "student": student_spec(student), "objective": "mae", "mode": "mae-pretrain"}
    (run / "run.json").write_text(json.dumps(record))
    CheckpointManager(run).save(100, {"model": student.state_dict()}, {"step": 100})
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "out"))
    assert code == 0 and "EMA" not in err, err
    assert_exported(tmp_path / "out", student.state_dict())


# ------------------------------------------------------------------------- export through the CLI, of `trained`


def test_export_run_of_a_run_without_ema_exports_its_raw_weights_as_the_cli_does(trained, tmp_path):
    """EMA is off by default: `export_run(RUN_DIR, OUT)` (docs/export.md) takes the weights the run kept."""
    out = export_run(trained, tmp_path / "out")
    assert "step-00000004 (best val top-1" in (out / "README.md").read_text()
    assert "), raw weights" in (out / "README.md").read_text()


def test_export_help_loads_a_headless_student_with_automodel(capsys):
    """An MAE pre-training's encoder has no classifier: transformers loads it with AutoModel (docs/export.md)."""
    with pytest.raises(SystemExit):
        run_cli(capsys, "export", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "AutoModelForImageClassification.from_pretrained(OUT_DIR) (a headless one, as an MAE " in text
    assert "pre-training's encoder: AutoModel.from_pretrained(OUT_DIR))" in text


def test_an_export_into_the_runs_export_folder_is_named_after_the_run(trained, tmp_path):
    """RUN/export (where pretrain exports, where a refusal points) would name every model "export"."""
    run = tmp_path / "my-run"
    shutil.copytree(trained, run)
    text = (export_run(run, run / "export") / "README.md").read_text()
    assert "\n# my-run\n" in text and "- name: my-run\n" in text and "# export" not in text


def test_an_export_into_the_runs_own_folder_is_refused(trained, capsys):
    """--overwrite there would mix config.json and model.safetensors among the run's own files."""
    before = sorted(p.name for p in trained.iterdir())
    code, _, err = run_cli(capsys, "export", str(trained), f"{trained}/", "--overwrite")
    assert code == 2 and f"is a run's folder (it holds run.json): export into {trained / 'export'}" in err
    assert sorted(p.name for p in trained.iterdir()) == before


def test_an_export_into_a_folder_the_run_writes_into_is_refused(trained, capsys):
    """The run's checkpoints/ would hold the model's files beside its step folders; its export/ is where it goes."""
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    code, _, err = run_cli(capsys, "export", str(trained), str(trained / "checkpoints"), "--overwrite")
    assert (
        code == 2
        and f"in {trained}'s checkpoints/, which its run writes into: export into {trained / 'export'}" in err
    )
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("marker", ["stage2", "checkpoints"])
def test_an_export_into_a_conversions_or_studys_folder_is_refused(trained, tmp_path, marker):
    """`export CONVERSION CONVERSION --overwrite` (meant: its stage2/export) would mix the model's files into
    the conversion's folder, as into a study's (its checkpoints/ beside its students)."""
    (tmp_path / marker).mkdir()
    with pytest.raises(FileExistsError, match=f"is a run's folder \\(it holds {marker}\\)"):
        export_run(trained, tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [marker]


def test_a_push_without_the_hub_is_one_line_after_a_complete_export(trained, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # what HF_HUB_OFFLINE=1 sets at import
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", str(trained), str(out), "--push-to-hub", "acme/student")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"hf upload acme/student {out} ." in err and (out / "model.safetensors").is_file()
    code, _, err = run_cli(capsys, "export", str(trained), str(tmp_path / "o2"), "--push-to-hub", "bad name!")
    assert code == 2 and "'bad name!' is not a Hub repo id" in err and not (tmp_path / "o2").exists()


def test_a_push_stopped_by_ctrl_c_says_the_export_is_complete_and_how_to_push_it(
    trained, tmp_path, capsys, monkeypatch
):
    """Running the same command again would be refused (OUT is no longer empty): the upload is what is left."""
    import attnxfer.checkpoints.export as export_module

    def interrupted_push(out_dir, repo_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "push_export", interrupted_push)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", str(trained), str(out), "--push-to-hub", "acme/student")
    assert (
        code == 130
        and f"the export in {out} is complete; push it with `hf upload acme/student {out} .`" in err
    )


def test_the_card_of_a_run_without_a_teacher_says_so_and_export_into_dot_names_the_folder(
    trained, tmp_path, capsys, monkeypatch
):
    """From scratch (or MAE pre-training): no 'from the teacher (no teacher recorded)', no teacher's licence;
    `export RUN .` names the card after the folder it is written into, not '', and its snippets load that
    folder by its absolute path."""
    (tmp_path / "scratch-vit").mkdir()
    monkeypatch.chdir(tmp_path / "scratch-vit")
    code, _, err = run_cli(capsys, "export", str(trained), ".")
    assert code == 0, err
    body = (tmp_path / "scratch-vit" / "README.md").read_text().split("---", 2)[2]
    assert body.lstrip().startswith("# scratch-vit\n") and "trained without a teacher, with attnxfer." in body
    assert "## Teacher\n\nNone: trained without a teacher." in body and "teacher's licence" not in body
    # its snippets name the folder itself, not '.': they run from any other folder too
    assert f'timm.create_model("local-dir:{Path.cwd()}", pretrained=True)' in body
    assert f'AutoModelForImageClassification.from_pretrained("{Path.cwd()}")' in body


def test_a_student_fine_tuned_from_non_commercial_weights_inherits_their_licence(exported, tmp_path, capsys):
    """model.init's weights bind as a teacher's do: MAE's released encoder fine-tuned (no teacher) is
    CC-BY-NC-4.0, not a card saying no licence was set."""
    init = tmp_path / "init"
    init.mkdir()
    for f in exported.iterdir():
        (init / f.name).write_bytes(f.read_bytes())
    config = json.loads((init / "config.json").read_text())
    config["pretrained_cfg"]["license"] = "cc-by-nc-4.0"
    (init / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    argv = [*S, f"model.init=local-dir:{init}", "schedule.max_steps=1", f"run_dir={run}"]
    assert run_cli(capsys, "train", *argv)[0] == 0
    assert run_cli(capsys, "export", str(run), str(tmp_path / "out"))[0] == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["license"] == "cc-by-nc-4.0"
    assert f"fine-tuned from (local-dir:{init}) are licensed **CC-BY-NC-4.0**" in text
    # the same weights as a bare file, which records no licence: the card says so, not timm's default licence
    # of the architecture (apache-2.0), which had relicensed them
    file_run = tmp_path / "file_run"
    argv = [*S, f"model.init={init / 'model.safetensors'}", "model.kwargs.in_chans=3", "schedule.max_steps=1"]
    argv.append(f"run_dir={file_run}")
    assert run_cli(capsys, "train", *argv)[0] == 0
    assert run_cli(capsys, "export", str(file_run), str(tmp_path / "file_out"))[0] == 0
    text = (tmp_path / "file_out" / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["license"] == "other" and "apache" not in text
    assert (
        f"fine-tuned from ({init / 'model.safetensors'}) have no recorded licence: check their terms" in text
    )
    # a checkpoint of a run taught by those weights (export's advice for a copy student): the teacher's binds
    taught = tmp_path / "taught"
    argv = [*S, "transfer.mode=distill", f"teacher.spec=local-dir:{init}", "schedule.max_steps=1"]
    assert run_cli(capsys, "train", *argv, f"run_dir={taught}")[0] == 0
    checkpoint = taught / "checkpoints" / "step-00000001" / "model.safetensors"
    argv = [*S, f"model.init={checkpoint}", "model.kwargs.in_chans=3", "schedule.max_steps=1"]
    code, out, err = run_cli(capsys, "train", *argv, f"run_dir={tmp_path / 'alone'}")
    assert code == 0, err
    # and the statistics that run normalised by, not timm's defaults for the architecture (0.5 here)
    assert "timm's defaults" not in err and "normalised by model.init's mean/std" in out
    ran, alone = (json.loads((r / "run.json").read_text()) for r in (taught, tmp_path / "alone"))
    assert (alone["mean"], alone["std"]) == (ran["mean"], ran["std"]) != ([0.5] * 3, [0.5] * 3)
    assert run_cli(capsys, "export", str(tmp_path / "alone"), str(tmp_path / "alone_out"))[0] == 0
    card_text = (tmp_path / "alone_out" / "README.md").read_text()
    assert yaml.safe_load(card_text.split("---")[1])["license"] == "cc-by-nc-4.0"


def test_a_teacher_exported_from_a_micro_vit_is_recorded_by_its_name(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(trained), str(tmp_path / "exported"))
    assert code == 0, err
    assert (
        json.loads((tmp_path / "exported/config.json").read_text())["architecture"] != "vit_micro_patch4_28"
    )
    run = tmp_path / "copy"
    code, _, err = run_cli(
        capsys,
        "train",
        *(a for a in S if a.split("=")[0] not in ("transfer.mode", "model.kwargs")),
        "transfer.mode=copy",
        f"teacher.spec=local-dir:{tmp_path / 'exported'}",
        "schedule.max_steps=1",
        f"run_dir={run}",
    )
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["teacher"]["architecture"] == "vit_micro_patch4_28"


def test_export_given_a_folder_that_is_not_a_run_says_what_it_is(trained, exported, tmp_path, capsys):
    """A folder of runs (the demo's runs/demo), an export, a path that is not there, a run's checkpoints, a
    study's (once told to give the study's folder as a run's): each answer points to what to give instead, and
    nothing is written."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a").symlink_to(trained)
    study = tmp_path / "study"
    (study / "checkpoints" / "step-00000002").mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"students": [{"name": "s0", "folder": "s0"}]}))
    (study / "s0").symlink_to(trained)
    cases = {
        tmp_path / "runs": f"holds runs (a/): give one of them, e.g. {tmp_path / 'runs' / 'a'}",
        exported: f"is an exported model, not a run's dir: it loads as local-dir:{exported}",
        exported.parent: f"it holds an exported model, {exported}, which loads as local-dir:{exported}",
        tmp_path / "runs" / "b": f"does not exist ({tmp_path / 'runs'} holds: a/)",
        trained / "config.yaml": f"is a file, not a run's folder: give the folder it is in, {trained}",
        # its checkpoints, or one of them (whose state.json once made them "runs" to pick one of)
        trained
        / "checkpoints": f"belongs to the checkpoints of the run {trained}: give the run's folder, {trained}",
        trained / "checkpoints" / "step-00000004": f"of the run {trained}: give the run's folder, {trained};",
        # a study's checkpoints (the steps its students all saved): its folder is no run to give either
        study / "checkpoints": f"{study} is a study's folder: its students are the runs in it (s0); give one",
        study
        / "checkpoints"
        / "step-00000002": f"{study} is a study's folder: its students are the runs in it",
    }
    for given, says in cases.items():
        code, _, err = run_cli(capsys, "export", str(given), str(tmp_path / "out"))
        assert code == 2 and says in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_of_a_softmax_student_of_an_attnxfer_architecture_says_how_timm_loads_it(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    model = ("model.name=pvt_v2_micro_56", "model.kwargs={depths: [1, 1, 1, 1]}", "transfer.mode=none")
    code, _, err = run_cli(
        capsys, "train", *tiny_run(16, 16), *model, "schedule.max_steps=1", f"run_dir={run}"
    )
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "export", str(run), str(out))
    assert code == 0, err
    assert "efficient attention" not in stdout
    assert "load with: import attnxfer.models (registers pvt_v2_micro_56), then timm.create_model(" in stdout


@pytest.mark.parametrize("command", ["export", "inspect"])
def test_under_several_processes_rank_0_alone_writes_the_folder(
    command, trained, tmp_path, capsys, monkeypatch
):
    """torchrun or srun starts the command on every rank: each wrote OUT_DIR, and all but the first stopped
    (`written by another export meanwhile`), failing the job whose export had succeeded."""
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    args = (
        [str(trained), str(out)] if command == "export" else [str(trained), str(trained), "--out", str(out)]
    )
    assert run_cli(capsys, command, *args) == (0, "", "") and not out.exists()
