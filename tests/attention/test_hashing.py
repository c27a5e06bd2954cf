"""Hashing attention (EcoFormer-style) against its definition, its stage-1 objective and its export (its
operation counts: tests/attention/test_operation_counts.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import peaked_teacher

from attnxfer.checkpoints.export import ModelCardInfo, export_student
from attnxfer.models import capture_attention
from attnxfer.models.efficient import build_efficient_student, create_attention
from attnxfer.sources.exported_student import load_student
from attnxfer.train.measure import map_agreement
from attnxfer.train.stage1 import stage1_transfer
from attnxfer.transfer.conversion import build_conversion_plan

DIM, HEADS, N = 32, 2, 11


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


def hashing(bits: int = 8, **options):
    torch.manual_seed(0)
    return create_attention("hashing", dim=DIM, num_heads=HEADS, qkv_bias=True, bits=bits, **options).double()


def x64(batch: int = 2, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def codes_by_definition(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sign(W^T x) per head and token, +1 for a zero projection, from explicit loops."""
    B, H, n, _ = x.shape
    out = torch.empty(B, H, n, weight.shape[-1], dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                u = weight[h].T @ x[b, h, i]
                out[b, h, i] = torch.where(u >= 0, 1.0, -1.0)
    return out


def explicit_map(q, k, w_q, w_k, bits, eps):
    """A_ij = (2 * #agreeing bits + eps) / row sum: b + h_q.h_k is twice the agreeing bits."""
    h_q, h_k = codes_by_definition(q, w_q), codes_by_definition(k, w_k)
    agree = (h_q.unsqueeze(-2) == h_k.unsqueeze(-3)).sum(-1).to(q.dtype)  # (B, H, N, N)
    scores = 2 * agree + eps
    return scores / scores.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------- definition
def test_codes_are_plus_minus_one_and_the_map_is_the_definitions():
    attn = hashing().eval()
    with torch.no_grad():
        attn.hash_k.add_(0.5 * torch.randn_like(attn.hash_k))  # q and k hashed differently
    qkv = attn.project(x64())
    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    codes = attn.codes(q, "q")
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(codes, codes_by_definition(q, attn.hash_q.detach()), rtol=0, atol=0)
    a = attn.attention_map(q, k)
    ref = explicit_map(q, k, attn.hash_q.detach(), attn.hash_k.detach(), attn.bits, attn.eps)
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]), rtol=0, atol=1e-12)
    assert a.min() >= 0
    # the O(N) core equals the explicit map times v, and forward is the projection of it
    torch.testing.assert_close(attn.attend(q, k, v), ref @ v, rtol=1e-10, atol=1e-12)
    merged = (ref @ v).transpose(1, 2).reshape(2, N, DIM)
    torch.testing.assert_close(attn(x64()), attn.proj(merged), rtol=1e-10, atol=1e-12)


def test_untrained_codes_are_simhash_agreement_follows_the_angle():
    """Shared Gaussian projections: a bit agrees with probability 1 - angle / pi (Charikar's SimHash)."""
    attn = create_attention("hashing", dim=16, num_heads=1, bits=8192).double().eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 6, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 6, 16, generator=g, dtype=torch.float64)
    agree = (attn.codes(q, "q").unsqueeze(-2) == attn.codes(k, "k").unsqueeze(-3)).double().mean(-1)
    cos = torch.nn.functional.cosine_similarity(q.unsqueeze(-2), k.unsqueeze(-3), dim=-1)
    expected = 1 - torch.arccos(cos.clamp(-1, 1)) / math.pi
    torch.testing.assert_close(agree, expected, rtol=0, atol=0.03)


def test_relaxation_tends_to_the_codes_and_its_gradient_reaches_the_projections():
    attn = hashing(temperature=1e-3)
    q = attn.project(x64())["q"]
    relaxed, hard = attn.codes(q, "q", relaxed=True), attn.codes(q, "q", relaxed=False)
    assert torch.equal(relaxed.sign(), hard) and relaxed.abs().mean() > 0.98
    attn.train()
    attn(x64()).square().mean().backward()
    for p in (attn.hash_q, attn.hash_k):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # eval-mode codes are exact signs: no gradient at all, which is why stage 1 brings its own objective
    attn.zero_grad(set_to_none=True)
    attn.eval()(x64()).square().mean().backward()
    assert attn.hash_q.grad is None and attn.hash_k.grad is None


def test_fit_loss_is_the_kernelised_hashing_objective_by_hand():
    attn = hashing(bits=6, temperature=0.5, pair_fraction=0.2)
    g = torch.Generator().manual_seed(2)
    q, k, q_t, k_t = (torch.randn(1, HEADS, 10, 16, generator=g, dtype=torch.float64) for _ in range(4))
    pairs = 2  # 0.2 * 10 keys
    terms = []
    for h in range(HEADS):
        for i in range(10):
            p = torch.softmax(q_t[0, h, i] @ k_t[0, h].T / 4.0, dim=-1)
            order = torch.argsort(p)
            c_q = torch.tanh(attn.hash_q[h].T @ q[0, h, i] / (0.5 * q[0, h, i].norm()))
            for j, s in [(int(j), 1.0) for j in order[-pairs:]] + [(int(j), -1.0) for j in order[:pairs]]:
                c_k = torch.tanh(attn.hash_k[h].T @ k[0, h, j] / (0.5 * k[0, h, j].norm()))
                terms.append((c_q @ c_k / 6 - s) ** 2)
    torch.testing.assert_close(attn.fit_loss(q, k, q_t, k_t), torch.stack(terms).mean(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------- stage 1, export
def _objective(teacher, student, xs):
    values = []
    for x in xs:
        with torch.no_grad(), capture_attention(teacher, [0, 1], ("input", "q", "k")) as store:
            teacher.forward_features(x)
        for layer in (0, 1):
            attn = student.blocks[layer].attn
            own = attn.project(store[layer]["input"], "qk")
            with torch.no_grad():
                values.append(attn.fit_loss(own["q"], own["k"], store[layer]["q"], store[layer]["k"]))
    return float(torch.stack(values).mean())


def test_stage1_fits_the_hash_projections_and_lowers_objective_and_map_kl():
    teacher = peaked_teacher(depth=2, qkv_bias=True).eval().requires_grad_(False)
    student = build_efficient_student(teacher, "hashing")
    plan = build_conversion_plan(
        teacher, student, stage1_steps=30, stage1_lr=0.2, stage1_batch_size=8, stage1_train="new"
    )
    assert [layer.objective for layer in plan.layers] == ["kernelized_hashing"] * 2
    assert "objective kernelized_hashing (metric kl)" in plan.describe()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(6)]
    train, held_out = xs[:4], xs[4:]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kl_before, obj_before = map_agreement(teacher, student, held_out), _objective(teacher, student, held_out)

    def forever():
        while True:
            yield from train

    stage1_transfer(teacher, student, plan, forever(), warmup_steps=2)
    kl_after, obj_after = map_agreement(teacher, student, held_out), _objective(teacher, student, held_out)
    assert obj_after < 0.9 * obj_before, (obj_before, obj_after)
    for b, a in zip(kl_before, kl_after):  # held-out images
        assert a["value"] < 0.97 * b["value"], (b, a)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {f"blocks.{i}.attn.hash_{w}" for i in (0, 1) for w in "qk"}


def test_export_and_load_student_rebuild_it_bit_identically(tmp_path):
    teacher = peaked_teacher(depth=2, qkv_bias=True).eval()
    student = build_efficient_student(teacher, "hashing", bits=12, temperature=0.2, hash_seed=3).eval()
    with torch.no_grad():
        for blk in student.blocks:
            blk.attn.hash_q.add_(0.1 * torch.randn_like(blk.attn.hash_q))
    out = export_student(student, tmp_path / "hashing", card=ModelCardInfo(model_name="hashing-test"))
    loaded = load_student(f"local-dir:{out}").eval()
    assert [b.attn.options() for b in loaded.blocks] == [b.attn.options() for b in student.blocks]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
