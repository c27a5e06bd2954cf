"""`transfer.ce_path: auto`: the CE path measured on the device, its record, failing paths,
and rank 0's choice used by every rank. Timings are never asserted: only which paths were timed, skipped
or refused and that the choice is the fastest of what was timed. Through the CLI: the path a run's config
chooses reaches its training and run.json, and a resumed auto run takes the recorded path back, bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ONE_BLOCK_RUN as S, run_cli, tiny_vit, torchrun_launch
from safetensors.torch import load_file

from attnxfer.transfer import TeacherStudent, build_plan
from attnxfer.transfer.ce_select import (
    CEChoice,
    LayerShapes,
    candidate_paths,
    check_forced,
    choose_ce_path,
    layer_shapes,
    measure_ce_paths,
)
from attnxfer.transfer.losses import CEPath, CEPathUnavailable, materialised_bytes
from attnxfer.transfer.map_losses import LayerLogits, map_distillation_loss

ROOT = Path(__file__).resolve().parents[2]


def _tiny_pair():
    """A fresh tiny teacher and student (2 blocks, 17 tokens, 3 heads of 16): a plan may freeze the
    student's projections, so tests that build their own plans do not share them with `pair`."""
    return tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2)


@pytest.fixture(scope="module")
def pair():
    teacher, student = _tiny_pair()
    return TeacherStudent(teacher, student, build_plan(teacher, student, "distill"))


def test_auto_times_every_cpu_path_keeps_the_fastest_and_records_it(pair, capsys):
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in pair.student.state_dict().items()}
    choice = choose_ce_path(pair, 4, "cpu", rounds=2)
    assert capsys.readouterr().out == ""  # nothing failed
    assert set(choice.timings_ms) == {"rows", "sdpa", "attention_lse", "materialised"}
    assert choice.path == min(choice.timings_ms, key=choice.timings_ms.get) and choice.how == "measured"
    assert choice.unavailable == {"triton": "needs CUDA"}
    # the real shapes of the plan's layers: batch per rank, 17 tokens, 3 heads of 16, both distilled layers
    assert choice.shapes == dict(
        batch=4,
        tokens=17,
        student_heads=3,
        student_dim=16,
        teacher_heads=3,
        teacher_dim=16,
        layers=2,
        student_dtype="float32",
        teacher_dtype="float32",
    )
    # calibration touches no RNG stream and no weight: a calibrated run trains as one told the path
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in pair.student.state_dict().items())
    # what run.json and the checkpoints carry comes back as the same choice
    again = CEChoice.from_record(json.loads(json.dumps(choice.record())))
    assert again == choice and pair.ce_path is None  # choose_ce_path only says; the caller sets it
    assert choice.describe().startswith(f"ce_path: {choice.path} (measured on cpu, batch 4 x 17 tokens")


def test_a_failing_path_is_skipped_with_one_line_and_materialised_needs_its_budget(pair, capsys):
    """triton on a CPU without Triton's interpreter raises for real; a budget of 0 bytes refuses the
    materialised maps before they are built; rows is what is left."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter makes the triton path run on the CPU")
    choice = choose_ce_path(
        pair, 2, "cpu", paths=["materialised", "triton", "rows"], budget_bytes=0, rounds=1
    )
    lines = capsys.readouterr().out.splitlines()
    assert choice.path is CEPath.ROWS and set(choice.timings_ms) == {"rows"}
    assert len(lines) == 1
    assert lines[0].startswith("ce_path auto: skipping triton, it cannot run here: CEPathUnavailable")
    assert set(choice.skipped) == {"triton"} and "TRITON_INTERPRET" in choice.skipped["triton"]
    # the start-up line and the record (run.json) say why, not only which
    assert f"skipped, cannot run here: triton ({choice.skipped['triton']})" in choice.describe()
    assert CEChoice.from_record(json.loads(json.dumps(choice.record()))).skipped == choice.skipped
    need = materialised_bytes(2, 17, 3, 3, 2)
    assert choice.unavailable == {"materialised": f"maps need {need / 2**30:.3g} GiB, budget 0 GiB"}
    # a budget that holds the maps lets materialised be timed
    fits = choose_ce_path(pair, 2, "cpu", paths=["materialised"], budget_bytes=need, rounds=1)
    assert set(fits.timings_ms) == {"materialised"} and fits.path is CEPath.MATERIALISED


def test_a_path_that_raises_for_another_reason_stops_the_calibration(capsys):
    """Only "cannot run here" is skipped: a layer shape every path rejects (2 teacher heads for 3 student heads)
    is an error in the caller or a path, and it surfaces instead of becoming a skip line per path."""
    odd = LayerShapes(
        batch=2, tokens=17, student_heads=3, student_dim=16, teacher_heads=2, teacher_dim=16, layers=1
    )
    with pytest.raises(ValueError, match="teacher has 2 heads, student 3"):
        measure_ce_paths(odd, "cpu", [CEPath.ROWS, CEPath.SDPA], rounds=1)
    assert capsys.readouterr().out == ""


def test_triton_needs_square_maps_in_every_distilled_layer_and_a_forced_path_is_never_replaced(pair):
    """A student with a class-attention layer (one query row, 17 keys): auto does not try triton and says why;
    forced, triton is refused before the first step, and on the layer itself it raises rather than quietly
    taking another path."""
    shapes = LayerShapes(
        batch=2,
        tokens=17,
        student_heads=3,
        student_dim=16,
        teacher_heads=3,
        teacher_dim=16,
        layers=3,
        non_square_layers=1,
    )
    todo, unavailable = candidate_paths("cpu", shapes, 2**30, paths=["triton", "rows"])
    assert todo == [CEPath.ROWS]
    assert unavailable == {
        "triton": "needs square maps, and 1 distilled layer(s) have fewer queries than keys"
    }
    with pytest.raises(CEPathUnavailable, match="^transfer.ce_path=triton cannot run here: "):
        check_forced("triton", "cpu", shapes)
    check_forced("rows", "cpu", shapes)  # the other paths take any shape
    g = torch.Generator().manual_seed(0)
    q_cls, k = torch.randn(2, 3, 1, 16, generator=g), torch.randn(2, 3, 17, 16, generator=g)
    layer = LayerLogits(q_cls, k)
    attn = pair.student.blocks[0].attn
    with pytest.raises(
        CEPathUnavailable, match="takes square maps only, and this student layer's are 1 queries x 17"
    ):
        map_distillation_loss(attn, layer, layer, "ce", ce_path="triton")
    rows = map_distillation_loss(attn, layer, layer, "ce", ce_path="rows")
    assert torch.isfinite(rows.total)


def test_a_named_attention_lse_path_without_the_student_lse_is_refused_with_advice(pair):
    """attention_lse takes the student kernel's log-sum-exp: a named path whose layer handed out none stops
    with why and what to set; the path auto resolved gives way to the same CE by sdpa, as it did unsaid for
    both."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 17, 16, generator=g), torch.randn(2, 3, 17, 16, generator=g)
    layer, attn = LayerLogits(q, k), pair.student.blocks[0].attn
    with pytest.raises(CEPathUnavailable, match="handed out none on this call.*ce_path=auto or sdpa"):
        map_distillation_loss(attn, layer, layer, "ce", ce_path="attention_lse")
    resolved = map_distillation_loss(attn, layer, layer, "ce", ce_path="attention_lse", ce_path_forced=False)
    sdpa = map_distillation_loss(attn, layer, layer, "ce", ce_path="sdpa")
    assert torch.equal(resolved.total, sdpa.total)


def test_the_probe_counts_every_distilled_layer_whose_maps_are_not_square(pair):
    """The shapes auto times are read from every distilled layer: a plain ViT's are all square."""
    shapes = layer_shapes(pair, 2)
    assert shapes.layers == 2 and shapes.non_square_layers == 0
    assert "non_square_layers" not in choose_ce_path(pair, 2, "cpu", paths=["rows"], rounds=1).shapes


def test_materialised_bytes_counts_the_maps_autograd_keeps():
    """Two fp32 N×N maps per distilled layer kept for backward (P̄_t and log P_s), three transient."""
    assert materialised_bytes(2, 10, 3, 6, 4) == 4 * 2 * 100 * (2 * 3 * 4 + 3 * 6)


def test_a_plan_without_softmax_map_distillation_has_no_ce_path():
    teacher, student = _tiny_pair()
    for mode in ("copy", "distill_q", "none"):
        assert layer_shapes(TeacherStudent(teacher, student, build_plan(teacher, student, mode)), 2) is None


@pytest.mark.slow
def test_two_gloo_ranks_use_rank_0s_choice(tmp_path):
    """Each rank offers a different single path (rank 0 sdpa, rank 1 rows): had rank 1 decided on its own
    it would use rows; both use sdpa, and rank 1 timed nothing itself."""
    launch, env = torchrun_launch(ranks=2)
    res = subprocess.run(
        [*launch, str(ROOT / "tests" / "dist_ce_choice.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["path"] == r1["path"] == "sdpa"
    assert r0["how"] == "measured" and r1["how"] == "measured on rank 0"
    assert r1["timings_ms"] == r0["timings_ms"] and set(r0["timings_ms"]) == {"sdpa"}
    assert r0["world"] == r1["world"] == 2


def test_a_deterministic_run_takes_the_device_default_without_timing(pair, capsys):
    """Timings may rank two close paths either way from run to run; ``deterministic: true`` asks for
    repeated runs to be identical, so auto takes the device's fixed default instead of measuring."""
    from attnxfer.apps.run.ce_choice import ce_choice_for_run
    from attnxfer.config import load_config
    from attnxfer.train.runtime import create_runtime
    from attnxfer.transfer.losses import ce_path_for

    runtime = create_runtime("cpu", "fp32")
    for deterministic in (True, False):
        cfg = load_config(
            overrides=["transfer.mode=distill", f"deterministic={deterministic}", "data.batch_size=4"]
        )
        choice = ce_choice_for_run(cfg, pair, runtime, None)
        lines = capsys.readouterr().out.splitlines()
        assert pair.ce_path is choice.path
        if deterministic:
            assert choice.path is ce_path_for(torch.device("cpu")) and not choice.timings_ms
            assert "deterministic=true" in lines[-1]
        else:
            assert choice.how == "measured" and set(choice.timings_ms) >= {"rows", "sdpa"}
    pair.ce_path = None


def test_auto_measures_layers_with_fewer_keys_than_queries():
    """A spatial-reduction layer's shapes (65 query rows, 17 keys): every CPU path is timed on them and none
    fails; the Triton kernels (square maps only) are not tried; the materialised maps are counted N_q×N_k."""
    from attnxfer.transfer.ce_select import LayerShapes, candidate_paths, measure_ce_paths

    shapes = LayerShapes(
        batch=2,
        tokens=65,
        student_heads=2,
        student_dim=8,
        teacher_heads=2,
        teacher_dim=8,
        layers=1,
        key_tokens=17,
    )
    todo, unavailable = candidate_paths("cuda", shapes, budget_bytes=2**40)
    assert CEPath.TRITON not in todo and "keys" in unavailable["triton"]
    square = LayerShapes(**{**shapes.__dict__, "key_tokens": None})
    _, tight = candidate_paths("cpu", shapes, budget_bytes=materialised_bytes(2, 65, 2, 2, 1) - 1)
    _, none_fit = candidate_paths("cpu", square, budget_bytes=materialised_bytes(2, 65, 2, 2, 1) - 1)
    assert "materialised" not in tight and "materialised" in none_fit
    todo, _ = candidate_paths("cpu", shapes, budget_bytes=2**40)
    choice = measure_ce_paths(shapes, "cpu", todo, rounds=1)
    assert not choice.skipped and set(choice.timings_ms) == {str(p) for p in todo}
    assert choice.path in todo and "17 keys" in choice.describe()


def test_layer_shapes_are_the_q_k_the_adapter_hands_out_talking_heads_included():
    """CaiT's talking heads mix heads before the softmax: the CE runs on q', k' of H·d features per head
    (the adapter's `project`), not on one head's d. The shapes timed are those of `project` on the layer's
    real input (the hidden tokens entering the first block), and the batch, tokens and heads too."""
    from families.cases import TINY

    teacher, student = TINY["cait"].build(seed=1), TINY["cait"].build(seed=2)
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "distill"))
    shapes = layer_shapes(pair, 3)
    attn = pair._student_attn[pair.plan.pairs[0][0]]
    hidden = student.patch_embed(torch.zeros(1, 3, 32, 32))  # CaiT's self-attention blocks see the patches
    with torch.no_grad():
        qk = attn.project(student.blocks[0].norm1(hidden), "qk")
    B, H, N, D = qk["q"].shape
    assert (H, D) == (attn.num_heads, attn.num_heads * attn.head_dim) == (2, 32)  # H·d, d = 16
    assert qk["k"].shape == (B, H, N, D) and N == 16
    assert (shapes.batch, shapes.tokens, shapes.student_heads, shapes.student_dim) == (3, N, H, D)
    assert (shapes.teacher_heads, shapes.teacher_dim, shapes.keys) == (H, D, N)


# ---------------------------------------------------------------- through the CLI: a run's choice, recorded


@pytest.mark.parametrize("ce_path", [pytest.param("auto", marks=pytest.mark.slow), "attention_lse"])
def test_the_ce_path_is_chosen_by_config_and_recorded(ce_path, exported, tmp_path, capsys):
    """transfer.ce_path reaches the training step (attention_lse: the student's layers hand out their
    log-sum-exp, or the loss refuses to run) and run.json records the path used and how it was chosen
    (auto: measured here, every path that runs on a CPU timed; a forced path: nothing timed)."""
    run = tmp_path / "distill"
    code, _, err = run_cli(
        capsys,
        "train",
        *[a for a in S if a != "transfer.mode=none"],
        "transfer.mode=distill",
        f"teacher.spec=local-dir:{exported}",
        f"transfer.ce_path={ce_path}",
        "schedule.max_steps=1",
        f"run_dir={run}",
        "deterministic=false",  # with deterministic=true auto takes the device default (test_ce_select)
    )
    assert code == 0, err
    info = json.loads((run / "run.json").read_text())
    choice = info["ce_path_choice"]
    if ce_path == "auto":
        assert choice["how"] == "measured" and set(choice["timings_ms"]) == {
            "rows",
            "sdpa",
            "attention_lse",
            "materialised",
        }
        assert info["ce_path"] == min(choice["timings_ms"], key=choice["timings_ms"].get)
        assert choice["unavailable"] == {"triton": "needs CUDA"}
    else:
        assert info["ce_path"] == ce_path and choice["timings_ms"] == {}


@pytest.mark.slow
def test_a_resumed_auto_run_reuses_the_recorded_ce_path_and_stays_bit_identical(exported, tmp_path, capsys):
    """transfer.ce_path=auto measures once, at the start: the checkpoint records the choice and a resumed
    run takes it back without timing anything (another path would change the trajectory in the last
    bits). Resumed after step 1, the run ends bit-identical to one told the recorded path from the start:
    the calibration disturbed neither the RNG streams nor the weights."""
    distill = [
        *[a for a in S if a != "transfer.mode=none"],
        "transfer.mode=distill",
        f"teacher.spec=local-dir:{exported}",
        "model.drop_path_rate=0.1",  # the RNG stream matters
        "checkpoint.every_steps=1",
        "deterministic=false",  # deterministic=true: auto takes the device default without timing
    ]
    run = tmp_path / "auto"
    assert (
        run_cli(capsys, "train", *distill, "transfer.ce_path=auto", "schedule.max_steps=1", f"run_dir={run}")[
            0
        ]
        == 0
    )
    first = json.loads((run / "run.json").read_text())["ce_path_choice"]
    assert first["how"] == "measured"
    state = json.loads((run / "checkpoints/step-00000001/state.json").read_text())
    assert state["ce_path"] == first
    code, out, err = run_cli(
        capsys, "train", *distill, "transfer.ce_path=auto", "schedule.max_steps=3", f"run_dir={run}"
    )
    assert code == 0, err
    again = json.loads((run / "run.json").read_text())["ce_path_choice"]
    assert again == {**first, "how": "resumed from step-00000001"}  # the same timings: nothing re-measured
    assert f"ce_path: {first['path']} (resumed from step-00000001" in out
    told = tmp_path / "told"
    code, _, err = run_cli(
        capsys,
        "train",
        *distill,
        f"transfer.ce_path={first['path']}",
        "schedule.max_steps=3",
        f"run_dir={told}",
    )
    assert code == 0, err
    a, b = (load_file(str(r / "checkpoints/step-00000003/model.safetensors")) for r in (run, told))
    assert all(torch.equal(a[k], b[k]) for k in a)
