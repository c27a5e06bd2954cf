"""Every code block in README.md and every page of the documentation site (docs/) runs as written.

Python blocks are executed (a pretrained or full-size ViT is swapped for a tiny randomly initialised
one, since nothing can be downloaded or trained at full size here, and ``images`` is defined). Shell
blocks are smoke-checked command by command: every ``attnxfer`` command must parse exactly as the CLI
parses it, and one that names a config resolves it through ``--print-config``; benchmark scripts
must know every flag the docs pass them. A command that no longer parses fails CI.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import subprocess
import tempfile

import pytest
import timm
import torch
from helpers import script_module, script_outputs

from attnxfer.config import ConfigError, resolve_recipe
from attnxfer.launch.cli import build_parser, main

from .doc_pages import PAGES, ROOT, page_name

DOCS = PAGES
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _blocks(lang: set[str]) -> list[tuple[str, str]]:
    """(where, code) of every block in ``lang``; a block repeated word for word on another page (README's
    example on its guide page) runs once, where it first appears."""
    out, seen = [], set()
    for path in DOCS:
        for i, m in enumerate(_FENCE.finditer(path.read_text())):
            if m.group(1) in lang and m.group(2) not in seen:
                seen.add(m.group(2))
                out.append((f"{page_name(path)}#{i}", m.group(2)))
    return out


# --------------------------------------------------------------------------------------- python blocks

_real_create_model = timm.create_model


def _tiny_create_model(name: str, pretrained: bool = False, **kwargs):
    """timm.create_model, with full-size / pretrained ViTs replaced by a tiny random one of the same kind; of
    dynamic size, so a block's own batch at the full size's 224 px runs too."""
    if name.startswith(("vit_base", "vit_large", "vit_huge", "hf-hub:", "local-dir:")) or pretrained:
        keep = {k: v for k, v in kwargs.items() if k in ("num_classes", "attn_layer", "global_pool")}
        return _real_create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            depth=4,
            num_heads=3,
            dynamic_img_size=name.startswith("vit_base"),
            **keep,
        )
    return _real_create_model(name, pretrained=pretrained, **kwargs)


def _python_blocks() -> list:
    """The python blocks; one that inspects full-size ViTs (``inspect_attention`` builds its models itself, at
    224 px: ~20 s of CPU) or exports to ONNX (torch.export and ONNX Runtime: ~4 s) is ``slow``."""
    return [
        pytest.param(w, c, marks=pytest.mark.slow)
        if "inspect_attention(" in c or "onnxruntime" in c
        else (w, c)
        for w, c in _blocks({"python", "py"})
    ]


@pytest.mark.parametrize(("where", "code"), _python_blocks(), ids=lambda v: v if "#" in v else "")
def test_python_blocks_run(where, code, monkeypatch, tmp_path, registries_kept):
    monkeypatch.chdir(tmp_path)  # what a block writes (runs/...) lands here, not in the repository
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # and its mkdtemp() folders, not in /tmp for good
    monkeypatch.setattr(timm, "create_model", _tiny_create_model)
    namespace = {"images": torch.randn(2, 3, 32, 32), "__name__": "__docs__"}
    exec(compile(code, where, "exec"), namespace)


def test_readme_has_python_blocks():
    assert any(w.startswith("README.md") for w, _ in _blocks({"python", "py"}))


# ---------------------------------------------------------------------------------------- shell blocks


def _expand_for_loops(lines: list[str]) -> list[str]:
    """``for a in x y; do ... $a ... done`` -> the body once per value (the only shell the docs use)."""
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"for (\w+) in (.+); do$", lines[i].strip())
        if not m:
            out.append(lines[i])
            i += 1
            continue
        end = next(j for j in range(i, len(lines)) if lines[j].strip() == "done")
        var, values = m.group(1), m.group(2).split()
        for v in values:
            out += [re.sub(rf"\$\{{{var}\}}|\${var}\b", v, line) for line in lines[i + 1 : end]]
        i = end + 1
    return out


def _commands(code: str) -> list[list[str]]:
    """Shell commands of a block: continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [ln.split(" #")[0].strip() for ln in joined.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    cmds = []
    for line in _expand_for_loops(lines):
        for part in line.split("&&"):
            cmds.append(shlex.split(part))
    return cmds


def _attnxfer_argv(cmd: list[str]) -> list[str] | None:
    if cmd and cmd[0].endswith("attnxfer"):
        return cmd[1:]
    if cmd[:3] in (["python", "-m", "attnxfer"], ["python3", "-m", "attnxfer"]):
        return cmd[3:]
    if len(cmd) > 3 and cmd[0].startswith("torchrun") and "-m" in cmd:
        return cmd[cmd.index("-m") + 2 :]
    return None


def _check_attnxfer(argv: list[str], where: str) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # exactly as main() parses
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    assert not stray and (not extra or hasattr(args, "overrides")), f"{where}: {argv}: stray {stray or extra}"
    assert getattr(args, "func", None), f"{where}: {argv}: no subcommand"
    config = getattr(args, "config", None)
    if config is None:
        return
    try:
        resolve_recipe(config)
    except ConfigError:
        return  # a user's file (my.yaml, RUN_DIR/config.yaml): parsing is all that can be checked
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([*argv, "--print-config"])
    assert rc == 0, f"{where}: {argv} --print-config failed"
    assert "config: recipe" in out.getvalue()


@functools.cache
def _script_helps() -> dict[str, tuple[int, str, str]]:
    """Every benchmark script's ``--help`` (exit code, stdout, stderr): each script's ``main()`` in this process
    (`script_outputs`), which imported torch and attnxfer already; a new interpreter spent ~8 s of CPU
    importing them again."""
    scripts = sorted((ROOT / "benchmarks").glob("[!_]*.py"))
    return {
        p.relative_to(ROOT).as_posix(): script_outputs(script_module(p.stem, folder="benchmarks"), "--help")
        for p in scripts
    }


def _check_script(cmd: list[str], where: str) -> None:
    script = next(c for c in cmd[1:] if c.endswith(".py"))
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    code, help_text, err = _script_helps()[path.resolve().relative_to(ROOT).as_posix()]
    assert code == 0, f"{where}: python {script} --help failed:\n{err}"
    for flag in (c.split("=")[0] for c in cmd if c.startswith("--")):
        assert flag in help_text, f"{where}: {script} has no option {flag}"


_SHELL = _blocks({"bash", "sh", "shell", "console"})  # unlabelled blocks are pictures (trees)


@pytest.mark.parametrize(("where", "code"), _SHELL, ids=[w for w, _ in _SHELL])
def test_shell_commands_parse(where, code):
    for cmd in _commands(code):
        argv = _attnxfer_argv(cmd)
        if argv is not None:
            _check_attnxfer(argv, where)
        elif cmd[0] in ("python", "python3", ".venv/bin/python") and any(
            c.startswith("benchmarks/") for c in cmd
        ):
            _check_script(cmd, where)


def test_the_cli_helps_examples_parse_and_name_recipes_that_resolve_anywhere(tmp_path, monkeypatch):
    """``attnxfer --help`` is read wherever attnxfer is installed: its examples name built-in recipes (or a
    run's own config), not paths that exist only in the checkout (``cfgs/demo/copy.yaml``)."""
    from attnxfer.launch.cli import EXAMPLES

    monkeypatch.chdir(tmp_path)
    examples = [
        shlex.split(line, comments=True)
        for line in EXAMPLES.splitlines()
        if line.strip().startswith("attnxfer")
    ]
    assert len(examples) >= 8
    for cmd in examples:
        argv = _attnxfer_argv(cmd)
        config = argv[argv.index("-c") + 1] if "-c" in argv else None
        if config is not None and not config.startswith("runs/"):
            resolve_recipe(config)
        _check_attnxfer(argv, "attnxfer --help")


def _gpu_suite_commands() -> list[list[str]]:
    """The commands `benchmarks/gpu_suite.sh` runs (``run NAME CMD...``), with ``"$PY"`` as python."""
    code = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    return [
        ["python" if c == "$PY" else c for c in cmd[2:]]
        for cmd in _commands(code)
        if cmd and cmd[0] == "run" and len(cmd) > 2
    ]


def test_gpu_suite_commands_parse():
    """The GPU suite runs only on a lent GPU machine, with minutes of device time: a benchmark flag or a test
    file it names that no longer exists must fail here, in CI, not there."""
    cmds = _gpu_suite_commands()
    scripts = [c for c in cmds if any(a.startswith("benchmarks/") and a.endswith(".py") for a in c)]
    # transfer_step, ce_loss, attention_zoo, model_throughput, train_throughput, stage1_throughput...
    assert len(scripts) >= 8, cmds
    for cmd in scripts:
        _check_script(cmd, "gpu_suite.sh")
    tests = [a for c in cmds if c[1:3] == ["-m", "pytest"] for a in c if a.startswith("tests/")]
    assert tests and all((ROOT / t).is_file() for t in tests), tests


def test_every_benchmark_script_is_named_in_the_benchmarks_page():
    """docs/benchmarks.md is where a reader looks for what a script in benchmarks/ measures (or where its
    results are)."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").iterdir() if p.is_file())
    assert [s for s in scripts if s not in page] == []


def test_every_attnxfer_command_in_the_docs_is_checked():
    """The shell blocks hold attnxfer commands of every kind the docs show (the test is not vacuous)."""
    seen = {
        argv[0]
        for _, code in _SHELL
        for cmd in _commands(code)
        if (argv := _attnxfer_argv(cmd)) and argv and not argv[0].startswith("-")
    }
    assert {"train", "eval", "submit", "export", "convert", "demo"} <= seen


def test_a_stale_command_would_fail():
    with pytest.raises(AssertionError, match="stray"):
        _check_attnxfer(["export", "runs/x", "out", "[--weights", "ema|raw]"], "probe")


# ------------------------------------------------------------------------------------------------ links


def test_no_dangling_links_in_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    links = [line.split("\t", 1)[1] for line in tracked if line.startswith("120000")]
    dangling = [p for p in links if not (ROOT / p).exists()]
    assert not dangling, f"symbolic links that resolve to nothing: {dangling}"
    assert (ROOT / "cfgs" / "paper" / "vit_large_copy.yaml").is_file()  # the top level shows the recipes


def test_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("paper/vit_large_copy").is_file()
    assert resolve_recipe("paper/vit_large_distill_end3").is_file()
