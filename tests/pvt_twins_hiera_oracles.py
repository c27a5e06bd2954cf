"""Tiny PVTv2, Twins and Hiera models and first-principles oracles for their maps (never attnxfer's code).

PVTv2's ``Attention`` and Twins' two attentions compute ``softmax → attn_drop`` with fused attention off: a
forward hook on ``attn_drop`` records their maps (Twins' windowed maps come as (B, windows, H, n, n) and are
reshaped to (B·windows, H, n, n), the windows as rows of the batch). Hiera's ``MaskUnitAttention`` has no
``attn_drop``: its maps are recomputed here from the module's own ``qkv`` weights and its input, following
timm's arithmetic (unrolled mask units, max-pooled queries). Models are drawn with peaked attention.
"""

from __future__ import annotations

import contextlib

import family_oracles
import torch
import torch.nn as nn
from family_oracles import TinyFamily, recording

#: timm attention classes (by class name) of these families: PVTv2's is called ``Attention``.
HIER_ATTENTIONS = ("Attention", "LocallyGroupedAttn", "GlobalSubSampleAttn", "MaskUnitAttention")

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


def build(name: str, seed: int = 0) -> nn.Module:
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


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in HIER_ATTENTIONS]


def hiera_map(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's MaskUnitAttention map for input ``x`` (B, N, C), from its own weights: (B·units, H, N_q, N_k)."""
    B, N, _ = x.shape
    H, d, qs = attn.heads, attn.head_dim, attn.q_stride
    units = N // (qs * attn.window_size) if attn.use_mask_unit_attn else 1
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, -1, units, 3, H, d).permute(3, 0, 4, 2, 1, 5)
    q, k, _ = qkv.unbind(0)  # (B, H, units, tokens, d)
    if qs > 1:
        q = q.view(B, H, units, qs, -1, d).amax(dim=3)
    p = ((q * d**-0.5) @ k.transpose(-1, -2)).softmax(dim=-1)
    return p.permute(0, 2, 1, 3, 4).reshape(B * units, H, *p.shape[-2:])


def _hier_hook(name: str, attn: nn.Module, out: list):
    if type(attn).__name__ == "MaskUnitAttention":
        return attn.register_forward_pre_hook(lambda mod, args: out.append((name, hiera_map(mod, args[0]))))

    def post(mod, args, result, heads=attn.num_heads):
        out.append((name, result.reshape(-1, heads, *result.shape[-2:])))

    return attn.attn_drop.register_forward_hook(post)


def recorded_maps(model: nn.Module) -> contextlib.AbstractContextManager[list[tuple[str, torch.Tensor]]]:
    """While active, every forward of ``model`` (fused attention off) appends ``(layer name, map)`` in call
    order; maps keep their graph."""
    return recording(model, attention_modules(model), _hier_hook)


def oracle_maps(model: nn.Module, x: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
    """Each attention layer's maps for ``x`` in forward order, from timm's own modules (on a deep copy unless
    ``grad``: then on ``model``, whose parameters the maps' graph reaches)."""
    return family_oracles.oracle_maps(model, x, grad, record=recorded_maps)
