"""transformers-format BEiT, data2vec-vision, Swin and PVTv2 teachers, held against transformers' own forward.

Each case is a tiny randomly initialised transformers model (every parameter moved off its init, position
tables included), saved with ``save_pretrained``; `load_teacher("local-dir:FOLDER")` makes it the timm
model with the same computation, and on the same images its final token features, pooled features and
logits equal transformers' (rel ≤ 1e-5, fp32), and so does every attention layer's map: transformers'
``output_attentions`` (eager attention; for Swin, whose outputs keep only each stage's last block, the
maps its attention modules return) against timm's own softmax output recorded by
`timm.utils.AttentionExtract` with fused attention off. Then a 2-step ``attnxfer train`` distillation from
such a folder, and the one-line refusals of weights that do not fit their config.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import transformers
from helpers import fast_cells, tiny_run
from safetensors.torch import load_file, save_file
from timm.utils import AttentionExtract

from attnxfer.launch.cli import main
from attnxfer.models.attention import attention_maps
from attnxfer.sources.teacher import TeacherLoadError, load_teacher
from attnxfer.sources.transformers_format import beit, pvt_v2, swin

transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar would land in the CLI's stderr

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny models: a second thread only waits

MODULES = {t: m for m in (beit, swin, pvt_v2) for t in m.MODEL_TYPES}
TOL = 1e-5


def load_folder(folder: Path) -> tuple[nn.Module, list[str]]:
    """The teacher `load_teacher` makes of a transformers folder, and the checkpoint keys it dropped."""
    model, record = load_teacher(f"local-dir:{folder}")
    return model, list(record.dropped_keys)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


@dataclass(frozen=True)
class Case:
    """One tiny transformers model: its config and model classes, config values and image size."""

    config_cls: str
    model_cls: str
    config: dict
    img: int = 32
    # parameter names (substrings) scaled by 1e-3 after the move: activations near LayerNorm's eps
    shrink: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> nn.Module:
        """The transformers model with every parameter moved off its init: bias tables, layer scales, class
        tokens and norms all matter to the outputs."""
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_cls)(attn_implementation="eager", **self.config)
        model = getattr(transformers, self.model_cls)(config).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                std = 1.0 if "relative_position_bias_table" in name else 0.3
                p.add_(torch.randn(p.shape, generator=g) * std)
                if any(s in name for s in self.shrink):
                    p.mul_(1e-3)
        return model

    def layers(self) -> int:
        """Attention layers the config describes."""
        return self.config.get("num_hidden_layers") or sum(self.config["depths"])

    def images(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.img, self.img, generator=torch.Generator().manual_seed(1))


_BEIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
_SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
_PVT = dict(
    image_size=32,
    hidden_sizes=[16, 32],
    depths=[2, 1],
    num_encoder_blocks=2,
    num_attention_heads=[1, 2],
    sr_ratios=[2, 1],
    patch_sizes=[7, 3],
    strides=[4, 2],
    mlp_ratios=[2, 2],
)

CASES = {
    # per-layer tables, mean pooling with the pooler's norm, a classifier
    "beit_cls": Case(
        "BeitConfig", "BeitForImageClassification", dict(_BEIT, use_relative_position_bias=True, num_labels=5)
    ),
    # shared table, absolute positions, class-token pooling, MIM heads and mask token dropped
    "beit_mim": Case(
        "BeitConfig",
        "BeitForMaskedImageModeling",
        dict(
            _BEIT,
            use_shared_relative_position_bias=True,
            use_absolute_position_embeddings=True,
            use_mean_pooling=False,
            use_mask_token=True,
        ),
    ),
    # both tables at once, no layer scale
    "beit_both": Case(
        "BeitConfig",
        "BeitModel",
        dict(
            _BEIT,
            use_relative_position_bias=True,
            use_shared_relative_position_bias=True,
            layer_scale_init_value=0.0,
        ),
    ),
    # data2vec-vision's base model: shared table, no pooler in the folder
    "data2vec": Case(
        "Data2VecVisionConfig", "Data2VecVisionModel", dict(_BEIT, use_shared_relative_position_bias=True)
    ),
    "data2vec_cls": Case(
        "Data2VecVisionConfig",
        "Data2VecVisionForImageClassification",
        dict(_BEIT, use_relative_position_bias=True, num_labels=3),
    ),
    # 16x16 then 8x8 grids in 4x4 windows, shifted every other block, a classifier
    "swin_cls": Case("SwinConfig", "SwinForImageClassification", dict(_SWIN, num_labels=5)),
    # the last stage's 7x7 grid is one unshifted window; the 7-wide grid is padded before merging
    "swin_clamped": Case("SwinConfig", "SwinModel", dict(_SWIN, image_size=28, window_size=7), img=28),
    # 10x10 and 5x5 grids padded to whole 4x4 windows, no shifted block
    "swin_padded": Case(
        "SwinConfig", "SwinModel", dict(_SWIN, image_size=40, patch_size=4, depths=[1, 1]), img=40
    ),
    # spatial reduction in stage 0, none in stage 1, a classifier
    "pvt_cls": Case("PvtV2Config", "PvtV2ForImageClassification", dict(_PVT, num_labels=5)),
    # the linear variant: keys and values pooled to 7x7, ReLU in the MLP
    "pvt_linear": Case("PvtV2Config", "PvtV2Model", dict(_PVT, linear_attention=True)),
    "pvt_nobias_eps": Case(
        "PvtV2Config",
        "PvtV2ForImageClassification",
        dict(_PVT, qkv_bias=False, layer_norm_eps=1e-5, num_labels=3),
    ),
    # segmentation: the encoder without pooler; UperNet heads and FPN dropped
    "beit_seg": Case(
        "BeitConfig",
        "BeitForSemanticSegmentation",
        dict(
            _BEIT,
            num_hidden_layers=4,
            out_indices=[0, 1, 2, 3],
            use_relative_position_bias=True,
            num_labels=3,
            auxiliary_channels=8,
            pool_scales=[1, 2],
        ),
    ),
    # SimMIM: decoder and mask token dropped
    "swin_mim": Case("SwinConfig", "SwinForMaskedImageModeling", dict(_SWIN, encoder_stride=16)),
    # token variance near 1e-5: only transformers' eps (1e-12 in BEiT's norms, 1e-6 in PVTv2's conv-fed norms)
    # gives transformers' features
    "beit_small_acts": Case(
        "BeitConfig",
        "BeitModel",
        dict(_BEIT, use_relative_position_bias=True),
        shrink=("patch_embeddings", "cls_token"),
    ),
    "pvt_small_acts": Case(
        "PvtV2Config", "PvtV2Model", _PVT, shrink=("patch_embedding.proj", "spatial_reduction")
    ),
}


def transformers_maps(model: nn.Module, x: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
    """The base model's outputs and every attention layer's map, in forward order, from transformers' eager
    attention: ``output_attentions`` (nested per stage for PVTv2), or for Swin, whose outputs hold only each
    stage's last block, what each of its attention modules returns."""
    base = getattr(model, model.base_model_prefix, model)
    swin_maps: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: swin_maps.append(out[1]))
        for m in base.modules()
        if type(m).__name__ == "SwinAttention"
    ]
    try:
        with torch.no_grad():
            out = base(x, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    if swin_maps:
        per_stage = [len(stage.blocks) for stage in base.encoder.layers]
        last = [sum(per_stage[: i + 1]) - 1 for i in range(len(per_stage))]
        assert all(torch.equal(swin_maps[i], a) for i, a in zip(last, out.attentions))
        return out, swin_maps
    maps = [a for s in out.attentions for a in (s if isinstance(s, tuple) else (s,))]
    return out, maps


def timm_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's softmax outputs, layer by layer (hooks on ``attn_drop``, fused attention off)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with torch.no_grad():
        return list(AttentionExtract(model, method="hook")(x).values())


@pytest.mark.parametrize("name", list(CASES))  # about 0.1 s of CPU each
def test_features_logits_and_maps_match_transformers(name, tmp_path):
    case = CASES[name]
    hf = case.build()
    hf.save_pretrained(tmp_path)
    model, _ = load_folder(tmp_path)
    x = case.images()
    out, hf_maps = transformers_maps(hf, x)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
    want = out.last_hidden_state
    if features.ndim == 4 and want.ndim == 3:  # Swin: timm's NHWC grid, transformers' token sequence
        features = features.flatten(1, 2)
    assert rel(features, want) <= TOL
    if getattr(out, "pooler_output", None) is not None:
        assert rel(pooled, out.pooler_output) <= TOL
    if "ForImageClassification" in case.model_cls:
        with torch.no_grad():
            assert rel(model(x), hf(x).logits) <= TOL
    maps = timm_maps(model, x)
    assert len(maps) == len(hf_maps) == case.layers()
    for i, (ours, theirs) in enumerate(zip(maps, hf_maps)):
        assert rel(ours, theirs) <= TOL, f"layer {i}"


@pytest.mark.parametrize("name", ["beit_cls", "data2vec", "swin_cls", "pvt_linear"])
def test_attnxfers_adapters_read_the_same_maps(name, tmp_path):
    """What distillation and copy read: attnxfer's adapters' explicit maps of the mapped teacher (its
    attention layers swapped in place to their family adapters) equal transformers' maps."""
    case = CASES[name]
    hf = case.build()
    hf.save_pretrained(tmp_path)
    model, _ = load_folder(tmp_path)
    x = case.images()
    _, hf_maps = transformers_maps(hf, x)
    ours = attention_maps(model, x)
    assert len(ours) == len(hf_maps) == case.layers()
    for i, theirs in enumerate(hf_maps):
        assert rel(ours[i], theirs) <= TOL, f"layer {i}"


def test_a_folder_without_a_pooler_pools_as_transformers_adds_one(tmp_path):
    """data2vec-vision's base model saves no pooler; the mapped teacher's pooled features are what
    transformers computes when it loads that folder with a pooler (its LayerNorm freshly initialised)."""
    case = CASES["data2vec"]
    case.build().save_pretrained(tmp_path)
    assert not any("pooler" in k for k in load_file(tmp_path / "model.safetensors"))
    hf = transformers.Data2VecVisionModel.from_pretrained(tmp_path, add_pooling_layer=True).eval()
    model, _ = load_folder(tmp_path)
    x = case.images()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert rel(pooled, hf(x).pooler_output) <= TOL


@pytest.mark.parametrize(
    "name, dropped",
    [
        (
            "beit_mim",
            [
                "beit.embeddings.mask_token",
                "layernorm.bias",
                "layernorm.weight",
                "lm_head.bias",
                "lm_head.weight",
            ],
        ),
        ("swin_mim", ["decoder.0.bias", "decoder.0.weight", "swin.embeddings.mask_token"]),
        ("pvt_cls", []),
        ("data2vec", []),
    ],
)
def test_pretraining_heads_are_dropped_and_reported(name, dropped, tmp_path):
    CASES[name].build().save_pretrained(tmp_path)
    assert sorted(load_folder(tmp_path)[1]) == dropped


def test_segmentation_heads_are_dropped_and_reported(tmp_path):
    CASES["beit_seg"].build().save_pretrained(tmp_path)
    dropped = load_folder(tmp_path)[1]
    heads = {k.split(".")[0] for k in load_file(tmp_path / "model.safetensors")} - {"beit"}
    assert heads == {"auxiliary_head", "decode_head", "fpn1", "fpn2"}
    assert {k.split(".")[0] for k in dropped} == heads
    assert sorted(dropped) == sorted(
        k for k in load_file(tmp_path / "model.safetensors") if not k.startswith("beit.")
    )


@pytest.mark.parametrize("name", ["beit_cls", "beit_mim", "swin_cls"])
def test_a_live_models_state_dict_maps_like_its_saved_folder(name, tmp_path):
    """transformers 5 names some modules differently in memory (q_proj, mlp.fc1, layers.N) than in the
    files it writes; both spellings give the same timm weights."""
    hf = CASES[name].build()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    module = MODULES[config["model_type"]]
    live = hf.state_dict()
    assert any("q_proj" in k for k in live)  # the in-memory spelling is really different
    saved, _ = module.timm_weights(load_file(tmp_path / "model.safetensors"), config)
    mapped, _ = module.timm_weights(live, config)
    assert saved.keys() == mapped.keys()
    assert all(torch.equal(saved[k], mapped[k]) for k in saved)


@pytest.mark.parametrize("name", ["beit_small_acts", "pvt_small_acts"])
def test_small_activations_need_transformers_eps(name, tmp_path, monkeypatch):
    """The eps handling is what makes the small-activation cases match: BEiT with timm's default eps
    (1e-6 instead of 1e-12), or PVTv2 without the conv scaling, is off by more than 1e-3."""
    case = CASES[name]
    hf = case.build()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    module = MODULES[config["model_type"]]
    arch, kwargs = module.timm_arch(config)
    if module is beit:
        kwargs.pop("norm_layer")  # timm's LayerNorm default
    else:
        monkeypatch.setattr(pvt_v2, "_CONV_NORM_EPS", config["layer_norm_eps"])  # conv scale 1
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    model.load_state_dict(module.timm_weights(load_file(tmp_path / "model.safetensors"), config)[0])
    x = case.images()
    with torch.no_grad():
        assert rel(model.forward_features(x), hf(x).last_hidden_state) > 1e-3


def _corrupt_missing(weights, config):
    name = next(k for k in sorted(weights) if k.endswith("bias"))
    del weights[name]
    return name


def _corrupt_unexpected(weights, config):
    name = next(iter(sorted(weights))).rsplit(".", 1)[0] + ".extra_scale"
    weights[name] = torch.ones(1)
    return name


def _corrupt_shape(weights, config):
    name = max(weights, key=lambda k: weights[k].numel())
    weights[name] = weights[name][:-1]
    return None


@pytest.mark.parametrize("name", ["beit_cls", "swin_cls", "pvt_cls"])
@pytest.mark.parametrize(
    "corrupt, words",
    [
        (_corrupt_missing, "missing"),
        (_corrupt_unexpected, "unexpected"),
        (_corrupt_shape, "shapes differ"),
    ],
)
def test_weights_that_do_not_fit_name_what_differs(name, corrupt, words, tmp_path):
    CASES[name].build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = load_file(tmp_path / "model.safetensors")
    culprit = corrupt(weights, config)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TeacherLoadError, match=words) as err:
        load_teacher(f"local-dir:{tmp_path}")
    msg = str(err.value)
    assert f"the weights do not fit the transformers {config['model_type']} model" in msg
    assert len(msg.splitlines()) == 1 and str(tmp_path / "model.safetensors") in msg
    assert culprit is None or re.sub(r"\.\d+\.", ".*.", culprit) in msg


def test_a_classifier_the_config_does_not_declare_is_unexpected(tmp_path):
    """A head is built from config.json's ``architectures``; classifier weights beside a base-model config
    are named, not silently loaded or dropped."""
    CASES["swin_cls"].build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["SwinModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert swin.timm_arch(config)[1]["num_classes"] == 0
    with pytest.raises(TeacherLoadError, match=r"unexpected 2 keys: classifier.bias, classifier.weight"):
        load_teacher(f"local-dir:{tmp_path}")


def test_position_index_buffers_from_older_checkpoints_are_recomputed(tmp_path):
    """Checkpoints written before the index became a non-persistent buffer carry it; timm rebuilds it."""
    for name in ("beit_cls", "swin_cls"):
        folder = tmp_path / name
        CASES[name].build().save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        module = MODULES[config["model_type"]]
        weights = load_file(folder / "model.safetensors")
        clean, _ = module.timm_weights(dict(weights), config)
        tables = [k for k in weights if k.endswith("relative_position_bias_table")]
        for k in tables:
            weights[k.replace("bias_table", "index")] = torch.zeros(4, 4, dtype=torch.long)
        state, dropped = module.timm_weights(weights, config)
        assert tables and dropped == [] and state.keys() == clean.keys()


@pytest.mark.parametrize(
    "module, config, words",
    [
        (swin, dict(_SWIN, image_size=40, patch_size=4), "pads before the cyclic shift"),
        (swin, dict(_SWIN, patch_size=4, depths=[2, 2, 2], num_heads=[2, 2, 2]), "smaller than window_size"),
        (swin, dict(_SWIN, use_absolute_embeddings=True), "no absolute position"),
        (swin, dict(_SWIN, layer_norm_eps=1e-6), "one eps for every norm"),
        (swin, dict(_SWIN, hidden_act="relu"), "exact GELU"),
        (beit, dict(_BEIT, hidden_act="gelu_new"), "exact GELU"),
        (pvt_v2, dict(_PVT, patch_sizes=[7, 5]), "kernel/stride"),
    ],
)
def test_configs_timm_cannot_rebuild_are_refused_with_the_reason(module, config, words):
    with pytest.raises(ValueError, match=words):
        module.timm_arch(config)


def test_the_refused_swin_layouts_really_compute_differently(tmp_path, monkeypatch):
    """Why the two Swin layouts are refused, measured: with the check off, a padded grid with shifted
    windows gives features off by more than 1e-2; and on a grid smaller than its window transformers' own
    forward fails."""
    case = Case("SwinConfig", "SwinModel", dict(_SWIN, image_size=40, patch_size=4), img=40)
    hf = case.build()
    hf.save_pretrained(tmp_path)
    monkeypatch.setattr(swin, "_check_windows", lambda *args: None)
    model, _ = load_folder(tmp_path)
    x = case.images()
    with torch.no_grad():
        assert rel(model.forward_features(x).flatten(1, 2), hf(x).last_hidden_state) > 1e-2
    small = Case(
        "SwinConfig", "SwinModel", dict(_SWIN, patch_size=4, depths=[2, 2, 2], num_heads=[2, 2, 2])
    ).build()
    with torch.no_grad(), pytest.raises(RuntimeError, match="must match the size"):
        small(case.images()[:, :, :32, :32])


# ------------------------------------------------------------------------------- a run from the folder

TRAIN = [
    "transfer.mode=distill",
    *tiny_run(16, 8),
    "schedule.epochs=1",
    "schedule.max_steps=2",
    "data.mean=[0.5,0.5,0.5]",  # save_pretrained writes no preprocessor_config.json: a run asks for them
    "data.std=[0.5,0.5,0.5]",
]


@pytest.mark.parametrize(
    "name", fast_cells(["beit_cls", "data2vec", "swin_cls", "pvt_cls"], keep=("data2vec",))
)
def test_attnxfer_train_distils_from_a_transformers_folder(name, tmp_path, capsys):
    folder = tmp_path / name
    CASES[name].build().save_pretrained(folder)
    run = tmp_path / "run"
    argv = ["train", f"run_dir={run}", f"teacher.spec=local-dir:{folder}", *TRAIN]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    record = json.loads((run / "run.json").read_text())
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert record["teacher"]["source_format"].startswith(f"transformers {model_type}")
    assert record["teacher"]["input_size"] == [3, CASES[name].img, CASES[name].img]  # the config's image_size
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and train[-1]["step"] == 2 and all(math.isfinite(r["total"]) for r in train)
    layers = CASES[name].layers()
    assert all(math.isfinite(train[-1][f"attn_ce/{i}"]) for i in range(layers))
