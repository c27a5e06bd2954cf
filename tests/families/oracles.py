"""First-principles oracles for every family's maps (never attnxfer's code).

The oracle runs timm's own modules with fused attention off and records each attention layer's softmax output
with a forward hook — on ``attn_drop`` (what `timm.utils.AttentionExtract` hooks), or, for CaiT's talking
heads, on the input of ``proj_w`` (the softmax output before the post-softmax head mixing). Twins' windowed
maps come as (B, windows, H, n, n) and are reshaped to (B·windows, H, n, n), the windows as rows of the batch.
Hiera's ``MaskUnitAttention`` has no ``attn_drop``: its maps are recomputed from the module's own ``qkv``
weights and its input, following timm's arithmetic (unrolled mask units, max-pooled queries). Swin's window
attentions are recorded in float64 (`swin_oracle_maps`). `assert_distill_matches_oracle` holds attnxfer's
distillation (CE terms and gradients) against any family's oracle maps, and the two shared-drop-path checks
hold a pair's shared masks against timm's own train-mode forward and against private draws.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import timm
import torch
import torch.nn as nn

from attnxfer.transfer import TeacherStudent, build_plan

#: timm attention classes (by class name) whose softmax output the oracle records.
ORACLE_ATTENTIONS = (
    "RelPosAttention",  # vision_transformer_relpos
    "Attention",  # vision_transformer_sam, beit, pvt_v2 (and timm.layers' plain Attention in NaFlexViT)
    "TalkingHeadAttn",  # cait
    "ClassAttn",  # cait, blocks_token_only
    "AttentionRope",  # qwen3_vit, eva's Perception Encoder
    "Gemma4Attention",  # gemma4_vit
    "EvaAttention",  # eva, naflexvit with rope
    "LocallyGroupedAttn",  # twins
    "GlobalSubSampleAttn",  # twins
    "MaskUnitAttention",  # hiera
    "WindowAttention",  # swin_transformer, swin_transformer_v2
    "WindowMultiHeadAttention",  # swin_transformer_v2_cr
)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention layer the oracle knows, in registration order."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in ORACLE_ATTENTIONS]


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


def _hook(name: str, attn: nn.Module, out: list):
    if type(attn).__name__ == "MaskUnitAttention":  # no attn_drop: recomputed from its own weights
        return attn.register_forward_pre_hook(lambda mod, args: out.append((name, hiera_map(mod, args[0]))))
    if type(attn).__name__ == "TalkingHeadAttn":  # the softmax before the post-softmax head mixing
        return attn.proj_w.register_forward_pre_hook(
            lambda mod, args: out.append((name, args[0].permute(0, 3, 1, 2)))
        )

    def post(mod, args, result, heads=attn.num_heads):
        # SAM: heads folded into the batch; Twins' windows: (B, windows, H, n, n)
        out.append((name, result.reshape(-1, heads, *result.shape[-2:])))

    return attn.attn_drop.register_forward_hook(post)


def recorded_maps(model: nn.Module) -> contextlib.AbstractContextManager[list[tuple[str, torch.Tensor]]]:
    """While active, every forward of ``model`` (run unfused) appends ``(layer name, softmax map)`` in call
    order; maps keep their graph. SAM's maps come as (B·windows·H, n, n) and Twins' as (B, windows, H, n, n):
    both are reshaped to (B·windows, H, n, n); talking-heads maps are the softmax before the post-softmax
    mixing; Hiera's are recomputed from its weights."""
    return recording(model, attention_modules(model), _hook)


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
    """One distillation step of (copies of) ``student`` from ``teacher`` on ``x`` through `TeacherStudent`, held
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
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()
    out = pair(x)
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
    for n, p in pair.student.named_parameters():
        ref = grads[n] if grads[n] is not None else torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=0, atol=tol, msg=n)
        if ref.abs().max() > 100 * tol:
            compared.add(n)
    return len(t_maps), compared


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def swin_oracle_maps(model: nn.Module, x: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
    """Each window attention's softmax maps (B·nW, H, N, N), in forward order, from timm's own unfused
    modules in float64 (Swin V2's τ up to 100 spreads logits over ±200: in fp32 maps, keys below e^-103
    underflow to 0 while their log still counts in the CE). On a float64 copy unless ``grad``: then
    ``model`` must be float64 already, and the maps' graph reaches its parameters."""
    model = model if grad else copy.deepcopy(model).double()
    maps: list[torch.Tensor] = []
    handles = []
    for m in [m for n, m in model.named_modules() if n.endswith(".attn")]:
        assert type(m).__module__.startswith("timm."), type(m)  # the oracle never runs an adapter
        m.fused_attn = False
        handles.append(m.attn_drop.register_forward_hook(lambda mod, a, out: maps.append(out)))
    with torch.no_grad() if not grad else contextlib.nullcontext():
        model(x.double())
    for h in handles:
        h.remove()
    return maps


def masked_map_ce(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """The per-layer CE from explicit maps, mean over (window, head, query) of -Σ_j P_t log P_s; keys a shift
    mask sends to exactly 0 in fp32 (exp(-100) underflows) contribute 0, without a NaN gradient."""
    p_s = p_s.double()
    log_p_s = torch.log(torch.where(p_s > 0, p_s, torch.ones_like(p_s)))
    return -(p_t.double() * log_p_s).sum(-1).mean()


def timm_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The softmax maps timm's own (unswapped, unfused) attention modules produce, in forward order, read at
    ``attn_drop`` during ``forward_features`` (EVA's and BEiT's layers: one map per layer)."""
    maps: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if name.endswith(".attn") and hasattr(module, "fused_attn"):
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out)))
    try:
        model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return maps


def assert_shared_drop_path_copy_is_timms(teacher: nn.Module, x: torch.Tensor) -> None:
    """Copy from a teacher with the student's own weights under shared drop path is timm's own train-mode
    forward of the student with the same random stream: each block applies the same draws on both sides."""
    plan = build_plan(teacher, teacher, "copy", share_drop_path=True)
    torch.manual_seed(3)
    expected = copy.deepcopy(teacher).train()(x)
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(teacher), plan).train()
    torch.manual_seed(3)
    torch.testing.assert_close(pair(x).logits, expected, rtol=1e-5, atol=1e-5)


def assert_shared_drop_path_keeps_the_maps(teacher: nn.Module, x: torch.Tensor) -> None:
    """A student equal to the teacher with drop path 0.5 in its blocks: under shared masks its maps stay the
    teacher's (KL 0), under its own draws they do not."""
    kl = {}
    for share in (True, False):
        student = copy.deepcopy(teacher)
        for blk in student.blocks:
            blk.drop_path1 = blk.drop_path2 = timm.layers.DropPath(0.5)
        torch.manual_seed(0)
        plan = build_plan(copy.deepcopy(teacher), student, "distill", share_drop_path=share)
        out = TeacherStudent(copy.deepcopy(teacher), student, plan).train()(x)
        kl[share] = max(v.abs().item() for v in out.logs.values())
    assert kl[True] < 1e-5 < 1e-3 < kl[False]
