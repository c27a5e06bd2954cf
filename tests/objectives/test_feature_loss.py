"""The feature-distillation loss against a hand-written reference (values and gradients), its numerics (fp32
under autocast, no gradient into the teacher), the properties its form is chosen for, and the token layout
of each family's final features read against timm's own pooling."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from attnxfer.transfer.feature_loss import feature_distill_loss, final_tokens, num_prefix_tokens

B, N, C, PREFIX = 2, 5, 6, 1

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _tokens(seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=g, dtype=dtype)


def _smooth_l1(d: float, beta: float) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def _reference(s: torch.Tensor, t: torch.Tensor, beta: float = 1.0, eps: float = 1e-6) -> dict[str, float]:
    """Token by token, channel by channel, in Python floats, from the formula in the module docstring."""
    cos, l1 = {}, {}
    for b in range(s.shape[0]):
        for n in range(s.shape[1]):
            sv, tv = s[b, n].tolist(), t[b, n].tolist()
            mu = sum(tv) / len(tv)
            sigma = math.sqrt(sum((v - mu) ** 2 for v in tv) / len(tv) + eps)
            l1[b, n] = sum(
                _smooth_l1((a - mu) / sigma - (c - mu) / sigma, beta) for a, c in zip(sv, tv)
            ) / len(tv)
            dot = sum(a * c for a, c in zip(sv, tv))
            cos[b, n] = 1.0 - dot / (math.sqrt(sum(a * a for a in sv)) * math.sqrt(sum(c * c for c in tv)))

    def mean(table, keep):
        values = [v for (b, n), v in table.items() if keep(n)]
        return sum(values) / len(values)

    every, prefix, patch = (lambda n: True), (lambda n: n < PREFIX), (lambda n: n >= PREFIX)
    return {
        "loss": mean(cos, every) + mean(l1, every),
        "feat_cos": mean(cos, every),
        "feat_smooth_l1": mean(l1, every),
        "feat_cos/prefix": mean(cos, prefix),
        "feat_cos/patch": mean(cos, patch),
        "feat_smooth_l1/prefix": mean(l1, prefix),
        "feat_smooth_l1/patch": mean(l1, patch),
    }


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_values_and_logged_terms_match_the_hand_computed_reference(beta):
    s, t = _tokens(0), _tokens(1) * 3 + 0.5
    out = feature_distill_loss(s, t, PREFIX, beta=beta)
    want = _reference(s, t, beta)
    assert out.total.item() == pytest.approx(want.pop("loss"), rel=1e-12)
    assert set(out.terms) == set(want)
    for key, value in want.items():
        assert out.terms[key].item() == pytest.approx(value, rel=1e-12), key
        assert not out.terms[key].requires_grad


def test_gradient_matches_gradcheck_and_never_reaches_the_teacher():
    s, t = _tokens(2).requires_grad_(True), _tokens(3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: feature_distill_loss(x, t, PREFIX, beta=0.5).total, (s,))
    feature_distill_loss(s, t, PREFIX).total.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_gradient_of_the_cosine_term_is_the_explicit_formula():
    """With the smooth-L1 term at its minimum (s = t), the gradient is the cosine term's alone:
    d(1 - cos)/ds = -(t/|t| - cos * s/|s|) / |s|, divided by the B*N tokens of the mean."""
    t = _tokens(4)
    s = (t * 1.0).requires_grad_(True)
    feature_distill_loss(s, t, PREFIX).total.backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-12, rtol=0)  # s = t: both terms at 0
    s = (t + 0.01 * _tokens(5)).requires_grad_(True)
    beta = 1e3  # quadratic everywhere: d/ds of 0.5 d²/beta is tiny and known; check it separately below
    feature_distill_loss(s, t, PREFIX, beta=beta).total.backward()
    sd, td = s.detach(), t
    ns, nt = sd.norm(dim=-1, keepdim=True), td.norm(dim=-1, keepdim=True)
    cos = (sd * td).sum(-1, keepdim=True) / (ns * nt)
    grad_cos = -(td / nt - cos * sd / ns) / ns
    sigma2 = td.var(-1, unbiased=False, keepdim=True) + 1e-6
    grad_l1 = (sd - td) / sigma2 / beta / C
    torch.testing.assert_close(s.grad, (grad_cos + grad_l1) / (B * N), rtol=1e-9, atol=1e-12)


def test_loss_is_fp32_under_bf16_autocast_and_equals_the_upcast_computation():
    s, t = _tokens(6, torch.float32), _tokens(7, torch.float32)
    sb, tb = s.bfloat16().requires_grad_(True), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = feature_distill_loss(sb, tb, PREFIX)
    assert out.total.dtype == torch.float32
    want = feature_distill_loss(sb.detach().float(), tb.float(), PREFIX).total
    torch.testing.assert_close(out.total, want, rtol=0, atol=0)
    out.total.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()


def test_a_huge_norm_token_counts_like_any_other():
    """Why each token is standardised by its teacher token: scaling one token of both models by 1000 (an
    artifact token of CLIP/DINOv2) leaves the loss unchanged; a plain MSE would be that token's alone."""
    s, t = _tokens(8), _tokens(9)
    scaled_s, scaled_t = s.clone(), t.clone()
    scaled_s[0, 2] *= 1000.0
    scaled_t[0, 2] *= 1000.0
    a = feature_distill_loss(s, t, PREFIX, eps=0.0)
    b = feature_distill_loss(scaled_s, scaled_t, PREFIX, eps=0.0)
    assert b.total.item() == pytest.approx(a.total.item(), rel=1e-10)
    mse_share = ((scaled_s - scaled_t)[0, 2].pow(2).sum() / (scaled_s - scaled_t).pow(2).sum()).item()
    assert mse_share > 0.999  # what a raw MSE would have looked at


def test_no_prefix_tokens_logs_no_prefix_terms_and_mismatched_shapes_are_refused():
    s, t = _tokens(10), _tokens(11)
    out = feature_distill_loss(s, t, 0)
    assert "feat_cos/prefix" not in out.terms and out.terms["feat_cos/patch"] == out.terms["feat_cos"]
    with pytest.raises(ValueError, match="same"):
        feature_distill_loss(s, t[:, 1:], 0)
    with pytest.raises(ValueError, match="num_prefix"):
        feature_distill_loss(s, t, N + 1)


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        pytest.param(
            "vit_tiny_patch16_224",
            dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, global_pool="avg"),
            id="vit",
        ),
        pytest.param(
            "swin_tiny_patch4_window7_224",
            dict(img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=7),
            id="swin-nhwc",
        ),
        pytest.param(  # a conv stem's first call costs ~2 s of CPU
            "pvt_v2_b0",
            dict(depths=(1, 1, 1, 1), embed_dims=(8, 8, 16, 16), num_heads=(1, 1, 1, 2)),
            id="pvt-nchw",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_final_tokens_are_what_timms_average_pooling_averages(arch, kwargs):
    """Each family's final-feature layout (tokens; NHWC; NCHW) read as (B, N, C): the mean of the patch
    tokens is timm's own avg-pooled pre-logits feature (ViT built with avg pooling and no fc_norm)."""
    if arch.startswith("vit"):
        kwargs["fc_norm"] = False
    size = kwargs.get("img_size", 64)  # PVTv2's conv stem takes any size
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        tokens = final_tokens(feats, model)
        pooled = model.forward_head(feats, pre_logits=True)
    prefix = num_prefix_tokens(model)
    assert tokens.ndim == 3 and tokens.shape[-1] == pooled.shape[-1]
    torch.testing.assert_close(tokens[:, prefix:].mean(1), pooled, rtol=1e-5, atol=1e-6)
    assert F.cosine_similarity(tokens[:, prefix:].mean(1), pooled).min() > 0.9999
