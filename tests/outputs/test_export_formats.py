"""Exported students in the other runtimes: transformers' timm wrapper (`AutoModel*.from_pretrained` of a
timm-format export) and ONNX Runtime (`attnxfer export --format onnx`), each held against the PyTorch
forward of the student attnxfer trained, on the same images, in fp32 on CPU."""

from __future__ import annotations

import json
import sys

import huggingface_hub
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn as nn
import transformers
from families.cases import build_hier, build_swin
from helpers import CONVERT_OPTIONS, card, fast_cells
from teachers.test_transformers_teachers import save_tiny

from attnxfer.apps.inspect.inspect import inspect_attention
from attnxfer.checkpoints.export import export_run, export_student
from attnxfer.checkpoints.onnx_export import OPSET, OnnxExportError
from attnxfer.errors import UserError
from attnxfer.launch.cli import build_parser, main
from attnxfer.models.attention import list_attentions
from attnxfer.models.efficient import build_efficient_student
from attnxfer.models.student import student_like
from attnxfer.sources import load_student
from attnxfer.sources.teacher import load_teacher
from outputs.test_export import efficient_student, fake_run, teacher_model, trained_student

transformers.utils.logging.set_verbosity_error()  # the wrapper's load report (an unused head) is not a failure
transformers.utils.logging.disable_progress_bar()

IMAGES = 5  # neither the traced batch (2) nor a checked one (1, 3): the batch axis is really free


def images(size: int = 32, batch: int = IMAGES, seed: int = 11) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def onnx_outputs(folder, x: torch.Tensor) -> torch.Tensor:
    """The exported graph run by a fresh ONNX Runtime CPU session of this test (not the export's own)."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])


def assert_onnx_matches(student: nn.Module, out, size: int = 32) -> dict:
    """ONNX Runtime's outputs equal the student's (max abs diff <= 1e-4); the graph is valid opset 18 with a
    free batch axis; the report says what was measured. Returns the report."""
    x = images(size)
    with torch.no_grad():
        want = student.eval()(x)
    got = onnx_outputs(out, x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    graph = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    report = json.loads((out / "export_report.json").read_text())["onnx"]
    assert report["opset"] == OPSET and report["input_shape"] == ["batch", 3, size, size]
    assert 0 <= report["max_abs_diff"] <= 1e-4 and report["check_batches"] == [1, 3]
    assert f"max absolute difference **{report['max_abs_diff']:.3g}**" in (out / "README.md").read_text()
    return report


# ----------------------------------------------------------------------------------------- transformers


def test_softmax_export_loads_in_transformers_with_attnxfers_logits(tmp_path):
    student = trained_student()
    out = export_student(student, tmp_path / "out", card=card())
    model = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    x = images()
    with torch.no_grad():
        assert rel(model(x).logits, student(x)) <= 1e-5
    readme = (out / "README.md").read_text()
    assert f'AutoModelForImageClassification.from_pretrained("{out}")' in readme
    scope = {}  # the card's transformers code runs as a reader copies it
    exec(readme.split("In transformers")[1].split("```python\n")[1].split("```")[0], scope)
    assert scope["logits"].shape == (1, 10)


def test_the_cards_transformers_code_reads_an_image_as_the_run_validated_it(tmp_path):
    """The card's transformers code (`AutoImageProcessor`: the export's timm transform) gives the student's
    logits on an image through timm's transform, RGB or one-channel; the pipeline the card names for an RGB
    classifier scores as it does, and a one-channel card says why the pipeline (every image read as RGB)
    cannot serve it, which transformers still holds to."""
    from PIL import Image

    from attnxfer.models import create_vit

    one_channel = student_like(create_vit("vit_micro_patch4_28", num_classes=3), depth=1).eval()
    rng = np.random.default_rng(0)
    for student, mode in ((trained_student(), "RGB"), (one_channel, "L")):
        out = export_student(student, tmp_path / mode, card=card())
        readme = (out / "README.md").read_text().split("In transformers")[1]
        scope = {}
        exec(readme.split("```python\n")[1].split("```")[0], scope)
        channels, high, wide = student.pretrained_cfg["input_size"]
        pixels = rng.integers(0, 256, (high + 7, wide + 3, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
        cfg = timm.data.resolve_model_data_config(timm.create_model(f"local-dir:{out}", pretrained=True))
        with torch.no_grad():
            want = student(timm.data.create_transform(**cfg, is_training=False)(image)[None])
            got = scope["model"](**scope["processor"](image)).logits
        assert rel(got, want) <= 1e-5
        classify = transformers.pipeline("image-classification", model=str(out))
        if mode == "RGB":
            assert f'`pipeline("image-classification", model="{out}")`' in readme
            best = classify(image, top_k=1)[0]
            assert best["score"] == pytest.approx(want.softmax(-1).max().item(), rel=1e-5)
        else:
            assert "reads every image as RGB, which this one-channel model cannot take" in readme
            with pytest.raises(RuntimeError, match="to have 1 channels, but got 3"):
                classify(image)


def test_headless_export_loads_in_transformers_as_features(tmp_path):
    student = student_like(teacher_model(), num_classes=0).eval()
    out = export_student(student, tmp_path / "out", card=card())
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert type(model).__name__ == "TimmWrapperModel"
    x = images()
    with torch.no_grad():
        got = model(x)
        tokens = student.forward_features(x)
        assert rel(got.last_hidden_state, tokens) <= 1e-5
        assert rel(got.pooler_output, student.forward_head(tokens, pre_logits=True)) <= 1e-5
    assert 'AutoModel.from_pretrained("' in (out / "README.md").read_text()


def _micro_linear_student() -> nn.Module:
    from attnxfer.models import create_vit

    return build_efficient_student(
        student_like(create_vit("vit_micro_patch4_28", num_classes=3), depth=1), "relu_linear"
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: efficient_student("relu_linear"),
        _micro_linear_student,  # an architecture only attnxfer registers
        lambda: build_efficient_student(build_swin("swin"), "relu_linear"),  # a class other than timm's ViT
    ],
    ids=["vit", "micro-vit", "swin"],
)
def test_an_efficient_export_is_refused_by_transformers_and_the_card_points_to_onnx(make, tmp_path):
    out = export_student(make().eval(), tmp_path / "out", card=card())
    # timm, under the wrapper, names why and the loader (not a path error telling to prefix hf-hub:), and
    # transformers does not turn it into advice to upgrade timm, which builds no such model in any version
    why = r"relu_linear attention, which timm and transformers build only as softmax; load it with attnxfer"
    for auto in (transformers.AutoModel, transformers.AutoModelForImageClassification):
        with pytest.raises(Exception, match=why + r"\.load_student, or run model\.onnx") as refused:
            auto.from_pretrained(out)
        assert "upgrade" not in str(refused.value)
    readme = (out / "README.md").read_text()
    assert "neither can transformers' timm wrapper" in readme and "--format onnx" in readme


# ----------------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_only(tmp_path_factory):
    """(student, folder): a trained softmax student exported as ONNX alone, once for the module (an export
    traces, checks and runs the graph: ~3 s). Read-only: the tests read the folder and the student."""
    student = trained_student()
    out = tmp_path_factory.mktemp("onnx-only") / "out"
    export_student(student, out, card=card(repo_id="acme/student"), formats=("onnx",))
    return student, out


def test_softmax_student_runs_in_onnx_runtime_as_in_pytorch(onnx_only, monkeypatch):
    student, out = onnx_only
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export_report.json", "model.onnx"]
    report = assert_onnx_matches(student, out)
    assert report["output_name"] == "logits" and report["output_shape"] == ["batch", 10]
    front = (out / "README.md").read_text().split("---")[1]
    assert "library_name: onnx" in front and "- onnx" in front
    # the card of a Hub repo: its code fetches the graph from the repo (here the Hub's copy is OUT's)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(out / name))
    scope = {}
    exec((out / "README.md").read_text().split("## ONNX")[1].split("```python\n")[1].split("```")[0], scope)
    assert scope["logits"].shape == (1, 10)


#: The mixed student's attentions (`test_a_mixed_efficient_student_runs_in_onnx_runtime`): their ONNX check.
MIXED = ["window_linear", "performer"]
#: Every other registered attention but softmax (the softmax tests'), two to a student, one a block (the
#: student has two): the graph traced is two blocks whichever attentions they hold, so a pair costs one
#: export, not two. An odd one out holds both blocks.
_REST = [n for n in list_attentions() if n not in ("softmax", *MIXED)]
PAIRS = [tuple(_REST[i : i + 2]) for i in range(0, len(_REST), 2)]


@pytest.mark.slow
def test_a_mixed_efficient_student_runs_in_onnx_runtime(tmp_path):
    """One attention per block, with options (window sizes, Performer's fixed random features): also the
    ONNX check of these two attentions, which `test_every_registered_attention_exports_to_onnx` leaves out."""
    student = efficient_student(MIXED, window_size=2, num_features=24, feature_seed=5)
    out = export_student(student, tmp_path / "out", card=card(), formats=("timm", "onnx"))
    assert {"config.json", "model.safetensors", "model.onnx", "README.md"} <= {p.name for p in out.iterdir()}
    report = assert_onnx_matches(student, out)
    assert json.loads((out / "export_report.json").read_text())["attnxfer"]["attention"] == MIXED
    assert report["output_name"] == "logits"


def test_a_swin_converted_to_softmax_is_the_teacher_and_exports_as_timms_swin(tmp_path):
    """A Swin stage given softmax keeps the teacher's window attention, position table included: a student
    of softmax throughout is the teacher (it lost the table, and its export missed it in timm's rebuild)."""
    teacher = build_swin("swin").eval()  # position tables drawn wide: dropping them moves the logits
    student = build_efficient_student(teacher, "softmax").eval()
    mixed = build_efficient_student(teacher, ["softmax", "relu_linear"])
    x = images()
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))
        out = export_student(student, tmp_path / "out", card=card())
        assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), teacher(x))
    kept = [n for n, _ in mixed.named_parameters() if "relative_position_bias_table" in n]
    assert kept and all(n.startswith("layers.0.") for n in kept)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["pvt_v2", "swin"])
def test_a_hierarchical_efficient_student_runs_in_onnx_runtime(family, tmp_path):
    """A converted PVTv2 (one attention per layer, spatial reduction kept) and a converted Swin (the zoo
    attention inside shifted windows, regions kept apart by the shift mask)."""
    if family == "pvt_v2":
        student = build_efficient_student(build_hier("pvt_v2"), ["none", "hashing", "relu_linear"])
    else:
        student = build_efficient_student(build_swin("swin"), "hedgehog")
    student.pretrained_cfg = dict(student.pretrained_cfg, input_size=(3, 32, 32))
    out = export_student(student.eval(), tmp_path / "out", card=card(), formats=("onnx",))
    assert_onnx_matches(student, out)


@pytest.mark.slow
@pytest.mark.parametrize("names", PAIRS, ids="+".join)
def test_every_registered_attention_exports_to_onnx(names, tmp_path):
    options = {k: v for name in names for k, v in CONVERT_OPTIONS.get(name, {}).items()}
    student = efficient_student(list(names) if len(names) == 2 else names[0], **options)
    out = export_student(student, tmp_path / "out", card=card(), formats=("onnx",))
    assert_onnx_matches(student, out)


class _SignFlip(nn.Module):
    """A head-side module that branches on its input's values: no static graph can hold the branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


@pytest.mark.slow
def test_a_student_that_cannot_be_traced_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    student = trained_student()
    student.head_drop = _SignFlip()
    with pytest.raises(OnnxExportError) as e:
        export_student(student, tmp_path / "out", card=card(), formats=("onnx",))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and len(msg.splitlines()) == 1
    assert (
        "VisionTransformer with softmax attention cannot be exported to ONNX" in msg
        and "--format timm" in msg
    )
    assert not (tmp_path / "out").exists()


def test_missing_onnx_packages_stop_the_cli_before_any_work(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnxfer export: error: ") and len(err.splitlines()) == 1
    assert "attnxfer[onnx]" in err and "onnxruntime" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_attnxfer_export_format_onnx_from_a_run(tmp_path, capsys):
    """Both formats, whether named after one --format or each after its own (not the last one only): the
    two spellings parse to the same formats, and the export runs once, from the second."""
    fake_run(tmp_path / "run")
    out = tmp_path / "out"
    argvs = [
        ["export", str(tmp_path / "run"), str(out), "--format", *formats, "--weights", "raw"]
        for formats in (["timm", "onnx"], ["timm", "--format", "onnx"])
    ]
    assert [build_parser().parse_args(argv).formats for argv in argvs] == [["timm", "onnx"]] * 2
    argv = argvs[1]
    with pytest.warns(UserWarning, match="step-00000300"):  # the run's broken newest checkpoint
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        f"ONNX: {out / 'model.onnx'} (opset {OPSET})" in printed and "load with: timm.create_model" in printed
    )
    with pytest.warns(UserWarning, match="step-00000300"):
        export_run(tmp_path / "run", tmp_path / "timm", weights="raw")
    student = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert_onnx_matches(student, out)


def test_an_unknown_format_is_refused_by_the_library_before_any_work(tmp_path):
    with pytest.raises(UserError, match="choose from timm, onnx"):
        export_student(trained_student(steps=0), tmp_path / "out", card=card(), formats=("tflite",))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ students of a transformers-ViT teacher


@pytest.mark.parametrize(
    "how", fast_cells(["distilled", "converted", "converted_hedgehog"], keep=("converted",))
)
def test_a_student_of_a_transformers_vit_teacher_is_what_it_exports(how, tmp_path):
    """transformers' ViT normalises with LayerNorm eps 1e-12, which the teacher keeps and no timm argument
    names: a student (mirrored for distillation, or the teacher's converted copy) is built with the eps its
    export rebuilds (timm's 1e-6), so export -> load_student (and timm, and transformers' wrapper, for a
    softmax student) gives its outputs exactly."""
    save_tiny("vit", tmp_path / "teacher")
    teacher, _ = load_teacher(f"local-dir:{tmp_path / 'teacher'}")
    assert teacher.blocks[0].norm1.eps == 1e-12
    if how == "distilled":
        student = student_like(teacher)
    else:
        student = build_efficient_student(teacher, "hedgehog" if how.endswith("hedgehog") else "softmax")
        x = images()
        with torch.no_grad():  # the converted copy starts where the teacher is, but for the eps
            assert 0 < rel(student.eval().forward_features(x), teacher.forward_features(x)) <= 1e-3
    assert {m.eps for m in student.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    student.eval()
    out = export_student(student, tmp_path / "out", card=card())
    x = images()
    with torch.no_grad():
        want = student(x)
        assert torch.equal(load_student(f"local-dir:{out}")(x), want)
        if how != "converted_hedgehog":
            assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), want)
            wrapped = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
            assert rel(wrapped(x).logits, want) <= 1e-5


@pytest.mark.slow
def test_an_onnx_only_export_given_as_a_model_says_to_export_the_timm_format_too(onnx_only):
    """ONNX Runtime runs it; load_student and inspect read config.json + model.safetensors, which this
    export has none of: the refusal says so, not that an export would have written them."""
    _, out = onnx_only
    for refused in (
        lambda: load_student(f"local-dir:{out}"),
        lambda: inspect_attention("vit_tiny_patch16_224", [str(out)], pretrained=False, data="synthetic"),
    ):
        with pytest.raises(
            UserError, match="ONNX-only export .* export the run again with --format timm onnx"
        ):
            refused()
