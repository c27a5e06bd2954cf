"""Tiny timm models of the flat transformer families and first-principles oracles for their maps.

The oracle never goes through attnxfer: it runs timm's own modules with fused attention off and records
each attention layer's softmax output with a forward hook — on ``attn_drop`` (what
`timm.utils.AttentionExtract` hooks), or, for CaiT's talking heads, on the input of ``proj_w`` (the
softmax output before the post-softmax head mixing). Models are drawn with peaked attention (q/k rows
and position tables at std 0.2-0.5, as trained ViTs have, instead of timm's near-uniform init).
`assert_distill_matches_oracle` holds attnxfer's distillation (CE terms and gradients) against any family's
oracle maps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

from attnxfer.transfer import DualViT

#: timm attention classes (by class name) whose softmax output the oracle records.
ORACLE_ATTENTIONS = (
    "RelPosAttention",  # vision_transformer_relpos
    "Attention",  # vision_transformer_sam (and timm.layers' plain Attention in NaFlexViT)
    "TalkingHeadAttn",  # cait
    "ClassAttn",  # cait, blocks_token_only
    "AttentionRope",  # qwen3_vit
    "Gemma4Attention",  # gemma4_vit
    "EvaAttention",  # naflexvit with rope
)


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


_SMALL = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
# Families with LayerScale get 0.5 instead of timm's 1e-5/1e-6: the attention must matter to the logits.

#: The families h26fam adapts, each as a tiny model (name -> builder); several layouts per family where the
#: family's archs differ (shared vs per-block tables, class token, res-post blocks, padded windows).
TINY = {
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


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention layer the oracle knows, in registration order."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in ORACLE_ATTENTIONS]


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


def unfused(model: nn.Module) -> None:
    """Fused attention off everywhere in ``model``: timm then computes ``softmax → attn_drop`` explicitly."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


@contextlib.contextmanager
def recording(
    model: nn.Module, attentions: list[tuple[str, nn.Module]], hook: Callable
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """While active, ``model`` runs unfused and ``hook(name, attn, out)`` is in force for each of its
    ``attentions``: it registers (and returns the handle of) a hook that appends ``(name, map)`` to ``out``
    on every forward, in call order. The hooks come off on exit."""
    unfused(model)
    out: list[tuple[str, torch.Tensor]] = []
    handles = [hook(name, attn, out) for name, attn in attentions]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _flat_hook(name: str, attn: nn.Module, out: list):
    if type(attn).__name__ == "TalkingHeadAttn":  # the softmax before the post-softmax head mixing
        return attn.proj_w.register_forward_pre_hook(
            lambda mod, args: out.append((name, args[0].permute(0, 3, 1, 2)))
        )

    def post(mod, args, result, heads=attn.num_heads):
        p = result
        if p.dim() == 3:  # SAM: heads folded into the batch
            p = p.reshape(-1, heads, *p.shape[-2:])
        out.append((name, p))

    return attn.attn_drop.register_forward_hook(post)


def recorded_maps(model: nn.Module) -> contextlib.AbstractContextManager[list[tuple[str, torch.Tensor]]]:
    """While active, every forward of ``model`` (run unfused) appends ``(layer name, softmax map)`` in call
    order; maps keep their graph. SAM's maps come as (B·windows·H, n, n) and are reshaped to
    (B·windows, H, n, n); talking-heads maps are the softmax before the post-softmax mixing."""
    return recording(model, attention_modules(model), _flat_hook)


def oracle_maps(
    model: nn.Module, x: torch.Tensor, grad: bool = False, record: Callable = recorded_maps
) -> list[torch.Tensor]:
    """Each attention layer's softmax maps for images ``x``, in forward order, from timm's own modules
    (run on a deep copy, so ``model`` itself is untouched, except with ``grad``: then on ``model``, whose
    parameters the maps' graph reaches). ``record`` is the family's `recorded_maps`."""
    clone = model if grad else copy.deepcopy(model)
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx, record(clone) as maps:
        clone(x)
    return [m for _, m in maps]


def map_ce(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """The paper's per-layer CE from explicit maps: mean over (batch, head, query) of -Σ_j P_t log P_s."""
    return -(p_t.double() * p_s.double().log()).sum(-1).mean()


def assert_distill_matches_oracle(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    oracle: Callable[..., list[torch.Tensor]],
    *,
    ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = map_ce,
    rel: float = 1e-5,
    float64_reference: bool = False,
) -> tuple[int, set[str]]:
    """One distillation step of (copies of) ``student`` from ``teacher`` on ``x`` through `DualViT`, held
    against the materialised loss: one CE term per layer the oracle records, each equal to ``ce`` of the
    oracle's teacher and student maps, and every student gradient equal to that summed loss's (``oracle``
    run with ``grad`` on a copy of the student, in float64 with ``float64_reference``) within ``rel`` × the
    largest gradient. Gradients that are zero in exact arithmetic (a k bias, talking heads' pre-softmax
    bias: row constants of the logits) are float noise on the oracle's side, hence the absolute tolerance.
    Returns (layers, names of the parameters whose gradient was large enough to compare)."""
    ref_student = copy.deepcopy(student)
    if float64_reference:
        ref_student = ref_student.double()
    ref_student.train()
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()
    out = dual(x)
    t_maps = oracle(teacher, x)
    s_maps = oracle(ref_student, x, grad=True)
    assert set(out.terms) == {f"attn_ce/{i}" for i in range(len(t_maps))}
    ref_terms = [ce(t, s) for t, s in zip(t_maps, s_maps)]
    for i, ref in enumerate(ref_terms):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    torch.stack(ref_terms).sum().backward()
    grads = {n: p.grad for n, p in ref_student.named_parameters()}
    tol = rel * max(g.abs().max().item() for g in grads.values() if g is not None)
    compared = set()
    for n, p in dual.student.named_parameters():
        ref = grads[n] if grads[n] is not None else torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=0, atol=tol, msg=n)
        if ref.abs().max() > 100 * tol:
            compared.add(n)
    return len(t_maps), compared


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)
