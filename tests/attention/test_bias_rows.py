"""The chunked biased CE with a `BiasRows` bias (rows gathered from a relative-position table per chunk):
value and gradients equal the CE of explicit maps (float64, the bias built whole by plain indexing), for a
biased teacher, a biased student, both, and BEiT's shared bias beside a layer's table; and nothing of
N×N size is kept for backward. Also: each adapter's rows equal timm's own full bias."""

from __future__ import annotations

import pytest
import timm
import torch

from attnxfer.models.attention import attention_layers
from attnxfer.models.attention.bias_rows import BiasRows, gathered_bias_rows
from attnxfer.transfer.losses import biased_attention_ce

B, N, D = 2, 17, 8  # 1 + 4x4 tokens; chunks of 5 rows: 4 chunks, the last one short
CHUNK = 5


def _table_case(heads: int, seed: int, requires_grad: bool):
    g = torch.Generator().manual_seed(seed)
    table = (0.5 * torch.randn(40, heads, generator=g)).requires_grad_(requires_grad)
    index = torch.randint(0, 40, (N * N,), generator=g)
    return table, index


def _explicit_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(1, H, N, N) by plain indexing, in float64."""
    return table.double()[index].reshape(N, N, -1).permute(2, 0, 1).unsqueeze(0)


def _oracle_ce(q_t, k_t, q_s, k_s, bias_t, bias_s):
    """−mean Σ_j P̄_t log P_s from both explicit maps, in float64 (teacher heads averaged in groups)."""
    z_t = (q_t.double() * q_t.shape[-1] ** -0.5) @ k_t.double().transpose(-2, -1)
    z_s = (q_s.double() * q_s.shape[-1] ** -0.5) @ k_s.double().transpose(-2, -1)
    if bias_t is not None:
        z_t = z_t + bias_t
    if bias_s is not None:
        z_s = z_s + bias_s
    p_t = z_t.softmax(-1)
    groups = q_t.shape[1] // q_s.shape[1]
    p_t = p_t.reshape(B, q_s.shape[1], groups, N, -1).mean(2)
    return -(p_t * z_s.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("case", ["teacher", "student", "both", "shared"])
def test_bias_rows_ce_and_gradients_equal_explicit_maps(case):
    g = torch.Generator().manual_seed(0)
    heads_t, heads_s = 4, 2  # teacher heads averaged in pairs
    q_t, k_t = (torch.randn(B, heads_t, N, D, generator=g) for _ in range(2))
    q_s, k_s = (torch.randn(B, heads_s, N, D, generator=g).requires_grad_() for _ in range(2))
    table_t, index_t = _table_case(heads_t, 1, False)
    table_s, index_s = _table_case(heads_s, 2, True)
    shared = (0.3 * torch.randn(heads_s, N, N, generator=g)).requires_grad_()

    rows_t = gathered_bias_rows(table_t, index_t, N) if case in ("teacher", "both", "shared") else None
    rows_s = None
    if case in ("student", "both"):
        rows_s = gathered_bias_rows(table_s, index_s, N)
    elif case == "shared":
        rows_s = gathered_bias_rows(table_s, index_s, N, extra=shared)
    got = biased_attention_ce(q_t, k_t, q_s, k_s, bias_t=rows_t, bias_s=rows_s, chunk=CHUNK)

    bias_t = _explicit_bias(table_t, index_t) if rows_t is not None else None
    bias_s = _explicit_bias(table_s, index_s) if rows_s is not None else None
    if case == "shared":
        bias_s = bias_s + shared.double().unsqueeze(0)
    want = _oracle_ce(q_t, k_t, q_s, k_s, bias_t, bias_s)
    torch.testing.assert_close(got.total.double(), want, rtol=1e-5, atol=1e-6)

    inputs = [q_s, k_s] + ([table_s] if rows_s is not None else []) + ([shared] if case == "shared" else [])
    grads = torch.autograd.grad(got.total, inputs)
    wants = torch.autograd.grad(want, inputs)
    for g_, w in zip(grads, wants):
        assert w.abs().max() > 0
        torch.testing.assert_close(g_.double(), w.double(), rtol=1e-4, atol=1e-6)


def test_nothing_n_by_n_is_kept_for_backward():
    """With a table bias on both sides, what the loss saves for backward is at most the size of q, k and
    the table: no bias, no bias gradient, no map of N×N (hooks see every saved tensor)."""
    g = torch.Generator().manual_seed(0)
    n = 65
    q_t, k_t = (torch.randn(1, 2, n, D, generator=g) for _ in range(2))
    q_s, k_s = (torch.randn(1, 2, n, D, generator=g).requires_grad_() for _ in range(2))
    table = torch.randn(40, 2, generator=g)
    index = torch.randint(0, 40, (n * n,), generator=g)
    table_s = table.clone().requires_grad_()
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ce = biased_attention_ce(
            q_t,
            k_t,
            q_s,
            k_s,
            bias_t=gathered_bias_rows(table, index, n),
            bias_s=gathered_bias_rows(table_s, index, n),
            chunk=8,
        ).total
    ce.backward()
    assert saved and max(saved) <= q_s.numel()  # dq, dk, the table's gradient
    assert table_s.grad.abs().max() > 0
    # the full-tensor form keeps (and saves) the whole gradient: the hook does see N×N there
    saved.clear()
    full = gathered_bias_rows(table_s, index, n).full().detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        biased_attention_ce(q_t, k_t, q_s, k_s, bias_s=BiasRows.of_tensor(full), chunk=8)
    assert max(saved) == 2 * n * n


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("beit_base_patch16_224", {}),
        ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
        ("vit_relpos_small_patch16_224", {}),  # RelPosMlp, no prefix token
        ("vit_relpos_medium_patch16_cls_224", {}),  # RelPosMlp, class token padded with zeros
        ("vit_relpos_medium_patch16_rpn_224", {}),  # RelPosBias
    ],
)
def test_adapter_rows_equal_timms_full_bias(arch, kwargs):
    """Each adapter's `logit_bias_rows`, chunk by chunk, is timm's own whole bias (``logit_bias``)."""
    torch.manual_seed(0)
    model = timm.create_model(
        arch, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, **kwargs
    ).eval()  # RelPosMlp has dropout inside (in training its rows fall back to the full tensor)
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name or "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.5)
    _, attn = attention_layers(model)[0]
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    q = torch.zeros(1, 2, tokens, 16)
    call = {}
    if getattr(model, "rel_pos_bias", None) is not None:  # BEiT's shared bias arrives per call
        call = dict(shared_rel_pos_bias=model.rel_pos_bias())
    elif getattr(model, "shared_rel_pos", None) is not None:
        call = dict(shared_rel_pos=model.shared_rel_pos.get_bias())
    full = attn.logit_bias(q, q, **call)
    full = full.unsqueeze(0) if full.dim() == 3 else full  # BEiT's shared bias is (H, N, N)
    rows = attn.logit_bias_rows(q, q, full, **call)
    assert isinstance(rows, BiasRows) and tuple(rows.shape) == tuple(full.shape)
    got = torch.cat([rows.rows(slice(s, s + 3)) for s in range(0, tokens, 3)], dim=-2)
    torch.testing.assert_close(got, full, rtol=0, atol=0)
