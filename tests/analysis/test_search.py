"""attnxfer search: NSGA-II ranks and crowding by hand, the rejection protocol, the fitness against an explicit
KL, and the command end to end (outputs, resume after a kill, refusals) on a tiny teacher."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    QUIET,
    peaked_teacher,
    run_cli,
    script_main,
    script_module,
    tiny_convert_report,
    tiny_run,
)
from safetensors.torch import load_file, save_file

from attnxfer.apps.search import _seed_formulas
from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.checkpoints.store import CheckpointError
from attnxfer.config import ConfigError, load_config
from attnxfer.launch import cli
from attnxfer.launch.search_array import split_batches
from attnxfer.models.efficient.formula import HAND_DESIGNED
from attnxfer.search import (
    CandidateEvaluator,
    FitSettings,
    SearchSettings,
    SearchState,
    SpeedSettings,
    cache_teacher,
    crowding_distance,
    dominates,
    pareto_ranks,
    precheck,
    run_search,
    select_survivors,
)
from attnxfer.search.fitness import fit_student
from attnxfer.transfer.selection import beside

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# a candidate's fit is hundreds of tiny ops: a second intra-op thread only waits for a core on a busy machine
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ------------------------------------------------------------------------------------- Pareto, by hand
#        A       B       G         C       D       E       F     (both objectives minimised)
POINTS = [(1, 5), (2, 2), (3, 1.5), (4, 1), (3, 3), (2, 4), (5, 5)]


def test_pareto_ranks_and_crowding_match_a_hand_worked_example():
    # A, B, G, C: nobody is <= in both and < in one. B dominates D(3,3), E(2,4), F; G dominates D.
    # Without rank 0, D and E do not dominate each other; both dominate F.
    assert pareto_ranks(POINTS) == [0, 0, 0, 0, 1, 1, 2]
    assert dominates((2, 2), (3, 3)) and not dominates((2, 2), (2, 2)) and not dominates((1, 5), (2, 2))
    # Crowding in rank 0 (x range 3, y range 4): ends infinite; B: x (3-1)/3 + y (5-1.5)/4; G: x (4-2)/3 + y (2-1)/4
    a, b, g, c = crowding_distance(POINTS[:4])
    assert a == c == math.inf
    assert b == pytest.approx(2 / 3 + 3.5 / 4) and g == pytest.approx(2 / 3 + 1 / 4)
    # Survivors: rank 0 cut by crowding (A, C infinite, then B over G); then whole ranks.
    assert sorted(select_survivors(POINTS, 3)) == [0, 1, 3]
    assert sorted(select_survivors(POINTS, 6)) == [0, 1, 2, 3, 4, 5]
    assert sorted(select_survivors(POINTS, 5)) == [0, 1, 2, 3, 4]  # D and E tie (infinite): lower index
    assert split_batches(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert split_batches(list("ab"), 5) == [["a"], ["b"]]


def test_the_front_and_the_winner_under_a_speed_floor_match_a_hand_made_search():
    """The front is every fitted candidate nobody beats in both fit and speed (from all generations, not the
    last population; rejections never), fastest first; the winner is the best fit at least min_speed fast, a
    tie in fit going to the faster, and the best fit of the front where no member reaches the floor."""
    from attnxfer.apps.search import winner_of
    from attnxfer.search import pareto_front

    made = [
        ("a", 0.1, 0.5),
        ("b", 0.2, 2.0),  # beaten by c: as good a fit, slower
        ("c", 0.2, 3.0),
        ("d", 0.5, 3.0),  # beaten by c: as fast, worse fit
        ("e", 0.9, 8.0),
        ("g", 0.1, 0.5),  # the same scores as a: neither beats the other
    ]
    state = SearchState(
        candidates={f: {"formula": f, "status": "ok", "kl": kl, "speed": sp} for f, kl, sp in made},
        population=["e"],
    )
    state.candidates["r"] = {"formula": "r", "status": "rejected", "reason": "at fit time: non-finite"}
    front = pareto_front(state)
    assert [c["formula"] for c in front] == ["e", "c", "a", "g"]
    picked = {floor: (winner_of(front, floor) or {}).get("formula") for floor in (0, 1, 3, 3.01, 8, 9)}
    assert picked == {0: "a", 1: "c", 3: "c", 3.01: "e", 8: "e", 9: "a"}
    assert winner_of([], 1) is None


# ------------------------------------------------------------------------------------- fitness, rejection
@pytest.fixture(scope="module")
def tiny():
    teacher = peaked_teacher(depth=2, qkv_bias=True).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    return teacher, cache_teacher(teacher, xs[:2], xs[2:], [0, 1]), xs[2]


def _evaluator(tiny, **fit):
    teacher, cache, _ = tiny
    return CandidateEvaluator(
        teacher, cache, FitSettings(**{"steps": 4, **fit}), SpeedSettings(tokens=65, mode="flops")
    )


def test_fit_kl_is_the_kl_of_explicit_maps_on_the_held_out_images(tiny):
    """The search's score recomputed from first principles: with a negligible learning rate the candidate
    is the unfitted copy, whose map is relu(q) relu(k)^T row-normalised; the teacher's is softmax(q k^T / sqrt d)
    from the same cached q, k; KL per row, averaged over rows, heads, images and layers."""
    _, cache, _ = tiny
    result = _evaluator(tiny, steps=1, lr=1e-12)("formula:sum(relu)")
    assert result["status"] == "ok" and len(result["kl_per_layer"]) == 2
    expected = []
    with torch.no_grad():
        for i in (0, 1):
            q, k = (cache.held_out[0][i][n].double() for n in ("q", "k"))
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
            a = (torch.relu(q) + 1e-6) @ (torch.relu(k) + 1e-6).transpose(-1, -2)
            a = a / a.sum(-1, keepdim=True)
            expected.append(float((p * (p.log() - a.log())).sum(-1).mean()))
    assert result["kl_per_layer"] == pytest.approx(expected, rel=1e-4)
    assert result["kl"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert result["speed"] == pytest.approx(result["softmax_flops"] / result["flops"])
    # fitting lowers it, and the same candidate fitted again (same seed, same batches) scores the same
    fitted = _evaluator(tiny)("formula:sum(relu)")
    assert fitted["kl"] < result["kl"]
    assert _evaluator(tiny)("formula:sum(relu)")["kl"] == fitted["kl"]


def test_an_attention_fitted_on_outputs_the_cache_lacks_is_refused_in_words(tiny):
    """hydra (no map) fits on the teacher's attention outputs, which the search does not cache: zoo_proxy's
    fit of it raised a bare KeyError traceback after every earlier student's fit, writing nothing."""
    teacher, cache, _ = tiny
    with pytest.raises(ValueError, match=r"^its fit needs the teacher's output, which the search's cache"):
        fit_student(teacher, "hydra", cache, FitSettings(steps=2), check_map=False)


def test_flops_speed_counts_softmaxs_own_maps_so_a_linear_attention_beats_it_at_many_tokens(tiny):
    """search.speed=flops: softmax's N x N maps (q k^T and the map times v, 2 N^2 d each) are counted besides
    its projections; the fused CPU kernel was counted as nothing, which left every candidate slower than it."""
    from attnxfer.models.attention import transferable_attentions
    from attnxfer.search.fitness import layer_speed

    teacher, n = tiny[0], 1025  # the class token + 32 x 32 patches
    attn = transferable_attentions(teacher)[0]
    width, dim = attn.num_heads * attn.head_dim, attn.proj.out_features
    measured = layer_speed("formula:sum(relu)", teacher, SpeedSettings(tokens=n, mode="flops"))
    projections = 2 * n * dim * 3 * width + 2 * n * width * dim
    assert measured["softmax_flops"] == projections + 4 * n * n * width
    assert measured["speed"] > 1, measured


def test_the_layers_the_search_times_are_built_where_the_teacher_is(tiny):
    """search.speed=time times a candidate and softmax on the teacher's device: built on the CPU whatever the
    teacher's, a search on a GPU reported CPU timings (a teacher on the meta device shows where they go)."""
    from attnxfer.search.fitness import _layer

    teacher = copy.deepcopy(tiny[0]).to("meta")
    for name in ("softmax", "formula:sum(relu)"):
        assert {p.device.type for p in _layer(name, teacher, 17).parameters()} == {"meta"}


def test_a_window_as_tall_as_a_wider_grid_is_fitted_not_refused_as_softmax():
    """win(s) is refused before training where it covers the whole grid (there it is exact softmax); on a wider
    grid a window as tall as the grid still splits each row, so it is no softmax and gets its fit."""
    assert "covers the whole 4x4 token grid" in precheck("formula:sum(relu+win(4))", 16, (4, 4))[1]
    assert precheck("formula:sum(relu+win(4))", 16, (4, 8)) == ("formula:sum(relu+win(4))", None)
    assert precheck("formula:sum(relu+win(4))", 16, (8, 4)) == ("formula:sum(relu+win(4))", None)


@pytest.mark.slow
def test_rejection_protocol_records_every_rejection_with_its_reason(tiny):
    # before training: syntax, check_formula, signed normalisation
    assert "position 8" in precheck("sum(relu", 16, (4, 4))[1]
    assert "signed features" in precheck("formula:sum(neg)", 16, (4, 4))[1]
    assert "signed map" in precheck("formula:len(relu)", 16, (4, 4))[1]
    assert "larger than the 4x4 token grid" in precheck("formula:sum(relu+win(7))", 16, (4, 4))[1]
    assert "covers the whole 4x4 token grid" in precheck("formula:sum(relu+win(4))", 16, (4, 4))[1]
    assert precheck("formula:sum(relu+win(3))", 16, (4, 4)) == ("formula:sum(relu+win(3))", None)
    assert precheck("formula:sum( relu )", 16, (4, 4)) == ("formula:sum(relu)", None)
    # at fit time: stage 1 diverges (NaN/inf) -> recorded, not raised, not dropped (lscale's softplus(s) reaches 0
    # at this rate; a power no longer overflows, its input capped)
    diverging = _evaluator(tiny, lr=1e6, clip_grad=None)("formula:sum(relu.lscale)")
    assert diverging["status"] == "rejected" and "non-finite" in diverging["reason"]

    calls: list[str] = []
    evaluator = _evaluator(tiny)

    def evaluate(names):
        calls.extend(names)
        return [evaluator(n) for n in names]

    seeds = {
        "ok": "formula:sum(relu)",
        "same": "sum(relu)",  # the same canonical formula: a duplicate
        "signed": "formula:sum(neg)",
        "local": "formula:sum(relu+win(7))",
    }
    settings = SearchSettings(population=4, offspring=4, generations=2, head_dim=16, grid=(4, 4), seeds=seeds)
    state = run_search(SearchState(), settings, evaluate)
    # nothing is evaluated twice, nothing rejected before training is evaluated at all
    assert len(calls) == len(set(calls))
    rejected = {n: c["reason"] for n, c in state.candidates.items() if c["status"] == "rejected"}
    assert not set(rejected) & {n for n in calls if rejected.get(n, "").startswith("before training")}
    assert "formula:sum(neg)" in rejected and "formula:sum(relu+win(7))" in rejected
    assert all(c["status"] in ("ok", "rejected") for c in state.candidates.values())
    assert all(c["reason"] for c in state.candidates.values() if c["status"] == "rejected")
    assert state.generation == 2 and 1 <= len(state.population) <= 4
    # every candidate in the state came from a recorded generation, with its origin and parents
    origins = {c["origin"].split(":")[0] for c in state.candidates.values()}
    assert "zoo" in origins and origins <= {"zoo", "random", "mutation", "crossover"}


# ------------------------------------------------------------------------------------- the command
def _args(run_dir, teacher_dir, *extra):
    return [
        "search",
        f"run_dir={run_dir}",
        f"teacher.spec=local-dir:{teacher_dir}",
        *tiny_run(64, 8),
        "search.population=4",
        "search.offspring=3",
        "search.generations=2",
        "search.fit_steps=3",
        "search.fit_batches=2",
        "search.held_out_images=8",
        "search.target_tokens=65",
        "search.speed=flops",
        *extra,
    ]


def _deterministic(path: Path) -> list[dict]:
    """candidates.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]


def _saved(run: Path) -> dict:
    """The search's newest saved state (its checkpoint's state.json), {} where none is saved yet."""
    try:
        point = ResumePoint.find(run, verify_hash=False)
    except CheckpointError:  # a generation being saved this very moment
        return {}
    return {} if point is None else point.state


def test_the_winners_convert_command_runs_the_searched_teacher_on_the_searched_data(tmp_path, capsys):
    """The command pareto.md prints: the recipe's feature_dim would be refused by a formula (whose name holds
    its options), and the recipe's teacher and data would convert another model on other images."""
    import shlex

    from attnxfer.apps.search import winner_command
    from attnxfer.config import load_config
    from attnxfer.models.attention.registry import get_attention_class

    searched = ["teacher.spec=local-dir:/x/teacher", "data.dataset=synthetic", "data.kwargs.length=64"]
    cfg = load_config("search/demo", [*searched, f"run_dir={tmp_path / 's'}"])
    argv = shlex.split(winner_command(cfg, "formula:sum(proj.cat(softmax,neg.softmax))", 2))
    assert (
        argv[:4] == ["attnxfer", "convert", "-c", "convert/demo_hedgehog"]
        and "data.kwargs={length: 64}" in argv
    )
    folder = next(a.removeprefix("run_dir=") for a in argv if a.startswith("run_dir="))
    assert all(key in argv for key in searched[:2]) and Path(folder).parent == tmp_path / "s"
    # a later winner converts beside this one
    other = shlex.split(winner_command(cfg, "formula:sum(relu)", 2))
    assert f"run_dir={folder}" not in other and any(a.startswith(f"run_dir={tmp_path / 's'}") for a in other)
    capsys.readouterr()
    assert cli.main([*argv[1:], "--print-config"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert (
        "attention: formula:sum(proj.cat(softmax,neg.softmax))" in printed and "dataset: synthetic" in printed
    )
    converted = load_config(argv[3], argv[4:])  # each option is one the formula takes, as the swap checks
    formula = get_attention_class(converted.convert.attention)
    assert all(formula.accepts_option(k) for k in converted.convert.attention_kwargs)
    # the recipe's batches (128, stage 1's 64) over the searched set give way to the search's 16, which fitted
    assert not any("batch_size" in a for a in argv)  # the set's size unknown (a stream): the recipe's stand
    for images, batches in ((64, (16, 64)), (32, (16, 16))):
        smaller = load_config(argv[3], shlex.split(winner_command(cfg, "formula:sum(relu)", 2, images))[4:])
        assert (smaller.data.batch_size, smaller.convert.stage1_batch_size) == batches, images
    # a search of some blocks converts those blocks alone; the others keep the teacher's softmax
    some = load_config("search/demo", ["search.layers=[1,3]"])
    argv = shlex.split(winner_command(some, "formula:sum(proj.cat(softmax,neg.softmax))", 4))
    each = ["softmax", "formula:sum(proj.cat(softmax,neg.softmax))"] * 2
    assert load_config(argv[3], argv[4:]).convert.attention == each, argv


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher_dir):
    run = tmp_path_factory.mktemp("search") / "run"
    assert cli.main(_args(run, tiny_teacher_dir)) == 0
    return run


def test_a_winner_recipe_that_is_not_there_is_refused_before_the_search(tmp_path, tiny_teacher_dir, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys, *_args(run, tiny_teacher_dir, "search.convert_recipe=convert/demo_hedgehgo")
    )
    assert code == 2 and "did you mean the built-in recipe 'convert/demo_hedgehog'" in err, err
    assert err.startswith("attnxfer search: error: search.convert_recipe=convert/demo_hedgehgo: config file")
    code, _, err = run_cli(capsys, *_args(run, tiny_teacher_dir, "search.convert_recipe=search/demo"))
    assert (
        code == 2 and "search.convert_recipe=search/demo: search." in err and "attnxfer convert would" in err
    )
    assert not (run / "candidates.jsonl").exists()


def test_pareto_md_says_a_search_of_every_layer_averages_its_fit_over_every_layer():
    from attnxfer.apps.search import render_pareto_md

    md = render_pareto_md(load_config("search/demo"), SearchState(), [], None, None, held_out=5)
    assert "(nats per row, mean over every layer) after" in md, md
    # a search under a minute keeps its count line, its time at the end (the line had been its time alone)
    assert ": 0 fitted, 0 rejected before training, 0 rejected at fit time; 0 duplicates" in md
    assert "duplicates not re-evaluated; 0 s.\n" in md, md
    # a time names what it was measured on, and that it is one layer's, not the model's convert.speedup
    cfg = load_config("search/demo", ["device=cpu", "search.speed=time"])
    md = render_pareto_md(cfg, SearchState(), [], None, None, held_out=5)
    threads = torch.get_num_threads()
    assert (
        f"x softmax (time: batch 1 on cpu, {threads} threads, median of {cfg.search.speed_repeats} interleaved"
        in md
    )
    assert "one layer's ratio, not a whole model's" in md


@pytest.mark.slow
def test_pareto_md_says_the_images_measured_on_and_a_winner_below_min_speed(finished):
    """The held-out count the KL was measured on (a smaller val split caps search.held_out_images), and a
    winner that is the front's best fit because no member reaches search.min_speed, said as such."""
    from attnxfer.apps.search import render_pareto_md, winner_of
    from attnxfer.config import load_config
    from attnxfer.search import pareto_front

    state = SearchState.from_dict(_saved(finished)["state"])
    cfg = load_config("search/demo", ["search.min_speed=1000"])  # what the report reads of a config
    front = pareto_front(state)
    md = render_pareto_md(cfg, state, front, winner_of(front, 1000), "attnxfer convert ...", held_out=5)
    assert "on 5 held-out images" in md and "none of its members is 1000x as fast as softmax" in md
    assert f"(search.min_speed; the fastest is {beside(max(c['speed'] for c in front), 1000)})" in md
    assert f"## Top {min(10, len(state.evaluated))} formulas by fit" in md  # not "Top 10" of fewer
    twice = load_config("search/demo", ["search.layers=[1,0,1]"])  # the layers fitted: each once, in order
    md = render_pareto_md(twice, state, front, winner_of(front, 1), "attnxfer convert ...", held_out=5)
    assert "mean over layers [0, 1])" in md
    # a bar the table's two decimals round the fastest up to (1.4286 shows as 1.43) is said missed, with its speed
    made = SearchState(
        candidates={"f": {"formula": "f", "status": "ok", "kl": 0.1, "speed": 1 / 0.7, "origin": "zoo:x"}}
    )
    near = load_config("search/demo", ["search.min_speed=1.43"])
    md = render_pareto_md(
        near, made, pareto_front(made), winner_of(pareto_front(made), 1.43), "c", held_out=5
    )
    assert (
        "| 1.43 |" in md
        and "none of its members is 1.43x as fast as softmax (search.min_speed; the fastest is 1.429x)" in md
    )
    # four significant digits round 1.42996 up to the bar too: as many digits as keep it short are said
    made.candidates["f"]["speed"] = 1.42996
    md = render_pareto_md(
        near, made, pareto_front(made), winner_of(pareto_front(made), 1.43), "c", held_out=5
    )
    assert "(search.min_speed; the fastest is 1.42996x)" in md, md


@pytest.mark.slow
def test_search_command_writes_every_output(finished, capsys):
    run = finished
    for name in ("candidates.jsonl", "pareto.md", "pareto.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]
    state = _saved(run)
    assert state["state"]["generation"] == 2
    assert len(rows) == len({r["formula"] for r in rows}) >= 6  # the zoo, then children; no duplicates
    zoo = {r["origin"] for r in rows if r["origin"].startswith("zoo:")}
    assert {"zoo:relu_linear", "zoo:hedgehog", "zoo:window_linear"} <= zoo
    # win(7)/conv(5) do not fit the tiny 4x4 grid: rejected before training, with the reason
    window = next(r for r in rows if r["origin"] == "zoo:window_linear")
    assert window["status"] == "rejected" and "4x4 token grid" in window["reason"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(math.isfinite(r["kl"]) and r["speed"] > 0 for r in ok)
    md = (run / "pareto.md").read_text()
    # the front in the report is exactly the non-dominated set of the fitted candidates
    front = [r for r, rank in zip(ok, pareto_ranks([(r["kl"], -r["speed"]) for r in ok])) if rank == 0]
    table = md.split("## Pareto front")[1].split("##")[0]
    assert sorted(line.split("`")[1] for line in table.splitlines() if line.startswith("| `")) == sorted(
        r["formula"] for r in front
    )
    assert "attnxfer convert -c convert/demo_hedgehog" in md and "'convert.attention=formula:" in md
    # a rerun of a finished search changes nothing and says so
    before = (run / "candidates.jsonl").read_text()
    capsys.readouterr()
    teacher = Path(state["config"]["teacher"]["spec"][len("local-dir:") :])
    assert cli.main(_args(run, teacher, "search.generations=0")) == 0  # fewer generations than it ran
    out = capsys.readouterr().out
    assert (
        "resuming" in out and "generation 2 was reached already (search.generations=0): no candidate" in out
    )
    assert (run / "candidates.jsonl").read_text() == before
    # a speed bar nothing on the front reaches: the winner line says it is the best fit of all
    assert cli.main(_args(run, teacher, "search.min_speed=1000")) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("winner: "))
    assert re.search(
        r"; no member of the front is 1000x as fast \(search.min_speed; the fastest is [0-9.]+x\)\)$", line
    ), line


@pytest.mark.slow  # two 1-step conversions of 64 images score alike: Spearman's rho has no defined value
@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_search_proxy_reads_a_saved_search_and_converts_its_candidates_as_pareto_md_would(
    finished, tmp_path, capsys, monkeypatch
):
    """benchmarks/search_proxy.py (docs/conversion.md, "Is the proxy honest?") on a search saved through the
    checkpoint store: every candidate converted by the winner's command, on the searched data, whose recipe's
    Hedgehog options a formula would refuse. The script's main() runs here (no interpreter of its own to
    import torch again); each conversion is still the `python -m attnxfer convert` process pareto.md gives."""
    out = tmp_path / "proxy"
    tiny = ["convert.stage1_steps=1", "schedule.max_steps=1", "data.batch_size=4", "convert.speed_sweep=[]"]
    args = [str(finished), "--count", "1", "--out", str(out), *tiny, *tiny_convert_report(repeats=1, batch=1)]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the conversions' threads, as `OMP_NUM_THREADS=1 python ...`
    code, _, err = script_main(capsys, script_module("search_proxy", folder="benchmarks"), *args, *QUIET)
    assert code == 0, err[-2000:]
    summary = json.loads((out / "proxy.json").read_text())
    assert summary["conversions"] >= 2 and not summary["failed"], summary["failed"]
    assert all(
        r["val_size"] == 64 for r in summary["rows"]
    )  # the search's synthetic images, not the recipe's


def test_search_proxy_rerun_never_reports_a_conversion_of_another_formula_as_its_pick(
    finished, tmp_path, capsys, monkeypatch
):
    """A rerun with another --count (or after a longer search) picks other candidates, so OUT/NN may hold
    another formula's finished conversion: that row fails saying so, not reports those figures as its own."""
    out = tmp_path / "proxy"
    other = {
        "student": {"spec": {"attention": "formula:sum(exp)"}},
        "student_top1": 99.0,
        "recovered_pct": 100,
    }
    other |= {
        "top1": {"after_stage1": 99.0, "teacher": 99.0},
        "data": {"val_size": 64},
        "seconds": {"total": 1},
    }
    for i in range(12):  # every index a pick can take
        (out / f"{i:02d}").mkdir(parents=True)
        (out / f"{i:02d}" / "report.json").write_text(json.dumps(other))
    monkeypatch.chdir(ROOT)
    proxy = script_module("search_proxy", folder="benchmarks")
    code, _, err = script_main(capsys, proxy, str(finished), "--count", "1", "--out", str(out))
    assert code == 0, err[-2000:]
    summary = json.loads((out / "proxy.json").read_text())
    assert summary["failed"] and not [r for r in summary["rows"] if "error" not in r], summary["rows"]
    assert all(
        "holds formula:sum(exp)'s conversion: give a new --out" in r["error"] for r in summary["failed"]
    )


@pytest.mark.slow
def test_the_proxy_benchmarks_refuse_a_folder_that_is_not_theirs_with_what_to_give(trained, tmp_path, capsys):
    """search_proxy.py on a training run's folder (its checkpoints hold no search state) and zoo_proxy.py on
    a folder without a study say which folder they take, not a KeyError or FileNotFoundError traceback (which
    would reach the test here: both scripts' main() run in this process)."""
    runs = [
        script_main(capsys, script_module("search_proxy", folder="benchmarks"), str(trained)),
        script_main(
            capsys,
            script_module("zoo_proxy", folder="benchmarks"),
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ),
    ]
    errs = [err for _, _, err in runs]
    assert all(code == 2 and "Traceback" not in err for code, _, err in runs), errs
    assert "not a search's: give a search's RUN_DIR" in errs[0] and "attnxfer study" in errs[1], errs


def test_zoo_proxy_only_refuses_a_student_name_the_study_lacks(tmp_path, monkeypatch, capsys):
    """A mistyped --only name was dropped without a word: the rho then covered fewer students than asked."""
    students = []
    for name in ("relu_linear", "nystrom", "local"):
        (tmp_path / name).mkdir()
        report = {"student": {"attention": [name], "attention_kwargs": {}}, "student_top1": 0.5}
        report["top1"] = {"teacher": 0.9, "after_stage1": 0.4}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        students.append({"name": name, "folder": name})
    (tmp_path / "study.json").write_text(json.dumps({"students": students}))
    args = [str(tmp_path), "--out", str(tmp_path / "out"), "--only", "nystrom", "nystorm", "local"]
    monkeypatch.setattr(sys, "argv", ["zoo_proxy.py", *args])
    with pytest.raises(SystemExit) as stopped:
        script_module("zoo_proxy", folder="benchmarks").main()
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert "--only nystorm: no student with a report by that name (have: relu_linear, nystrom, local)" in said


@pytest.mark.slow
def test_zoo_proxy_fits_at_the_studys_token_count_so_a_teacher_without_a_class_token_is_taken(
    tmp_path, monkeypatch
):
    """search.target_tokens' default (3137: a class token + 56x56) was handed to the evaluator, which refused the
    recall teacher (no class token) with a ConfigError traceback; the proxy times nothing, so the run's own count
    goes, and one given on the command line is kept."""
    students = []
    for name in ("relu_linear", "hedgehog", "performer"):
        (tmp_path / name).mkdir()
        report = {"student": {"attention": [name], "attention_kwargs": {}}, "student_top1": 0.5}
        report["top1"] = {"teacher": 0.9, "after_stage1": 0.4}
        report["speed"] = {"tokens": 1024}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        (tmp_path / name / "config.yaml").write_text("seed: 0\n")
        students.append({"name": name, "folder": name})
    (tmp_path / "study.json").write_text(json.dumps({"students": students}))
    module = script_module("zoo_proxy", folder="benchmarks")
    taken = []

    def build_evaluator(cfg):
        taken.append(cfg.search.target_tokens)
        raise SystemExit(0)

    monkeypatch.setattr(module, "build_evaluator", build_evaluator)
    for extra in ([], ["search.target_tokens=65"]):
        monkeypatch.setattr(
            sys, "argv", ["zoo_proxy.py", str(tmp_path), "--out", str(tmp_path / "out"), *extra]
        )
        with pytest.raises(SystemExit):
            module.main()
    assert taken == [1024, 65]


def test_a_search_folder_takes_no_other_commands_run(finished, tiny_teacher_dir, capsys):
    """A conversion's stages or a run's checkpoints beside the search's would be read as its own on resume."""
    before = sorted(p.relative_to(finished) for p in finished.rglob("*"))
    for command in ("train", "convert"):
        code, _, err = run_cli(
            capsys, command, f"teacher.spec=local-dir:{tiny_teacher_dir}", f"run_dir={finished}"
        )
        assert code == 2 and f"holds a search (candidates.jsonl), which attnxfer {command} does not" in err, (
            err
        )
    # read where a model or a run is wanted, it is named a search's folder (it has checkpoints/ as a run has)
    spec = f"teacher.spec=local-dir:{tiny_teacher_dir}"
    for argv in (["eval", spec, f"run_dir={finished}"], ["train", f"teacher.spec=local-dir:{finished}"]):
        code, _, err = run_cli(capsys, *argv)
        assert (
            code == 2 and f"{finished} is a search's folder: it holds attention formulas, not a model" in err
        ), err
    # export, which takes a run's folder, says where a student of the search's winner comes from
    code, _, err = run_cli(capsys, "export", str(finished), str(finished.parent / "exported"))
    assert (
        code == 2 and f"the convert command in {finished / 'pareto.md'} makes a student of its winner" in err
    )
    assert sorted(p.relative_to(finished) for p in finished.rglob("*")) == before


def _search_process(run: Path, teacher_dir: Path) -> subprocess.Popen:
    """The CLI's search of `_args` started in its own process, to be stopped from outside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-m", "attnxfer", *_args(run, teacher_dir)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, finished, tiny_teacher_dir, capsys):
    """SIGKILL of the search's own process after a generation is saved; the same command, run here, resumes
    it and ends as the uninterrupted search."""
    run = tmp_path / "run"
    proc = _search_process(run, tiny_teacher_dir)
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if _saved(run):
            generation = _saved(run)["state"]["generation"]
            if generation >= 0:
                proc.send_signal(signal.SIGKILL)
                killed_at = generation
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 2, "the search finished before it could be killed"
    code, out, err = run_cli(capsys, *_args(run, tiny_teacher_dir))
    assert code == 0, out + err[-3000:]
    assert f"after generation {killed_at}" in out
    assert _deterministic(run / "candidates.jsonl") == _deterministic(finished / "candidates.jsonl")
    a, b = (_saved(r)["state"] for r in (run, finished))
    assert a["population"] == b["population"] and a["duplicates"] == b["duplicates"]


@pytest.mark.slow
def test_sigterm_stops_at_a_saved_generation_says_so_and_the_same_command_ends_as_uninterrupted(
    tmp_path, finished, tiny_teacher_dir, capsys
):
    """A job's time limit or preemption (SIGTERM) ends the search at the next generation boundary, with the
    generation saved, its lock released and the resume said, as train and convert stop; not killed outright.
    The signal goes to the search's own process; the same command, run here, resumes it."""
    run = tmp_path / "run"
    proc = _search_process(run, tiny_teacher_dir)
    deadline = time.monotonic() + 240
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and _saved(run).get("state", {}).get("generation", -1) < 0
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    m = re.search(
        r"stopped by SIGTERM at generation (\d) of 2; checkpoint saved \((.+?)\); re-run the same command",
        out,
    )
    assert m and Path(m.group(2)).is_dir() and not (run / "attnxfer.lock").exists(), out[-3000:]
    code, out, err = run_cli(capsys, *_args(run, tiny_teacher_dir))
    assert code == 0 and f"after generation {m.group(1)}" in out, out + err[-3000:]
    assert _deterministic(run / "candidates.jsonl") == _deterministic(finished / "candidates.jsonl")


@pytest.mark.slow
def test_changed_config_on_resume_is_refused(finished, tiny_teacher_dir, capsys):
    before = _saved(finished)
    code, _, err = run_cli(capsys, *_args(finished, tiny_teacher_dir, "search.fit_steps=5"))
    assert code == 2 and "search.fit_steps (3 -> 5)" in err and "run_dir=" in err and "Traceback" not in err
    assert _saved(finished) == before


def test_budget_that_cannot_fit_generation_0_is_refused_before_starting(tmp_path, tiny_teacher_dir, capsys):
    """A search stopped before generation 0 ends has nothing to report: the budget is judged against its every
    candidate (the seeds, then random formulas up to the population), and the refusal says how much to give."""
    run = tmp_path / "run"
    args = _args(run, tiny_teacher_dir, "search.time_budget_min=0.00001")
    code, _, err = run_cli(capsys, *(a.replace("population=4", "population=8") for a in args))
    assert code == 2 and err.startswith("attnxfer search: error: search.time_budget_min=1e-05")
    seeds = len(HAND_DESIGNED)
    assert f"generation 0, its 8 candidates (search.population=8, at least the {seeds} seed formulas)" in err
    assert "Raise search.time_budget_min to at least" in err
    assert not run.exists()


@pytest.mark.slow
def test_a_resumed_search_whose_next_generation_would_pass_the_budget_stops_before_it(
    tmp_path, tiny_teacher_dir, capsys
):
    """The guess of the next generation's length is the last one's, which a resume reads from the checkpoint:
    it stops where the process that saved it would have, with its reports, instead of running one more."""
    run = tmp_path / "run"
    assert run_cli(capsys, *_args(run, tiny_teacher_dir, "search.generations=0"))[0] == 0
    spent = _saved(run)["state"]["seconds"]  # generation 0 alone: as long as the last generation
    budget = f"search.time_budget_min={1.5 * spent / 60}"
    code, out, err = run_cli(capsys, *_args(run, tiny_teacher_dir, budget))
    assert code == 0 and "stopping before generation 1: the next generation would end after" in out, err
    assert _saved(run)["state"]["generation"] == 0 and (run / "pareto.md").is_file()


def test_a_generation_with_every_candidate_rejected_says_what_to_change(tmp_path, tiny_teacher_dir, capsys):
    run = tmp_path / "run"  # a learning rate no stage 1 survives: every fit goes non-finite
    code, _, err = run_cli(
        capsys, *_args(run, tiny_teacher_dir, "search.fit_lr=1e30", "search.generations=0")
    )
    assert code == 2 and "every candidate was rejected" in err and "search.fit_lr" in err, err
    assert "Traceback" not in err


def test_a_seed_may_name_a_zoo_attention_the_grammar_writes_and_another_name_is_told_which():
    """A name is told what it is (a zoo attention no formula writes, or a misspelt seed with the nearest one),
    not a formula's syntax error."""
    cfg = load_config("search/demo", ["search.seeds=[hedgehog, 'sum(relu)']"])
    assert _seed_formulas(cfg) == {"hedgehog": HAND_DESIGNED["hedgehog"], "relu_linear": "formula:sum(relu)"}
    listed = r"\(seeds are formulas, e\.g\. 'sum\(relu\)', or name one of: relu_linear, elu_linear, "
    for name, why in (
        ("performer", "is a zoo attention that no formula writes"),
        ("hedgehogg", "names no seed; did you mean 'hedgehog'?"),
    ):
        with pytest.raises(
            ConfigError, match=rf"search\.seeds\[0\]: '{name}' {re.escape(why)} {listed}"
        ) as e:
            _seed_formulas(load_config("search/demo", [f"search.seeds=[{name}]"]))
        assert "syntax" not in str(e.value)


def test_search_layers_that_name_no_block_or_one_past_the_last_are_refused_saying_which(
    tmp_path, tiny_teacher_dir, capsys
):
    for layers, which in (
        ("[]", "names no block (null: every block)"),
        ("[0, 2]", "names a block the teacher lacks"),
    ):
        code, _, err = run_cli(capsys, *_args(tmp_path / "run", tiny_teacher_dir, f"search.layers={layers}"))
        assert code == 2 and f"{which}: the teacher has blocks 0..1" in err, err


def test_unparsable_seed_formula_names_the_position(tmp_path, tiny_teacher_dir, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_args(run, tiny_teacher_dir, "search.seeds=['sum(relu)', 'sum(relu.)']"))
    assert code == 2 and "search.seeds[1]" in err and "position 9" in err and "expected" in err
    assert "Traceback" not in err and not run.exists()


def test_target_tokens_that_are_not_the_teachers_layout_are_refused_before_any_fit(
    tmp_path, tiny_teacher_dir, capsys
):
    run = tmp_path / "run"  # the teacher has one class token: 51 = 1 + 50, not a square grid
    code, _, err = run_cli(capsys, *_args(run, tiny_teacher_dir, "search.target_tokens=51"))
    assert code == 2 and "search.target_tokens: 51 tokens is not the teacher's 1 prefix token(s)" in err, err
    assert "choose e.g. 50 or 65" in err, err  # the nearest counts, not always 3137's far-off grid
    assert "Traceback" not in err and not (run / "candidates.jsonl").exists()


@pytest.mark.slow
def test_the_same_teacher_under_another_path_resumes_and_other_weights_are_refused(
    tmp_path, tiny_teacher_dir, capsys, monkeypatch
):
    """The teacher is judged by the sha256 the saved state records, not by the spec's spelling."""
    monkeypatch.chdir(tiny_teacher_dir.parent)
    run = tmp_path / "run"
    relative = Path(tiny_teacher_dir.name)
    assert cli.main(_args(run, relative, "search.generations=0")) == 0
    state = _saved(run)
    assert state["config"]["teacher"]["spec"] == f"local-dir:{relative}"
    recorded = state["teacher"]["sha256"]
    capsys.readouterr()
    assert cli.main(_args(run, tiny_teacher_dir.resolve(), "search.generations=1")) == 0  # absolute spelling
    out = capsys.readouterr().out
    assert "resuming" in out and "after generation 0" in out and "teacher.spec (" in out
    assert _saved(run)["state"]["generation"] == 1
    # the same files with one weight changed: another teacher, refused before anything is written
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, str(other / "model.safetensors"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, *_args(run, other, "search.generations=2"))
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert recorded in line and "another teacher" in line and "sha256" in line.split(recorded)[1]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("override", "accepted"),
    [
        ("search.min_speed=2", True),  # declared search_resumable (a training resume could not change it)
        ("log.every_steps=7", True),  # through its section: section(LogConfig, search_resumable=True)
        ("data.num_workers=2", True),
        ("checkpoint.keep_last=5", True),  # how many generations stay saved, not what they hold
        ("optim.lr=0.5", False),  # a training resume may change it; a search's candidates were fitted with it
        ("search.fit_steps=5", False),
    ],
)
def test_a_search_resumes_with_exactly_the_keys_declared_search_resumable(
    tmp_path, override, accepted, capsys
):
    """The search's resume rule is read off the schema (``key(..., search_resumable=True)``), not a table of
    its own, and is not the training run's rule (`RESUMABLE_KEYS`)."""
    from attnxfer.apps.search import _resume_point, _save
    from attnxfer.config import RESUMABLE_KEYS, SEARCH_RESUMABLE_KEYS, ConfigError, load_config
    from attnxfer.search import SearchState

    name = override.split("=")[0]
    assert (name in SEARCH_RESUMABLE_KEYS) is accepted and (name in RESUMABLE_KEYS) is not name.startswith(
        "search"
    )
    recorded = load_config(overrides=[f"run_dir={tmp_path}"])
    _save(recorded, tmp_path, SearchState(generation=0), None)
    changed = load_config(overrides=[f"run_dir={tmp_path}", override])
    capsys.readouterr()
    if accepted:
        assert _resume_point(changed, tmp_path).record("state")["generation"] == 0
        assert capsys.readouterr().out.startswith("resume: changed since step-00000000: " + name)
    else:
        with pytest.raises(ConfigError, match=f"different values for: {name} ") as refused:
            _resume_point(changed, tmp_path)
        assert capsys.readouterr().out == ""
        assert "its config" not in str(refused.value)  # a search writes none: its checkpoint is not named one
        assert "start it over here (checkpoint.resume=none" in str(refused.value)  # as the docs offer


def test_a_search_started_over_keeps_the_earlier_one_aside_and_the_plain_command_continues_the_new_one(
    tmp_path, tiny_teacher_dir, capsys
):
    """checkpoint.resume=none starts over as training does: the earlier search's generations and reports are
    set aside, and the command without it continues the new search (not the earlier, further one; not
    refused for its checkpoint.resume)."""
    from attnxfer.apps.search import _save
    from attnxfer.config import load_config
    from attnxfer.search import SearchState

    run = tmp_path / "run"
    _save(load_config(overrides=[f"run_dir={run}"]), run, SearchState(generation=5), None)
    (run / "pareto.png").write_bytes(b"the earlier search's figure")
    one = ["search.generations=0", "search.population=2", "search.seeds=[formula:sum(relu)]"]
    code, _, err = run_cli(capsys, *_args(run, tiny_teacher_dir, *one, "checkpoint.resume=none"))
    assert code == 0, err[-2000:]
    assert "kept the earlier step-00000005 as" in err
    assert _saved(run)["state"]["generation"] == 0
    assert len(list((run / "checkpoints").glob("step-00000005.replaced-*"))) == 1
    assert [p.read_bytes() for p in run.glob("pareto.png.replaced-*")] == [b"the earlier search's figure"]
    code, out, err = run_cli(capsys, *_args(run, tiny_teacher_dir, *one[1:], "search.generations=1"))
    assert code == 0 and "search: resuming" in out and _saved(run)["state"]["generation"] == 1, err[-2000:]


def test_keys_a_search_never_reads_are_refused_before_anything_is_written(tmp_path, tiny_teacher_dir, capsys):
    """A candidate is fitted by the search section alone: schedule.max_steps would not shorten the search, nor
    optim.lr change its fits, so neither is dropped without a word."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *_args(run, tiny_teacher_dir, "schedule.max_steps=2", "optim.lr=1"))
    assert code == 2 and "attnxfer search does not read optim.lr, schedule.max_steps (" in err, err[-2000:]
    assert "search.fit_steps, search.fit_lr): remove them" in err and not run.exists()
    code, _, err = run_cli(
        capsys, *_args(run, tiny_teacher_dir, "aug.mixup=0.8", "precision=bf16", "deterministic=true")
    )
    assert code == 2 and "does not read precision, deterministic, aug.mixup (" in err, err[-2000:]
    assert not run.exists()
    code, _, err = run_cli(
        capsys, *_args(run, tiny_teacher_dir, "teacher.dtype=bf16", "teacher.compile=true")
    )
    assert code == 2 and "does not read teacher.dtype, teacher.compile (" in err, err[-2000:]
    assert not run.exists()
    # it saves once per generation, and a resume on other data is refused whatever allow_new_data says
    saving = ["checkpoint.every_steps=5", "checkpoint.every_minutes=1", "checkpoint.every_epoch=false"]
    code, _, err = run_cli(capsys, *_args(run, tiny_teacher_dir, *saving, "checkpoint.allow_new_data=true"))
    assert code == 2 and "does not read " + ", ".join(k.split("=")[0] for k in saving) in err, err[-2000:]
    assert "checkpoint.allow_new_data (it saves after each generation" in err and "fit_lr" not in err
    assert not run.exists()


def test_a_search_keeps_its_newest_checkpoint_keep_last_generations(tmp_path):
    from attnxfer.apps.search import _save
    from attnxfer.config import load_config
    from attnxfer.search import SearchState

    for keep, kept in ((None, [3, 4, 5]), (1, [5]), (4, [2, 3, 4, 5])):
        run = tmp_path / str(keep)
        cfg = load_config(
            overrides=[f"run_dir={run}"] + [f"checkpoint.keep_last={keep}"] * (keep is not None)
        )
        for generation in range(6):
            _save(cfg, run, SearchState(generation=generation), None)
        assert sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")) == kept


def test_job_array_flags_without_array_tasks_are_refused_not_dropped(tmp_path, capsys):
    """Without --array-tasks the search runs in this process, so --partition or --time would change nothing."""
    code, _, err = run_cli(
        capsys, "search", "--partition", "cpu", "--time", "30", f"run_dir={tmp_path / 'r'}"
    )
    assert (
        code == 2
        and "--partition, --time only apply to --array-tasks K" in err
        and not (tmp_path / "r").exists()
    )


def test_job_array_flags_choose_where_the_array_runs(tmp_path, monkeypatch):
    """--account, --qos, --constraint, --exclude and --gpus-per-node reach the array's sbatch options (a cluster
    that requires an account takes no array without it; --slurm account= is refused in favour of --account)."""
    from attnxfer.launch import search_array
    from attnxfer.launch.slurm import sbatch_parameters

    def built(opts, job_dir):
        raise LookupError(sbatch_parameters(opts))

    monkeypatch.setattr(search_array, "build_executor", built)
    want = dict(account="lab", qos="high", constraint="a100", exclude="n3", partition="p")
    flags = [part for key, value in want.items() for part in (f"--{key}", value)]
    with pytest.raises(LookupError) as got:
        cli.main(
            ["search", "--array-tasks", "2", "--gpus-per-node", "1", *flags, f"run_dir={tmp_path / 'r'}"]
        )
    assert {**want, "gpus_per_node": 1}.items() <= got.value.args[0].items()


def test_a_stopped_search_names_the_generation_it_continues_from(tmp_path, capsys, monkeypatch):
    """Its checkpoints (step-<N> folders) hold generations: Ctrl-C's advice and a disk error's note say so."""
    import attnxfer.apps.search
    from attnxfer.apps.search import _save
    from attnxfer.checkpoints.run_lock import last_checkpoint_note
    from attnxfer.config import load_config
    from attnxfer.search import SearchState

    run = tmp_path / "run"
    _save(load_config(overrides=[f"run_dir={run}"]), run, SearchState(generation=3), None)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnxfer.apps.search, "search", ctrl_c)
    assert cli.main(["search", f"run_dir={run}"]) == 130
    saved = run / "checkpoints" / "step-00000003"
    assert f"continues from generation 3 ({saved})" in capsys.readouterr().err
    assert last_checkpoint_note(run) == f"last intact checkpoint: generation 3 ({saved})"


def test_zoo_proxy_leaves_out_a_hybrid_student_before_it_fits_any(tmp_path, capsys):
    """A student with an attention per block (auto's choice, softmax_first) reached the fit after the others
    had been fitted, and its list stopped the script with a traceback, writing nothing."""
    students = []
    for name, attention in (("relu_linear", ["relu_linear"] * 2), ("auto_1.5", ["hedgehog", "performer"])):
        (tmp_path / name).mkdir()
        report = {"student": {"attention": attention, "attention_kwargs": {}}, "student_top1": 0.5}
        report["top1"] = {"teacher": 0.9, "after_stage1": 0.4}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        students.append({"name": name, "folder": name})
    (tmp_path / "study.json").write_text(json.dumps({"students": students}))
    kept = script_module("zoo_proxy", folder="benchmarks").students_of(tmp_path)
    assert [s["name"] for s in kept] == ["relu_linear"] and kept[0]["attention"] == "relu_linear"
    assert "auto_1.5: a hybrid (hedgehog, performer), left out" in capsys.readouterr().out
