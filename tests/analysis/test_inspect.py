"""`attnxfer inspect` and `attnxfer.analysis`: every metric against a hand computation, the walk against
explicit maps, head permutations recovered, efficient students through their implicit maps, pictures,
copy-mode runs, TensorBoard pictures during training, and one clear error for each bad input."""

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import timm
import torch
from helpers import ONE_BLOCK_RUN, QUIET, peaked_teacher, randomize_qkv_rows, run_cli, tiny_run, tiny_vit
from PIL import Image
from safetensors.torch import save_file

from attnxfer.analysis import (
    PAIR_METRICS,
    InspectedStudent,
    attention_distance,
    attention_rollout,
    class_token_maps,
    compare_attention,
    head_assignment,
    patch_distances,
    row_entropy,
    row_js,
    row_kl,
    spearman_rows,
    topk_overlap,
)
from attnxfer.analysis.maps import token_maps
from attnxfer.analysis.pictures import (
    agreement_figure,
    class_token_figure,
    class_token_figure_size,
    curves_figure,
)
from attnxfer.apps.inspect.inspect import (
    LoadedModel,
    _copy_layers,
    _publish,
    inspect_attention,
    inspect_models,
    load_images,
    load_model,
    write_report,
)
from attnxfer.apps.inspect.report_text import agreement_sentence, render_report
from attnxfer.checkpoints.export import ModelCardInfo, export_student
from attnxfer.errors import InputError, UserError
from attnxfer.launch.cli import main as cli_main
from attnxfer.models import attention_maps, create_vit
from attnxfer.models.efficient import build_efficient_student

LN2 = math.log(2)


# ------------------------------------------------------------------------------------------- metrics by hand
def test_divergences_and_entropy_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    # KL = .5 ln(.5/.25) + .25 ln(.25/.5) + .25 ln 1 = .25 ln 2
    assert row_kl(p, q).item() == pytest.approx(0.25 * LN2, abs=1e-12)
    # m = (.375, .375, .25): JS = .5[.5 ln(.5/.375) + .25 ln(.25/.375)] + .5[.25 ln(.25/.375) + .5 ln(.5/.375)]
    js = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375)
    assert row_js(p, q).item() == pytest.approx(js, abs=1e-12)
    assert row_entropy(p).item() == pytest.approx(1.5 * LN2, abs=1e-12)
    # disjoint supports: JS is exactly ln 2, KL finite (floored) and large
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert row_js(a, b).item() == pytest.approx(LN2, abs=1e-12)
    assert 600 < row_kl(a, b).item() < 800
    assert row_kl(p, p).item() == 0 and row_js(p, p).item() == pytest.approx(0, abs=1e-15)
    # a model against its copy: fp32 softmax rows, one side laid out otherwise, are exactly 0 apart
    rows = torch.randn(2, 3, 17, 17, generator=torch.Generator().manual_seed(0)).softmax(-1)
    assert row_kl(rows, rows.transpose(-1, -2).contiguous().transpose(-1, -2)).max().item() == 0


def test_topk_overlap_and_rank_correlation_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    assert topk_overlap(p, q, 1).tolist() == [0.0, 1.0]
    assert topk_overlap(p, q, 2).tolist() == [0.5, 1.0]  # {0,1} vs {2,1}; {0,1} vs {0,1}
    assert spearman_rows(p, q).tolist() == pytest.approx([-1.0, 1.0])
    # ties (a window attention's zeros) and constant rows: scipy's definition
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.rand(6, 9, generator=g, dtype=torch.float64),
        torch.rand(6, 9, generator=g, dtype=torch.float64),
    )
    a[0, :4] = 0
    b[1, 2:6] = 0.5
    a[2] = 0.25
    with pytest.warns(scipy.stats.ConstantInputWarning):  # row 2 is constant: scipy says so, and gives NaN
        ref = [scipy.stats.spearmanr(a[i], b[i]).statistic for i in range(6)]
    ours = spearman_rows(a, b).tolist()
    assert math.isnan(ours[2]) and math.isnan(ref[2])
    assert [v for i, v in enumerate(ours) if i != 2] == pytest.approx(
        [v for i, v in enumerate(ref) if i != 2]
    )


def test_js_of_close_fp32_rows_is_not_rounding():
    """fp32 maps a little apart (a noise floor, a good student): JS near 1e-7 as float64 gives it on the same
    rows, not the ~1e-7 rounding of a difference of fp32 entropies."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 197, generator=g, dtype=torch.float64)
    p = logits.softmax(-1).float()
    q = (logits + 1e-3 * torch.randn(logits.shape, generator=g, dtype=torch.float64)).softmax(-1).float()
    p64, q64 = p.double(), q.double()
    m = 0.5 * (p64 + q64)
    exact = 0.5 * (torch.special.xlogy(p64, p64 / m) + torch.special.xlogy(q64, q64 / m)).sum(-1)
    assert exact.mean().item() < 1e-6
    assert row_js(p, q).double() == pytest.approx(exact.numpy(), rel=1e-4)


def test_attention_distance_and_rollout_by_hand():
    d = patch_distances((2, 2), (16, 16), dtype=torch.float64)  # patches at (0,0) (0,16) (16,0) (16,16) px
    assert d[0].tolist() == pytest.approx([0, 16, 16, 16 * math.sqrt(2)])
    rows = torch.tensor([[0.25, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    # row 0 renormalised to (.5, .5, 0, 0): 8 px from patch 0; row 1 from patch 1 to patch 3: 16 px
    assert attention_distance(rows, d[:2]).tolist() == pytest.approx([8.0, 16.0])
    swap = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    # one layer: .5 I + .5 swap; two layers: (.5 I + .5 S)^2 = .5 I + .5 S as well (S^2 = I)
    assert attention_rollout([swap]).tolist() == [[[0.5, 0.5], [0.5, 0.5]]]
    eye = torch.eye(2, dtype=torch.float64)[None]
    skew = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    # (.5 I + .5 skew) @ I-layer: rows (1, 0) and (.5, .5); a layer without a map (None) passes through
    assert attention_rollout([eye, None, skew]).tolist() == [[[1.0, 0.0], [0.5, 0.5]]]


def test_head_assignment_by_hand_and_fewer_student_heads():
    perm = [2, 0, 1]  # student head b is teacher head perm[b]
    cost = np.ones((3, 3))
    for b, a in enumerate(perm):
        cost[a, b] = 0.0
    res = head_assignment(cost)
    assert sorted(map(tuple, res["pairs"])) == sorted((a, b) for b, a in enumerate(perm))
    assert res["matched_cost"] == 0 and res["identity_cost"] == 1 and not res["is_identity"]
    # 4 teacher heads, 2 student heads: teacher heads 0, 3 sit nearest student head 1; 1, 2 nearest head 0
    cost = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    res = head_assignment(cost)
    assert res["tracks"] == {0: [1, 2], 1: [0, 3]}
    assert sorted(map(tuple, res["pairs"])) == [(0, 1), (1, 0)]
    # identity with groups of 2: teacher heads 0,1 -> student 0; 2,3 -> student 1
    assert res["identity_cost"] == pytest.approx((0.9 + 0.2 + 0.7 + 0.4) / 4)


# ------------------------------------------------------------------------------------------- the walk
def _explicit_reference(teacher, student, x, topk):
    """Per (layer, head) means from whole explicit maps, written out with plain torch."""
    tm, sm = attention_maps(teacher, x), attention_maps(student, x)
    out = []
    for i in range(len(teacher.blocks)):
        p, q = tm[i].double(), sm[i].double()
        kl = (p * (p.log() - q.log())).sum(-1).mean((0, 2))
        m = (p + q) / 2
        js = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean((0, 2))
        ent = -(q * q.log()).sum(-1).mean((0, 2))
        cp, cq = p[:, :, 0, 1:], q[:, :, 0, 1:]
        cp, cq = cp / cp.sum(-1, keepdim=True), cq / cq.sum(-1, keepdim=True)
        mc = (cp + cq) / 2
        cls_js = (0.5 * (cp * (cp / mc).log()).sum(-1) + 0.5 * (cq * (cq / mc).log()).sum(-1)).mean(0)
        grid = teacher.patch_embed.grid_size
        pos = torch.tensor(
            [(r * 8.0, c * 8.0) for r in range(grid[0]) for c in range(grid[1])], dtype=torch.float64
        )
        dist = torch.cdist(pos, pos)
        pq = q[:, :, 1:, 1:]
        distance = ((pq / pq.sum(-1, keepdim=True)) * dist).sum(-1).mean((0, 2))
        top_p, top_q = p.topk(topk, -1).indices, q.topk(topk, -1).indices
        overlap = (top_p[..., :, None] == top_q[..., None, :]).any(-1).sum(-1) / topk
        out.append(dict(kl=kl, js=js, entropy=ent, cls_js=cls_js, distance=distance, topk_all=overlap))
    return out


def test_walk_matches_explicit_maps_in_row_chunks():
    teacher = peaked_teacher(depth=2)
    student = randomize_qkv_rows(tiny_vit(depth=2, seed=5), range(2), "qk", seed=9)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # chunks of 4 rows over 17 tokens, two batches, probe rows = every row: nothing is seen whole
    insp = compare_attention(teacher, {"s": student}, [x[:3], x[3:]], topk=3, chunk=4, probe_rows=17)
    ref = _explicit_reference(teacher, student, x, topk=3)
    for layer, r in zip(insp.students["s"], ref):
        for key in ("kl", "js", "entropy", "cls_js", "distance"):
            assert layer.metrics[key] == pytest.approx(r[key].tolist(), rel=2e-4, abs=1e-6), key
        assert layer.metrics["topk"] == pytest.approx(r["topk_all"].mean((0, 2)).tolist(), abs=1e-6)
    assert insp.images == 5 and insp.settings["probe_rows"] == 17


def test_pair_metrics_names_every_pair_metric_compare_attention_reports():
    """A metric added in layer_sums.py (`_compare_rows`) is named in `PAIR_METRICS` too, the public list of
    what a student's layers and the teacher's noise floor are measured by (a model's own: entropy, distance)."""
    teacher, x = tiny_vit(depth=1, seed=1), torch.randn(2, 3, 32, 32)
    insp = compare_attention(teacher, {"s": tiny_vit(depth=1, seed=2)}, [x])
    said = "name each metric _compare_rows adds in PAIR_METRICS (analysis/compare.py)"
    assert set(insp.students["s"][0].metrics) == {*PAIR_METRICS, "entropy", "distance"}, said
    assert set(insp.teacher[0].floor) == set(PAIR_METRICS), said


def test_a_topk_of_every_key_is_said_to_measure_nothing(capsys):
    teacher, x = tiny_vit(depth=1, seed=1), torch.randn(2, 3, 32, 32)
    compare_attention(teacher, {"s": tiny_vit(depth=1, seed=2)}, [x], topk=16)  # 17 keys: fine
    assert "topk=" not in capsys.readouterr().err
    # every key of every row in the top k: the overlap would be 1 whatever the maps, refused before any work
    with pytest.raises(
        InputError, match=r"^topk=17 is not below the teacher's 17 tokens: choose topk \(--topk\) below 17$"
    ):
        compare_attention(teacher, {"s": tiny_vit(depth=1, seed=2)}, [x], topk=17)


def _permute_heads(model, layer, perm):
    """A copy of ``model`` whose heads in ``layer`` are reordered: new head b is old head perm[b]."""
    model = copy.deepcopy(model)
    attn = model.blocks[layer].attn
    h, d = attn.num_heads, attn.head_dim
    idx = torch.cat([torch.arange(p * d, (p + 1) * d) for p in perm])
    rows = torch.cat([idx + j * h * d for j in range(3)])
    with torch.no_grad():
        attn.qkv.weight.copy_(attn.qkv.weight[rows])
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(attn.qkv.bias[rows])
        attn.proj.weight.copy_(attn.proj.weight[:, idx])
    return model


def test_head_permutation_is_recovered_and_self_is_identity():
    teacher = peaked_teacher(depth=3, qkv_bias=True)
    perm = [2, 0, 1]
    permuted = _permute_heads(teacher, 1, perm)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the same function: only the order of the heads differs
        torch.testing.assert_close(permuted.forward_features(x), teacher.forward_features(x))
    insp = compare_attention(teacher, {"perm": permuted, "self": copy.deepcopy(teacher)}, [x], noise=0.1)
    layer = insp.students["perm"][1]
    assert sorted(map(tuple, layer.assignment["pairs"])) == sorted((a, b) for b, a in enumerate(perm))
    assert layer.assignment["matched_cost"] < 1e-6 < 1e-3 < layer.assignment["identity_cost"]
    assert not layer.assignment["is_identity"]
    for rows in (insp.students["self"], [insp.students["perm"][0], insp.students["perm"][2]]):
        for r in rows:
            assert max(r.metrics["kl"]) < 1e-5 and max(r.metrics["js"]) < 1e-6
            assert min(r.metrics["topk"]) == 1.0 and min(r.metrics["spearman"]) > 0.9999
            assert r.assignment["is_identity"] and r.assignment["matched_cost"] < 1e-6
    # the floor is above zero (noise moves the maps) and far below an unrelated student
    floor = insp.teacher[1].mean["floor_js"]
    assert 0 < floor < layer.mean["js"]


def test_efficient_student_through_its_implicit_maps():
    teacher = peaked_teacher(depth=2)
    student = build_efficient_student(teacher, "hedgehog")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    insp = compare_attention(teacher, {"hedgehog": student}, [x], chunk=5, probe_rows=17)
    explicit = attention_maps(student, x)  # the layer's explicit attention_map, whole
    t_maps = attention_maps(teacher, x)
    for i, r in enumerate(insp.students["hedgehog"]):
        assert r.attention == "hedgehog" and r.map_kind == "row_stochastic"
        kl = row_kl(t_maps[i].double(), explicit[i].double()).mean((0, 2))
        assert r.metrics["kl"] == pytest.approx(kl.tolist(), rel=1e-4, abs=1e-6)
        assert r.mean["js"] > 0
    hydra = build_efficient_student(teacher, "hydra")  # no map at all: said, not measured
    rows = compare_attention(teacher, {"hydra": hydra}, [x]).students["hydra"]
    assert all(not r.metrics and "no attention map" in r.note for r in rows)
    # a block without attention (``none``) runs no q/k: it is said and the blocks after it still line up
    mixed = build_efficient_student(teacher, ["none", "hedgehog"])
    rows = compare_attention(teacher, {"mixed": mixed}, [x], chunk=5, probe_rows=17).students["mixed"]
    assert not rows[0].metrics and "no attention map" in rows[0].note
    assert rows[1].attention == "hedgehog" and rows[1].mean["js"] > 0
    maps = class_token_maps(mixed, x)
    assert maps[0] is None and maps[1].shape == (3, 3, 4, 4)


def test_a_teacher_with_signed_maps_is_said_to_be_clipped_before_comparing():
    """A converted model given as the teacher (Nystrom's maps go negative): its rows are clipped at 0 and
    renormalised to be compared, which its layers' table says, as a student's does."""
    teacher = build_efficient_student(peaked_teacher(depth=2), "nystrom", num_landmarks=8)
    insp = compare_attention(teacher, {"s": tiny_vit(depth=2, seed=7)}, [torch.randn(2, 3, 32, 32)])
    assert all("rows clipped at 0 and renormalised" in t.note for t in insp.teacher)
    report = render_report(insp, "t", {"s": "s"})
    assert "- teacher layers 0, 1: signed map: rows clipped at 0 and renormalised before comparing" in report
    plain = compare_attention(
        peaked_teacher(depth=2), {"s": tiny_vit(depth=2, seed=7)}, [torch.randn(2, 3, 32, 32)]
    )
    assert not any(t.note for t in plain.teacher)


def test_grouped_teacher_heads_and_fewer_student_heads():
    teacher = peaked_teacher(depth=2, num_heads=6, embed_dim=48)
    student = tiny_vit(depth=2, num_heads=3, embed_dim=48, seed=4)
    x = torch.randn(2, 3, 32, 32)
    rows = compare_attention(teacher, {"s": student}, [x]).students["s"]
    for r in rows:
        assert len(r.metrics["kl"]) == 3 and len(r.js_cost) == 6 and len(r.js_cost[0]) == 3
        tracked = sorted(a for heads in r.assignment["tracks"].values() for a in heads)
        assert tracked == list(range(6))  # every teacher head is tracked by exactly one student head


def test_agreement_sentence_reads_ratios_below_the_floor():
    """A student closer than the noise floor reads e.g. "0.31x the floor", never "0x"."""
    teacher = peaked_teacher(depth=2)
    near = copy.deepcopy(teacher)
    with torch.no_grad():
        for block in near.blocks:
            block.attn.qkv.weight.add_(1e-3 * torch.randn_like(block.attn.qkv.weight))
    insp = inspect_models(teacher, {"near": near}, torch.randn(4, 3, 32, 32), noise=0.5)
    floor = sum(t.mean["floor_js"] for t in insp.teacher) / len(insp.teacher)
    js = sum(r.mean["js"] for r in insp.students["near"]) / len(insp.students["near"])
    assert 0 < js < floor / 10
    sentence = agreement_sentence(insp)
    assert f"({js / floor:.2g}x the floor)" in sentence and "(0x the floor)" not in sentence
    assert f"gives JS {floor:.3g} (the floor)" in sentence and f"mean JS {js:.3g} (" in sentence  # not 0.000


# ------------------------------------------------------------------------------------------- pictures and reports
def test_report_files_and_picture_sizes(tmp_path):
    teacher = peaked_teacher(depth=2)
    students = {"a": tiny_vit(depth=2, seed=7), "b": copy.deepcopy(teacher)}
    x = torch.randn(3, 3, 32, 32)
    insp = inspect_models(teacher, students, x, batch_size=2)
    wrap = lambda m, name: LoadedModel(name, m, "test", mean=(0.5,) * 3, std=(0.5,) * 3)
    files = write_report(
        tmp_path, insp, wrap(teacher, "t"), {n: wrap(m, n) for n, m in students.items()}, x, picture_images=2
    )
    pngs = sorted(p.name for p in files if p.suffix == ".png")
    # class-token grids per student and picture image, head matching per student, one rollout per picture
    # image, the curves
    assert pngs == sorted(
        ["cls_maps_a_img0.png", "cls_maps_a_img1.png", "cls_maps_b_img0.png", "cls_maps_b_img1.png"]
        + ["heads_a.png", "heads_b.png", "rollout_img0.png", "rollout_img1.png", "curves.png"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*pngs, "metrics.json", "report.md"])
    assert Image.open(tmp_path / "cls_maps_a_img0.png").size == class_token_figure_size(2, 3 + 1 + 3)
    assert Image.open(tmp_path / "rollout_img0.png").size == (800, 230)  # 4 panels: image, teacher, a, b
    assert Image.open(tmp_path / "curves.png").size == (1600, 360)
    for figure in (curves_figure(insp), agreement_figure(insp)):  # layers are whole: no tick at layer 0.2
        figure.canvas.draw()
        assert all(float(t).is_integer() for ax in figure.axes for t in ax.get_xticks()), figure
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["specs"]["students"] == {"a": "a", "b": "b"} and len(data["teacher"]) == 2
    assert [len(data["students"][n]) for n in ("a", "b")] == [2, 2]
    report = (tmp_path / "report.md").read_text()
    assert "Head correspondence" in report
    # divergences in significant digits: a good student's and the floor are far below a thousandth (0.0000)
    floors = [f"{t.mean['floor_js']:.3g}" for t in insp.teacher]
    assert all(f" | {f} | " in report for f in floors) and "| 0 | 0 | 1.00 | 1.00 | 0 |" in report, report


def test_a_shallower_students_layers_are_drawn_beside_the_teacher_layers_they_are_compared_with(tmp_path):
    """A 2-block student of a 4-block teacher is compared at teacher layers 0 and 3: its class-token maps sat
    beside the teacher's layers 0 and 1 (and two empty rows), its curves at layers 0 and 1."""
    teacher, student = peaked_teacher(depth=4), tiny_vit(depth=2, seed=7)
    x = torch.randn(1, 3, 32, 32)
    insp = inspect_models(teacher, {"shallow": student}, x)
    assert [(r.layer, r.teacher_layer) for r in insp.students["shallow"]] == [(0, 0), (1, 3)]
    wrap = lambda m, name: LoadedModel(name, m, "test", mean=(0.5,) * 3, std=(0.5,) * 3)
    write_report(
        tmp_path, insp, wrap(teacher, "t"), {"shallow": wrap(student, "shallow")}, x, picture_images=1
    )
    assert Image.open(tmp_path / "cls_maps_shallow_img0.png").size == class_token_figure_size(2, 3 + 1 + 3)
    figure = curves_figure(insp)
    js = figure.axes[1].lines[1]  # after the teacher's floor
    assert js.get_label() == "shallow" and list(js.get_xdata()) == [0, 3]


# ------------------------------------------------------------------------------------------- runs and the CLI
@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    """A micro teacher (exported), a second one, and a 2-step copy-mode run on animal-mnist with TensorBoard."""
    root = tmp_path_factory.mktemp("inspect")
    for name, seed in (("teacher", 0), ("other", 1)):
        torch.manual_seed(seed)
        t = randomize_qkv_rows(
            create_vit("vit_micro_patch4_28", num_classes=10, depth=2, embed_dim=48), range(2)
        )
        export_student(t, root / name, card=ModelCardInfo(model_name=name, license="apache-2.0"))
    code = cli_main(
        [
            "train",
            f"run_dir={root / 'copy'}",
            "model.name=vit_micro_patch4_28",
            "model.kwargs={depth: 2, embed_dim: 48}",
            "data.batch_size=32",
            "log.progress=false",
            "schedule.max_steps=2",
            "schedule.epochs=1",
            "transfer.mode=copy",
            f"teacher.spec=local-dir:{root / 'teacher'}",
            "checkpoint.every_epoch=false",
            "log.attention_images=2",
        ]
    )
    assert code == 0
    return root


@pytest.mark.slow
def test_training_writes_class_token_pictures_to_tensorboard(copy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(copy_run / "copy" / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["attention/cls_maps_0", "attention/cls_maps_1"]
    image = events.Images("attention/cls_maps_0")[-1]
    # 2 layers x (3 teacher heads + gap + 3 student heads) panels
    assert (image.width, image.height) == class_token_figure_size(2, 7) and image.step == 2


@pytest.mark.slow
def test_a_run_folder_alone_is_compared_with_the_teacher_it_was_trained_from(copy_run, tmp_path, capsys):
    """`attnxfer inspect RUN`: TEACHER is the one its run.json records, which a copy student needs (another
    teacher is refused) and with which its maps are the teacher's own."""
    out = tmp_path / "report"
    args = ["--data", "animal_mnist", "--num-images", "6", "--out", str(out)]
    assert cli_main(["inspect", str(copy_run / "copy"), *args]) == 0, capsys.readouterr().err[-3000:]
    said = capsys.readouterr().out
    assert f"compared with the teacher it was trained from, local-dir:{copy_run / 'teacher'}" in said
    for r in json.loads((out / "metrics.json").read_text())["students"]["copy"]:
        assert r["borrowed"] == "qk" and r["mean"]["js"] < 1e-6


def test_inspect_given_one_folder_that_records_no_teacher_asks_for_both(trained, tmp_path, capsys):
    assert cli_main(["inspect", str(trained)]) == 2
    assert (
        f"{trained} was trained without a teacher; inspect compares a STUDENT with a TEACHER: give both, "
        in (capsys.readouterr().err)
    )
    # an MAE pre-training has no student to compare: its encoder is given as the teacher of one
    mae = tmp_path / "mae"
    shutil.copytree(trained, mae)
    (mae / "run.json").write_text(
        json.dumps({**json.loads((mae / "run.json").read_text()), "objective": "mae"})
    )
    assert cli_main(["inspect", str(mae)]) == 2
    assert f"give it as the TEACHER, attnxfer inspect {mae / 'export'} STUDENT" in capsys.readouterr().err
    assert cli_main(["inspect", "vit_micro_patch4_28"]) == 2
    err = capsys.readouterr().err
    assert "give both, attnxfer inspect TEACHER vit_micro_patch4_28 (a run's folder alone is compared" in err
    # a teacher's spec or an export alone: a model (it exists), not a missing folder to give as the student
    (export := tmp_path / "export").mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    for model in (f"local-dir:{export}", str(export)):
        assert cli_main(["inspect", model]) == 2
        err = capsys.readouterr().err
        assert (
            f"{model} is a model, not a run's folder: inspect compares a STUDENT with a TEACHER, so give both, "
            in err
        )
        assert "does not exist" not in err


@pytest.mark.slow
def test_copy_run_through_the_cli_and_without_its_teacher(copy_run, tmp_path, capsys):
    out = tmp_path / "report"
    code = cli_main(
        [
            "inspect",
            f"local-dir:{copy_run / 'teacher'}",
            str(copy_run / "copy"),
            "--data",
            "animal_mnist",
            "--num-images",
            "6",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    data = json.loads((out / "metrics.json").read_text())
    for r in data["students"]["copy"]:  # a copy student attends with the teacher's maps: no divergence
        assert r["borrowed"] == "qk" and r["mean"]["js"] < 1e-6 and r["assignment"]["is_identity"]
    before = (out / "metrics.json").read_bytes()
    teacher, run = f"local-dir:{copy_run / 'teacher'}", str(copy_run / "copy")
    assert cli_main(["inspect", teacher, run, "--data", "animal_mnist", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before  # nothing saved is overwritten
    other = f"local-dir:{copy_run / 'other'}"
    assert cli_main(["inspect", other, run, "--data", "animal_mnist", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "copy-mode student trained with teacher" in err and "pass that teacher" in err
    with pytest.raises(ValueError, match="can only be inspected with that teacher"):
        load_model(str(copy_run / "copy"))
    # a run folder holds trained weights, as an export does: never compared as if random
    assert (
        cli_main(["inspect", "vit_micro_patch4_28", run, "--random-weights", "--out", str(tmp_path / "y")])
        == 2
    )
    assert f"--random-weights is for timm names; {run} holds trained weights" in capsys.readouterr().err


@pytest.mark.slow
def test_a_student_trained_on_other_statistics_is_warned_of_and_one_on_the_teachers_is_not(
    copy_run, tmp_path, capsys
):
    """inspect gives every model the teacher's normalisation: a run trained with its own data.mean/data.std
    (its maps measured on inputs it never saw) is named with both statistics; the copy run, normalised the
    teacher's way as a run is by default, draws no such line, nor does a run beside its own export (which
    writes the run's one value a statistic once a channel)."""
    teacher = f"local-dir:{copy_run / 'teacher'}"
    other = tmp_path / "other-stats"
    train = [
        "train",
        f"run_dir={other}",
        "model.name=vit_micro_patch4_28",
        "model.kwargs={depth: 2, embed_dim: 48}",
    ]
    train += ["data.batch_size=8", "log.progress=false", "schedule.max_steps=1", "schedule.epochs=1"]
    train += ["transfer.mode=distill", f"teacher.spec={teacher}", "checkpoint.every_epoch=false"]
    assert cli_main([*train, "data.mean=[0.25]", "data.std=[0.125]"]) == 0
    args = ["--data", "animal_mnist", "--num-images", "2", "--floor-images", "1", "--batch-size", "2"]
    args += ["--out", str(tmp_path / "report")]
    capsys.readouterr()
    assert cli_main(["inspect", teacher, str(other), str(copy_run / "copy"), *args]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "normalised otherwise" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {other} was trained on images"), warned
    assert "mean [0.25] against [" in warned[0] and "std [0.125] against [" in warned[0]
    # one value stands for every channel: a run on 1-channel data made 3-channel records its dataset's
    # statistics once ([0.5]), its export once a channel ([0.5, 0.5, 0.5])
    scratch, exported = tmp_path / "scratch", tmp_path / "exported"
    scratch_run = ["train", f"run_dir={scratch}", *train[2:4], *tiny_run(8, 8), "schedule.max_steps=1"]
    assert cli_main([*scratch_run, "transfer.mode=none"]) == 0
    assert cli_main(["export", str(scratch), str(exported)]) == 0
    written = json.loads((scratch / "run.json").read_text())["mean"]
    assert len(written) == 1
    assert json.loads((exported / "config.json").read_text())["pretrained_cfg"]["mean"] == written * 3
    args[-1] = str(tmp_path / "report-of-its-export")
    capsys.readouterr()
    assert cli_main(["inspect", f"local-dir:{exported}", str(scratch), *args]) == 0
    assert "normalised otherwise" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["resnet18", "vit_tiny_patch16_224", "--random-weights", "--data", "synthetic"],
            "not a timm VisionTransformer",
        ),
        pytest.param(  # builds two ViTs at 224 px: seconds
            ["vit_tiny_patch16_224", "vit_small_patch32_224", "--random-weights", "--data", "synthetic"],
            "differ from the teacher's",
            marks=pytest.mark.slow,
        ),
        (["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights"], "no images to inspect"),
        (
            [
                "vit_tiny_patch16_224",
                "vit_tiny_patch16_224",
                "--random-weights",
                "--data",
                "synthetic",
                "--num-images",
                "0",
            ],
            "--num-images must be at least 1",
        ),
        (
            [
                "vit_tiny_patch16_224",
                "vit_tiny_patch16_224",
                "--random-weights",
                "--images",
                "/nonexistent/a.png",
                "/nonexistent/b.png",
            ],
            "--images names files that do not exist: /nonexistent/a.png, /nonexistent/b.png",
        ),
        (  # the flag given once per file reads every file, not the last alone
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights"]
            + ["--images", "/nonexistent/a.png", "--images", "/nonexistent/b.png"],
            "--images names files that do not exist: /nonexistent/a.png, /nonexistent/b.png",
        ),
        (  # dataset flags beside --images would be dropped without a word
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--images", "a.png", "--num-images", "4"]
            + ["--split", "val", "--data-root", "X", "--data-kwargs", "seed=1"],
            "--images reads the files given, not a dataset: drop --data-root, --data-kwargs, --split, --num-images",
        ),
        (  # a run folder's own data would take the options' place without a word
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights", "--data-kwargs", "seed=3"],
            "--data-kwargs are options of the dataset --data names: give --data NAME",
        ),
        (
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights", "--data", "synthetic"]
            + ["--data-kwargs", "length"],
            "--data-kwargs takes KEY=VALUE items (e.g. num_keys=32), got 'length'",
        ),
        (  # the dataset names its options by the flag they were given with, not by a run's config key
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights", "--data", "synthetic"]
            + ["--data-kwargs", "lenght=8"],
            "dataset 'synthetic' has no option(s) lenght (--data-kwargs); its options are: num_classes, length",
        ),
        (
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights", "--data", "folder"],
            "--data folder reads its images from a folder: give --data-root PATH",
        ),
        (  # generated images read no folder: the root would be dropped without a word
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights", "--data", "synthetic"]
            + ["--data-root", "X"],
            "--data-root X is unused: synthetic generates its images and reads no folder; drop it",
        ),
        (  # a folder of images, as a dataset would be given
            [
                "vit_tiny_patch16_224",
                "vit_tiny_patch16_224",
                "--random-weights",
                "--images",
                str(Path(__file__).parent),
            ],
            f"{Path(__file__).parent} (a folder: give the image files in it",
        ),
        (  # trained weights (a file here) are never silently swapped for random ones
            ["vit_tiny_patch16_224", __file__, "--random-weights", "--data", "synthetic"],
            "--random-weights is for timm names;",
        ),
        (  # a file that is there but is no image: this test's own source
            ["vit_tiny_patch16_224", "vit_tiny_patch16_224", "--random-weights", "--images", __file__],
            "cannot be read as an image: cannot identify image file",
        ),
    ],
)
def test_bad_input_is_one_clear_message(args, needle, tmp_path, capsys):
    """In process (the CLI's own main, its own error handling): exit 2 and one `error:` line."""
    assert cli_main(["inspect", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.strip().splitlines()[-1]]
    assert err.strip().splitlines()[-1].startswith("attnxfer inspect: error:")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_copy_student_given_a_run_folder_as_teacher_is_not_told_it_has_random_weights():
    """A run folder (the teacher's own pretraining run, say) loads with no weights hash: it is a trained model."""
    run = {"mode": "copy", "teacher": {"spec": "local-dir:runs/mae/export", "sha256": "ab" * 32}}
    for source, said in (
        ("run step-00000030 (best), model weights", "holds a trained student"),
        ("random-init", "has random weights"),
    ):
        teacher = LoadedModel("runs/mae", tiny_vit(depth=1), source)
        with pytest.raises(InputError, match=f"but TEACHER 'runs/mae' {said}.*pass that teacher"):
            _copy_layers(Path("runs/copy"), run, teacher.model, teacher)


def test_a_folder_with_a_report_md_of_its_own_is_not_written_over(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    args = [
        "inspect",
        "vit_tiny_patch16_224",
        "vit_tiny_patch16_224",
        "--random-weights",
        "--data",
        "synthetic",
    ]
    for extra in ([], ["--overwrite"]):  # --overwrite replaces an earlier inspection, not the user's files
        assert cli_main([*args, "--out", str(out), *extra]) == 2
    assert (out / "report.md").read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == [
        "report.md"
    ]


def test_an_empty_image_batch_is_a_clear_error():
    teacher = tiny_vit(depth=1)
    with pytest.raises(ValueError, match="no images to inspect"):
        inspect_models(teacher, {"s": teacher}, torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="no images to inspect"):
        compare_attention(teacher, {"s": InspectedStudent(teacher)}, [])


@pytest.mark.parametrize("heads, layers", [((6, 3), 12), ((3, 3), 2), ((3, 3), 1)])
def test_a_class_token_pictures_title_lies_inside_the_picture_above_the_maps(heads, layers):
    """The title inspect writes (a student named after its timm architecture, as in the docs' first example)
    and the one training draws, whatever the number of heads: every letter in the picture, none on a map."""
    t, s = ([torch.rand(h, 4, 4)] * layers for h in heads)
    for title in ("class-token attention, image 0: teacher heads (t) | vit_tiny_patch16_224 heads (s)", ""):
        fig = class_token_figure(np.random.rand(28, 28), t, s, title=title)
        renderer = fig.canvas.get_renderer()
        text, box = fig.get_suptitle(), fig._suptitle.get_window_extent(renderer)
        top = fig.axes[0].get_window_extent(renderer).y1
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and top <= box.y0 + 1, (text, box, top)


def test_one_batch_or_one_student_not_wrapped_says_how_to_wrap_it():
    teacher, x = tiny_vit(depth=1), torch.randn(2, 3, 32, 32)
    for students, batches in (({"s": teacher}, x), (teacher, [x])):  # a tensor iterates as single images
        with pytest.raises(TypeError, match=r"\{'student': model\}.*\[images\] for one batch"):
            compare_attention(teacher, students, batches)


# ------------------------------------------------------------------------------------------- --out and --overwrite
@pytest.fixture(scope="module")
def micro_teacher(tmp_path_factory):
    """A one-layer micro ViT in export format: the fastest model `attnxfer inspect` can load."""
    folder = tmp_path_factory.mktemp("micro") / "teacher"
    torch.manual_seed(0)
    model = create_vit("vit_micro_patch4_28", num_classes=10, depth=1, embed_dim=24, num_heads=2)
    export_student(model, folder, card=ModelCardInfo(model_name="micro", license="apache-2.0"))
    return f"local-dir:{folder}"


def _inspect(spec: str, out: Path, *flags: str) -> int:
    args = ["inspect", spec, spec, "--data", "synthetic", "--num-images", "2", "--floor-images", "1"]
    return cli_main([*args, "--batch-size", "2", "--out", str(out), *flags])


@pytest.mark.slow
def test_overwrite_deletes_only_what_inspect_wrote(micro_teacher, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "mine.png").write_bytes(b"the user's own picture")
    (out / "rollout_img7.png").write_bytes(b"a user's file with an inspect-like name")
    assert _inspect(micro_teacher, out, "--pictures", "2") == 0
    first = json.loads((out / "inspect-manifest.json").read_text())["files"]
    assert {"rollout_img0.png", "rollout_img1.png", "metrics.json"} <= set(first)
    assert "mine.png" not in first and "rollout_img7.png" not in first
    assert _inspect(micro_teacher, out, "--pictures", "1", "--overwrite") == 0
    names = {p.name for p in out.iterdir()}
    assert not (out / "rollout_img1.png").exists()  # the first report's second picture: inspect's, gone
    assert {"mine.png", "rollout_img7.png", "rollout_img0.png", "curves.png", "report.md"} <= names
    assert (out / "mine.png").read_bytes() == b"the user's own picture"
    assert (out / "rollout_img7.png").read_bytes() == b"a user's file with an inspect-like name"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.partial")]  # no staging left


def test_an_inspection_into_a_folder_another_filled_meanwhile_is_refused_and_replaces_nothing(tmp_path):
    """Two inspections find the same --out free before measuring: the second to publish its report is
    refused, rather than replacing the first's without --overwrite."""
    out = tmp_path / "report"
    for who in ("first", "second"):
        staged = tmp_path / f".{who}"
        staged.mkdir()
        (staged / "metrics.json").write_text(who)
        if who == "first":
            _publish(staged, out, ["metrics.json"])
    with pytest.raises(FileExistsError, match="written by another inspection meanwhile.*pass --overwrite"):
        _publish(staged, out, ["metrics.json"])
    assert (out / "metrics.json").read_text() == "first"


def test_a_users_file_under_a_pictures_name_is_refused_with_or_without_overwrite(tmp_path):
    """Only report.md and a few names are checked before measuring; a picture's name (heads_NAME.png) is known
    once drawn: a file of the user's under it is refused then, not replaced."""
    out, staged = tmp_path / "report", tmp_path / ".staged"
    out.mkdir()
    (out / "heads_distill.png").write_text("mine")
    for overwrite in (False, True):
        staged.mkdir(exist_ok=True)
        for name in ("metrics.json", "heads_distill.png"):
            (staged / name).write_text("inspect's")
        with pytest.raises(FileExistsError, match=r"of its own .*\(heads_distill.png\); choose another"):
            _publish(staged, out, ["metrics.json", "heads_distill.png"], overwrite)
    assert [p.name for p in out.iterdir()] == ["heads_distill.png"]
    assert (out / "heads_distill.png").read_text() == "mine"


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_inspection(micro_teacher, capsys):
    assert _inspect(micro_teacher, Path("/proc/attnxfer-inspect")) == 2
    assert "--out=/proc/attnxfer-inspect cannot be written (/proc: " in capsys.readouterr().err


def test_a_hub_teacher_not_cached_is_told_the_cache_routes_inspect_has(
    micro_teacher, tmp_path, monkeypatch, capsys
):
    """inspect takes no teacher.cache_dir (nor cache_dir= in Python): HF_HUB_CACHE / HF_HOME are its routes."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert _inspect("hf-hub:acme/not-cached", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "point HF_HUB_CACHE at the directory that holds models--acme--not-cached" in err
    assert "cache_dir" not in err.replace("--cache-dir", "")


def test_an_out_folder_of_a_run_is_refused_as_export_refuses_it(micro_teacher, tmp_path, capsys):
    """The report's files would mix with the run's own (report.md, metrics.json and pictures beside run.json)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert _inspect(micro_teacher, run, "--overwrite") == 2
    assert f"--out={run} is a run's folder (it holds run.json)" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["run.json"]


def test_an_out_folder_of_an_exported_model_is_refused(micro_teacher, tmp_path, capsys):
    """The report's PNGs would mix into the model's files, and an export's --push-to-hub upload them with it."""
    model = tmp_path / "export"
    shutil.copytree(micro_teacher.removeprefix("local-dir:"), model)
    before = sorted(p.name for p in model.iterdir())
    assert _inspect(micro_teacher, model) == 2
    assert f"--out={model} is an exported model, which --push-to-hub uploads whole" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before


def test_an_interrupted_inspection_leaves_nothing_and_the_same_command_runs(
    micro_teacher, tmp_path, capsys, monkeypatch
):
    """Ctrl-C while the pictures are drawn (after metrics.json, before the rest): nothing reaches --out."""
    import attnxfer.apps.inspect.drawings as pictures_app

    drawn = []
    real_save = pictures_app.save_figure

    def interrupted_save(fig, path):
        drawn.append(path)
        if len(drawn) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, here at a known point
        return real_save(fig, path)

    monkeypatch.setattr(pictures_app, "save_figure", interrupted_save)
    out = tmp_path / "report"
    assert _inspect(micro_teacher, out) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "nothing was written" in err and "run the same command again" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no report, no staging folder
    monkeypatch.setattr(pictures_app, "save_figure", real_save)
    assert _inspect(micro_teacher, out) == 0  # the advice holds: no "already holds an inspection"
    assert (out / "metrics.json").exists() and (out / "curves.png").exists()


def test_a_16_bit_grey_png_given_to_inspect_reads_as_its_top_8_bits_not_as_white(micro_teacher, tmp_path):
    """PIL's convert clips a 16-bit grey PNG's values to 255: --images reads it as the 8-bit PNG of its top
    8 bits reads."""
    grey = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(grey << 8 | 0x7F).save(tmp_path / "16.png")
    x = load_images(
        load_model(micro_teacher, role="teacher"), files=[tmp_path / "8.png", tmp_path / "16.png"]
    )
    assert torch.equal(x[0], x[1]) and x[1].std() > 0


def test_a_model_folder_is_read_by_its_path_and_a_spec_naming_nothing_by_its_role(
    micro_teacher, tmp_path, capsys
):
    """Run folders are given as paths, so export folders are too (a teacher spec says local-dir:); a student's
    spec that names no model is refused as the student's, not the teacher's."""
    folder = micro_teacher.removeprefix("local-dir:")
    assert _inspect(folder, tmp_path / "r") == 0
    assert list(json.loads((tmp_path / "r" / "metrics.json").read_text())["students"]) == ["teacher"]
    capsys.readouterr()
    args = ["inspect", folder, str(tmp_path / "nope"), "--data", "synthetic", "--out", str(tmp_path / "s")]
    assert cli_main(args) == 2
    assert f"error: student '{tmp_path / 'nope'}': " in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_inspect_attention_returns_what_it_writes_to_metrics_json(micro_teacher, tmp_path):
    """The Python call hands back the report's metrics.json, specs included: the students' names (folder
    names, made unique) say which spec each one is."""
    folder = micro_teacher.removeprefix("local-dir:")
    few = dict(data="synthetic", num_images=2, floor_images=1, batch_size=2, out=tmp_path / "r")
    result = inspect_attention(micro_teacher, [folder, micro_teacher], **few)
    assert result == json.loads((tmp_path / "r" / "metrics.json").read_text())
    students = {"teacher": folder, "teacher-2": micro_teacher}
    assert result["specs"] == {"teacher": micro_teacher, "students": students}


def test_a_students_loading_warnings_name_it_as_the_student(tmp_path, capsys):
    """A student weights file under an untagged architecture gets timm's default mean/std: the warning says so
    of the student, not of a teacher."""
    weights = tmp_path / "student.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(weights))
    load_model(str(weights), arch="vit_tiny_patch16_224")
    err = capsys.readouterr().err
    assert f"student {weights}: mean/std are timm's defaults" in err and "teacher" not in err


def test_a_student_that_cannot_be_loaded_is_named_as_the_student(tmp_path, monkeypatch):
    """The sources say "teacher" of whatever they load: a student not in the Hub cache offline, or whose
    weights fit no architecture, is refused as the student."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(UserError, match=r"^student 'hf-hub:acme/student': config.json of Hub repo"):
        load_model("hf-hub:acme/student")
    weights = tmp_path / "student.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(weights))
    with pytest.raises(InputError, match=rf"^student '{weights}': the weights do not fit"):
        load_model(str(weights), arch="vit_small_patch16_224")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_pickled_weights_file_is_told_to_come_back_as_inspects_argument_not_teacher_spec(tmp_path, role):
    """A .pth with pickled training args is refused with a conversion recipe; where to give the converted file
    names inspect's TEACHER / STUDENT and their --*-arch flags, not a config's teacher.spec (inspect has none)."""
    import argparse

    pickled = tmp_path / "mae_full.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3)}, pickled)
    with pytest.raises(UserError, match=r"argparse\.Namespace") as err:
        load_model(str(pickled), arch="vit_tiny_patch16_224", role=role)
    [then] = [line for line in str(err.value).splitlines() if line.startswith("then give")]
    assert then.startswith(f"then give {pickled.with_suffix('.safetensors')} where this file was (attnxfer")
    assert f"inspect's {role.upper()}, with --{role}-arch" in then and "teacher.spec" not in then, then


def test_a_student_given_as_its_run_brings_the_data_it_was_trained_on(micro_teacher, tmp_path, capsys):
    """Without --images or --data the images are the run's own data as the run made them (its data seed and
    options: a recall task's glyphs are a function of them), not the dataset's defaults. report.md names a
    run folder, student or teacher, with the checkpoint and the weights it read."""
    run = tmp_path / "run"
    micro = [
        "model.name=vit_micro_patch4_28",
        "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
        "data.in_chans=1",
    ]
    steps = [
        "transfer.mode=none",
        "schedule.max_steps=1",
        "schedule.epochs=1",
        "checkpoint.every_epoch=false",
        "ema.decay=0.9",
    ]
    code, _, err = run_cli(capsys, "train", f"run_dir={run}", *tiny_run(8, 4), "data.seed=3", *micro, *steps)
    assert code == 0, err
    few = dict(num_images=2, floor_images=1, batch_size=2)
    flags = ["--num-images", "2", "--floor-images", "1", "--batch-size", "2", "--out"]
    code, out, err = run_cli(capsys, "inspect", micro_teacher, str(run), *flags, str(tmp_path / "own"))
    assert code == 0 and "images: synthetic's val split" in out, err
    [val] = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"
    ]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    read = f"`{run}` (step-00000001, best EMA val top-1 {val['ema_val_top1']:.2f}, EMA weights)"
    assert (
        f"- teacher: `{micro_teacher}`\n- student `run`: {read}\n"
        in (tmp_path / "own" / "report.md").read_text()
    )
    assert run_cli(capsys, "inspect", str(run), str(run), *flags, str(tmp_path / "self"))[0] == 0
    assert f"- teacher: {read}\n" in (tmp_path / "self" / "report.md").read_text()
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())["students"]
    options = {"seed": 3, "length": 8}
    made = inspect_attention(micro_teacher, [str(run)], data="synthetic", data_options=options, **few)
    defaults = inspect_attention(micro_teacher, [str(run)], data="synthetic", **few)
    assert own == json.loads(json.dumps(made["students"])) != json.loads(json.dumps(defaults["students"]))
    # the same options given as flags, as a student that is no run folder (an export) needs them
    given = ["--data", "synthetic", "--data-kwargs", "seed=3", "length=8", *flags, str(tmp_path / "flags")]
    assert run_cli(capsys, "inspect", micro_teacher, str(run), *given)[0] == 0
    assert json.loads((tmp_path / "flags" / "metrics.json").read_text())["students"] == own


def test_a_student_that_takes_other_channels_than_its_teacher_is_one_clear_message(
    micro_teacher, tmp_path, capsys
):
    """Both see the same images: an RGB student against a grey teacher is refused before any forward."""
    rgb = tmp_path / "rgb"
    model = create_vit("vit_micro_patch4_28", num_classes=10, depth=1, embed_dim=24, num_heads=2, in_chans=3)
    export_student(model, rgb, card=ModelCardInfo(model_name="rgb", license="apache-2.0"))
    code, _, err = run_cli(
        capsys,
        "inspect",
        micro_teacher,
        f"local-dir:{rgb}",
        "--data",
        "synthetic",
        "--out",
        str(tmp_path / "r"),
    )
    assert (
        code == 2 and "takes 3-channel images, the teacher" in err and len(err.strip().splitlines()) == 1
    ), err


# ------------------------------------------------------------------------------------------- data settings named
def test_a_bad_data_root_flag_is_named_as_the_flag_not_as_a_config_key(micro_teacher, tmp_path, capsys):
    """animal_mnist's refusal names the key a run sets (data.root); inspect's user wrote --data-root."""
    cache = tmp_path / "no" / "such" / "cache"
    code, _, err = run_cli(
        capsys,
        "inspect",
        micro_teacher,
        micro_teacher,
        "--data",
        "animal_mnist",
        "--data-root",
        str(cache),
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and f"error: --data-root '{cache}' is the folder animal_mnist caches" in err, err
    assert "drop --data-root to cache in" in err and "data.root" not in err, err


@pytest.mark.slow
def test_a_runs_bad_data_root_is_named_by_where_it_came_from(micro_teacher, tmp_path, capsys):
    """A student's run brings its data: a bad root given as --data-root is named as the flag, a root the run's
    own config set (its cache folder moved away since) as data.root."""
    run, cache = tmp_path / "run", tmp_path / "cache" / "animal"
    micro = ["model.name=vit_micro_patch4_28", "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]
    steps = [
        "transfer.mode=none",
        "schedule.max_steps=1",
        "schedule.epochs=1",
        "checkpoint.every_epoch=false",
    ]
    cache.parent.mkdir()
    data = [
        "data.dataset=animal_mnist",
        f"data.root={cache}",
        "data.batch_size=4",
        "data.eval_batch_size=1000",
    ]
    code, _, err = run_cli(capsys, "train", f"run_dir={run}", *data, *QUIET, *micro, *steps)
    assert code == 0, err
    bad = tmp_path / "gone" / "animal"
    code, _, err = run_cli(capsys, "inspect", micro_teacher, str(run), "--data-root", str(bad))
    assert code == 2 and f"error: --data-root '{bad}' is the folder" in err and "data.root" not in err, err
    (tmp_path / "cache").rename(tmp_path / "moved")
    code, _, err = run_cli(capsys, "inspect", micro_teacher, str(run), "--out", str(tmp_path / "r"))
    assert code == 2 and f"error: data.root='{cache}' is the folder" in err and "--data-root" not in err, err


@pytest.mark.slow
def test_runs_whose_settings_make_other_images_are_warned_of_by_key_and_values(trained, tmp_path, capsys):
    """Every student is measured on the images the first run's settings make: a run whose data seed makes
    other images is named with the key, both values and whose images are used; a run whose settings differ
    without changing these images (a longer synthetic split) is not; a dataset chosen with --data is."""
    other_seed, longer = tmp_path / "seed5", tmp_path / "longer"
    for run, key in ((other_seed, "data.seed=5"), (longer, "data.kwargs.length=128")):
        code, _, err = run_cli(capsys, "train", *ONE_BLOCK_RUN, "schedule.max_steps=1", key, f"run_dir={run}")
        assert code == 0, err
    few = ["--num-images", "2", "--floor-images", "1", "--batch-size", "2"]
    students = [str(trained), str(other_seed), str(longer)]
    code, out, err = run_cli(capsys, "inspect", str(trained), *students, *few, "--out", str(tmp_path / "r"))
    assert code == 0 and f"images: synthetic's val split as {trained} made it" in out, err
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    differ = f"(data.seed (else seed): 0 in {trained}, 5 in {other_seed})"
    assert warning.startswith(f"warning: {other_seed} made its data otherwise than {trained} {differ}: "), (
        warning
    )
    assert f"every student is measured on the images {trained}'s settings make" in warning, warning
    assert str(longer) not in warning
    chosen = ["--data", "synthetic", "--out", str(tmp_path / "chosen")]
    code, _, err = run_cli(capsys, "inspect", str(trained), *students, *few, *chosen)
    assert code == 0 and "warning:" not in err, err


def _hiera_unrolled_global():
    """A tiny Hiera whose stage-1 second block attends globally over tokens still in unrolled order."""
    torch.manual_seed(0)
    model = timm.create_model(
        "hiera_tiny_224",
        img_size=32,
        patch_stride=(4, 4),
        mask_unit_size=(4, 4),
        stages=(1, 2, 1),
        q_pool=1,
        q_stride=(2, 2),
        mask_unit_attn=(True, False, False),
        embed_dim=8,
        num_heads=1,
        num_classes=0,
    ).eval()
    with torch.no_grad():
        model.blocks[2].attn.qkv.weight.mul_(8)  # peaked maps: the token order shows in the distance
    return model


def _global_map_and_cells(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global block's explicit softmax map (float64) on ``x``, and each of its tokens' (row, col) on the
    4x4 grid: timm's unroll of the 8x8 cell coordinates, max-pooled once as the model pools."""
    attn, inputs = model.blocks[2].attn, {}
    hook = attn.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
        hook.remove()
        t = inputs["x"]
        qkv = attn.qkv(t).reshape(2, t.shape[1], 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        p = (qkv[0] * attn.scale @ qkv[1].transpose(-1, -2)).softmax(-1).double()
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    cells = model.unroll(torch.stack([r.flatten(), c.flatten()], -1).float()[None])
    return p, cells.view(1, 4, -1, 2).amin(1)[0] // 2  # the 2x2 group's top-left on the 4x4 grid


@pytest.mark.slow
def test_attention_distance_of_a_global_layer_over_unrolled_tokens():
    """Hiera's global layers see tokens in its unrolled order, not raster order: the distance must follow
    where each token sits, as recomputed here from timm's own unroll and an explicit softmax map."""
    model = _hiera_unrolled_global()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    insp = compare_attention(model, {"self": model}, [x], floor_images=0)
    p, cells = _global_map_and_cells(model, x)
    assert not torch.equal(cells[:, 0] * 4 + cells[:, 1], torch.arange(16))  # not raster order
    centres = (cells.double() + 0.5) * 8  # 8 px per cell of the 4x4 grid
    expected = (p * torch.cdist(centres, centres)).sum(-1).mean((0, 2))
    assert insp.teacher[2].partition == "global"
    assert insp.teacher[2].distance == pytest.approx(expected.tolist(), rel=1e-5)


@pytest.mark.slow
def test_received_map_of_a_global_layer_over_unrolled_tokens_is_drawn_on_its_cells():
    """A picture of Hiera's global layer puts each key's received attention on the cell timm's unroll took
    it from (recomputed here from an explicit softmax map), not in token order."""
    model = _hiera_unrolled_global()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    maps, geometries = token_maps(model, x)
    p, cells = _global_map_and_cells(model, x)
    received = p.mean(2) / p.mean(2).sum(-1, keepdim=True)
    want = torch.zeros_like(received)
    want[..., (cells[:, 0] * 4 + cells[:, 1]).long()] = received
    assert geometries[2].kind == "global" and not geometries[2].has_class_row
    assert torch.allclose(maps[2].double(), want.reshape(2, -1, 4, 4), atol=1e-6)
