"""Small shared builders for the tests (plain functions, no fixtures magic)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnxfer.checkpoints.export import ModelCardInfo
from attnxfer.data import DatasetInfo, InMemoryImageDataset, register_dataset, registry
from attnxfer.data.registry import built_info
from attnxfer.launch import cli
from attnxfer.models import create_vit
from attnxfer.sources.teacher import TeacherRecord
from attnxfer.train.compile import is_compiled as is_compiled  # the tests' import of it
from attnxfer.transfer import TeacherStudent, build_plan


def fast_cells(values, keep) -> list:
    """A parametrised matrix for the fast lane: the values in ``keep`` run in every lane, the others are marked
    ``slow`` (CI runs them all). Rotate ``keep`` across a file's tests so that every value still runs in
    some fast test; ids stay the values' own."""
    missing = set(keep) - set(values)
    assert not missing, f"fast_cells: {sorted(missing)} not among {list(values)}"
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]


def script_module(name: str, folder: str = "scripts") -> ModuleType:
    """``FOLDER/NAME.py`` as a module (imported once): the scripts that make docs (the configuration
    reference, the families' coverage table) and the benchmarks are no part of the package, and their tests
    call their functions. FOLDER joins ``sys.path`` (first, as ``python FOLDER/NAME.py`` puts it; and there it
    stays, as the benchmarks that put it there themselves leave it): a script's imports of its siblings (the
    benchmarks' ``_measure``) resolve as they do there, also in a child process it spawns."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up there
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec.loader.exec_module(module)
    return sys.modules[name]


def script_main(capsys: pytest.CaptureFixture[str], module: ModuleType, *args: str) -> tuple[int, str, str]:
    """``python SCRIPT ARGS`` as the interpreter would end it, but in this process (a `script_module`'s
    ``main()``; no new interpreter, no fresh torch import): its exit code (main's return value; a
    SystemExit's code, a message printed to stderr as exit 1), stdout and stderr. What else it raises
    reaches the test, as the interpreter's traceback would."""
    capsys.readouterr()
    code = _script_exit_code(module, args)
    out = capsys.readouterr()
    return code, out.out, out.err


def script_outputs(module: ModuleType, *args: str) -> tuple[int, str, str]:
    """`script_main` without a test's ``capsys``, for a result that several tests share (a cached one): what
    the script writes to ``sys.stdout`` and ``sys.stderr`` is caught by redirecting them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _script_exit_code(module, args)
    return code, out.getvalue(), err.getvalue()


def _script_exit_code(module: ModuleType, args: tuple[str, ...]) -> int:
    argv = sys.argv
    sys.argv = [f"{module.__name__}.py", *args]
    try:
        return module.main() or 0
    except SystemExit as e:
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv


def tiny_vit(
    depth: int = 4,
    embed_dim: int = 48,
    num_heads: int = 3,
    img_size: int = 32,
    patch_size: int = 8,
    num_classes: int = 10,
    seed: int = 0,
    plain_timm: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A ViT-Tiny-shaped model small enough for CPU tests (17 tokens by default)."""
    torch.manual_seed(seed)
    args = dict(
        img_size=img_size,
        patch_size=patch_size,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=num_classes,
        **kwargs,
    )
    if plain_timm:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    return create_vit("vit_tiny_patch16_224", **args)


def randomize_qkv_rows(
    model: torch.nn.Module, layers, chunks: str = "qk", seed: int = 123, std: float = 0.2
) -> torch.nn.Module:
    """A copy of ``model`` whose q/k/v projection rows in ``layers`` are re-drawn with ``std``.

    timm's init (std 0.02) gives near-uniform maps; std 0.2 gives peaked ones, as trained ViTs have.
    """
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for i in layers:
        attn = model.blocks[i].attn
        d = attn.attn_dim
        with torch.no_grad():
            for c in chunks:
                j = "qkv".index(c)
                attn.qkv.weight[j * d : (j + 1) * d] = torch.randn(d, attn.qkv.in_features, generator=g) * std
                if attn.qkv.bias is not None:
                    attn.qkv.bias[j * d : (j + 1) * d] = torch.randn(d, generator=g) * std
    return model


def peaked_teacher(depth: int = 4, seed: int = 1, **kwargs) -> torch.nn.Module:
    """A random teacher whose attention maps are far from uniform (something worth transferring)."""
    return randomize_qkv_rows(tiny_vit(depth=depth, seed=seed, **kwargs), range(depth), "qk", seed=seed + 100)


def distill_step_on(ce_path: str, teacher: torch.nn.Module, x: torch.Tensor, depth: int = 2):
    """One attention-distillation step of a fresh tiny student through `TeacherStudent` on ``ce_path``:
    (per-layer CE terms, gradients of the student's trainable parameters, None where unused)."""
    student = tiny_vit(seed=2, depth=depth)
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "distill"), ce_path=ce_path).train()
    out = pair(x)
    params = [w for w in student.parameters() if w.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return {k: v.detach() for k, v in out.terms.items()}, grads


def assert_same_distill_step(got, want, layers: int = 2) -> None:
    """Two `distill_step_on` results agree: the same terms (to fp32 rounding) and gradients."""
    (terms, grads), (terms_ref, grads_ref) = got, want
    assert terms.keys() == terms_ref.keys() == {f"attn_ce/{i}" for i in range(layers)}
    for key in terms:
        torch.testing.assert_close(terms[key], terms_ref[key], rtol=1e-5, atol=1e-6)
    assert sum(g is not None for g in grads) > 0
    for a, b in zip(grads, grads_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- a tiny run's overrides ---------------------------------------------------------------------------------

#: A test run draws no progress bar and writes to no tracker (TensorBoard is on by default).
QUIET = ("log.progress=false", "log.trackers=[]")


def tiny_run(length: int, batch: int) -> list[str]:
    """The overrides most CLI tests start from: the synthetic dataset, ``length`` images a split, ``batch``
    a batch, and `QUIET`. The test's own keys follow them (a later key wins)."""
    return ["data.dataset=synthetic", f"data.kwargs.length={length}", f"data.batch_size={batch}", *QUIET]


def rewrite_checkpoint_state(state_file: Path, change: Callable[[dict], None]) -> None:
    """Edit a checkpoint's ``state.json`` in place (``change`` mutates the loaded dict) as an older attnxfer
    would have written it, its manifest entry rewritten with the new size and hash so it still verifies."""
    state = json.loads(state_file.read_text())
    change(state)
    text = json.dumps(state).encode()
    state_file.write_bytes(text)
    manifest_file = state_file.with_name("MANIFEST.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["state.json"] = {"size": len(text), "sha256": hashlib.sha256(text).hexdigest()}
    manifest.pop("sha256", None)  # the manifest's own digest, which older versions did not write
    manifest_file.write_text(json.dumps(manifest))


def once_each(argv: list[str]) -> list[str]:
    """``argv`` without the overrides a later one of the same key replaces: the command as a user types it,
    which a test whose stderr must be one line runs (a key given twice is warned about)."""
    keys = [
        a.partition("=")[0].strip()
        if "=" in a and not a.startswith("-") and argv[i - 1 : i] not in (["--vary"], ["--sweep"])
        else None
        for i, a in enumerate(argv)
    ]
    return [a for i, (a, key) in enumerate(zip(argv, keys)) if key is None or key not in keys[i + 1 :]]


#: A one-block student trained from scratch, 4 steps an epoch on synthetic data: about a second a run (the
#: `trained` fixtures' run, and the run-dir tests').
ONE_BLOCK_RUN = (
    *tiny_run(64, 16),
    "transfer.mode=none",
    "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
    "log.every_steps=1",
    "deterministic=true",
)


def train_one_block_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ONE_BLOCK_RUN` trained 4 steps (one epoch, a checkpoint at step 4) into a new folder: the run of the
    `trained` fixtures (tests/conftest.py's, read-only, and a module's own where its tests write into it)."""
    run = tmp_path_factory.mktemp("rel") / "run"
    assert cli.main(["train", *ONE_BLOCK_RUN, "schedule.max_steps=4", f"run_dir={run}"]) == 0
    return run


def tiny_convert_report(repeats: int, batch: int) -> list[str]:
    """A conversion report measured on the least that still runs every part: one batch of map agreement,
    ``repeats`` timed passes of ``batch`` images."""
    return [
        "convert.agreement_batches=1",
        f"convert.speed_repeats={repeats}",
        f"convert.speed_batch_size={batch}",
    ]


#: (fast-lane tests, all tests) of the session's collection, when it collected every test file (tests/conftest.py)
SUITE_COUNTS = pytest.StashKey[tuple[int, int]]()


# -- the CLI in this process ----------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``attnxfer ARGV`` in this process, through the CLI's own `main` (no interpreter start-up): its exit
    code, then the stdout and stderr that pytest's ``capsys`` holds (all since its last read)."""
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the CLI in a process of its own (its own interpreter: exit codes, torchrun, SLURM, trackers) --------------

#: the checkout the tests run (a child process imports attnxfer from here)
ROOT = Path(__file__).resolve().parents[1]


def attnxfer_process(
    *argv: str, timeout: float = 600, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m attnxfer ARGV`` run to its end in a new interpreter: one thread, this checkout's package, no
    terminal on stdin; stdout and stderr captured as text. ``env`` replaces this process's environment."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "attnxfer", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
    )


# Scripts (benchmarks/, scripts/) run as ``python SCRIPT ARGS`` would, several in ONE new interpreter: runpy as
# __main__ with the script's folder first on sys.path, so torch is imported once and not once per script (~4 s
# of CPU each). The driver prints one JSON line: [[exit, stdout, stderr], ...].
_SCRIPTS_DRIVER = """
import contextlib, io, json, pathlib, runpy, sys, traceback
runs, results = json.loads(sys.argv[1]), []
for argv in runs:
    sys.argv, sys.path[0] = list(argv), str(pathlib.Path(argv[0]).resolve().parent)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter ends: None is 0, a message is printed and exits 1
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
sys.__stdout__.write(json.dumps(results) + "\\n")
"""


def run_scripts(
    *argvs: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
) -> list[tuple[int, str, str]]:
    """Each ``python SCRIPT ARGS`` (``argv = [SCRIPT, *ARGS]``, the script's path relative to ``cwd``) in one
    new interpreter, one after the other: (exit code, stdout, stderr) of each, an uncaught exception's
    traceback in its stderr as the interpreter prints it. ``env`` replaces this process's environment."""
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPTS_DRIVER, json.dumps([list(a) for a in argvs])],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


# -- the CLI in a forked child (signals from outside, by process id) ---------------------------------------


@contextlib.contextmanager
def on_each_line(act: Callable[[str], None]) -> Iterator[None]:
    """``act(line)`` for every line attnxfer says (a handler on its logger, as a user could add), e.g. to cut a
    run short at a given line: what ``act`` raises reaches the code that said it."""

    class _Act(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            act(record.getMessage())

    hook, logger = _Act(), logging.getLogger("attnxfer")
    logger.addHandler(hook)
    try:
        yield
    finally:
        logger.removeHandler(hook)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    """Two state dicts (a checkpoint's tensors) with the same keys and bit-identical tensors."""
    assert a.keys() == b.keys(), where
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: {k} differs"


def _cli_child(argv: list[str], log: str, err: str | None = None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    err_fd = fd if err is None else os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest replaced both)
    sys.stderr = sys.stdout if err is None else open(err_fd, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as a foreground command takes it
    code = 1
    try:
        code = cli.main(argv)
    except BaseException:  # into the log: os._exit below would drop the traceback unprinted
        traceback.print_exc()
    finally:
        os._exit(code)


def fork_cli(argv: list[str], log: Path, err: Path | None = None) -> multiprocessing.Process:
    """A forked child running the CLI's own `main` on ``argv``, one torch thread, its stdout and stderr
    appended to ``log`` (its stderr to ``err`` where given: a test of what stderr alone holds); its exit code
    is main's. Started; the caller joins or signals it. Forked from a
    fork server that imported the CLI once (no interpreter start-up per child), not from this process: a
    child forked from a process that has run a backward pass cannot run one (torch's autograd threads),
    and an xdist worker may have run other tests' training first."""
    args = (list(argv), str(log), None if err is None else str(err))
    proc = start_fork_server().Process(target=_cli_child, args=args)
    proc.start()
    return proc


def start_fork_server() -> multiprocessing.context.BaseContext:
    """`fork_cli`'s context, its server started (a few seconds, once per process): a test that times a
    child calls it first."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["attnxfer.launch.cli", "attnxfer.apps.run.training", "attnxfer.apps.convert.convert", "helpers"]
    )
    multiprocessing.forkserver.ensure_running()
    return ctx


def _take_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_interruptible(argv: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` for a child the test will send SIGINT (Ctrl-C) to: the child starts with SIGINT's
    default action, as a terminal's foreground command does, however pytest was started. A background job
    of a non-interactive shell (``cmd &``, nohup, some CI runners) runs with SIGINT (and SIGQUIT) ignored, as
    POSIX wants, and its children inherit that: without this the test's Ctrl-C would do nothing. The
    product keeps that inheritance on purpose (``attnxfer train &`` ignores a terminal's Ctrl-C, as any
    background command does). ``preexec_fn`` runs between fork and exec; one sigaction takes no lock, so
    the parent's threads are no hazard."""
    return subprocess.Popen(argv, preexec_fn=_take_ctrl_c, **kwargs)


# -- host reads (none on unlogged training steps) --------------------------------------------------------

#: Python-level reads of a tensor's value on the host: on a GPU each waits for the queued kernels
_SYNC_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__format__",
)
#: aten ops that read values on the host (.item() and the data-dependent output shapes)
_SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::is_nonzero",
    "aten::equal",
    "aten::repeat_interleave",
}


def _in_data_loading(stack: traceback.StackSummary) -> bool:
    """Calls made while the DataLoader builds a batch: host data by design (workers, on a GPU run)."""
    return any("torch/utils/data/" in f.filename for f in stack)


class SyncCounter(TorchDispatchMode):
    """Records every call that would wait for a GPU: the Python reads above (patched on torch.Tensor for the
    duration) and, as a dispatch mode, the aten ops that read values (what `.item()` and boolean-mask
    indexing reach in C++). Counting only: every call still runs the real code."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}

    def _note(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if not _in_data_loading(stack):
            where = next(
                (f"{f.filename}:{f.lineno} {f.name}" for f in reversed(stack) if "/torch/" not in f.filename),
                "?",
            )
            self.calls.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _SYNC_OPS:
            self._note(func._schema.name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _name=name, _orig=original, **k):
                self._note(f"Tensor.{_name}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


# -- a dataset whose labels raise when read ------------------------------------------------------------------

LABEL_TRAP = "a label was read"


_LABELS_RAISE = DatasetInfo("labels_raise", 4, None, (0.5,), (0.25,), 3, 32)


class LabelsRaise(InMemoryImageDataset):
    """Real images; reading any label raises."""

    def label(self, index: int) -> int:
        raise AssertionError(f"{LABEL_TRAP} (sample {int(index)})")


def _labels_raise_dataset(split, *, root=None, img_size=None, in_chans=None, mean=None, std=None, seed=0):
    """Real images (32 train, 16 val, 32 px, 4 classes), every label read raises `AssertionError`."""
    base = _LABELS_RAISE
    info = built_info("labels_raise", base, img_size, in_chans, mean, std)
    n = 32 if split == "train" else 16
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return LabelsRaise(images, torch.arange(n) % 4, info, augment=split == "train", seed=seed)


@contextlib.contextmanager
def labels_raise_registered():
    """``data.dataset=labels_raise`` while active (the dataset registry is restored after): a run that claims to
    read no label proves it on it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_DATASETS", dict(registry._DATASETS))
        register_dataset("labels_raise", info=_LABELS_RAISE)(_labels_raise_dataset)
        yield


def run_cli_reading_no_label(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """`run_cli` that read no label and raised nothing past the CLI: its exit code, stdout and stderr's lines."""
    code, out, err = run_cli(capsys, *argv)
    assert "Traceback" not in err and LABEL_TRAP not in err, err
    return code, out, [line for line in err.splitlines() if line.strip()]


# -- a model card's inputs (export tests) ------------------------------------------------------------

MAE_TEACHER = TeacherRecord(
    spec="vit_large_patch16_224.mae",
    architecture="vit_large_patch16_224.mae",
    source="timm-pretrained",
    hf_repo="timm/vit_large_patch16_224.mae",
    hf_commit="0123456789abcdef0123456789abcdef01234567",
    sha256="ab" * 32,
    license="cc-by-nc-4.0",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    input_size=(3, 32, 32),
    num_classes=0,
)


PLAN = "TransferPlan(mode=distill)\n  student 0 <- teacher 0 (maps, CE, weight 1.0)\n  student 1 <- teacher 1"


RECIPE = (
    "model:\n  student_depth: 2\ndata:\n  name: animal-mnist\n  img_size: 32\ntransfer:\n  mode: distill\n"
)


def card(**kwargs) -> ModelCardInfo:
    base = dict(
        model_name="vit-tiny-attnxfer-demo",
        teacher=MAE_TEACHER,
        transfer_mode="distill",
        plan=PLAN,
        recipe=RECIPE,
        metrics={"val/top1": 0.8125, "val/loss": 0.61},
        training_data="animal-mnist, 10 classes",
    )
    return ModelCardInfo(**{**base, **kwargs})


# -- zoo attentions on a small layout --------------------------------------------------------------------

#: A prefix token and a token grid the windows and agents do not divide evenly.
ZOO_PREFIX, ZOO_GRID = 1, (4, 5)
ZOO_TOKENS = ZOO_PREFIX + ZOO_GRID[0] * ZOO_GRID[1]
#: Options that fit the zoo attentions to that layout (the rest take their defaults).
ZOO_OPTIONS = {
    "window": dict(window_size=2),
    "window_linear": dict(window_size=2),
    "agent": dict(agent_grid=(2, 3), bias_grid=3),
    "nystrom": dict(num_landmarks=5),
    "linformer": dict(seq_len=ZOO_TOKENS, proj_len=6),
    "performer": dict(num_features=24, feature_seed=0),
    "focused_linear": dict(kernel_size=3),
}
#: The same sizes for a conversion build, which takes linformer's seq_len from the teacher and refuses sizes
#: beyond the teacher's grid (the tiny teachers' 4x4: a default window, landmark or agent count is larger).
CONVERT_OPTIONS = {name: {k: v for k, v in o.items() if k != "seq_len"} for name, o in ZOO_OPTIONS.items()}


def torchrun_launch(ranks: int = 2) -> tuple[list[str], dict[str, str]]:
    """torchrun's command line up to what it runs (``ranks`` processes on this machine) and its environment:
    one thread a rank, this checkout's package, outside any SLURM job the tests themselves run in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"], env


def torchrun_attnxfer(*args: str, ranks: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``attnxfer ARGS`` under torchrun (`torchrun_launch`); asserts it succeeded."""
    launch, env = torchrun_launch(ranks)
    res = subprocess.run(
        [*launch, "-m", "attnxfer", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def torchrun_commands(
    *argvs: list[str], out: Path, ranks: int = 2, timeout: float = 600
) -> list[tuple[str, str]]:
    """Each ``attnxfer ARGV`` in turn in ONE torchrun launch (`torchrun_launch`; tests/dist_commands.py: the
    ranks keep one process group across the commands); asserts every command
    exited 0 on every rank. Returns each command's (stdout, stderr), its ranks' in rank order, as the launch's
    own output would interleave them; the per-rank files stay in the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    launch, env = torchrun_launch(ranks)
    script = [str(ROOT / "tests" / "dist_commands.py"), str(out), json.dumps([list(a) for a in argvs])]
    res = subprocess.run([*launch, *script], capture_output=True, text=True, env=env, timeout=timeout)

    def said(i: int, kind: str) -> str:
        files = (out / f"{i}.rank{r}.{kind}" for r in range(ranks))
        return "".join(f.read_text() if f.exists() else "" for f in files)

    for i in range(len(argvs)):
        codes = said(i, "code")  # each rank's exit code, in rank order
        assert codes == "0" * ranks, (
            f"command {i} exited {codes!r}: " + res.stderr[-3000:] + said(i, "err")[-3000:]
        )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [(said(i, "out"), said(i, "err")) for i in range(len(argvs))]


def image_folder(
    root: Path, classes: int = 3, per_class: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """An ImageNet-style folder (``root/{train,val}/classK/*.png``) of RGB noise pictures, 40 x 48 px (not
    square, not the model's size: resizing and cropping matter), class K brighter in channel K so that a few
    steps learn something."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (per_class or {"train": 16, "val": 12}).items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                a[..., c % 3] = np.clip(a[..., c % 3].astype(int) + 110, 0, 255)
                Image.fromarray(a).save(folder / f"{i}.png")
    return root


def mae_val_case(batch_size: int, rank: int = 0, world_size: int = 1):
    """(a tiny MAE, a loader of rank's exact share of 11 fixed images): the same model and val set in every
    process that builds them, the MAE val loss's case in one process and under torchrun alike."""
    from torch.utils.data import TensorDataset

    from attnxfer.data import ResumableSampler, build_loader
    from attnxfer.models.mae import MaskedAutoencoder

    torch.manual_seed(0)
    enc = create_vit("vit_micro_patch4_28", num_classes=0, depth=2, embed_dim=48)
    mae = MaskedAutoencoder(enc, decoder_dim=32, decoder_heads=2, decoder_depth=1)
    images = torch.randn(11, enc.patch_embed.proj.in_channels, 28, 28)
    sampler = ResumableSampler(
        11, shuffle=False, rank=rank, world_size=world_size, drop_last=False, exact=True
    )
    loader = build_loader(TensorDataset(images), batch_size=batch_size, sampler=sampler, drop_last=False)
    return mae, loader
