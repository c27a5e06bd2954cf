"""Teachers saved by transformers: a tiny randomly initialised transformers model of each mapped type,
written by ``save_pretrained``, loaded by `load_teacher` as a timm model, is checked against
transformers' own forward on the same images (fp32): the final token features and the logits or pooled
output (rel <= 1e-5), and every layer's attention map against ``output_attentions=True``. Then a
2-step ``attnxfer train`` distillation from such a folder, the Hub path offline, and the one-line refusals
for config.json files attnxfer cannot read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import transformers
from helpers import fast_cells, tiny_convert_report, tiny_run
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import attnxfer.sources.transformers_format as tf
from attnxfer.errors import InputError
from attnxfer.launch.cli import main
from attnxfer.models.attention import attention_maps
from attnxfer.models.student import student_like, student_spec
from attnxfer.sources import load_student
from attnxfer.sources.teacher import TeacherLoadError, load_teacher

transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar would land in the CLI's stderr

ROOT = Path(__file__).resolve().parents[2]
IMG = 32
# 32x32 images in 8-px patches (16 tokens), width 32, 2 heads, 2 layers: every type's smallest sensible model
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=8)
MLP = dict(intermediate_size=64)


@dataclass(frozen=True)
class Case:
    """One transformers class and config; how its outputs line up with timm's."""

    model_class: str
    config: Any  # () -> transformers config
    encoder: str | None = None  # attribute holding the encoder whose last_hidden_state is the features
    features: str = "last_hidden_state"  # or "post_layernorm": CLIP's timm features are post-norm
    output: str | None = None  # what timm's forward equals: "logits", "pooler_output", "image_embeds"
    dropped: tuple[str, ...] = ()  # key prefixes the load must report as dropped


# a text tower as small as the vision one (it is dropped; its token ids fit its vocabulary)
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=99,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def _clip_config(T, vision: dict) -> Any:
    return T.CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=16)


def _siglip_config(T, vision: dict, **kwargs) -> Any:
    return T.SiglipConfig(vision_config=vision, text_config=TEXT, **kwargs)


CASES: dict[str, Case] = {
    "vit": Case(
        "ViTForImageClassification",
        lambda T: T.ViTConfig(**TINY, **MLP, num_labels=3),
        encoder="vit",
        output="logits",
    ),
    "vit_model": Case(
        "ViTModel", lambda T: T.ViTConfig(**TINY, **MLP), output=None, dropped=("pooler.dense.weight",)
    ),
    "deit": Case(
        "DeiTForImageClassificationWithTeacher",
        lambda T: T.DeiTConfig(**TINY, **MLP, num_labels=3),
        encoder="deit",
        output="logits",
    ),
    "vit_mae": Case(
        "ViTMAEForPreTraining",
        lambda T: T.ViTMAEConfig(
            **TINY,
            **MLP,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_intermediate_size=32,
            decoder_num_attention_heads=2,
        ),
        encoder="vit",
        dropped=("decoder.decoder_pred.weight",),
    ),
    "dinov2": Case(
        "Dinov2Model",
        lambda T: T.Dinov2Config(**TINY),
        output="pooler_output",
        dropped=("embeddings.mask_token",),
    ),
    "dinov2_swiglu": Case(
        "Dinov2Model", lambda T: T.Dinov2Config(**TINY, use_swiglu_ffn=True), output="pooler_output"
    ),
    "dinov2_with_registers": Case(
        "Dinov2WithRegistersModel",
        lambda T: T.Dinov2WithRegistersConfig(**TINY, num_register_tokens=2),
        output="pooler_output",
    ),
    "dinov3_vit": Case(
        "DINOv3ViTModel",
        lambda T: T.DINOv3ViTConfig(**TINY, **MLP, num_register_tokens=2),
        output="pooler_output",
        dropped=("embeddings.mask_token",),
    ),
    "dinov3_vit_gated": Case(  # SwiGLU, and biases the config leaves out (zeros in timm)
        "DINOv3ViTModel",
        lambda T: T.DINOv3ViTConfig(
            **TINY, **MLP, use_gated_mlp=True, hidden_act="silu", value_bias=False, mlp_bias=False
        ),
        output="pooler_output",
    ),
    "clip": Case(
        "CLIPModel",
        lambda T: _clip_config(T, dict(**TINY, **MLP)),
        encoder="vision_model",
        features="post_layernorm",
        output="image_embeds",
        dropped=("text_model.final_layer_norm.weight", "logit_scale", "text_projection.weight"),
    ),
    "clip_vision_model": Case(
        "CLIPVisionModel",
        lambda T: T.CLIPVisionConfig(**TINY, **MLP),
        features="post_layernorm",
        output="pooler_output",
    ),
    "siglip": Case(
        "SiglipModel",
        lambda T: _siglip_config(T, dict(**TINY, **MLP)),
        encoder="vision_model",
        output="pooler_output",
        dropped=("text_model.head.weight", "logit_bias"),
    ),
    "siglip_vision_model": Case(
        "SiglipVisionModel", lambda T: T.SiglipVisionConfig(**TINY, **MLP), output="pooler_output"
    ),
    "siglip_classifier": Case(
        "SiglipForImageClassification",
        lambda T: _siglip_config(T, dict(**TINY, **MLP), num_labels=3),
        encoder="vision_model",
        output="logits",
        dropped=("vision_model.head.probe",),
    ),
    "ijepa": Case(
        "IJepaForImageClassification",
        lambda T: T.IJepaConfig(**TINY, **MLP, num_labels=3),
        encoder="ijepa",
        output="logits",
    ),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms to 1/0, biases and tokens to 0, layer scales to a constant: move them
    all, so a swapped norm, a lost bias or a misplaced token shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p.shape[:2] == (1, 1) or p.shape[0] == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def save_tiny(name: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """The case's transformers model, perturbed, saved with ``save_pretrained``; returned in eval mode."""
    case = CASES[name]
    torch.manual_seed(seed)
    config = case.config(transformers)
    config._attn_implementation = "eager"  # maps through output_attentions
    model = getattr(transformers, case.model_class)(config).eval()
    _perturb(model, seed)
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def reference(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """transformers' own outputs that timm's features, forward and maps must equal."""
    case = CASES[name]
    enc = getattr(model, case.encoder) if case.encoder else model
    kwargs = {}
    if name == "vit_mae":  # every patch, in order: the teacher sees the whole image
        enc.config.mask_ratio = 0.0
        kwargs["noise"] = torch.arange(x.shape[0] * 16, dtype=torch.float32).reshape(x.shape[0], 16)
    out = enc(x, output_attentions=True, **kwargs)
    features = out.last_hidden_state
    if case.features == "post_layernorm":
        features = enc.post_layernorm(features)
    result = {"features": features, "attentions": out.attentions}
    if case.output == "logits":
        result["output"] = model(x).logits
    elif case.output == "pooler_output":
        result["output"] = out.pooler_output
    elif case.output == "image_embeds":
        result["output"] = model.visual_projection(out.pooler_output)
    return result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", fast_cells(list(CASES), keep=("vit",)))
def test_teacher_computes_what_transformers_computes(name, tmp_path):
    hf = save_tiny(name, tmp_path / name)
    teacher, record = load_teacher(f"local-dir:{tmp_path / name}")
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    ref = reference(name, hf, x)
    with torch.no_grad():
        features, output = teacher.forward_features(x), teacher(x)
        maps = attention_maps(teacher, x)

    assert features.shape == ref["features"].shape
    assert _rel(features, ref["features"]) <= 1e-5
    if "output" in ref:
        assert output.shape == ref["output"].shape
        assert _rel(output, ref["output"]) <= 1e-5
    assert len(maps) == len(ref["attentions"]) == TINY["num_hidden_layers"]
    for i, hf_map in enumerate(ref["attentions"]):
        torch.testing.assert_close(maps[i], hf_map, rtol=1e-5, atol=1e-6, msg=f"layer {i}")

    assert record.source_format.startswith(f"transformers {hf.config.model_type} ({CASES[name].model_class})")
    classes = {"logits": 3, "image_embeds": 16}.get(CASES[name].output, 0)  # CLIP's projection is its head
    assert record.num_classes == teacher.num_classes == classes
    assert set(CASES[name].dropped) <= set(record.dropped_keys)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_mirrored_student_is_plain_timm_where_the_teacher_has_transformers_eps(tmp_path):
    """transformers' ViT normalises with eps 1e-12 and the teacher keeps it (timm's 1e-6 moves these tiny
    features by ~1e-4); no timm name carries that eps, so the student gets timm's and its spec stays JSON."""
    save_tiny("vit", tmp_path)
    teacher, _ = load_teacher(f"local-dir:{tmp_path}")
    assert teacher.blocks[0].norm1.eps == 1e-12 and teacher.norm.eps == 1e-12
    student = student_like(teacher, num_classes=5)
    assert student.blocks[0].norm1.eps == 1e-6
    spec = json.loads(json.dumps(student_spec(student)))
    assert "norm_layer" not in spec["model_args"] and spec["model_args"]["depth"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "dinov2_swiglu", "dinov3_vit"])
def test_in_memory_names_of_transformers_5_load_too(name, tmp_path):
    """transformers 5 renames layers in memory (``layers.0.attention.q_proj``, ``model.layer.0``) and writes the
    old names back on save; a state dict saved from memory (``safetensors.save_file(model.state_dict())``)
    loads the same."""
    hf = save_tiny(name, tmp_path / "saved")
    (tmp_path / "memory").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "memory" / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    on_disk = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert on_disk["model_type"] and set(state) != set(
        _safetensors_keys(tmp_path / "saved" / "model.safetensors")
    )
    save_file(state, str(tmp_path / "memory" / "model.safetensors"))
    a, _ = load_teacher(f"local-dir:{tmp_path / 'saved'}")
    b, _ = load_teacher(f"local-dir:{tmp_path / 'memory'}")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_sharded_safetensors_load_as_one(tmp_path):
    hf = save_tiny("dinov2", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    a, rec_a = load_teacher(f"local-dir:{tmp_path / 'one'}")
    b, rec_b = load_teacher(f"local-dir:{tmp_path / 'sharded'}")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert {str(s) for s in shards} <= set(rec_b.files)
    assert rec_b.sha256 != rec_a.sha256 and len(rec_b.sha256) == 64  # of the shards, not of the index


# ------------------------------------------------------------------------------------- preprocessing


def _write_card_and_preprocessing(folder: Path) -> None:
    """A CLIP-style image processor (shortest edge 36, centre crop 32, bicubic) and a model card."""
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_resize": True,
                "size": {"shortest_edge": 36},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "do_normalize": True,
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
                "resample": 3,
            }
        )
    )
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny\n")


def test_preprocessing_and_licence_come_from_the_folder(tmp_path):
    save_tiny("vit", tmp_path)
    _write_card_and_preprocessing(tmp_path)
    _, rec = load_teacher(f"local-dir:{tmp_path}")
    assert rec.mean == (0.1, 0.2, 0.3) and rec.std == (0.4, 0.5, 0.6)
    assert rec.interpolation == "bicubic" and rec.crop_pct == pytest.approx(32 / 36)
    assert rec.input_size == (3, 32, 32) and rec.license == "mit"
    assert str(tmp_path / "preprocessor_config.json") in rec.files


def test_resize_to_a_fixed_size_is_timms_squash():
    pp = tf._preprocessing({"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3})
    assert pp["crop_pct"] == 1.0 and pp["crop_mode"] == "squash" and pp["interpolation"] == "bilinear"
    old = tf._preprocessing({"size": 224, "do_center_crop": True, "crop_size": 196})  # transformers 4 ints
    assert old["crop_pct"] == pytest.approx(196 / 224) and old["crop_mode"] == "center"


def test_a_resize_to_height_and_width_before_a_center_crop_is_timms_squash_as_deits_processor_does():
    """DeiT's processor resizes to 256x256 (aspect ratio not kept), then crops 224: timm's ``squash`` with
    crop_pct 224/256; ``center`` would keep the aspect ratio and crop another part of a non-square image."""
    proc = transformers.DeiTImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}, resample=3
    )
    pp = tf._preprocessing(json.loads(proc.to_json_string()))
    assert pp["crop_mode"] == "squash" and pp["crop_pct"] == pytest.approx(32 / 40)
    pp.pop("crop_size")
    transform = create_transform(**resolve_data_config(pretrained_cfg={"input_size": (3, 32, 32), **pp}))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    expected = torch.as_tensor(proc(img, return_tensors="np")["pixel_values"][0])
    assert (transform(img) - expected).abs().max() < 0.02  # PIL's rounding, not another crop


def test_an_image_processor_that_does_not_normalise_feeds_pixels_in_0_1_not_timms_statistics():
    """``do_normalize: false``: transformers hands the model rescaled pixels as they are (mean 0, std 1), so
    the teacher's images must not be normalised by timm's defaults for the architecture."""
    pp = tf._preprocessing({"do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    assert pp["mean"] == (0.0, 0.0, 0.0) and pp["std"] == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------------- the registry


def test_every_module_of_the_package_is_registered_and_every_issue_type_is_read():
    names = {m.name for m in pkgutil.iter_modules(tf.__path__) if not m.name.startswith("_")}
    assert names == {m.__name__.rsplit(".", 1)[1] for m in tf.MODULES}
    for module in tf.MODULES:
        assert callable(module.timm_arch) and callable(module.timm_weights) and module.MODEL_TYPES
    types = [t for m in tf.MODULES for t in m.MODEL_TYPES]
    assert len(types) == len(set(types)), "a model_type claimed by two modules"
    assert {
        "vit",
        "vit_mae",
        "deit",
        "dinov2",
        "dinov2_with_registers",
        "dinov3_vit",
        "clip",
        "clip_vision_model",
        "siglip",
        "siglip_vision_model",
        "ijepa",
    } <= set(tf.supported_types())


def test_the_docs_table_of_model_types_names_every_mapped_type():
    """A new module in transformers_format/ gets its row in docs/teachers.md, which says what each type is
    built as and what is dropped."""
    table = (ROOT / "docs/teachers.md").read_text().split("| `model_type` |")[1].split("\n\n")[0]
    rows = table.splitlines()[2:]
    assert (
        sorted(n for row in rows for n in re.findall(r"`([^`]+)`", row.split("|")[1])) == tf.supported_types()
    ), "docs/teachers.md: one row per transformers_format module, its MODEL_TYPES in the first column"


# ----------------------------------------------------------------------------------------- refusals


def _vit_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "vit"
    save_tiny("vit_model", folder)
    return folder


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("broken", ["config.json", "preprocessor_config.json"])
def test_broken_json_is_one_line_naming_the_file(tmp_path, broken):
    folder = _vit_folder(tmp_path)
    (folder / broken).write_text('{"model_type": "vit", "hidden_size": 32,,}')
    with pytest.raises(InputError) as e:
        load_teacher(f"local-dir:{folder}")
    msg = str(e.value)
    assert (
        f"{folder / broken} is not valid JSON" in msg
        and "line 1 column" in msg
        and len(msg.splitlines()) == 1
    )


def test_neither_architecture_nor_model_type_lists_what_is_read(tmp_path):
    folder = _vit_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(
        InputError, match="names neither a timm 'architecture' nor a transformers 'model_type'"
    ) as e:
        load_teacher(f"local-dir:{folder}")
    assert "dinov3_vit" in str(e.value) and str(folder / "config.json") in str(e.value)


def test_a_timm_wrapper_folder_is_told_how_to_become_timms_format_and_the_way_told_loads_it(tmp_path):
    """What a Trainer fine-tuning ``AutoModelForImageClassification.from_pretrained("timm/...")`` saves: timm's
    architecture beside transformers' settings, weights under ``timm_model.``; timm read those settings as a
    pretrained config ("PretrainedCfg.__init__() got an unexpected keyword argument 'architectures'")."""
    dims = dict(img_size=IMG, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    config = transformers.TimmWrapperConfig(
        architecture="vit_tiny_patch16_224", model_args=dims, num_labels=3
    )
    torch.manual_seed(0)
    wrapper = transformers.TimmWrapperForImageClassification(config).eval()
    wrapper.save_pretrained(tmp_path / "wrapped")
    with pytest.raises(
        InputError, match="is transformers' TimmWrapper around timm's 'vit_tiny_patch16_224'"
    ) as e:
        load_teacher(f"local-dir:{tmp_path / 'wrapped'}")
    [told] = re.findall(r"`(m = transformers\.TimmWrapperForImageClassification.*?)`", str(e.value))
    exec(told.replace("DIR", repr(str(tmp_path / "timm"))), {"transformers": transformers, "timm": timm})
    teacher, record = load_teacher(f"local-dir:{tmp_path / 'timm'}")
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert record.num_classes == 3 and _rel(teacher(x), wrapper(x).logits) <= 1e-6


def test_an_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    folder = _vit_folder(tmp_path)
    _edit_config(folder, model_type="bert")
    with pytest.raises(InputError) as e:
        load_teacher(f"local-dir:{folder}")
    msg = str(e.value)
    assert "model_type 'bert'" in msg and "vit_mae" in msg and "siglip_vision_model" in msg
    assert str(folder / "config.json") in msg


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (dict(num_hidden_layers=3), "missing"),  # the config promises a layer the weights lack
        (dict(num_hidden_layers=1), "unexpected"),  # the weights hold a layer the config lacks
        (dict(image_size=64), "shapes differ: pos_embed"),  # timm would have resampled silently
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_weights_that_do_not_fit_their_config_are_named(tmp_path, change, expected):
    folder = _vit_folder(tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(TeacherLoadError) as e:
        load_teacher(f"local-dir:{folder}")
    msg = str(e.value)
    assert expected in msg and str(folder / "model.safetensors") in msg and "transformers vit" in msg
    assert "encoder.layer.*" in msg or "pos_embed" in msg


def test_a_transformers_weights_file_given_with_an_architecture_is_told_to_give_its_folder(tmp_path):
    """Named as a bare file (teacher.spec=.../model.safetensors teacher.arch=...), transformers' names fit no
    timm architecture: the error says which spec maps them."""
    folder = _vit_folder(tmp_path)
    with pytest.raises(TeacherLoadError, match=r"Hint: the names are transformers' .* as local-dir:DIR"):
        load_teacher(
            str(folder / "model.safetensors"), arch="vit_tiny_patch16_224", img_size=IMG, patch_size=8
        )


def test_the_cli_refuses_an_unreadable_folder_in_one_line_before_any_work(tmp_path, capsys):
    folder = _vit_folder(tmp_path)
    _edit_config(folder, model_type="wav2vec2")
    run = tmp_path / "run"
    capsys.readouterr()
    argv = [
        "train",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{folder}",
        "transfer.mode=distill",
        *tiny_run(16, 8),
        "schedule.max_steps=1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attnxfer train: error: "), err
    assert "model_type 'wav2vec2'" in err and "dinov2_with_registers" in err
    assert not (run / "run.json").exists()


def test_a_run_refuses_a_folder_without_preprocessing_unless_data_mean_and_std_are_given(tmp_path, capsys):
    """``save_pretrained`` writes no preprocessor_config.json: the statistics the weights were trained with are
    unknown, and timm's defaults for the mapped architecture (0.5 for a ViTMAE folder trained on ImageNet's)
    would skew the teacher's maps without a sign. The run says what to set, before writing anything."""
    folder = _vit_folder(tmp_path)
    run = tmp_path / "run"
    argv = ["train", f"run_dir={run}", f"teacher.spec=local-dir:{folder}", *tiny_run(16, 8)]
    capsys.readouterr()
    assert main([*argv, "schedule.max_steps=1"]) == 2
    said = capsys.readouterr()
    err = said.err.strip().splitlines()[-1]
    assert (
        err.startswith("attnxfer train: error: teacher local-dir:") and "no preprocessor_config.json" in err
    )
    assert (
        "set data.mean and data.std (the likeliest, its family's published checkpoints' or timm's defaults"
        in err
    )
    assert "data.mean=[0.5,0.5,0.5]" in err and not run.exists()
    # a ViTMAE folder's likeliest are MAE's published ImageNet statistics, not its architecture's default tag's 0.5
    save_tiny("vit_mae", tmp_path / "mae")
    assert (
        main([*argv[:2], f"teacher.spec=local-dir:{tmp_path / 'mae'}", *argv[3:], "schedule.max_steps=1"])
        == 2
    )
    assert "data.mean=[0.485,0.456,0.406] data.std=[0.229,0.224,0.225]" in capsys.readouterr().err
    # a grey model is told one value each, which pasted as they are train (three had been refused for 1 channel)
    config = CASES["vit_model"].config(transformers)
    config.num_channels = 1
    transformers.ViTModel(config).save_pretrained(tmp_path / "grey")
    grey = [*argv[:2], f"teacher.spec=local-dir:{tmp_path / 'grey'}", *argv[3:], "schedule.max_steps=1"]
    assert main(grey) == 2
    told = re.search(r"data\.mean=\[[^]]*\] data\.std=\[[^]]*\]", capsys.readouterr().err)[0]
    assert told == "data.mean=[0.5] data.std=[0.5]", told
    assert main([*grey, *told.split()]) == 0
    shutil.rmtree(run)
    assert "stand in" not in said.out + said.err  # the refusal alone: not a warning that they will be used
    given = ["data.mean=[0.1,0.2,0.3]", "data.std=[0.4,0.5,0.6]", "schedule.max_steps=1"]
    assert main([*argv, *given]) == 0
    said = capsys.readouterr()
    assert "stand in" not in said.out + said.err  # given: no warning that timm's guess stands in
    _, record = load_teacher(f"local-dir:{folder}")  # in Python, nothing refuses: the guess is said
    assert record.mean_std_guessed and "or timm's defaults for vit_" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["mean"] == [0.1, 0.2, 0.3]
    # the same folder as the encoder a student starts from (model.init), for train and MAE pre-training
    init = [f"run_dir={tmp_path / 'init'}", f"model.init=local-dir:{folder}", *tiny_run(16, 8)]
    for command, mode in (("train", ["transfer.mode=none"]), ("pretrain", [])):
        capsys.readouterr()
        assert main([command, *init, *mode, "schedule.max_steps=1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"attnxfer {command}: error: model.init=local-dir:"), err
        assert "no preprocessor_config.json" in err and "set data.mean and data.std" in err
        assert not (tmp_path / "init").exists()


def _inspect_itself(folder: Path) -> list[str]:
    teacher = f"local-dir:{folder}"
    argv = ["inspect", teacher, teacher, "--data", "synthetic", "--num-images", "2", "--floor-images", "2"]
    return [*argv, "--pictures", "1", "--batch-size", "2"]


def test_inspect_asks_for_the_statistics_a_folder_lacks(tmp_path, capsys):
    """inspect has no data.mean: a teacher folder without preprocessor_config.json is refused with the flags
    that give them (timm's guess would skew every figure without a sign), and half of them is refused too."""
    argv = _inspect_itself(_vit_folder(tmp_path))
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no preprocessor_config.json" in err and "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5" in err, err
    assert not (tmp_path / "refused" / "metrics.json").exists()
    assert main([*argv, "--out", str(tmp_path / "o"), "--mean", "0.5"]) == 2
    assert "give both" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_normalises_the_teachers_images_by_the_mean_and_std_given(tmp_path, capsys):
    """--mean/--std reach the teacher's images: the same seed and images give other maps under others."""
    argv = _inspect_itself(_vit_folder(tmp_path))
    entropy = []
    for mean in ("0.5", "0.1"):
        out = tmp_path / f"mean-{mean}"
        assert main([*argv, "--out", str(out), "--mean", *[mean] * 3, "--std", "0.5", "0.5", "0.5"]) == 0
        assert "stand in" not in capsys.readouterr().err  # the flags, not timm's guess
        layers = json.loads((out / "metrics.json").read_text())["teacher"]
        entropy.append([layer["mean"]["entropy"] for layer in layers])
    assert entropy[0] != entropy[1]  # the same seed and images: only the normalisation differs


# ------------------------------------------------------------------------------- a run from the folder


TRAIN = [
    "transfer.mode=distill",
    *tiny_run(16, 8),
    "schedule.epochs=1",
    "schedule.max_steps=2",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vit", "deit", "vit_mae", "dinov2_with_registers", "dinov3_vit", "clip", "siglip", "ijepa"]
)
def test_attnxfer_train_distils_from_a_transformers_folder(name, tmp_path, capsys):
    folder = tmp_path / name
    save_tiny(name, folder)
    _write_card_and_preprocessing(folder)
    run = tmp_path / "run"
    assert main(["train", f"run_dir={run}", f"teacher.spec=local-dir:{folder}", *TRAIN]) == 0, (
        capsys.readouterr().err
    )
    record = json.loads((run / "run.json").read_text())
    teacher = record["teacher"]
    assert teacher["source_format"].startswith(f"transformers {CASES[name].config(transformers).model_type}")
    assert (
        teacher["license"] == "mit"
        and teacher["mean"] == [0.1, 0.2, 0.3]
        and teacher["std"] == [0.4, 0.5, 0.6]
    )
    assert record["mean"] == [0.1, 0.2, 0.3]  # the teacher's preprocessing fed the data pipeline
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows and all(math.isfinite(r["attn_ce/0"]) and math.isfinite(r["total"]) for r in train_rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_model", "dinov3_vit"])  # headless: conversion adds a head
def test_copy_convert_inspect_and_export_run_from_a_transformers_folder(name, tmp_path, capsys):
    """The other workflows, unchanged: a copy run, a conversion to a linear-attention student, inspect of
    teacher against a distilled student, and the export of that student (which checks its logits)."""
    folder = tmp_path / name
    save_tiny(name, folder)
    # save_pretrained writes no preprocessor_config.json: a run asks for the statistics
    spec = [f"teacher.spec=local-dir:{folder}", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
    common = [c for c in TRAIN if not c.startswith("transfer.mode")]
    assert main(["train", f"run_dir={tmp_path / 'copy'}", *spec, *common, "transfer.mode=copy"]) == 0
    assert main(["train", f"run_dir={tmp_path / 'distill'}", *spec, *TRAIN]) == 0
    convert = [
        f"run_dir={tmp_path / 'convert'}",
        *spec,
        *TRAIN,
        "convert.attention=hedgehog",
        "convert.stage1_steps=2",
        *tiny_convert_report(1, 2),
    ]
    assert main(["convert", *convert]) == 0, capsys.readouterr().err[-2000:]
    out = tmp_path / "inspect"
    inspect = [f"local-dir:{folder}", str(tmp_path / "distill"), "--data", "synthetic", "--num-images", "4"]
    capsys.readouterr()
    assert main(["inspect", *inspect, "--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    # the folder has no statistics of its own: the run's data.mean/std, which fed its teacher, are taken
    assert (
        f"its images normalised as the run {tmp_path / 'distill'} normalised them" in capsys.readouterr().out
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["students"]["distill"]
    assert main(["export", str(tmp_path / "distill"), str(tmp_path / "export"), "--weights", "raw"]) == 0
    student = load_student(f"local-dir:{tmp_path / 'export'}")
    assert type(student).__name__ == ("Eva" if name == "dinov3_vit" else "VisionTransformer")


# ------------------------------------------------------------------------------------ the Hub, offline

REV = "89abcdef0123456789abcdef0123456789abcdef"


def put_folder_in_hub_cache(cache: Path, repo: str, folder: Path, rev: str = REV) -> Path:
    """``folder``'s files laid out as huggingface_hub's cache holds a downloaded repo:
    models--ORG--NAME/{blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/<sha256>, refs/main}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, root / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    (root / "refs" / "main").write_text(rev)
    return snap


@pytest.mark.slow
def test_a_transformers_repo_loads_from_the_offline_hub_cache_at_a_pinned_revision(tmp_path):
    folder = tmp_path / "dino"
    hf = save_tiny("dinov2", folder)
    _write_card_and_preprocessing(folder)
    snap = put_folder_in_hub_cache(tmp_path / "hub", "acme/tiny-dinov2", folder)
    x = torch.randn(2, 3, IMG, IMG)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
        import json, torch
        from dataclasses import asdict
        from attnxfer.sources.teacher import load_teacher
        x = torch.load({str(tmp_path / "x.pt")!r})
        out = {{}}
        for spec in ("hf-hub:acme/tiny-dinov2@{REV}", "hf-hub:acme/tiny-dinov2"):
            m, rec = load_teacher(spec)
            with torch.no_grad():
                out[spec] = dict(record=asdict(rec), features=m.forward_features(x).tolist())
        print(json.dumps(out))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = reference("dinov2", hf, x)["features"]
    for r in out.values():
        rec = r["record"]
        assert rec["source"] == "hub" and rec["hf_repo"] == "acme/tiny-dinov2" and rec["hf_commit"] == REV
        assert rec["source_format"] == "transformers dinov2 (Dinov2Model)"
        assert rec["license"] == "mit" and rec["mean"] == [0.1, 0.2, 0.3]
        assert rec["sha256"] == hashlib.sha256((snap / "model.safetensors").read_bytes()).hexdigest()
        assert _rel(torch.tensor(r["features"]), ref) <= 1e-5
    assert out[f"hf-hub:acme/tiny-dinov2@{REV}"]["record"]["hf_revision"] == REV
