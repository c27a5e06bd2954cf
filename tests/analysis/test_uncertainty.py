"""Intervals and paired tests against scipy.stats and hand values; per-image scoring against the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import tiny_run
from scipy.stats import binomtest

from attnxfer.apps.run.training import train
from attnxfer.apps.run.uncertainty import format_top1, mcnemar, mean_std, top1_interval
from attnxfer.apps.study.seed_stats import paired_table, per_image_correct, results_table
from attnxfer.checkpoints.export import export_run
from attnxfer.config import load_config


def _scipy_ci(k: int, n: int, method: str = "wilson") -> tuple[float, float]:
    """The 95 % interval from scipy.stats (an independent implementation), in percent."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method=method)
    return 100 * float(ci.low), 100 * float(ci.high)


@pytest.mark.parametrize(("k", "n"), [(856, 1000), (844, 1000), (631, 1000), (7, 10), (0, 20), (20, 20)])
def test_wilson_interval_matches_scipy(k, n):
    assert top1_interval(k, n) == pytest.approx(_scipy_ci(k, n), abs=1e-9)


@pytest.mark.parametrize(("k", "n"), [(856, 1000), (7, 10), (0, 20), (20, 20)])
def test_exact_interval_matches_scipy_clopper_pearson(k, n):
    assert top1_interval(k, n, method="exact") == pytest.approx(_scipy_ci(k, n, "exact"), abs=1e-9)


def test_exact_interval_edges_and_the_demos_two_points():
    # Clopper–Pearson with no successes: [0, 1 - (alpha/2)^(1/n)]
    lo, hi = top1_interval(0, 20, method="exact")
    assert lo == 0 and hi == pytest.approx(100 * (1 - 0.025 ** (1 / 20)))
    # on 1,000 images, 85.6 vs 84.4 lie inside each other's intervals (about ±2.2 points)
    lo, hi = top1_interval(856, 1000)
    assert lo < 84.4 < 85.6 < hi and 2.0 < (hi - lo) / 2 < 2.4
    assert format_top1(856, 1000) == f"85.60 [{lo:.1f}, {hi:.1f}]"
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        top1_interval(11, 10)


def test_mcnemar_exact_by_hand():
    a = np.array([1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 0, 1, 0], bool)
    t = mcnemar(a, b)
    assert (t.only_a, t.only_b) == (3, 0) and t.p_value == pytest.approx(2 * 0.5**3)
    # 1 vs 9 discordant: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = np.array([1] + [0] * 9 + [1] * 5, bool)
    b = np.array([0] + [1] * 9 + [1] * 5, bool)
    assert mcnemar(a, b).p_value == pytest.approx(2 * 11 / 1024)
    # the exact McNemar test is a two-sided binomial test on the discordant pairs (scipy's binomtest)
    assert mcnemar(a, b).p_value == pytest.approx(binomtest(1, 10, 0.5).pvalue)
    assert mcnemar(a, a).p_value == 1.0  # no discordant images: no evidence either way
    with pytest.raises(ValueError, match="different images"):
        mcnemar(a, a[:-1])


def test_mean_std_is_the_sample_std():
    assert mean_std([85.6, 84.4, 85.0]) == pytest.approx((85.0, math.sqrt((0.36 + 0.36 + 0) / 2)))
    assert mean_std([63.1]) == (63.1, 0.0)


def test_tables_render_intervals_and_paired_tests():
    ca = [np.array([1] * 9 + [0], bool), np.array([1] * 8 + [0] * 2, bool)]
    cb = [np.array([0] * 3 + [1] * 6 + [0], bool), np.array([1] * 8 + [0] * 2, bool)]
    res = lambda top1: {"val_top1": top1, "best_top1": top1, "steps": 5, "seconds": 1.0}
    table = results_table({"A": [res(90.0), res(80.0)], "B": [res(60.0), res(80.0)]}, {"A": ca, "B": cb})
    lo, hi = _scipy_ci(9, 10)
    assert f"| A | 85.00 ± 7.07 | [{lo:.1f}, {hi:.1f}];" in table
    paired = paired_table({"A": ca, "B": cb}, [("A", "B")], seeds=[1, 2])
    assert "| A vs B | 1 | 3 | 0 | 0.250 |" in paired and "| A vs B | 2 | 0 | 0 | 1.000 |" in paired


@pytest.mark.slow
def test_per_image_scoring_agrees_with_the_engine(tmp_path):
    """A scratch run, then a copy run whose teacher is that run: scoring each image of the validation set
    again from the newest checkpoint (the copy student with its teacher's maps) gives the engine's top-1."""
    common = [
        *tiny_run(96, 32),
        "model.name=vit_nano_patch4_28",
        "schedule.max_steps=3",
        "schedule.epochs=1",
    ]
    scratch = load_config(None, [*common, f"run_dir={tmp_path / 'a'}", "transfer.mode=none"])
    copy = load_config(
        None,
        [
            *common,
            f"run_dir={tmp_path / 'b'}",
            "transfer.mode=copy",
            f"teacher.spec=local-dir:{tmp_path / 't'}",
        ],
    )
    for cfg in (scratch, copy):
        result = train(cfg)
        if cfg is scratch:
            export_run(cfg.run_dir, tmp_path / "t", weights="raw")
        correct = per_image_correct(cfg, digest="d")
        assert 100.0 * correct.mean() == pytest.approx(result.final["val_top1"])
        assert len(correct) == result.final["val_count"]
    assert (tmp_path / "b" / "val_correct.json").exists()
    assert np.array_equal(per_image_correct(copy, digest="d"), correct)  # cached
