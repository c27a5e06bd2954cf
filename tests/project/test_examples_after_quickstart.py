"""Every example of README.md and the documentation site runs right after the Quickstart, in the order a
newcomer meets it.

The shared fixture does what the Quickstart does, in an empty folder: `attnxfer demo --quick` (with fewer
steps still: the examples need its files, not its scores). Then the ``attnxfer`` commands of every shell
block run there, README first and then the site's pages in their navigation order, each with a short
schedule put before its own keys (a few optimiser and stage-1 steps, one timed repeat, a small k-NN bank, a
small validation set where the dataset makes one on the fly),
so that a command that needs what an earlier one made (an export, a stage-2 run, the demo's teacher) finds
it. The first command of each kind (subcommand and recipe, or subcommand and paths) runs; a later one that
only changes keys is already parsed and resolved by `test_docs.py`. A conversion or a search costs minutes
however short its schedule (every stage evaluates the 1,000 validation images with both models), so only the
first of them runs, and a later one whose folder a later example reads. A command that cannot run here says
why in `NOT_HERE` (a SLURM cluster, a download, a dataset on /data, a placeholder such as ``runs/my-run``, a
teacher of its own that takes its page's other commands to train).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import QUIET, tiny_convert_report

from attnxfer.config import ConfigError, load_config
from attnxfer.config.study_spec import load_study
from attnxfer.launch.cli import main
from attnxfer.run_layout import DEMO_EXPORTS, DEMO_OUT

from .doc_pages import DOCS_DIR, PAGES, ROOT, nav_pages, page_name
from .test_docs import _FENCE, _attnxfer_argv, _commands

#: what a command holds that this machine cannot give it, and why it is not run (it is still parsed)
NOT_HERE = {
    "submit": "a SLURM cluster (tests/cluster/slurm runs submit on a loopback one)",
    "fetch": "a download from the Hugging Face Hub",
    "--array-tasks": "a SLURM cluster",
    "/data/": "a dataset on /data",
    "/shared/": "a shared cluster filesystem",
    "/scratch/": "a dataset on /scratch",
    "my-run": "a placeholder for the reader's own run",
    "my-student": "a placeholder for the reader's own export",
    "sweep-atd": "what the SLURM example before it trains",
    "my.yaml": "a placeholder for the reader's own config",
    "that.yaml": "a placeholder for the reader's own config",
    "ORG/": "a Hub account",
    "hf-hub:": "a download from the Hugging Face Hub",
    "paper/": "an ImageNet-scale recipe",
    "wandb": "a W&B account and an MLflow server",
    "dinov3": "a DINOv3 encoder at 1024 px (minutes of CPU)",
    "hier_": "its own hierarchical teacher, trained by the commands beside it (their recipes: tests/conversion)",
    "demo_pvt_": "its own hierarchical teacher, trained by the commands beside it (their recipes: tests/conversion)",
    "demo/teacher": "the supervised teacher, trained for ~30 minutes by the commands beside it",
}
#: commands that each cost minutes of CPU here however short their schedule (a conversion evaluates the 1,000
#: validation images with both models at every stage): the first of each runs, and a later one only where a
#: later example reads what it makes (`attnxfer export runs/convert/demo_hedgehog/stage2`)
COSTLY = ("convert", "search")
#: `demo` is the fixture; the others read or write what the examples make
RUN = ("train", "study", "pretrain", "eval", "convert", "search", "export", "inspect")
#: keys put before an example's own: a few steps of everything, one timed repeat, a small k-NN bank
SHORT = {
    "train": ["schedule.max_steps=2", *QUIET, "eval.knn_bank_size=100"],
    "study": ["schedule.max_steps=2", *QUIET, "eval.knn_bank_size=100"],
    "pretrain": ["schedule.max_steps=2", *QUIET, "mae.pictures=2"],
    "convert": [
        "schedule.max_steps=2",
        "convert.stage1_steps=2",
        *tiny_convert_report(1, 8),
        "convert.speed_sweep=[]",
        "eval.knn_bank_size=100",
        *QUIET,
    ],
    "search": [
        "search.population=2",
        "search.offspring=1",
        "search.generations=0",
        "search.fit_steps=1",
        "search.fit_batches=1",
        "search.held_out_images=8",
        "search.speed=flops",
        "log.progress=false",
    ],
}
#: keys put before an example's own by its recipe's dataset: the recall task's validation images are made for
#: the run and each costs a forward at 1,024+ tokens (its 1,000 were half of this test's time)
SHORT_DATA = {"recall": ["data.kwargs.val_length=64"]}
#: the demo's budgets in the fixture: what `--quick` trains, cut further (its files are what the examples need)
DEMO = ["demo", "--quick", "--teacher-steps", "10", "--budget-steps", "3"]


def reading_order() -> list[Path]:
    """README, then the site's pages as its navigation lists them (then any page it leaves out)."""
    nav = [DOCS_DIR / p for p in nav_pages()]
    return [ROOT / "README.md", *nav, *[p for p in PAGES if p not in nav and p.name != "README.md"]]


def examples() -> Iterator[tuple[str, list[str]]]:
    """(where, command) of every command in the shell blocks, in reading order; a python one-liner as
    ``["python", "-c", CODE]``."""
    for page in reading_order():
        for i, m in enumerate(_FENCE.finditer(page.read_text())):
            if m.group(1) in ("bash", "sh", "shell", "console"):
                for cmd in _commands(m.group(2)):
                    yield f"{page_name(page)}#{i}", cmd


def _why_not(cmd: list[str]) -> str | None:
    """Why a command is not run here (None: it runs)."""
    text = shlex.join(cmd)
    return next((why for mark, why in NOT_HERE.items() if mark in text), None)


def _kind(argv: list[str]) -> tuple[str, ...]:
    """What makes two commands the same example: the subcommand and its recipe, or its paths."""
    if "-c" in argv:
        return (argv[0], argv[argv.index("-c") + 1], *(a for a in argv if a.startswith("--command")))
    return (argv[0], *(a for a in argv[1:] if "=" not in a and not a.startswith("-")))


def _recipe(argv: list[str]):
    """The run config of a command's recipe (None: no recipe, or a study recipe, whose students: is not one)."""
    try:
        return load_config(argv[argv.index("-c") + 1]) if "-c" in argv else None
    except ConfigError:
        return None


def _run_dir(argv: list[str]) -> str | None:
    """The folder a command writes: its ``run_dir=``, else its recipe's."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    if given:
        return given[-1]
    recipe = _recipe(argv)
    return recipe.run_dir if recipe is not None else None


def runnable() -> list[tuple[str, list[str]]]:
    """(where, argv) of the commands the test runs, in reading order, each with its short schedule: the first
    of each kind; of the `COSTLY` ones, the first and those whose folder a later example reads."""
    found = []
    for where, cmd in examples():
        argv = cmd if cmd[:2] == ["python", "-c"] else _attnxfer_argv(cmd)
        if argv and (argv[0] in RUN or argv[0] == "python") and not _why_not(cmd):
            found.append((where, argv))
    out, seen, made = [], set(), set()
    for i, (where, argv) in enumerate(found):
        if argv[0] == "python":
            out.append((where, argv))
            continue
        schedule = _schedule_of(argv)
        kind = (schedule,) if schedule in COSTLY else _kind(argv)
        folder = _run_dir(argv) if schedule in COSTLY else None
        read_later = folder is not None and any(
            a == folder or a.startswith(f"{folder}/") for _, later in found[i + 1 :] for a in later[1:]
        )
        if kind in seen and (not read_later or folder in made):
            continue
        seen.add(kind)
        made.add(folder)
        at = argv.index("-c") + 2 if "-c" in argv else 1
        recipe = _recipe(argv)
        data = SHORT_DATA.get(recipe.data.dataset, []) if recipe is not None else []
        out.append((where, [*argv[:at], *SHORT.get(schedule, []), *data, *argv[at:]]))
    return out


def _schedule_of(argv: list[str]) -> str:
    """Which short schedule a command takes: a study's is its students' command's (train, or convert for
    ``--command convert`` or a convert recipe's students)."""
    if argv[0] != "study":
        return argv[0]
    config = argv[argv.index("-c") + 1] if "-c" in argv else ""
    return "convert" if "convert" in argv or _study_command(config) == "convert" else "study"


def _study_command(config: str) -> str | None:
    """The command a study recipe's students run, through the recipes it starts from (``base:``):
    ``recall/convert_budgets_deep`` is a convert study by its base's ``command: convert``; None for no study."""
    try:
        return load_study(config).command
    except (OSError, ConfigError):
        return None


@contextlib.contextmanager
def _inside(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="session")
def after_quickstart(tmp_path_factory) -> Path:
    """A folder where `attnxfer demo --quick` has just run, as it does after the Quickstart."""
    folder = tmp_path_factory.mktemp("newcomer")
    start = time.monotonic()
    with _inside(folder):
        assert main(DEMO) == 0
    print(f"[example] attnxfer {shlex.join(DEMO)}: {time.monotonic() - start:.0f} s", flush=True)
    return folder


def _globbed(argv: list[str]) -> list[str]:
    """The shell's expansion of ``*`` (`runs/demo/mae_study-*/distill`): the matches, or the word itself."""
    return [m for a in argv for m in (sorted(glob.glob(a)) or [a] if "*" in a else [a])]


def test_the_examples_the_test_runs_are_the_ones_a_newcomer_meets_first():
    """Not vacuous: README's conversion and study, the guides' training, conversion, export and inspect
    commands are run, in reading order; SLURM and ImageNet commands are not."""
    runs = runnable()
    where = [w for w, _ in runs]
    assert where[0].startswith("README.md") and where == sorted(
        where, key=lambda w: [page_name(p) for p in reading_order()].index(w.split("#")[0])
    )
    kinds = {_kind(argv) for _, argv in runs if argv[0] != "python"}
    assert ("convert", "convert/demo_relu_linear") in kinds and ("study", "demo/distill") in kinds
    assert {
        ("train", "demo/copy"),
        ("train", "demo/mae_finetune"),
        ("pretrain", "demo/mae_pretrain"),
    } <= kinds
    assert any(
        k[:3] == ("export", "runs/convert/demo_hedgehog/stage2", "exports/hedgehog-student") for k in kinds
    )
    assert any(k[0] == "inspect" and "local-dir:runs/demo/mae/export" in k for k in kinds)
    assert not any(argv[0] == "submit" or "paper/" in " ".join(argv) for _, argv in runs)
    # the demo's teacher, where the recipes the examples start from look for it
    assert f"{DEMO_OUT}/{DEMO_EXPORTS['mae']}" == "runs/demo/mae/export"


def test_a_missing_demo_teacher_says_to_run_the_demo_first(tmp_path, capsys):
    """Before the demo, an example that needs its teacher fails in one line that names the demo."""
    with _inside(tmp_path):
        code = main(["train", "-c", "demo/copy", "schedule.max_steps=1", "log.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "local-dir:runs/demo/mae/export" in err and "run `attnxfer demo`" in err and "--quick" in err


#: how the docs spell what `attnxfer demo` writes: files at the top of its folder, its hashed run folders
#: (``<hash>``, ``*``) and its teacher's export; other ``runs/demo/...`` paths are what documented commands
#: write (``run_dir=runs/demo/distill_hedgehog``, ``attnxfer demo --supervised``'s teacher)
_DEMO_PATH = re.compile(r"runs/demo/[\w<>.*-]+(?:/[\w<>.*-]+)*/?")


def _demo_paths() -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        for m in _DEMO_PATH.finditer(page.read_text()):
            path = m.group(0).rstrip(".")
            first = path.split("/")[2]
            if (
                "." in first
                or "<" in first
                or "*" in first
                or path.rstrip("/") == f"{DEMO_OUT}/{DEMO_EXPORTS['mae']}"
            ):
                found.add((page_name(page), path))
    return sorted(found)


@pytest.mark.slow
def test_the_demo_writes_the_paths_the_docs_name(after_quickstart):
    paths = _demo_paths()
    assert ("docs/inspect.md", "runs/demo/mae_study-*/distill") in paths and len(paths) > 8
    missing = []
    for page, path in paths:
        pattern = re.sub(r"<[a-z]+>", "*", path)
        if not glob.glob(str(after_quickstart / pattern)):
            missing.append(f"{page}: {path}")
    assert not missing, "paths the docs say `attnxfer demo` writes that it did not:\n" + "\n".join(missing)
    export = after_quickstart / DEMO_OUT / DEMO_EXPORTS["mae"]
    assert (export / "config.json").is_file() and not export.is_symlink()
    # a smoke run's table says so, where its figures (a fine-tuned MAE below scratch) would be read as the demo's
    results = (after_quickstart / DEMO_OUT / "results.md").read_text().splitlines()
    assert results[2].startswith("**--quick: a smoke test of "), results[:3]


@pytest.mark.slow
def test_each_example_runs_after_the_quickstart_in_reading_order(after_quickstart):
    done = []
    with _inside(after_quickstart):
        for where, argv in runnable():
            print(f"[example] {where}: {shlex.join(argv)}", flush=True)  # shown with -s, and on a failure
            if argv[0] == "python":
                exec(compile(argv[2], where, "exec"), {"__name__": "__example__"})
            else:
                code = main(_globbed(argv))
                assert code == 0, f"{where}: attnxfer {shlex.join(argv)} failed (after {len(done)} that ran)"
            done.append(where)
    assert len(done) >= 10
