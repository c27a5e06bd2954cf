"""`attnxfer inspect` on the hierarchical families (Swin, Swin V2, Swin V2-CR, PVTv2 with sr > 1 and its linear
variant, Twins, Hiera), against first principles.

The oracle is timm's own modules: maps recorded at ``attn_drop`` with fused attention off
(`oracles.swin_oracle_maps`, `oracles.oracle_maps`; Hiera, which has no ``attn_drop``,
recomputed from the module's own weights). Where a query row sits on the image is checked against timm's own
``window_partition`` of a rolled, padded grid (Swin) and Hiera's own ``unroll``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import card
from PIL import Image
from timm.models.swin_transformer import window_partition

from attnxfer.analysis import compare_attention, layer_qk
from attnxfer.analysis.positions import query_maps, query_points, row_positions
from attnxfer.apps.inspect.inspect import LoadedModel, write_report
from attnxfer.checkpoints import export_student
from attnxfer.launch.cli import main as cli_main
from attnxfer.models.attention.bias_rows import BiasRows
from attnxfer.sources import load_teacher

from .cases import TINY_HIER, build_hier, build_swin, swin_images
from .oracles import oracle_maps, swin_oracle_maps
from .test_inspect_flat import _build as build_flat

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # hundreds of tiny ops: one thread is faster

SWINS = ("swin", "swin_padded", "swinv2", "swinv2_cr")
OTHERS = ("pvt_v2", "pvt_v2_linear", "twins_svt", "hiera")
FAMILIES = SWINS + OTHERS

#: family -> where each layer's rows sit (`LayerGeometry.label`), read from its shapes
PARTITIONS = {
    "swin": ["16 windows"] * 2 + ["4 windows"] * 2,
    "swin_padded": ["9 windows"] * 2 + ["4 windows"] * 2,
    "pvt_v2": ["reduced keys", "reduced keys", "global"],
    "twins_svt": ["9 windows", "reduced keys", "4 windows", "global"],
    "hiera": ["4 windows"] * 3 + ["partitioned"],
}


def _models(family: str, seed: int = 0):
    if family not in SWINS:
        return build_hier(family, seed)
    model = build_swin(family, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Swin V2's τ = e^[1, 2], not up to 100: fp32 maps keep every key above underflow
        for m in model.modules():
            if isinstance(m._parameters.get("logit_scale"), torch.nn.Parameter):
                m._parameters["logit_scale"].copy_(
                    torch.rand(m._parameters["logit_scale"].shape, generator=g) + 1
                )
    return model


def _images(family: str, batch: int = 2) -> torch.Tensor:
    return swin_images(family, batch) if family in SWINS else TINY_HIER[family].images(batch)


def _oracle(family: str, model, x) -> list[torch.Tensor]:
    maps = swin_oracle_maps(model, x) if family in SWINS else oracle_maps(model, x)
    return [m.double() for m in maps]


def _kl(p, q):
    """KL(p ‖ q) per row: 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0).sum(-1)


def _js(p, q):
    m = (p + q) / 2
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def _entropy(q):
    return -torch.where(q > 0, q * q.clamp_min(1e-300).log(), 0).sum(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_metrics_of_each_layer_equal_timms_own_maps(family):
    """Per layer and head: KL, JS and entropy over each layer's own key set (windows, shift mask, padding,
    reduced keys, pooled queries) equal those of the maps timm's own modules produce; a layer's rows are
    labelled by where they sit; both images count (two batches of one)."""
    teacher, student = _models(family, 0), _models(family, 1)
    x = _images(family)
    p_all, q_all = _oracle(family, teacher, x), _oracle(family, student, x)
    insp = compare_attention(teacher, {"s": student}, [x[:1], x[1:]], chunk=3, probe_rows=5)
    rows = insp.students["s"]
    assert len(rows) == len(p_all) == len(q_all)
    if family in PARTITIONS:
        assert [t.partition for t in insp.teacher] == PARTITIONS[family]
    rel = 2e-4
    for r, p, q in zip(rows, p_all, q_all):
        assert r.metrics["kl"] == pytest.approx(_kl(p, q).mean((0, 2)).tolist(), rel=rel, abs=1e-5)
        assert r.metrics["js"] == pytest.approx(_js(p, q).mean((0, 2)).tolist(), rel=rel, abs=1e-5)
        assert r.metrics["entropy"] == pytest.approx(_entropy(q).mean((0, 2)).tolist(), rel=rel, abs=1e-5)
    assert max(max(r.metrics["kl"]) for r in rows) > 1e-2  # the two models do differ: not 0 == 0


@pytest.mark.parametrize("family", ["swin", "swinv2_cr", "pvt_v2", "twins_svt", "hiera"])
def test_a_teacher_against_itself_agrees_perfectly(family):
    teacher = _models(family, 0)
    x = _images(family, 1)
    insp = compare_attention(teacher, {"self": copy.deepcopy(teacher)}, [x], floor_images=0)
    for r in insp.students["self"]:
        assert max(r.metrics["kl"]) < 1e-6 and max(r.metrics["js"]) < 1e-6, r.name
        assert min(r.metrics["topk"]) == 1.0
        assert r.assignment["is_identity"]


def _swin_cells(block) -> torch.Tensor:
    """(windows, tokens) image cells of a Swin block's window rows, by timm's own steps on a grid of cell
    ids: roll by -shift, pad bottom/right (padding: -1), `window_partition`."""
    (h, w), (wh, ww), shift = block.input_resolution, block.window_size, block.shift_size
    ids = torch.arange(h * w, dtype=torch.float64).reshape(1, h, w, 1)
    ids = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ids = torch.nn.functional.pad(ids, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh), value=-1)
    return window_partition(ids, (wh, ww)).reshape(-1, wh * ww).long()


@pytest.mark.parametrize("family", ["swin", "swin_padded", "hiera"])
def test_query_maps_are_timms_rows_put_back_on_the_image(family):
    """The picture of a query cell is that cell's row of timm's own map, each key drawn at its image cell:
    Swin's shifted and padded windows undone (timm's ``window_partition``), Hiera's mask units and pooled
    queries through its own ``unroll``. Every key of the row is drawn (the picture's mass is the row's, 1)."""
    model = _models(family, 0)
    x = _images(family)
    oracle = _oracle(family, model, x)
    positions = row_positions(model, x)
    sigs = layer_qk(model, x)
    if family == "hiera":  # tokens in Hiera's unrolled order: sequence index -> raster cell of its grid
        grid = tuple(model.unroll.size)
        seq = model.unroll(torch.arange(grid[0] * grid[1], dtype=torch.float32).reshape(1, -1, 1))
        seq = seq.reshape(-1).long()
        cells = seq.reshape(16, 4).t()  # 4 mask units of 16 tokens (tiny Hiera: 8x8 tokens, 4x4 units)
        assert torch.equal(positions[0].keys, cells) and torch.equal(positions[0].queries, cells)
        # block 1 max-pools queries over q_stride=4 tokens of a unit: 2x2 blocks, one cell of the 4x4 grid
        assert positions[1].grid == (4, 4) and positions[1].key_grid == (8, 8)
        for u in range(4):
            for t in range(4):
                members = cells[u].reshape(4, 4)[:, t]
                r, c = members // 8, members % 8
                assert (r // 2).unique().numel() == 1 and (c // 2).unique().numel() == 1  # one 2x2 block
                assert positions[1].queries[u, t] == (r[0] // 2) * 4 + c[0] // 2
    else:
        blocks = [blk for stage in model.layers for blk in stage.blocks]
        for pos, blk in zip(positions, blocks):
            cells = _swin_cells(blk)
            assert torch.equal(pos.queries, cells) and torch.equal(pos.keys, cells)
    for sig, pos, ref in zip(sigs, positions, oracle):
        assert pos.matches(sig, x.shape[0])
        for cell, got in query_maps(sig, pos, x.shape[0], query_points(pos.grid)).items():
            w, t = (pos.queries == query_points(pos.grid)[cell]).nonzero()[0].tolist()
            row = ref.reshape(x.shape[0], pos.windows, *ref.shape[1:])[:, w, :, t]  # (B, H, N_k)
            keys = pos.keys[w]
            flat = got.reshape(*got.shape[:2], -1).double()
            want = torch.zeros_like(flat)
            want[..., keys[keys >= 0]] = row[..., keys >= 0]
            torch.testing.assert_close(flat, want, rtol=1e-4, atol=1e-5)
    assert any(p.grid != p.key_grid for p in positions) == (family == "hiera")


@pytest.fixture(scope="module")
def saved_swin(tmp_path_factory):
    root = tmp_path_factory.mktemp("swin-pair")
    for role, seed in (("teacher", 0), ("student", 1)):
        export_student(_models("swin", seed), root / role, card=card())
    return root


def test_cli_writes_pictures_per_stage(saved_swin, tmp_path):
    """`attnxfer inspect` on a tiny saved Swin pair: per-layer metrics named by stage, one query picture per
    stage (its 4 layers' windows stitched back), head matching per stage; no class-token picture (no
    layer sees the whole image)."""
    out = tmp_path / "report"
    teacher, student = f"local-dir:{saved_swin / 'teacher'}", f"local-dir:{saved_swin / 'student'}"
    args = ["inspect", teacher, student, "--data", "synthetic", "--num-images", "2", "--batch-size", "2"]
    assert cli_main([*args, "--floor-images", "1", "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    rows = data["students"]["student"]
    assert [r["stage"] for r in rows] == ["layers.0"] * 2 + ["layers.1"] * 2
    assert all(r["mean"]["kl"] > 0 for r in rows)
    files = {p.name for p in out.iterdir()}
    pictures = {"queries_student_stage0_img0.png", "queries_student_stage1_img0.png"}
    pictures |= {"heads_student_layers_0.png", "heads_student_layers_1.png"}
    assert pictures <= files and not any(f.startswith("cls_maps") for f in files)
    for name in pictures:
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
            img.verify()


@pytest.mark.parametrize(
    "family", [*(pytest.param(f, marks=pytest.mark.slow) for f in ("pvt_v2", "twins_svt")), "hiera"]
)
def test_report_pictures_per_stage_of_reduced_and_pooled_layouts(family, tmp_path):
    """`write_report` (what the CLI calls) draws one query picture per stage: PVTv2's three stages (keys on
    the reduced grids), Twins' two (local windows, then sub-sampled keys) and Hiera's four (pooled queries
    at each new grid)."""
    teacher, student = _models(family, 0), _models(family, 1)
    x = _images(family, 1)
    insp = compare_attention(teacher, {"s": student}, [x], floor_images=1)
    loaded = LoadedModel("t", teacher, "test")
    written = write_report(tmp_path, insp, loaded, {"s": LoadedModel("s", student, "test")}, x)
    stages = {"pvt_v2": 3, "twins_svt": 2, "hiera": 4}[family]
    queries = sorted(p.name for p in written if p.name.startswith("queries_"))
    assert queries == [f"queries_s_stage{k}_img0.png" for k in range(stages)]
    for name in queries:
        with Image.open(tmp_path / name) as img:
            img.verify()


def test_a_gathered_bias_is_taken_a_row_chunk_at_a_time(monkeypatch):
    """BEiT's relative-position bias is gathered from its table per chunk of query rows (`BiasRows`):
    inspect's maps equal the maps with the whole bias, and the walk never asks for more rows than a chunk."""
    teacher, student = build_flat("beit", 0), build_flat("beit", 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sig = layer_qk(teacher, x)[0]
    assert isinstance(sig.bias, BiasRows)
    whole = ((sig.q @ sig.k.transpose(-2, -1)) * sig.q.shape[-1] ** -0.5 + sig.bias.full()).softmax(-1)
    torch.testing.assert_close(sig.map_rows(slice(3, 9)), whole[:, :, 3:9])
    asked = []
    rows = BiasRows.rows
    monkeypatch.setattr(BiasRows, "rows", lambda self, r: asked.append(r.stop - r.start) or rows(self, r))
    compare_attention(teacher, {"s": student}, [x], chunk=4)
    assert asked and max(asked) <= 4


def _centres(cells: torch.Tensor, grid, image: int) -> torch.Tensor:
    pitch = (image / grid[0], image / grid[1])
    return torch.stack([(cells // grid[1] + 0.5) * pitch[0], (cells % grid[1] + 0.5) * pitch[1]], -1).double()


@pytest.mark.parametrize("family", ["swin_padded", "pvt_v2"])
def test_attention_distance_of_windowed_and_reduced_layers(family):
    """Mean attention distance (px) of a layer whose rows are windows (Swin: shifted, padded; padding keys
    and padding queries left out) or whose keys are a reduced grid (PVTv2: key cells 2x as wide): Σ_j a_ij
    d_ij over timm's own maps, each row and key at the cell timm's ``window_partition`` (or the sr conv's
    stride) puts it."""
    teacher, student = _models(family, 0), _models(family, 1)
    x = _images(family)
    size = x.shape[-1]
    q_all = _oracle(family, student, x)
    insp = compare_attention(teacher, {"s": student}, [x], chunk=5)
    if family == "swin_padded":
        blocks = [blk for stage in student.layers for blk in stage.blocks]
        cells = [(_swin_cells(b), _swin_cells(b), tuple(b.input_resolution)) for b in blocks]
        layouts = [(c, c, g, g) for c, _, g in cells]
    else:
        grids = [((8, 8), (4, 4)), ((4, 4), (2, 2)), ((2, 2), (2, 2))]  # sr 2, 2, 1
        layouts = [(torch.arange(g[0] * g[1])[None], torch.arange(k[0] * k[1])[None], g, k) for g, k in grids]
    for r, q, (qc, kc, qg, kg) in zip(insp.students["s"], q_all, layouts):
        d = torch.cdist(_centres(qc, qg, size), _centres(kc, kg, size))  # (W, N_q, N_k)
        a = q.reshape(x.shape[0], qc.shape[0], *q.shape[1:])  # (B, W, H, N_q, N_k)
        a = a * (kc >= 0)[None, :, None, None, :]
        a = a / a.sum(-1, keepdim=True)
        per_row = (a * d[None, :, None]).sum(-1)  # (B, W, H, N_q)
        rows = (qc >= 0)[None, :, None, :].expand_as(per_row)
        want = [per_row[:, :, h][rows[:, :, h]].mean().item() for h in range(q.shape[1])]
        assert r.metrics["distance"] == pytest.approx(want, rel=1e-4)


def test_a_saved_hiera_teacher_loads(tmp_path):
    """Hiera keeps a ``pos_embed`` but its stem has no ``img_size``: a saved Hiera loads as a teacher (what
    `attnxfer inspect local-dir:...` does first) and computes what it computed."""
    model = _models("hiera", 0)
    export_student(model, tmp_path / "hiera", card=card())
    loaded, record = load_teacher(f"local-dir:{tmp_path / 'hiera'}")
    x = _images("hiera", 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert not record.resampled_pos_embed


@pytest.mark.slow
def test_a_topk_of_every_key_a_window_holds_is_said_to_measure_nothing_there(capsys):
    """Below the teacher's token count but not below the keys of its windows: accepted (other layers measure
    something), and said, since in the windowed layers the top-k overlap is 1 whatever the maps."""
    teacher, x = _models("swin", 0), _images("swin", 1)
    compare_attention(teacher, {"self": copy.deepcopy(teacher)}, [x], floor_images=0, topk=60)
    assert "topk=60 is not below the" in capsys.readouterr().err


def test_a_converted_pvt_student_over_all_keys_is_refused_saying_the_teacher_pools_them():
    """A conversion drops PVTv2's key reduction: the student's rows cover every key the teacher's pool. The
    refusal told to "give the student the teacher's token layout", which no conversion can."""
    from attnxfer.analysis import NotInspectable
    from attnxfer.models.efficient import build_efficient_student

    teacher = build_hier("pvt_v2")
    student = build_efficient_student(copy.deepcopy(teacher), "relu_linear").eval()
    x = TINY_HIER["pvt_v2"].images(1)
    with pytest.raises(
        NotInspectable, match=r"attends over all \d+ keys, the teacher's layer 0 over \d+ pooled"
    ):
        compare_attention(teacher, {"student": student}, [x])
