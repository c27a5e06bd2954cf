"""`attnxfer inspect` on every flat adapter family: the walk's metrics against an independent oracle (the
maps timm's own unfused modules produce, read with `timm.utils.AttentionExtract` at ``attn_drop``, or for
SAM's windows and CaiT's talking heads with the hooks of `oracles`), each layer's geometry
(windows, class attention) read from its shapes, stage grouping by layer names, and the CLI end to end on
tiny EVA-02 (rope), BEiT (relative-position bias), CaiT and SAM (windows) pairs saved as local files."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from helpers import card, fast_cells
from PIL import Image
from timm.models import save_for_hf
from timm.models.naflexvit import batch_patchify
from timm.utils import AttentionExtract

from attnxfer.analysis import (
    LayerGeometry,
    LayerSignals,
    NotInspectable,
    compare_attention,
    layer_geometry,
    layer_qk,
    rollout_class_maps,
    stage_of,
    token_maps,
)
from attnxfer.apps.inspect.inspect import load_images, load_model
from attnxfer.checkpoints import export_student
from attnxfer.launch.cli import main as cli_main
from attnxfer.models.attention import attention_layers

from .cases import TINY
from .oracles import oracle_maps

_SMALL = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
#: rope and bias families by arch (the flat cases of `cases.TINY` add SAM, CaiT, NaFlexViT)
ARCHS = {"eva02": "eva02_tiny_patch14_224", "beit": "beit_base_patch16_224"}


def _build(family: str, seed: int) -> torch.nn.Module:
    if family in TINY:
        return TINY[family].build(seed)
    torch.manual_seed(seed)
    model = timm.create_model(ARCHS[family], **_SMALL)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # peaked maps and a bias that matters, as trained models have
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            elif name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _images(family: str, n: int = 3) -> torch.Tensor:
    size = TINY[family].img_size if family in TINY else 32
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def _extracted(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The softmax maps of timm's own unfused attention modules, by `timm.utils.AttentionExtract`."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    out = AttentionExtract(model, names=["*attn.attn_drop"], method="hook")(x)
    return [v.double() for v in out.values()]


def _js(p, q):
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("family", fast_cells(["eva02", "beit"], ("eva02",)))
def test_rope_and_bias_metrics_equal_timms_own_maps(family):
    """Per head: KL, JS, entropy, class-token JS and attention distance from whole maps that timm's own
    modules produce — the rope (EVA-02) or the relative-position bias (BEiT) inside them."""
    teacher, student = _build(family, 0), _build(family, 1)
    x = _images(family)
    p_all, q_all = _extracted(teacher, x), _extracted(student, x)
    insp = compare_attention(teacher, {"s": student}, [x[:2], x[2:]], chunk=4, probe_rows=17, topk=3)
    pos = torch.tensor([(r * 8.0, c * 8.0) for r in range(4) for c in range(4)], dtype=torch.float64)
    for r, t, p, q in zip(insp.students["s"], insp.teacher, p_all, q_all):
        assert t.partition == "global" and r.stage == "" and r.name.endswith(".attn")
        kl = (p * (p.log() - q.log())).sum(-1).mean((0, 2))
        ent = -(q * q.log()).sum(-1).mean((0, 2))
        cp, cq = p[:, :, 0, 1:], q[:, :, 0, 1:]
        cls_js = _js(cp / cp.sum(-1, keepdim=True), cq / cq.sum(-1, keepdim=True)).mean(0)
        pq = q[:, :, 1:, 1:]
        dist = ((pq / pq.sum(-1, keepdim=True)) * torch.cdist(pos, pos)).sum(-1).mean((0, 2))
        assert r.metrics["kl"] == pytest.approx(kl.tolist(), rel=2e-4, abs=1e-6)
        assert r.metrics["js"] == pytest.approx(_js(p, q).mean((0, 2)).tolist(), rel=2e-4, abs=1e-6)
        assert r.metrics["entropy"] == pytest.approx(ent.tolist(), rel=2e-4, abs=1e-6)
        assert r.metrics["cls_js"] == pytest.approx(cls_js.tolist(), rel=2e-4, abs=1e-6)
        assert r.metrics["distance"] == pytest.approx(dist.tolist(), rel=2e-4, abs=1e-6)
        assert min(kl.tolist()) > 1e-3  # the two models do differ: the equality is not 0 == 0


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_the_drawn_class_token_maps_and_rollout_are_timms_own_maps(family):
    """What inspect draws (and training logs) per layer and head: the class token's row of timm's own map, its
    patch keys renormalised, on the patch grid in raster order; the rollout picture: the head-averaged rollout
    (0.5 I + 0.5 A, layer on layer) of those maps. For the plain ViT timm's map is itself checked against an
    explicit softmax(q kᵀ · scale) from the first layer's weights."""
    model, x = _build(family, 0), _images(family)
    maps = _extracted(model, x)
    if family == "vit":
        block = model.blocks[0]
        tokens = block.norm1(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        b, n, c = tokens.shape
        q, k, _ = block.attn.qkv(tokens).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        explicit = (q @ k.transpose(-2, -1) * (c // 2) ** -0.5).softmax(-1)
        torch.testing.assert_close(explicit.double(), maps[0], rtol=0, atol=1e-6)
    drawn, _ = token_maps(model, x)
    rolled = None
    for layer, p in zip(drawn, maps, strict=True):
        row = p[:, :, 0, 1:]
        assert torch.allclose(
            layer.double(), (row / row.sum(-1, keepdim=True)).reshape(3, 2, 4, 4), atol=1e-6
        )
        step = 0.5 * torch.eye(17, dtype=p.dtype) + 0.5 * p.mean(1)
        rolled = step if rolled is None else step @ rolled
    want = rolled[:, 0, 1:] / rolled[:, 0, 1:].sum(-1, keepdim=True)
    assert torch.allclose(rollout_class_maps(model, x).double(), want.reshape(3, 4, 4), atol=1e-6)


#: family -> where each layer's rows sit (`LayerGeometry.label`), and whether it has a class-token row
PARTITIONS = {
    "sam": [("4 windows", False), ("global", False)],
    "cait": [("global", False), ("global", False), ("class attention", True)],
    "relpos_cls": [("global", True), ("global", True)],
    "qwen3": [("global", False), ("global", False)],
    "gemma4": [("global", False), ("global", False)],
}


@pytest.mark.parametrize("family", fast_cells(list(PARTITIONS), ("relpos_cls", "cait")))
def test_windows_class_attention_and_other_families_against_timms_maps(family):
    """SAM: a windowed layer is a batch of windows (padding keys included, as timm keeps them), compared
    row for row; CaiT: talking-heads maps before the head mixing, and the class-attention block's one row
    per head, whose class-token map is compared too; relpos (bias), Qwen3-ViT and Gemma4-ViT (rope) too."""
    teacher, student = _build(family, 0), _build(family, 1)
    x = _images(family, 2)
    p_all, q_all = oracle_maps(teacher, x), oracle_maps(student, x)
    insp = compare_attention(teacher, {"s": student}, [x], chunk=5, probe_rows=100)
    assert [t.partition for t in insp.teacher] == [part for part, _ in PARTITIONS[family]]
    for r, p, q, (_, cls) in zip(insp.students["s"], p_all, q_all, PARTITIONS[family], strict=True):
        p, q = p.double(), q.double()
        kl = (p * (p.log() - q.log())).sum(-1).mean((0, 2))
        assert r.metrics["kl"] == pytest.approx(kl.tolist(), rel=2e-4, abs=1e-6)
        assert r.metrics["js"] == pytest.approx(_js(p, q).mean((0, 2)).tolist(), rel=2e-4, abs=1e-6)
        assert ("cls_js" in r.metrics) == cls
    if family == "cait":
        cp, cq = p_all[-1][:, :, 0, 1:].double(), q_all[-1][:, :, 0, 1:].double()
        cls_js = _js(cp / cp.sum(-1, keepdim=True), cq / cq.sum(-1, keepdim=True)).mean(0)
        assert insp.students["s"][-1].metrics["cls_js"] == pytest.approx(cls_js.tolist(), rel=2e-4)
        maps, geos = token_maps(teacher, x)
        assert maps[-1].shape == (2, 2, 4, 4) and geos[-1].has_class_row  # the class-attention row
        assert maps[0].shape == (2, 2, 4, 4) and not geos[0].has_class_row  # no class token: received
    elif family == "sam":
        maps, _ = token_maps(teacher, x)
        assert maps[0] is None and maps[1].shape == (2, 2, 6, 6)  # windowed: no whole-image map


def test_naflex_and_stage_names():
    """NaFlexViT keeps its patches in ``embeds`` (no ``patch_embed``): its 4 prefix tokens and grid come
    from there; layer names group into stages wherever a family keeps its blocks."""
    teacher, student = _build("naflex", 0), _build("naflex", 1)
    x = _images("naflex", 2)
    p, q = oracle_maps(teacher, x)[0].double(), oracle_maps(student, x)[0].double()
    insp = compare_attention(teacher, {"s": student}, [x])
    assert insp.tokens == {"prefix": 4, "grid": [4, 4], "patch": [8, 8], "tokens": 20}
    assert [t.partition for t in insp.teacher] == ["global", "global"]
    kl = (p * (p.log() - q.log())).sum(-1).mean((0, 2))
    assert insp.students["s"][0].metrics["kl"] == pytest.approx(kl.tolist(), rel=2e-4, abs=1e-6)
    # the model's stage module: Swin's ``layers.0``, PVTv2's ``stages.2``, "" for a flat model's blocks
    assert [stage_of(n) for n in ("layers.0.blocks.1.attn", "stages.2.blocks.0.attn", "blocks.3.attn")] == [
        "layers.0",
        "stages.2",
        "",
    ]
    assert stage_of("blocks_token_only.0.attn") == "blocks_token_only" and stage_of("attn") == ""
    assert [t.stage for t in insp.teacher] == ["", ""]


def test_a_copy_student_borrows_the_teachers_bias():
    """A copy-mode student of a BEiT teacher attends with the teacher's q, k *and* bias: identical maps."""
    teacher = _build("beit", 0)
    x = _images("beit", 2)
    t_sig = layer_qk(teacher, x)
    assert all(s.bias is not None for s in t_sig)
    student = copy.deepcopy(teacher)
    borrowed = {i: {"q": s.q, "k": s.k, "bias": s.bias} for i, s in enumerate(t_sig)}
    for s, t in zip(layer_qk(student, x, borrowed), t_sig):
        torch.testing.assert_close(s.map_rows(), t.map_rows())
        assert s.borrowed


class _Padded(torch.nn.Module):
    """NaFlexViT in NaFlex mode on images: their patches, coordinates, and the last ``pad`` marked padding
    (what variable-size batches give), so timm builds its attention mask."""

    def __init__(self, model: torch.nn.Module, pad: int) -> None:
        super().__init__()
        self.model, self.pad = model, pad

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        patches, (gh, gw) = batch_patchify(x, (8, 8))
        b, n = patches.shape[:2]
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord = torch.stack([rows, cols], -1).reshape(1, n, 2).expand(b, n, 2)
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[:, n - self.pad :] = False
        return self.model.forward_features(patches, patch_coord=coord, patch_valid=valid)

    forward = forward_features


def test_a_padding_mask_reaches_the_maps():
    """The attention mask a model hands its attention layers (NaFlexViT's padding) is part of the logits:
    the maps equal timm's own, and padding keys get no attention."""
    model = _Padded(_build("naflex", 0), pad=5)
    x = _images("naflex", 2)
    ref = oracle_maps(model, x)
    for sig, p in zip(layer_qk(model, x), ref):
        assert sig.bias is not None and sig.bias.shape == (2, 1, 20, 20)
        torch.testing.assert_close(sig.map_rows(), p.float(), atol=1e-6, rtol=1e-5)
        assert p[:, :, :15, -5:].abs().max() == 0  # valid queries never look at padding


@pytest.fixture(scope="module")
def saved_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in ("eva02", "beit", "cait", "sam"):
        for role, seed in (("teacher", 0), ("student", 1)):
            export_student(_build(family, seed), root / family / role, card=card())
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", ["eva02", "beit", "cait", "sam"])
def test_inspect_through_the_cli_writes_metrics_and_the_pictures_of_every_layer_group(
    family, saved_pairs, tmp_path
):
    folder, out = saved_pairs / family, tmp_path / "report"
    teacher, student = f"local-dir:{folder / 'teacher'}", f"local-dir:{folder / 'student'}"
    args = ["inspect", teacher, student, "--data", "synthetic", "--num-images", "2", "--batch-size", "2"]
    assert cli_main([*args, "--floor-images", "1", "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    rows = data["students"]["student"]
    assert [r["name"] for r in rows] == [t["name"] for t in data["teacher"]]
    assert all(r["mean"]["kl"] > 0 and r["assignment"]["pairs"] for r in rows)
    files = set(p.name for p in out.iterdir())
    # CaiT's layers come in two groups by name (blocks, blocks_token_only): a picture of each
    groups = ["_blocks", "_blocks_token_only"] if family == "cait" else [""]
    pictures = {
        f"{kind}_student{g}{end}"
        for g in groups
        for kind, end in (("cls_maps", "_img0.png"), ("heads", ".png"))
    }
    assert pictures | {"curves.png", "metrics.json", "report.md"} <= files
    # rollout through whole-image self-attention with a class token: not SAM's (none), not CaiT's (none there)
    assert ("rollout_img0.png" in files) == (family in ("eva02", "beit"))
    report = (out / "report.md").read_text()
    if family == "sam":
        assert "4 windows" in report
    for name in pictures:
        Image.open(out / name).verify()


def test_a_refused_attention_is_one_clear_message(tmp_path, capsys):
    """Differential attention (signed maps) is refused by the adapter registry; its reason reaches the user
    as one ``error:`` line and exit 2, from the CLI and from the library alike."""
    kw = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=5, attn_layer="diff")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    save_for_hf(model, tmp_path / "diff", model_args=kw)
    spec = f"local-dir:{tmp_path / 'diff'}"
    args = ["inspect", spec, spec, "--data", "synthetic", "--num-images", "1", "--out", str(tmp_path / "r")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "error:" in line] == err[-1:]
    assert (
        "blocks.0.attn is DiffAttention: differential attention" in err[-1]
        and "not a distribution" in err[-1]
    )
    assert not (tmp_path / "r").exists()
    with pytest.raises(NotInspectable, match="DiffAttention: differential attention"):
        compare_attention(model, {"s": model}, [torch.randn(1, 3, 32, 32)])


def test_geometry_and_rows_of_reduced_keys_and_coarser_stages():
    """Shape-generic rows: keys over fewer tokens than queries (PVTv2's spatial reduction) give
    (B, H, rows, N_k) rows of softmax(s·q kᵀ + bias); a later stage's coarser grid (Swin, PVTv2) is read
    from the token count, with its pixel pitch; windows from the row batch."""
    attn = attention_layers(_build("eva02", 0))[0][1]  # any softmax layer: its logit scale is d^-0.5
    g = torch.Generator().manual_seed(0)
    layout = {"prefix": 0, "grid": [4, 4], "patch": [8, 8], "tokens": 16}
    q, k = (torch.randn(2, 2, n, 16, generator=g) for n in (16, 4))
    bias = torch.randn(2, 2, 1, 4, generator=g).expand(2, 2, 16, 4)
    reduced = LayerSignals("stages.0.blocks.0.attn", attn, q, k, bias)
    assert layer_geometry(reduced, 2, layout).label == "reduced keys"
    rows = reduced.map_rows(slice(3, 9))
    want = ((q[:, :, 3:9] @ k.transpose(-2, -1)) / 4 + reduced.bias[:, :, 3:9]).softmax(-1)
    torch.testing.assert_close(rows, want)
    coarse = LayerSignals("stages.1.blocks.0.attn", attn, k, k)
    assert layer_geometry(coarse, 2, layout) == LayerGeometry("global", 0, (2, 2), (16, 16))
    windows = LayerSignals("layers.0.blocks.0.attn", attn, q.repeat(4, 1, 1, 1), q.repeat(4, 1, 1, 1))
    assert layer_geometry(windows, 2, layout).label == "4 windows"


@pytest.mark.parametrize("family", ["naflex", "gemma4"])
def test_a_saved_any_size_teacher_is_inspected_at_the_size_it_was_built_at(family, tmp_path):
    """timm's save keeps NaFlexViT's and Gemma4-ViT's default input_size (384, 768 px) for a model built at
    32 px, and their patch embeddings record no size: inspect feeds 32 px images, as train does."""
    save_for_hf(TINY[family].build(), tmp_path / "t", safe_serialization=True)
    teacher = load_model(f"local-dir:{tmp_path / 't'}", role="teacher")
    assert load_images(teacher, data="synthetic", num_images=1).shape[-2:] == (32, 32)
