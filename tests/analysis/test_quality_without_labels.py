"""Quality without a classifier: k-NN top-1 against a brute-force double loop with DINO's vote rule, its
intervals against the Wilson formula written out, and final-feature agreement against hand computation,
on tensors and on a timm ViT's own forward_features."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_run, tiny_vit

from attnxfer.analysis.features import FeatureAgreement, feature_agreement, feature_sums
from attnxfer.analysis.knn import (
    KnnComparison,
    embed,
    knn_comparison,
    knn_correct,
    knn_predict,
    paired_counts,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def _brute_force_knn(bank, bank_labels, queries, k, temperature) -> list[int]:
    """DINO's rule by hand: every bank entry's cosine with the query, the k largest, each voting
    exp(cos / T) for its label; the label with the largest sum wins."""
    out = []
    for q in queries.tolist():
        sims = []
        for j, b in enumerate(bank.tolist()):
            dot = sum(x * y for x, y in zip(q, b))
            norm = math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))
            sims.append((dot / norm, j))
        sims.sort(reverse=True)
        votes: dict[int, float] = {}
        for sim, j in sims[:k]:
            label = int(bank_labels[j])
            votes[label] = votes.get(label, 0.0) + math.exp(sim / temperature)
        out.append(max(votes, key=votes.get))
    return out


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.07), (3, 1.0), (100, 0.07)])
def test_knn_predictions_match_the_brute_force_double_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    bank, queries = _unit(torch.randn(60, 8, generator=g)), _unit(torch.randn(25, 8, generator=g))
    bank_labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, chunk=7)
    assert got.tolist() == _brute_force_knn(bank, bank_labels, queries, k, temperature)


def test_votes_are_weighted_by_similarity_not_counted():
    """Three far neighbours of class 0 against two close ones of class 1: at T = 0.07 the close pair wins
    (exp(0.9/0.07) x 2 > exp(0.5/0.07) x 3); with a flat weight (huge T) the majority wins."""
    query = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([math.acos(0.5)] * 3 + [math.acos(0.9)] * 2)
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert knn_predict(bank, labels, query, k=5, temperature=0.07).item() == 1
    assert knn_predict(bank, labels, query, k=5, temperature=1e4).item() == 0


def _wilson(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def test_comparison_reports_top1s_with_wilson_intervals_and_the_recovered_share():
    teacher = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1, 1, 0] * 4, dtype=torch.bool)
    student = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 0] * 4, dtype=torch.bool)
    counts = paired_counts(teacher, student)
    assert counts.tolist() == [20, 8, 4, 8]  # both, teacher only, student only, neither
    got = KnnComparison.from_counts(counts, k=20, temperature=0.07).as_dict()
    assert got["knn_count"] == 40 and got["knn_k"] == 20
    assert got["knn_top1"] == pytest.approx(60.0) and got["knn_teacher_top1"] == pytest.approx(70.0)
    for key, correct in (("knn_top1", 24), ("knn_teacher_top1", 28)):
        low, high = _wilson(correct, 40)
        assert got[f"{key}_low"] == pytest.approx(low, abs=1e-9) and got[f"{key}_high"] == pytest.approx(
            high, abs=1e-9
        )
    assert got["knn_share"] == pytest.approx(24 / 28)
    assert got["knn_share_low"] < got["knn_share"] < got["knn_share_high"]
    # the same predictions: a share of exactly 1, whatever the resample
    same = KnnComparison.from_counts(paired_counts(teacher, teacher), 20, 0.07).as_dict()
    assert same["knn_share"] == same["knn_share_low"] == same["knn_share_high"] == 1.0
    alone = KnnComparison.from_counts(paired_counts(student, student), 20, 0.07, teacher=False).as_dict()
    assert (
        alone["knn_top1"] == pytest.approx(60.0)
        and "knn_teacher_top1" not in alone
        and "knn_share" not in alone
    )


def test_knn_correct_reads_labels_as_the_brute_force_rule_does():
    g = torch.Generator().manual_seed(3)
    bank, queries = _unit(torch.randn(40, 6, generator=g)), _unit(torch.randn(12, 6, generator=g))
    bank_labels, labels = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (12,), generator=g)
    want = torch.tensor(_brute_force_knn(bank, bank_labels, queries, 20, 0.07)) == labels
    assert torch.equal(knn_correct(bank, bank_labels, queries, labels), want)
    assert knn_correct(bank, bank_labels, queries[:0], labels[:0]).numel() == 0


def test_feature_sums_and_agreement_match_hand_computation():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    prefix = 1
    want = {}
    for name, tokens in (("prefix", range(0, prefix)), ("patch", range(prefix, 4))):
        cos, err, ref = [], 0.0, 0.0
        for b in range(2):
            for n in tokens:
                a, c = s[b, n].tolist(), t[b, n].tolist()
                dot = sum(x * y for x, y in zip(a, c))
                cos.append(dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in c)))
                err += sum((x - y) ** 2 for x, y in zip(a, c))
                ref += sum(y * y for y in c)
        want[f"feat_cos_{name}"] = sum(cos) / len(cos)
        want[f"feat_rel_err_{name}"] = math.sqrt(err / ref)
    got = FeatureAgreement.from_sums(feature_sums(s, t, prefix)).as_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # sums over two shards of the batch add up to the whole batch's
    halves = feature_sums(s[:1], t[:1], prefix) + feature_sums(s[1:], t[1:], prefix)
    torch.testing.assert_close(halves, feature_sums(s, t, prefix))
    assert FeatureAgreement.from_sums(feature_sums(s, t, 0)).prefix is None


def test_feature_agreement_of_a_timm_vit_reads_its_final_normed_tokens():
    teacher = tiny_vit(depth=2, seed=0, reg_tokens=2).eval()
    student = copy.deepcopy(teacher)
    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    same = feature_agreement(student, teacher, images)
    assert (
        same.prefix.tokens == 2 * 2 * 3 and same.patch.tokens == 2 * 2 * 16
    )  # class + 2 registers; 4x4 patches
    assert same.prefix.cosine == pytest.approx(1.0) and same.patch.relative_error == pytest.approx(
        0.0, abs=1e-6
    )
    with torch.no_grad():
        student.blocks[1].mlp.fc2.weight.add_(0.05 * torch.randn_like(student.blocks[1].mlp.fc2.weight))
        s = torch.cat([student.forward_features(x) for x in images])
        t = torch.cat([teacher.forward_features(x) for x in images])
    got = feature_agreement(student.train(), teacher, images)
    assert student.training  # modes restored
    patch_s, patch_t = s[:, 3:].double(), t[:, 3:].double()
    cos = (patch_s * patch_t).sum(-1) / (patch_s.norm(dim=-1) * patch_t.norm(dim=-1))
    assert got.patch.cosine == pytest.approx(cos.mean().item(), rel=1e-6)
    assert got.patch.relative_error == pytest.approx(
        ((patch_s - patch_t).norm() / patch_t.norm()).item(), rel=1e-6
    )
    assert 0.0 < got.patch.relative_error < 1.0


def test_embeddings_are_the_pooled_pre_logits_feature_normalised():
    model = tiny_vit(depth=1, seed=1, num_classes=0).eval()
    batches = [
        (torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])),
        (torch.randn(2, 3, 32, 32), torch.tensor([1, 1])),
    ]
    (feats,), labels = embed([model], batches, "cpu", limit=4)
    with torch.no_grad():
        want = torch.cat([model.forward_features(x)[:, 0] for x, _ in batches])[:4]  # class-token pooling
    torch.testing.assert_close(feats, want / want.norm(dim=1, keepdim=True))
    assert labels.tolist() == [0, 1, 2, 1]


def test_knn_comparison_of_two_models_counts_what_the_brute_force_rule_gets_right():
    teacher, student = tiny_vit(depth=1, seed=3, num_classes=0), tiny_vit(depth=1, seed=4, num_classes=0)
    g = torch.Generator().manual_seed(7)
    data = {
        s: (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
        for s, n in (("bank", 24), ("val", 10))
    }
    batches = {s: [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)] for s, (x, y) in data.items()}
    got = knn_comparison(student, teacher, batches["bank"], batches["val"], "cpu", k=5)
    right = []
    with torch.no_grad():
        for model in (teacher, student):
            emb = {
                s: model.forward_head(model.forward_features(x), pre_logits=True)
                for s, (x, _) in data.items()
            }
            pred = _brute_force_knn(emb["bank"], data["bank"][1], emb["val"], 5, 0.07)
            right.append(torch.tensor(pred) == data["val"][1])
    t, s = right
    assert (got.both, got.teacher_only, got.student_only, got.neither) == (
        int((t & s).sum()),
        int((t & ~s).sum()),
        int((~t & s).sum()),
        int((~t & ~s).sum()),
    )
    assert got.count == 10 and got.k == 5
    # a bank of fewer images than k votes with all of them, and says so
    assert (
        knn_comparison(student, None, batches["bank"], batches["val"], "cpu", k=50).as_dict()["knn_k"] == 24
    )


# -- `attnxfer eval`: the scores of a trained run, recomputed from its checkpoint by hand ----------------------
@pytest.mark.slow  # trains a tiny distillation run (~3 s), evaluates it twice
def test_eval_prints_feature_agreement_and_knn_that_a_brute_force_recomputation_confirms(
    tiny_teacher_dir, tmp_path, capsys
):
    import json

    from attnxfer.checkpoints.run_dir import RunDir
    from attnxfer.data import build_dataset
    from attnxfer.launch import cli
    from attnxfer.sources import load_teacher

    run = tmp_path / "run"
    common = [
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        *tiny_run(40, 8),
        "deterministic=true",
        "device=cpu",
    ]
    assert cli.main(["train", *common, "schedule.max_steps=3", f"run_dir={run}"]) == 0
    capsys.readouterr()
    # k and the vote's temperature as the eval's own keys say (the brute force below votes at the same)
    assert cli.main(["eval", "-c", str(run / "config.yaml"), "eval.knn_k=5", "eval.knn_temperature=0.5"]) == 0
    out = capsys.readouterr().out
    result = json.loads(next(run.glob("eval-*.json")).read_text())["metrics"]
    assert "knn_top1 (%) [95% Wilson interval, 40 images, k=5, T=0.5]" in out and "knn_share" in out
    assert "\nknn_count: 40\nknn_k: 5\n" in out  # counts as the whole numbers they are

    student = RunDir(run).load_student("latest", "raw").model.eval()
    teacher, _ = load_teacher(f"local-dir:{tiny_teacher_dir}")
    teacher.eval()
    info = build_dataset("synthetic", "val", length=40).info
    norm = dict(
        mean=json.loads((run / "run.json").read_text())["mean"],
        std=json.loads((run / "run.json").read_text())["std"],
    )
    sets = {
        s: build_dataset("synthetic", s, length=40, img_size=info.img_size, **norm) for s in ("train", "val")
    }
    images = {s: torch.stack([ds[i][0] for i in range(len(ds))]) for s, ds in sets.items()}
    labels = {s: torch.tensor([ds[i][1] for i in range(len(ds))]) for s, ds in sets.items()}
    with torch.no_grad():
        for name, model in (("knn_top1", student), ("knn_teacher_top1", teacher)):
            emb = {
                s: model.forward_head(model.forward_features(x), pre_logits=True) for s, x in images.items()
            }
            pred = _brute_force_knn(emb["train"], labels["train"], emb["val"], 5, 0.5)
            want = 100.0 * (torch.tensor(pred) == labels["val"]).float().mean().item()
            assert result[name] == pytest.approx(want), name
        s, t = student.forward_features(images["val"]), teacher.forward_features(images["val"])
    patch_s, patch_t = s[:, 1:].double(), t[:, 1:].double()
    cos = (patch_s * patch_t).sum(-1) / (patch_s.norm(dim=-1) * patch_t.norm(dim=-1))
    assert result["val_feat_cos_patch"] == pytest.approx(cos.mean().item(), rel=1e-5)
    assert result["val_feat_rel_err_patch"] == pytest.approx(
        ((patch_s - patch_t).norm() / patch_t.norm()).item(), rel=1e-5
    )
    assert result["knn_share"] == pytest.approx(result["knn_top1"] / result["knn_teacher_top1"])
    assert "val_top1" in result  # the engine's own evaluation still runs


@pytest.mark.parametrize(
    "overrides,own_objective,want",
    [
        (["teacher.spec=vit_tiny_patch16_224"], False, {"top1", "knn", "features"}),
        (
            ["teacher.spec=vit_tiny_patch16_224", "transfer.mode=copy"],
            False,
            {"top1"},
        ),  # the student needs q/k
        (["transfer.mode=none"], False, {"top1", "knn"}),
        (["teacher.spec=vit_tiny_patch16_224", "data.labels=false"], False, {"features"}),
        (["data.labels=false"], True, set()),  # MAE pre-training: its own val loss
        (["eval.metrics=[knn]", "transfer.mode=none"], True, {"knn"}),
    ],
)
def test_eval_metrics_auto_takes_what_the_run_can_give(overrides, own_objective, want):
    from attnxfer.apps.run.evaluation import eval_metrics
    from attnxfer.config import load_config

    cfg = load_config(None, ["data.dataset=synthetic", *overrides])
    assert eval_metrics(cfg, own_objective=own_objective) == want


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eval.metrics=[features]", "transfer.mode=none"], "no teacher"),
        (["eval.metrics=[knn]", "teacher.spec=vit_tiny_patch16_224", "transfer.mode=copy"], "teacher's maps"),
        (["eval.metrics=[knn]", "data.labels=false", "transfer.mode=none"], "eval.metrics=knn needs labels"),
    ],
)
def test_eval_metrics_asked_for_by_name_that_the_run_cannot_give_are_refused(overrides, message):
    from attnxfer.apps.run.evaluation import eval_metrics
    from attnxfer.config import load_config
    from attnxfer.errors import InputError

    with pytest.raises(InputError, match=message):
        eval_metrics(load_config(None, ["data.dataset=synthetic", *overrides]))


def test_eval_metrics_top1_of_a_pretraining_run_is_refused_not_silently_left_out():
    """An MAE encoder is headless: a top-1 asked for by name has nothing to score."""
    from attnxfer.apps.run.evaluation import eval_metrics
    from attnxfer.config import load_config
    from attnxfer.errors import InputError

    with pytest.raises(InputError, match=r"no task loss \(MAE pre-training\), so no head"):
        eval_metrics(load_config(None, ["data.dataset=synthetic", "eval.metrics=[top1]"]), own_objective=True)
