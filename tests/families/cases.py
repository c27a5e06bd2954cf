"""The per-family case table: tiny randomly initialised timm models of every family, how to build them with
peaked maps, which oracle their maps are checked against, and what each case supports.

`CASES` maps a case name to a `Case`: several per family where the family's archs differ (per-layer or shared
tables, class token, res-post blocks, padded windows, grouped k/v heads, a linear variant). The suites in
``tests/families/test_adapters.py`` run over it; the family files' own tests take their models from it.
Adding a family: its adapter file, its row in the docs' tables, its cases here.

Models are drawn with peaked attention (q/k rows and position tables wider than timm's near-uniform init, as
trained models have), dropout off, in eval mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn

from .oracles import attention_modules, map_ce, masked_map_ce, oracle_maps, swin_oracle_maps


@dataclass(frozen=True)
class TinyFamily:
    """One tiny randomly initialised model of a timm family: the arch, its kwargs and its image size."""

    arch: str
    kwargs: dict
    img_size: int = 32

    def build(self, seed: int = 0, peaked: bool = True) -> nn.Module:
        torch.manual_seed(seed)
        model = timm.create_model(self.arch, pretrained=False, num_classes=5, **self.kwargs)
        if peaked:
            sharpen(model, seed)
        for m in model.modules():  # RelPosMlp has dropout inside its bias MLP: tiny models are deterministic
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        return model.eval()

    def images(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.img_size, self.img_size, generator=g)


def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the attention layers' projections and position tables so that the maps are peaked."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, attn in attention_modules(model):
            for name, p in attn.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if "norm" in name and leaf == "weight":
                    continue  # q/k norm gains stay at timm's init
                if "rel_pos" in name or "relative_position" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------- flat families

_SMALL = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
# Families with LayerScale get 0.5 instead of timm's 1e-5/1e-6: the attention must matter to the logits.

#: The flat families beside EVA and BEiT, each as a tiny model; several layouts per family where its archs
#: differ (shared vs per-block tables, class token, res-post blocks, padded windows).
TINY = {
    "vit": TinyFamily("vit_tiny_patch16_224", dict(img_size=32, **_SMALL)),  # timm's plain Attention
    "relpos": TinyFamily("vit_relpos_small_patch16_224", dict(img_size=32, init_values=0.5, **_SMALL)),
    "relpos_cls": TinyFamily(
        "vit_relpos_medium_patch16_cls_224", dict(img_size=32, init_values=0.5, **_SMALL)
    ),
    "srelpos": TinyFamily("vit_srelpos_small_patch16_224", dict(img_size=32, init_values=0.5, **_SMALL)),
    "relpos_rpn": TinyFamily(
        "vit_relpos_medium_patch16_rpn_224", dict(img_size=32, init_values=0.5, **_SMALL)
    ),
    # 6x6 patches in 4x4 windows: the windows are padded to 8x8, as SAM's 64x64 grid is in 14x14 windows
    "sam": TinyFamily(
        "samvit_base_patch16",
        dict(img_size=48, window_size=4, global_attn_indexes=(1,), neck_chans=16, **_SMALL),
        img_size=48,
    ),
    "cait": TinyFamily("cait_xxs24_224", dict(img_size=32, depth_token_only=1, init_values=0.5, **_SMALL)),
    "naflex": TinyFamily("naflexvit_base_patch16_gap", dict(img_size=32, init_values=0.5, **_SMALL)),
    "qwen3": TinyFamily("qwen3_vit_88m", dict(img_size=32, **_SMALL)),
    "gemma4": TinyFamily("gemma4_vit_167m", dict(img_size=32, head_dim=16, **_SMALL)),
}

# ----------------------------------------------------------------------------- EVA and BEiT

#: timm kwargs of the EVA and BEiT cases: 16 patches, two blocks.
SMALL_KW = dict(
    pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5
)

#: case -> (arch, extra kwargs): tiny random models, 16 patches
ARCHS = {
    "eva02": ("eva02_tiny_patch14_224", {}),
    "dinov3": ("vit_small_patch16_dinov3", {}),  # 4 registers, dinov3 rope, rotate-half
    "pe": ("vit_pe_core_tiny_patch16_384", {"global_pool": "avg", "ref_feat_shape": (4, 4)}),  # AttentionRope
    # separate q/k/v projections, one k/v head for two q heads (grouped-query attention)
    "pe_gqa": (
        "vit_pe_core_tiny_patch16_384",
        {"global_pool": "avg", "ref_feat_shape": (4, 4), "qkv_fused": False, "num_kv_heads": 1},
    ),
    "beit": ("beit_base_patch16_224", {}),  # per-layer relative-position tables
    "beitv2": ("beitv2_base_patch16_224", {}),
    "beit_shared": ("beit_base_patch16_224", {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The EVA or BEiT case ``name`` as timm initialises it."""
    arch, extra = ARCHS[name]
    torch.manual_seed(seed)
    return timm.create_model(arch, **{**SMALL_KW, **extra})


def peaked(model: nn.Module, seed: int = 1, head: bool = True) -> nn.Module:
    """Redraw q/k projections (std 0.4), relative-position tables (std 1), and unless ``head=False`` the v
    and output projections and the head: far-from-uniform maps, a bias and an attention branch that
    matter, as trained models have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("attn.qkv.weight"):
                rows = p.shape[0] // 3 * (3 if head else 2)
                p[:rows] = torch.randn(rows, p.shape[1], generator=g) * 0.4
            elif name.endswith(("attn.q_proj.weight", "attn.k_proj.weight")) or (
                head and name.endswith(("attn.v_proj.weight", "attn.proj.weight"))
            ):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            elif leaf == "relative_position_bias_table":
                p.copy_(torch.randn(p.shape, generator=g))
            elif head and leaf in ("gamma_1", "gamma_2", "gamma"):  # layer scale (BEiT 0.1, DINOv3 1e-5)
                p.fill_(1.0)
            elif name == "head.weight" and head:  # timm's head init is tiny: logits that show differences
                p.copy_(torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------- Swin, Swin V2, Swin V2-CR

_SWIN_BASE = dict(
    pretrained=False,
    drop_path_rate=0.0,
    window_size=4,
    depths=(2, 2),
    num_heads=(2, 4),
    embed_dim=32,
    num_classes=5,
)

#: 16x16 patches in 4x4 windows, two stages of two blocks (the second block of each stage shifted, with
#: timm's shifted-window mask), and a padded variant (10x10 patches: windows padded to 12x12, 5x5 in stage 2
#: padded to 8x8). name -> (arch, kwargs, image size)
SWINS = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2), 32),
    "swin_padded": ("swin_tiny_patch4_window7_224", dict(img_size=40, patch_size=4), 40),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2), 32),
    "swinv2_cr": ("swinv2_cr_tiny_ns_224", dict(img_size=32, patch_size=2), 32),
}


def build_swin(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny Swin model with peaked maps (q/k rows and position tables drawn wider than timm's init; Swin V2's
    per-head log scales spread over [1, 5], above timm's clamp at log 100 included). Swin V2 initialises its
    post-norm gains at 0 (the attention branch would not reach the logits): they are set to 1; dropout is
    off."""
    arch, kwargs, _ = SWINS[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**_SWIN_BASE, **kwargs, **overrides})
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in [m for n, m in model.named_modules() if n.endswith(".attn")]:
            for pname, p in m.named_parameters():
                if pname == "logit_scale":
                    p.copy_(torch.rand(p.shape, generator=g) * 4 + 1)
                elif any(t in pname for t in ("relative_position", "cpb_mlp", "meta_mlp")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() >= 2 else 0.1))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None and not m.weight.any():
                m.weight.fill_(1.0)
            if isinstance(m, nn.Dropout):  # Swin V2-CR's meta_mlp has dropout: tiny models are deterministic
                m.p = 0.0
    return model.eval()


def swin_images(name: str, batch: int = 2) -> torch.Tensor:
    size = SWINS[name][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- PVTv2, Twins, Hiera

_PVT = dict(depths=(1, 1, 1), embed_dims=(16, 16, 32), num_heads=(2, 2, 2), mlp_ratios=(2, 2, 2))
_TWINS = dict(img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(2, 2), mlp_ratios=(2, 2))

#: name -> tiny model (32 px). PVTv2, three stages: keys over the 2×/2×/1× reduced 8×8, 4×4, 2×2 grids, or the
#: linear variant's 7×7 pooling; Twins-SVT: 3×3 windows padded on an 8×8 and a 4×4 grid, then GSA (Twins-PCPVT's
#: only attention); Hiera: mask units without and with query pooling (to one query per unit), then a global block
#: with query pooling.
TINY_HIER = {
    "pvt_v2": TinyFamily("pvt_v2_b0", dict(sr_ratios=(2, 2, 1), **_PVT), img_size=32),
    "pvt_v2_linear": TinyFamily("pvt_v2_b0", dict(linear=True, **_PVT), img_size=32),
    "twins_svt": TinyFamily(
        "twins_svt_small", dict(depths=(2, 2), sr_ratios=(2, 1), wss=(3, 3), **_TWINS), img_size=32
    ),
    "hiera": TinyFamily(
        "hiera_tiny_224",
        dict(
            img_size=32,
            patch_stride=(4, 4),
            mask_unit_size=(4, 4),
            stages=(1, 1, 1, 1),
            q_pool=3,
            q_stride=(2, 2),
            mask_unit_attn=(True, True, False, False),
            embed_dim=8,
            num_heads=1,
            init_values=0.5,
        ),
        img_size=32,
    ),
}


def build_hier(name: str, seed: int = 0) -> nn.Module:
    """The tiny ``name`` model with peaked attention (q/k/v/sr weights at std 0.2; norms at timm's init)."""
    model = TINY_HIER[name].build(seed=seed, peaked=False)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, attn in attention_modules(model):
            for pname, p in attn.named_parameters():
                if "norm" in pname:
                    continue
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() >= 2 else 0.1))
        head = model.get_classifier()  # Hiera's head starts at zero: logits must depend on the attention
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.2)
    return model


def plain_vit(seed: int = 2, **overrides) -> nn.Module:
    """A plain timm ViT with the tiny families' token layout (8-px patches of a 32-px image, no prefix token,
    mean pooling), in eval mode: the student of a family teacher across families; ``overrides`` (img_size,
    patch_size, depth) give another teacher's grid."""
    torch.manual_seed(seed)
    layout = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, global_pool="avg", num_classes=5, **{**layout, **overrides}
    ).eval()


# ----------------------------------------------------------------------------- the table

_EXACT = dict(rtol=1e-5, atol=1e-6)


@dataclass(frozen=True)
class Case:
    """One tiny model of a family and how the shared suites check it.

    ``make(seed)``: the model with peaked maps (eval mode); the teacher is ``make(0)``, the student
    ``make(student_seed)``. ``oracle(model, x, grad=False)``: its maps from timm's own modules; ``ce`` the
    materialised per-layer CE of two oracle maps; the distillation's gradients are compared within
    ``distill_rel`` × the largest one (against a float64 student with ``float64_reference``); ``learns``: the
    logits' own parameters (position tables, scales) whose gradients must be among those compared. ``map_tol``:
    the tolerance of fp32 maps against the oracle's. ``copy_chunks``: copy_q/k/v of the teacher's own weights
    are checked to reproduce its logits too. ``other_size``: a second image side the case's family runs it at;
    ``size_oracle``: timm's own way to run it there (`SIZE_ORACLES`)."""

    name: str
    family: str
    make: Callable[[int], nn.Module]
    images: Callable[[int], torch.Tensor]
    student_seed: int = 1
    oracle: Callable[..., list[torch.Tensor]] = oracle_maps
    ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = map_ce
    distill_rel: float = 1e-5
    float64_reference: bool = False
    map_tol: dict = field(default_factory=lambda: dict(_EXACT))
    copy_chunks: bool = True
    learns: tuple[str, ...] = ()
    other_size: int = 48
    size_oracle: str = "filter"

    def pair(self) -> tuple[nn.Module, nn.Module, torch.Tensor]:
        """(teacher, student, images) of this case."""
        return self.make(0), self.make(self.student_seed), self.images(2)


def _eva_or_beit(name: str) -> Callable[[int], nn.Module]:
    return lambda seed: peaked(build(name, seed), seed + 1).eval()


def _eva_images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _swin_case(name: str, family: str, learns: tuple[str, ...]) -> Case:
    plain = name in ("swin", "swin_padded")
    return Case(
        name,
        family,
        lambda seed: build_swin(name, seed),
        lambda batch=2: swin_images(name, batch),
        learns=learns,
        oracle=swin_oracle_maps,
        ce=masked_map_ce,
        # fp32 vs the float64 oracle, relative to the largest gradient; τ = 100 amplifies fp32 rounding 3x more
        distill_rel=1e-5 if plain else 3e-5,
        float64_reference=True,
        # cosine attention's logits reach ±(τ + 16) with τ = 100, which fp32 rounds at ~1e-5
        map_tol=dict(_EXACT) if plain else dict(rtol=1e-3, atol=1e-4),
    )


#: case -> its family file (`attnxfer.models.attention.families.<family>`), where no builder above says it
_FAMILY_OF = {
    "vit": "vit",
    "relpos": "relpos",
    "relpos_cls": "relpos",
    "srelpos": "relpos",
    "relpos_rpn": "relpos",
    "sam": "sam",
    "cait": "cait",
    "naflex": "naflexvit",
    "qwen3": "qwen3_vit",
    "gemma4": "gemma4",
    "eva02": "eva",
    "dinov3": "eva",
    "pe": "eva",
    "pe_gqa": "eva",
    "beit": "beit",
    "beitv2": "beit",
    "beit_shared": "beit",
    "pvt_v2": "pvt_v2",
    "pvt_v2_linear": "pvt_v2",
    "twins_svt": "twins",
    "hiera": "hiera",
}

CASES: dict[str, Case] = {
    **{name: Case(name, _FAMILY_OF[name], tiny.build, tiny.images) for name, tiny in TINY.items()},
    **{
        name: Case(name, _FAMILY_OF[name], _eva_or_beit(name), _eva_images, student_seed=2, copy_chunks=False)
        for name in ARCHS
    },
    "swin": _swin_case("swin", "swin", ("attn.relative_position_bias_table",)),
    "swin_padded": _swin_case("swin_padded", "swin", ("attn.relative_position_bias_table",)),
    "swinv2": _swin_case("swinv2", "swin_v2", ("attn.logit_scale", "attn.cpb_mlp.0.weight")),
    "swinv2_cr": _swin_case("swinv2_cr", "swin_v2_cr", ("attn.logit_scale", "attn.meta_mlp.fc1.weight")),
    **{
        name: Case(
            name,
            _FAMILY_OF[name],
            lambda seed, name=name: build_hier(name, seed),
            TINY_HIER[name].images,
            # copy_q/k/v where the key set is not the queries' (reduced keys, pooled queries)
            copy_chunks=name in ("pvt_v2", "hiera"),
        )
        for name in TINY_HIER
    },
}

#: How timm itself runs a saved model at another image size, per case where it is not ``filter`` (timm's own
#: checkpoint filter resamples when ``create_model("local-dir:...", img_size=...)`` loads it):
#: ``forward`` — the model at its own size takes the other size and adapts at run time (SAM: position
#: embedding and tables resized per input; PVTv2: convolutional stems, no size argument); ``resample`` — timm
#: has no way (its filter keeps the checkpoint's position embedding): the model built at the size with the
#: position embedding resampled by timm's `resample_abs_pos_embed` (CaiT, Hiera).
SIZE_ORACLES = ("filter", "forward", "resample")
_OTHER_SIZES = {"sam": (64, "forward"), "swin_padded": (64, "filter"), "hiera": (64, "resample")}
_OTHER_SIZES |= {"cait": (48, "resample"), "pvt_v2": (48, "forward"), "pvt_v2_linear": (48, "forward")}
CASES = {
    name: dataclasses.replace(case, other_size=_OTHER_SIZES[name][0], size_oracle=_OTHER_SIZES[name][1])
    if name in _OTHER_SIZES
    else case
    for name, case in CASES.items()
}

#: Every case name, sorted (ids of the parametrised suites).
NAMES = sorted(CASES)


def cases_of(family: str) -> list[str]:
    """The names of the cases of one family file."""
    return [n for n in NAMES if CASES[n].family == family]
