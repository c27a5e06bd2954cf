"""Every registered attention, softmax included, meets the one interface (`TransferableAttention`).

For each: forward(x) == proj(norm(attend(project(x)))); an `AttentionIO` captures exactly the q/k/v the
layer used and overrides them (softmax with a teacher's q, k is SDPA(q_t, k_t, v_s), checked against the
explicit formula); row-stochastic maps have rows summing to 1; softmax's ``attention_map`` equals timm's
own `AttentionExtract` maps; frozen projections keep the layer's function; and the map-loss table
dispatches each kind to its loss (softmax's exact O(N) CE equals the chunked CE of its explicit rows).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from helpers import ZOO_GRID as GRID, ZOO_OPTIONS as OPTIONS, ZOO_PREFIX as PREFIX, ZOO_TOKENS as N, tiny_vit
from timm.layers import set_fused_attn
from timm.utils import AttentionExtract

from attnxfer.analysis.agreement import AGREEMENT_METRICS
from attnxfer.errors import InputError
from attnxfer.models import (
    AttentionIO,
    MapKind,
    TransferableAttention,
    TransferAttention,
    attention_io,
    attention_name_of,
    capture_attention,
    create_attention,
    get_attention_class,
    list_attentions,
    make_transfer_aware,
)
from attnxfer.models.efficient import EfficientAttention
from attnxfer.transfer import MapLoss, attention_distillation_loss, implicit_map_loss, map_distillation_loss
from attnxfer.transfer.map_losses import (
    MAP_LOSS_RULES,
    LayerLogits,
    agreement,
    check_map_loss,
    default_map_loss,
)

ALL = list_attentions()


def build(name: str) -> TransferableAttention:
    """A float64 layer with q/k norms and an output norm, new parameters moved off their init."""
    torch.manual_seed(0)
    attn = (
        create_attention(
            name,
            dim=32,
            num_heads=2,
            qkv_bias=True,
            qk_norm=True,
            scale_norm=True,
            norm_layer=nn.LayerNorm,
            num_prefix_tokens=PREFIX,
            grid_size=GRID,
            **OPTIONS.get(name, {}),
        )
        .double()
        .eval()
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in attn.parameters():  # LayerNorm weights 1 / biases 0 would make the norms trivial
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return attn


def inputs(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, N, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def merge(attn: TransferableAttention, core: torch.Tensor) -> torch.Tensor:
    B, _, n, _ = core.shape
    return attn.proj(attn.norm(core.transpose(1, 2).reshape(B, n, -1)))


@pytest.fixture(
    params=[n for n in ALL if n != "none"]
)  # `none` has no attention branch (zeros out): tests/families/test_convert_hier.py covers it
def name(request):
    return request.param


def test_registry_knows_every_attention_by_one_name(name):
    attn = build(name)
    cls = get_attention_class(name)
    assert isinstance(attn, cls) and isinstance(attn, TransferableAttention)
    # a family's plain name (formula) refines to the canonical "<name>:<spec>" of the built layer
    full = name if ":" not in attention_name_of(attn) else f"{name}:{attn.program}"
    assert attn.attention_name == attention_name_of(attn) == full
    assert get_attention_class(full).attention_name == full
    assert isinstance(cls.map_kind, MapKind)
    assert get_attention_class("softmax") is TransferAttention


def test_forward_is_proj_norm_attend_project(name):
    attn, x = build(name), inputs()
    qkv = attn.project(x)
    assert set(qkv) == {"q", "k", "v"} and qkv["q"].shape == (2, 2, N, 16)
    with torch.no_grad():
        expected = merge(attn, attn.attend(qkv["q"], qkv["k"], qkv["v"]))
        torch.testing.assert_close(attn(x), expected, rtol=1e-12, atol=1e-12)
    # q and k come out of the q/k norms; v does not go through one
    raw = (
        torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
        .reshape(2, N, 3, 2, 16)
        .permute(2, 0, 3, 1, 4)
    )
    torch.testing.assert_close(qkv["q"], attn.q_norm(raw[0]), rtol=0, atol=0)
    torch.testing.assert_close(qkv["k"], attn.k_norm(raw[1]), rtol=0, atol=0)
    torch.testing.assert_close(qkv["v"], raw[2], rtol=0, atol=0)


def test_a_second_io_on_a_layer_is_refused_and_the_first_holds():
    """A capture around a pair's forward (or another capture) would lose what it captures at the layers the
    inner one takes, then leave them with no io for the rest of its block."""
    attn, x = build("softmax"), inputs()
    outer = AttentionIO(capture="q")
    with torch.no_grad(), attention_io(attn, outer):
        with pytest.raises(ValueError, match="do not nest"), attention_io(attn, AttentionIO(capture="k")):
            pass
        attn(x)
    assert set(outer.captured) == {"q"} and attn.io is None


def test_attention_io_captures_what_the_layer_used_and_overrides_it(name):
    attn, x = build(name), inputs()
    io = AttentionIO(capture="qkv")
    with torch.no_grad(), attention_io(attn, io):
        y = attn(x)
    assert attn.io is None
    for c, t in attn.project(x).items():
        torch.testing.assert_close(io.captured[c], t, rtol=0, atol=0)
    # feeding the captured q/k/v back reproduces the output: they are what the layer used
    with torch.no_grad(), attention_io(attn, AttentionIO(**io.captured)):
        torch.testing.assert_close(attn(x), y, rtol=0, atol=0)
    # someone else's q and k (a teacher's): the layer attends with them over its own v
    teacher = inputs(seed=5)
    q_t, k_t = attn.project(teacher, "qk").values()
    with torch.no_grad(), attention_io(attn, AttentionIO(q=q_t, k=k_t, capture="v")) as borrowed:
        out = attn(x)
        torch.testing.assert_close(
            out, merge(attn, attn.attend(q_t, k_t, borrowed.captured["v"])), rtol=1e-12, atol=1e-12
        )
    if (
        attn.map_kind is MapKind.SOFTMAX
    ):  # attention copy: SDPA(q_t, k_t, v_s) == explicit softmax(q_t k_tᵀ/√d) v_s
        v = attn.project(x, "v")["v"]
        explicit = torch.softmax(q_t @ k_t.transpose(-2, -1) / 16**0.5, dim=-1) @ v
        torch.testing.assert_close(out, merge(attn, explicit), rtol=1e-10, atol=1e-12)


def test_attention_map_rows(name):
    attn, x = build(name), inputs()
    q, k, v = attn.project(x).values()
    with torch.no_grad():
        full = attn.attention_map(q, k)
        if not attn.map_kind.has_map:
            assert full is None
            with pytest.raises(TypeError, match="no attention map"):
                attn.attend_mapped(q, k, v)
            return
        assert full.shape == (2, 2, N, N) and full.dtype == torch.float64
        torch.testing.assert_close(
            attn.attention_map(q, k, rows=slice(3, 11)), full[:, :, 3:11], rtol=0, atol=1e-13
        )
        torch.testing.assert_close(full @ v, attn.attend_mapped(q, k, v), rtol=1e-9, atol=1e-10)
        with attention_io(attn, AttentionIO(return_map=True)) as io:
            attn(x)
        torch.testing.assert_close(io.map.double(), full, rtol=1e-5, atol=1e-6)
    if attn.map_kind.refines(MapKind.ROW_STOCHASTIC):
        torch.testing.assert_close(full.sum(-1), torch.ones_like(full[..., 0]), rtol=0, atol=1e-12)
        assert full.min() >= 0


def test_frozen_projections_keep_the_layer(name):
    attn, x = build(name), inputs()
    with torch.no_grad():
        y = attn(x)
        attn.freeze_projections("qk")
        torch.testing.assert_close(attn(x), y, rtol=0, atol=1e-13)
    trainable = {n for n, p in attn.named_parameters() if p.requires_grad}
    assert "qkv.v_weight" in trainable and not {"qkv.q_weight", "qkv.k_weight", "q_norm.weight"} & trainable


def test_softmax_attention_map_equals_timm_attention_extract():
    set_fused_attn(False)  # AttentionExtract reads the explicit softmax, which only the unfused path has
    try:
        timm_model = tiny_vit(plain_timm=True, qkv_bias=True, qk_norm=True).eval()
        x = torch.randn(2, 3, 32, 32)
        extracted = AttentionExtract(timm_model)(x)
    finally:
        set_fused_attn(True)
    ours = make_transfer_aware(copy.deepcopy(timm_model)).eval()
    with torch.no_grad(), capture_attention(ours, fields=("q", "k")) as store:
        ours.forward_features(x)
    for i, blk in enumerate(ours.blocks):
        maps = blk.attn.attention_map(store[i]["q"], store[i]["k"])
        torch.testing.assert_close(maps, extracted[f"blocks.{i}.attn.softmax"], rtol=1e-5, atol=1e-6)


def test_map_losses_dispatch_on_the_student_layers_kind():
    g = torch.Generator().manual_seed(0)
    q_t, k_t = (3 * torch.randn(2, 2, N, 16, generator=g) for _ in range(2))
    kinds = {}
    for name in ("softmax", "hedgehog", "nystrom", "hydra"):
        attn = build(name).float()
        q, k = (t.detach().requires_grad_() for t in attn.project(inputs().float(), "qk").values())
        if not attn.map_kind.has_map:
            with pytest.raises(ValueError, match="'output' loss compares attention outputs"):
                map_distillation_loss(attn, LayerLogits(q, k), LayerLogits(q_t, k_t))
            continue
        res = map_distillation_loss(attn, LayerLogits(q, k), LayerLogits(q_t, k_t))
        kinds[attn.map_kind] = next(iter(res.terms))  # the term named by the loss it took
        assert agreement(res) is not None and res.total.requires_grad
        if attn.map_kind is MapKind.SOFTMAX:  # the exact O(N) CE, equal to the chunked CE on explicit rows
            exact = attention_distillation_loss(q_t, k_t, q, k)
            torch.testing.assert_close(res.total, exact.total, rtol=0, atol=0)
            chunked = implicit_map_loss(attn, q, k, q_t, k_t, "ce", chunk=4)
            torch.testing.assert_close(res.total, chunked.total, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(agreement(res), agreement(chunked), rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(
                res.total, implicit_map_loss(attn, q, k, q_t, k_t).total, rtol=0, atol=0
            )
    assert kinds == {
        MapKind.SOFTMAX: MapLoss.CE.term,
        MapKind.ROW_STOCHASTIC: MapLoss.CE.term,
        MapKind.SIGNED: MapLoss.MSE.term,
    }


def test_a_map_loss_table_entry_is_the_whole_of_its_loss(monkeypatch):
    """A fork's new map loss is its entry in `MAP_LOSS_RULES`: the entry's row computation is what runs (an
    entry once named its loss while the rows were computed as MSE for any loss but CE). Here an entry computing
    the L1 distance, checked against the explicit maps."""

    def l1_rows(attn, q_s, k_s, teacher, start, stop):
        rows = slice(start, stop)
        p_t = (teacher.q[..., rows, :] * teacher.q.shape[-1] ** -0.5 @ teacher.k.transpose(-2, -1)).softmax(
            -1
        )
        return (attn.attention_map(q_s, k_s, rows) - p_t).abs().sum(), q_s.new_zeros(())

    key = (MapKind.ROW_STOCHASTIC, MapLoss.MSE)
    monkeypatch.setitem(MAP_LOSS_RULES, key, replace(MAP_LOSS_RULES[key], rows=l1_rows))
    attn = build("hedgehog").float()
    q, k = attn.project(inputs().float(), "qk").values()
    g = torch.Generator().manual_seed(0)
    q_t, k_t = (3 * torch.randn(2, 2, N, 16, generator=g) for _ in range(2))
    res = implicit_map_loss(attn, q, k, q_t, k_t, "mse", chunk=4)
    want = (attn.attention_map(q, k) - (q_t @ k_t.transpose(-2, -1) / 4).softmax(-1)).abs().mean()
    torch.testing.assert_close(res.total, want)
    torch.testing.assert_close(agreement(res), want)


@pytest.mark.parametrize(
    "kind, loss, why",
    [
        ("row_stochastic", "mse", r"MAP_LOSS_RULES has no rule for the two\); use 'ce' or 'output'"),
        ("signed", "mse", r"MAP_LOSS_RULES has no rule for the two\); use 'output'"),
        ("signed", "ce", r"its map has negative entries, so log A is undefined\); use 'output'"),
    ],
)
def test_a_map_loss_a_kind_has_no_rule_for_is_refused_with_that_losss_reason(kind, loss, why, monkeypatch):
    """The reason was the kind's alone: a fork's map loss that has no rule for signed maps was refused because
    'log A is undefined' (CE's reason), and one without a rule for row-stochastic maps with an empty '()'."""
    for k in ("row_stochastic", "signed"):  # a fork's table: its new loss has a rule for softmax maps alone
        monkeypatch.delitem(MAP_LOSS_RULES, (MapKind(k), MapLoss.MSE))
    with pytest.raises(
        InputError, match=rf"^map loss '{loss}' does not apply to a '{kind}' attention \({why}"
    ):
        check_map_loss(loss, kind)


def test_each_map_kinds_default_loss_has_the_measurements_metric():
    """Conversion reports and the search score each layer by its default loss's metric (`layer_agreement`):
    a new default loss's metric goes into `AGREEMENT_METRICS` too, or the report stops at its first layer."""
    for kind in MapKind:
        if kind.has_map:
            metric = default_map_loss(kind).metric
            assert metric in AGREEMENT_METRICS, f"add {metric!r} to analysis/agreement.py AGREEMENT_METRICS"


class _HeadsMerged(EfficientAttention):
    """A core that returns (B, N, H*d), which the head merge would take without a word, rows scrambled."""

    def _attend(self, q, k, v):
        return v.transpose(1, 2).flatten(2)


def test_a_core_of_the_wrong_shape_or_without_map_rows_says_what_it_misses():
    """An attention of one's own (a plug-in, which no test of this suite enumerates) whose ``_attend`` does not
    return v's (B, H, N, d) is refused rather than trained scrambled, and one that declares a map but gives no
    rows says which methods to write."""
    attn, q = _HeadsMerged(dim=32, num_heads=2), torch.randn(2, 2, N, 16)
    with pytest.raises(
        ValueError, match=r"_HeadsMerged._attend returned shape \(2, 21, 32\); it must return v's"
    ):
        attn(torch.randn(2, N, 32))
    with pytest.raises(NotImplementedError, match="map_kind 'row_stochastic' but no _map_context/_map_rows"):
        attn.attention_map(q, q)
