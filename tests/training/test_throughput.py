"""Whole-training throughput: no host syncs on unlogged steps, compiled blocks that compute what
eager ones do (and keep checkpoints unchanged), one optimiser decision, the non-finite guard deferred to
log steps, saves and evaluations."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import SyncCounter, is_compiled, peaked_teacher, tiny_vit
from safetensors.torch import load_file
from timm.layers import DropPath

from attnxfer.apps.run.pretrain import build_pretrain_engine
from attnxfer.apps.run.training import build_engine, train
from attnxfer.checkpoints.export import export_run
from attnxfer.config import ConfigError, load_config
from attnxfer.train.compile import RateAsInputDropPath, compile_blocks
from attnxfer.train.engine import NonFiniteLossError
from attnxfer.train.optim import (
    AdamWImplementation,
    adamw_implementation,
    build_adamw,
    optimizer_implementation,
    student_param_groups,
)
from attnxfer.train.terms import NonFiniteGuard, TermWindow
from attnxfer.transfer import TeacherStudent

pytestmark = pytest.mark.usefixtures("inductor_in_process")  # tests/conftest.py

# A 2-block, 48-wide ViT on 32-px synthetic images (17 tokens): a training step takes milliseconds.
TINY = [
    "data.dataset=synthetic",
    "data.batch_size=8",
    "data.kwargs.length=64",
    "log.progress=true",  # the progress bar's update runs every step: it must not read a tensor
    "log.trackers=[]",
    "checkpoint.every_epoch=false",
    "device=cpu",
    "deterministic=true",
]


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher_dir) -> Path:
    """The session's tiny teacher in timm's format (tests/conftest.py): the runs' teacher (``local-dir:``)."""
    return tiny_teacher_dir


def _cfg(tmp_path: Path, teacher_dir: Path, mode: str, *extra: str):
    teacher = [f"teacher.spec=local-dir:{teacher_dir}"] if mode != "none" else ["model.kwargs={depth: 2}"]
    return load_config(None, [f"run_dir={tmp_path / mode}", *TINY, f"transfer.mode={mode}", *teacher, *extra])


# -- 1. no host syncs on unlogged steps --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,extra",
    [
        # distillation with everything that runs per step: EMA, grad clipping, accumulation, layer decay
        (
            "distill",
            ["ema.decay=0.99", "optim.clip_grad=1.0", "optim.accum_steps=2", "optim.layer_decay=0.75"],
        ),
        ("copy", ["aug.mixup=0.8", "aug.cutmix=1.0"]),  # timm's Mixup/CutMix on the batch
    ],
)
def test_unlogged_steps_never_read_a_tensor_on_the_host(tmp_path, teacher_dir, mode, extra):
    cfg = _cfg(
        tmp_path,
        teacher_dir,
        mode,
        "log.every_steps=3",
        "schedule.max_steps=6",
        "data.kwargs.length=256",
        *extra,
    )
    engine = build_engine(cfg)
    # the optimiser a CUDA run gets (fused) is also the one a CPU run gets: the same code is counted
    assert optimizer_implementation(engine.optimizer) == adamw_implementation("cuda") == "fused"
    steps = engine.steps()
    per_step = {}
    for expected in range(1, 6):
        with SyncCounter() as counter:
            assert next(steps) == expected
        per_step[expected] = counter.calls
    unlogged = {s: calls for s, calls in per_step.items() if s % 3}
    assert all(not calls for calls in unlogged.values()), unlogged
    # the counter does see real reads: the log step converts the window's sums (and checks the guard)
    assert any("Tensor.tolist" in what for what, _ in per_step[3]), per_step[3]


def test_unlogged_mae_pretraining_steps_never_read_a_tensor_on_the_host(tmp_path):
    """The other objective the engine runs (`attnxfer pretrain`: masking, decoder, its own loss)."""
    cfg = load_config(
        None,
        [f"run_dir={tmp_path / 'mae'}", *TINY, "model.kwargs={depth: 2, embed_dim: 48}", "mae.pictures=0"]
        + ["log.every_steps=3", "schedule.max_steps=6", "data.kwargs.length=256"],
    )
    steps = build_pretrain_engine(cfg).steps()
    for expected in (1, 2):
        with SyncCounter() as counter:
            assert next(steps) == expected
        assert not counter.calls, counter.calls


def test_term_window_means_and_guard_against_python_floats():
    window, guard = TermWindow(), NonFiniteGuard()
    steps = [
        {"task": torch.tensor(1.5), "total": torch.tensor(2.0)},
        {"task": torch.tensor(0.5), "total": torch.tensor(1.0), "grad_norm": torch.tensor(3.0)},
        {"task": torch.tensor(2.5, dtype=torch.bfloat16), "total": torch.tensor(4.0)},
    ]
    for i, terms in enumerate(steps):
        window.add(terms)
        guard.watch({k: v for k, v in terms.items() if k != "grad_norm"}, step=i, epoch=0)
    assert window.means() == {"task": 1.5, "total": 7 / 3, "grad_norm": 3.0}
    assert window.means() == {} and guard.first() is None and int(guard.earliest) > 10**15
    assert guard.tripped().dtype == torch.float32 and guard.tripped().item() == 0.0
    # the first non-finite step is kept (step, epoch, term, value), later ones do not overwrite it
    guard.watch({"task": torch.tensor(1.0), "attn_ce/1": torch.tensor(float("inf"))}, step=7, epoch=2)
    guard.watch({"task": torch.tensor(float("nan")), "attn_ce/1": torch.tensor(1.0)}, step=8, epoch=2)
    bad = guard.first()
    assert (bad.term, bad.value, bad.step, bad.epoch) == ("attn_ce/1", math.inf, 7, 2)
    assert int(guard.earliest) == 7 and guard.tripped().item() == 1.0  # what a fused optimiser skips on
    assert NonFiniteGuard().tripped() is None


def test_non_finite_loss_stops_before_the_next_save_even_between_log_steps(tmp_path, teacher_dir):
    """Saves every step, logs every 100: the guard is read before each save, so the first step whose loss is
    NaN (step 2, the first after an lr of 1e30: numbered as the checkpoints and metrics.jsonl are) leaves only
    the checkpoint written before it."""
    cfg = _cfg(
        tmp_path,
        teacher_dir,
        "none",
        "optim.lr=1e30",
        "schedule.warmup_epochs=0",
        "schedule.max_steps=6",
        "log.every_steps=100",
        "checkpoint.every_steps=1",
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss term 'task' = nan at step 2 \(epoch 0\)"):
        train(cfg)
    saved = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").glob("step-*"))
    assert saved == ["step-00000001"]


# -- 2. model.compile ----------------------------------------------------------------------------------


def _loss_and_grads(pair: TeacherStudent, x: torch.Tensor):
    out = pair(x)
    loss = out.logits.logsumexp(-1).mean() + (out.loss if out.loss is not None else 0.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pair.student.named_parameters() if p.grad is not None}
    pair.student.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _student_with_rates_at_zero() -> torch.nn.Module:
    """A 2-block student with timm's stochastic depth (DropPath in block 1), its rate set to 0 (keep = 1:
    compiled and eager RNG streams differ by design). `compile_blocks` gives both blocks
    `RateAsInputDropPath`, so the compiled drop path is compared with eager's, and the training graph is the
    one the stochastic-depth test below compiles: inductor's cache serves it there instead of a second cold
    compile. (Blocks without any DropPath, `model.drop_path_rate=0`, are the compiled run's below.)"""
    student = tiny_vit(depth=2, seed=3, drop_path_rate=0.1)
    assert isinstance(student.blocks[1].drop_path1, DropPath)
    for block in student.blocks:
        for drop in (block.drop_path1, block.drop_path2):
            if isinstance(drop, DropPath):
                drop.drop_prob = 0.0
    return student


@pytest.mark.slow  # torch.compile: ~20 s the first time in a process with a cold inductor cache
@pytest.mark.parametrize("mode", ["none", "copy", "distill"])
def test_compiled_blocks_give_eager_losses_and_gradients(mode):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    breaks = sum(counters["graph_break"].values())
    results = []
    for compiled in (False, True):
        teacher = peaked_teacher(depth=2) if mode != "none" else None
        pair = TeacherStudent(teacher, _student_with_rates_at_zero(), mode=mode).train()
        names = list(pair.student.state_dict())
        if compiled:
            assert compile_blocks(pair.student.blocks) == 2
            if teacher is not None:
                compile_blocks(teacher.blocks)  # teacher.compile: no-grad graphs
        results.append(_loss_and_grads(pair, x))
        if compiled:
            assert all(is_compiled(b) for b in pair.student.blocks)
            assert all(isinstance(b.drop_path1, RateAsInputDropPath) for b in pair.student.blocks)
            graphs = counters["stats"]["unique_graphs"]
            again = _loss_and_grads(pair, x)  # a second step: no new graph, no recompile
            assert counters["stats"]["unique_graphs"] == graphs
            assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
            torch.testing.assert_close(again[0], results[-1][0])
            # names (state_dict, checkpoints, export) are the eager model's: no `_orig_mod.` anywhere
            assert list(pair.student.state_dict()) == names
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # torch.compile: ~20 s the first time in a process with a cold inductor cache
def test_stochastic_depth_rates_are_graph_inputs_so_one_graph_serves_every_block():
    """timm's DropPath rates differ per block (0, 0.1, 0.2 here) and dynamo specialises on floats: as
    buffers they make one training graph for all blocks; the drop itself is timm's (mask in {0, 1/keep})."""
    from torch._dynamo.utils import counters

    student = tiny_vit(depth=3, seed=5, drop_path_rate=0.2)
    names = list(student.state_dict())
    pair = TeacherStudent(None, student, mode="none").train()
    # dynamo forgets the blocks' graph an earlier test compiled (it would reuse it: no new graph to count);
    # inductor's cache still serves that graph's code, so the trace here costs no cold compile
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compile_blocks(student.blocks)
    assert list(student.state_dict()) == names  # the rates are non-persistent buffers
    rates = [b.drop_path1.drop_prob for b in student.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2]) and all(
        isinstance(b.drop_path1, RateAsInputDropPath) for b in student.blocks
    )
    for _ in range(2):
        pair(torch.randn(4, 3, 32, 32)).logits.sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs + 1
    drop = student.blocks[2].drop_path1
    x = torch.ones(4000, 1, 1)
    torch.manual_seed(0)
    y = drop(x).flatten()
    assert y.unique().tolist() == pytest.approx([0.0, 1 / 0.8])
    assert abs((y > 0).float().mean().item() - 0.8) < 0.03  # keep rate 0.8 (4000 draws: sd 0.006)
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.slow  # torch.compile: ~20 s the first time in a process with a cold inductor cache
def test_compiled_run_checkpoints_ema_and_export_like_an_eager_one(tmp_path, teacher_dir):
    """model.compile + teacher.compile through `attnxfer train`: same weights (tolerance), same names, an
    eager EMA, run.json says what was compiled and which AdamW stepped."""
    common = ["schedule.max_steps=3", "log.every_steps=1", "ema.decay=0.9", "model.drop_path_rate=0.0"]
    common += ["data.eval_batch_size=8"]  # the training batch: no second graph shape at evaluation
    eager = _cfg(tmp_path / "eager", teacher_dir, "distill", *common)
    compiled = _cfg(
        tmp_path / "compiled", teacher_dir, "distill", *common, "model.compile=true", "teacher.compile=true"
    )
    train(eager)
    train(compiled)
    a = load_file(next(Path(eager.run_dir, "checkpoints").glob("step-*/model.safetensors")))
    b = load_file(next(Path(compiled.run_dir, "checkpoints").glob("step-*/model.safetensors")))
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    ea = load_file(next(Path(eager.run_dir, "checkpoints").glob("step-*/ema.safetensors")))
    eb = load_file(next(Path(compiled.run_dir, "checkpoints").glob("step-*/ema.safetensors")))
    assert ea.keys() == eb.keys()
    for k in ea:
        torch.testing.assert_close(eb[k], ea[k], rtol=1e-4, atol=1e-5, msg=k)
    # the export (timm's layout, checked bit-identical against plain timm) holds the EMA weights as saved
    out = export_run(compiled.run_dir, tmp_path / "export", weights="ema", checkpoint="latest")
    exported = load_file(str(out / "model.safetensors"))
    assert exported and exported.keys() <= eb.keys()
    assert all(torch.equal(exported[k], eb[k]) for k in exported)
    run = json.loads(Path(compiled.run_dir, "run.json").read_text())
    assert run["compiled"] == {"student_blocks": 2, "teacher_blocks": 2}
    assert run["optimizer"] == "AdamW (fused)"


def test_compile_settings_are_checked_and_may_change_on_resume(tmp_path):
    with pytest.raises(
        ConfigError,
        match="model.compile_mode: 'reduce-overhead' is not one of default, max-autotune-no-cudagraphs",
    ):
        load_config(None, ["model.compile_mode=reduce-overhead"])
    cfg = load_config(None, [f"run_dir={tmp_path}", *TINY, "transfer.mode=none", "teacher.compile=true"])
    with pytest.raises(ValueError, match="remove teacher.compile"):
        build_engine(cfg, scoring=True)
    from attnxfer.apps.run.resume import config_changes
    from attnxfer.config import to_dict

    recorded = to_dict(load_config(None, []))
    changes = config_changes(
        recorded, load_config(None, ["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"])
    )
    assert len(changes) == 2 and all(c.allowed for c in changes)


# -- 3. one optimiser decision ---------------------------------------------------------------------------


def test_adamw_implementation_is_decided_in_one_place_and_matches_the_reference():
    assert adamw_implementation("cuda") is AdamWImplementation.FUSED
    assert adamw_implementation(torch.device("cpu")) is AdamWImplementation.FUSED
    assert adamw_implementation("meta") is AdamWImplementation.FOREACH
    # fused and foreach give the per-tensor reference's step (AdamW's update rule is the oracle)
    model = tiny_vit(depth=1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    states = {}
    for impl in ("fused", "foreach", None):
        m = copy.deepcopy(model)
        groups = student_param_groups(m, weight_decay=0.05)
        opt = (
            build_adamw(groups, lr=1e-2, device="cpu", implementation=impl)
            if impl
            else torch.optim.AdamW(groups, lr=1e-2, foreach=False)
        )
        for _ in range(3):
            opt.step()
        states[impl or "for-loop"] = (optimizer_implementation(opt), m.state_dict())
    assert [v[0] for v in states.values()] == ["fused", "foreach", "for-loop"]
    for impl in ("fused", "foreach"):
        for k, v in states["for-loop"][1].items():
            torch.testing.assert_close(states[impl][1][k], v, rtol=1e-5, atol=1e-7, msg=k)
