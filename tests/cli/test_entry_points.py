"""A lab's own comparison loss and attention, in a package installed beside attnxfer, reach the plain
``attnxfer`` CLI through the ``attnxfer.losses`` and ``attnxfer.attentions`` entry points (as a dataset does
through ``attnxfer.datasets``, tests/data_pipeline/test_data_sources.py): no fork, no script, and this file
never imports the package's modules itself. A package that fails to import is one warning line."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import timm
import torch
from helpers import ONE_BLOCK_RUN, attnxfer_process, run_cli, tiny_convert_report, tiny_run, tiny_vit

from attnxfer.checkpoints import CheckpointManager
from attnxfer.data import build_dataset
from attnxfer.errors import InputError, UnknownNameError
from attnxfer.launch.cli import main
from attnxfer.launch.rope_help import rope_support_from_source
from attnxfer.models import create_attention, list_attentions, student_from_spec, student_spec
from attnxfer.models.attention import registry
from attnxfer.models.efficient import build_efficient_student
from attnxfer.models.efficient.base import rope_support
from attnxfer.plugins import load_entry_points
from attnxfer.transfer import build_plan
from attnxfer.transfer.comparisons import COMPARISON_LOSSES, get_comparison_loss

_LOSS = '''
from attnxfer.transfer import ComparisonLoss, Loss, Signal, comparison_loss


@comparison_loss("lab_gap")
class LabGap(ComparisonLoss):
    """Squared gap of the two models' mean final features (any widths)."""

    signals = (Signal.FEATURES,)

    def compare(self, comparison, student, teacher, step) -> Loss:
        loss = (student.float().mean() - teacher.float().mean()).pow(2)
        return Loss(loss, {"lab_gap": loss})
'''

_ATTENTION = '''
from attnxfer.models import register_attention
from attnxfer.models.efficient import ReLULinearAttention


@register_attention("lab_relu")
class LabReLU(ReLULinearAttention):
    """ReLU-linear attention under the lab's own name."""
'''

_FILES = {"labpkg/__init__.py": "", "labpkg/losses.py": _LOSS, "labpkg/attention.py": _ATTENTION}
_ENTRY_POINTS = (
    "[attnxfer.losses]\nlab_gap = labpkg.losses\n\n[attnxfer.attentions]\nlab_relu = labpkg.attention\n"
)


def _uninstall_labpkg(site) -> None:
    """pip uninstall labpkg, as this process sees it: its metadata gone, its entry points read again, its
    attention unregistered (the fixture puts the registries back)."""
    shutil.rmtree(site / "labpkg-0.1.dist-info")
    load_entry_points.cache_clear()
    del registry._ATTENTIONS["lab_relu"]


def test_an_installed_packages_loss_and_attention_reach_the_plain_cli(
    install_package, tiny_teacher_dir, tmp_path, capsys
):
    """``attnxfer train`` plans with the package's loss and builds its student with the package's attention,
    each found through its own group's entry point once the name is not a built-in one."""
    install_package(_FILES, _ENTRY_POINTS)
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "train",
        *ONE_BLOCK_RUN,
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "transfer.losses=[{name: lab_gap, weight: 0.5}]",
        "model.attention=lab_relu",
        "schedule.max_steps=1",
        f"run_dir={run}",
    )
    assert code == 0 and "warning: attnxfer." not in err, err
    assert "\n  lab_gap of features: weight 0.5\n" in out  # the start-up plan's line
    assert json.loads((run / "run.json").read_text())["student"]["attention"] == "lab_relu"
    assert "lab_gap" in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_the_library_finds_them_too(install_package):
    """Python code that never runs the CLI (a notebook's `build_plan`, `create_attention`, `load_student`)
    asks the registries, which load the entry points themselves."""
    install_package(_FILES, _ENTRY_POINTS)
    plan = build_plan(tiny_vit(depth=1), tiny_vit(depth=1), "none", losses=[{"name": "lab_gap"}])
    assert [c.loss for c in plan.comparisons] == ["lab_gap"]
    assert type(create_attention("lab_relu", dim=48, num_heads=3)).__name__ == "LabReLU"


def test_convert_help_gives_the_installed_attentions_rope_answer(install_package, capsys):
    """`attnxfer convert --help` lists what a rope teacher does to each convert.attention: the package's too,
    read from its module's text as the zoo's are (importing neither), and as its imported class declares it."""
    install_package(_FILES, _ENTRY_POINTS)
    assert rope_support_from_source.__wrapped__()["lab_relu"] == rope_support()["lab_relu"]
    rope_support_from_source.cache_clear()  # the help's table with the package, then without it again
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    rope_support_from_source.cache_clear()
    assert "\n  lab_relu " in capsys.readouterr().out


@pytest.mark.parametrize(
    "family", ["vit", "pvt_v2"]
)  # PVTv2's layers: a family's subclass of the package's class
def test_a_student_loaded_without_its_attentions_package_names_the_package_to_install(
    install_package, family
):
    """A student of the package's attention, rebuilt where the package is not installed (an export handed on,
    a run dir on another machine), is told the pip command in run.json's wording: the package and the version
    it was trained with. A spec written before it recorded the version still names package and module, and a
    hand-edited one the generic refusal, without a traceback."""
    site = install_package(_FILES, _ENTRY_POINTS)
    small = {"depths": (1,) * 4, "embed_dims": (8,) * 4, "num_heads": (1,) * 4}
    teacher = tiny_vit(depth=1) if family == "vit" else timm.create_model("pvt_v2_b0", **small)
    spec = student_spec(build_efficient_student(teacher, "lab_relu"))
    shutil.rmtree(site / "labpkg-0.1.dist-info")  # pip uninstall labpkg, as this process sees it
    del registry._ATTENTIONS["lab_relu"]  # (the fixture puts the registry back)
    with pytest.raises(InputError) as said:
        student_from_spec(spec)
    assert str(said.value) == (
        "the student's attention 'lab_relu' came from the plug-in package labpkg 0.1 (labpkg.attention); it is "
        "not installed here: pip install labpkg"
    )
    older = dict(spec, attention_sources={"lab_relu": "package labpkg, module labpkg.attention"})
    with pytest.raises(InputError, match=r"'lab_relu' \(package labpkg, module labpkg\.attention\) is not"):
        student_from_spec(older)
    for edited in (["labpkg"], {"lab_relu": {"package": "labpkg"}}):
        with pytest.raises(InputError, match=r"^the student's attention 'lab_relu' is not registered here"):
            student_from_spec(dict(spec, attention_sources=edited))


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,changed",
    [
        ("model.attention=lab_relu", "model.attention: null -> lab_relu"),
        ("transfer.losses=[{name: lab_gap}]", "transfer.losses: [] -> [{name: lab_gap}]"),
    ],
)
def test_a_fresh_cli_process_checks_the_names_against_the_installed_package(
    install_package, override, changed
):
    """Where the CLI has not imported the registries yet (it checks names read from attnxfer's source), an
    unknown name imports the package, and its names pass: the command line a user types. The loss's module
    imports attnxfer's models, whose import loads no entry point (the attention's module, which imports them
    too, would fail half-imported)."""
    site = install_package(_FILES, _ENTRY_POINTS)
    child = attnxfer_process("train", "--print-config", override, cwd=site)  # `-m` puts site on sys.path
    assert child.returncode == 0 and not child.stderr, child.stderr  # passed, and no plug-in failed
    assert f"#   {changed}\n" in child.stdout


def test_a_package_that_fails_to_import_is_one_warning_line_and_hides_no_built_in(install_package, capsys):
    """Both groups name a module that raises as it is imported: each is said once a process, in one line,
    and the built-in losses and attentions are still offered."""
    broken = "raise RuntimeError('no licence server\\nfor the lab kernels')\n"
    install_package(
        {"labpkg/__init__.py": broken},
        "[attnxfer.losses]\nlab_gap = labpkg\n\n[attnxfer.attentions]\nlab_relu = labpkg\n",
    )
    code, _, err = run_cli(capsys, "train", "transfer.losses=[{name: lab_gap}]")
    warning, refusal = err.splitlines()
    assert code == 2 and warning == (
        "warning: attnxfer.losses entry point lab_gap = labpkg failed to load, rest skipped: "
        "RuntimeError('no licence server\\nfor the lab kernels')"
    )
    assert refusal.startswith(
        "attnxfer train: error: transfer.losses[0].name: 'lab_gap' is not a comparison loss"
    )
    offered = refusal.split("(one of ")[1].split(";")[0].split(", ")
    assert {"feature_distill", "map", "mse"} <= set(offered)  # the built-ins
    code, _, err = run_cli(capsys, "train", "transfer.losses=[{name: lab_gap}]")
    assert code == 2 and "warning" not in err  # once a process
    assert {"softmax", "performer"} <= set(list_attentions())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "warning: attnxfer.attentions entry point lab_relu = labpkg"
    )


def test_a_package_taking_a_built_in_name_is_said_when_that_name_is_asked_for(install_package, capsys):
    """A lab's `performer`, `mse` or `synthetic` cannot replace the built-in: asked for the built-in's name,
    each registry still reads the package, whose refused registration is one warning line (it was never
    imported, so the lab's class was silently not the one trained)."""
    taken = {
        "attention": "from attnxfer.models import register_attention\n"
        "from attnxfer.models.efficient import ReLULinearAttention\n\n"
        "@register_attention('performer')\nclass LabPerformer(ReLULinearAttention):\n    pass\n",
        "losses": _LOSS.replace('"lab_gap"', '"mse"'),
        "data": "from attnxfer.data import register_dataset\n"
        "from attnxfer.data.synthetic import SYNTHETIC_INFO, build_synthetic\n"
        "register_dataset('synthetic', info=SYNTHETIC_INFO)(build_synthetic)\n",
    }
    install_package(
        {"labpkg/__init__.py": ""} | {f"labpkg/{m}.py": text for m, text in taken.items()},
        "[attnxfer.attentions]\nperf = labpkg.attention\n\n[attnxfer.losses]\nmse = labpkg.losses\n\n"
        "[attnxfer.datasets]\nsyn = labpkg.data\n",
    )
    assert type(create_attention("performer", dim=48, num_heads=3)).__name__ != "LabPerformer"
    assert type(get_comparison_loss("mse")).__module__.startswith("attnxfer.")
    build_dataset("synthetic", "train", img_size=16)
    warnings = capsys.readouterr().err.splitlines()
    assert [w.split(" = ")[0] for w in warnings] == [
        "warning: attnxfer.attentions entry point perf",
        "warning: attnxfer.losses entry point mse",
        "warning: attnxfer.datasets entry point syn",
    ]
    assert all("already registered" in w for w in warnings), warnings


def test_a_packages_attention_that_lacks_part_of_the_interface_is_one_warning_line_not_a_first_step_traceback(
    install_package, capsys
):
    """No _attend, or a map kind with a map and no rows to give: refused as it registers, in the package's one
    warning line, and the name is then unknown (both had been accepted and traced back at the first forward)."""
    lacking = {
        "no_attend": "class NoAttend(EfficientAttention):\n    map_kind = MapKind.NONE\n",
        "no_rows": "class NoRows(EfficientAttention):\n    def _attend(self, q, k, v):\n        return v\n",
    }
    header = "from attnxfer.models import register_attention\nfrom attnxfer.models.attention import MapKind\n"
    header += "from attnxfer.models.efficient import EfficientAttention\n\n"
    install_package(
        {"labpkg/__init__.py": ""}
        | {f"labpkg/{n}.py": f"{header}@register_attention({n!r})\n{text}" for n, text in lacking.items()},
        "[attnxfer.attentions]\nno_attend = labpkg.no_attend\nno_rows = labpkg.no_rows\n",
    )
    for name in lacking:
        with pytest.raises(UnknownNameError, match=f"unknown attention {name!r}"):
            create_attention(name, dim=48, num_heads=3)
    warnings = capsys.readouterr().err.splitlines()
    assert any("NoAttend defines no _attend(q, k, v)" in w for w in warnings), warnings
    assert any("NoRows has map_kind 'row_stochastic' but no _map_context/_map_rows" in w for w in warnings)


def test_a_run_whose_package_was_uninstalled_names_the_package_to_install(
    install_package, tiny_teacher_dir, tmp_path, capsys
):
    """A run trained with a package's attention and loss, evaluated or resumed where the package is gone, is
    told to install the package run.json records, not offered the nearest built-in name (`mse` for `lab_mse`),
    which would score or train something else."""
    files = _FILES | {"labpkg/losses.py": _LOSS.replace('"lab_gap"', '"lab_mse"')}
    site = install_package(files, _ENTRY_POINTS)
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        *ONE_BLOCK_RUN,
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "transfer.losses=[{name: lab_mse}]",
        "model.attention=lab_relu",
        "schedule.max_steps=1",
        f"run_dir={run}",
    )
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["plugins"] == {
        "attnxfer.losses": {
            "lab_mse": {"package": "labpkg", "version": "0.1", "entry_point": "labpkg.losses"}
        },
        "attnxfer.attentions": {
            "lab_relu": {"package": "labpkg", "version": "0.1", "entry_point": "labpkg.attention"}
        },
    }
    _uninstall_labpkg(site)
    del COMPARISON_LOSSES["lab_mse"]
    code, _, err = run_cli(capsys, "eval", "-c", str(run / "config.yaml"))
    assert code == 2 and err.endswith(
        "model.attention: 'lab_relu' came from the plug-in package labpkg 0.1 (labpkg.attention); it is not "
        "installed here: pip install labpkg\n"
    )
    # its resume, the attention given otherwise: the loss's entry is refused alike
    code, _, err = run_cli(capsys, "train", "-c", str(run / "config.yaml"), "model.attention=relu_linear")
    assert (
        code == 2
        and "did you mean" not in err
        and err.endswith(
            "transfer.losses[0].name: 'lab_mse' came from the plug-in package labpkg 0.1 (labpkg.losses); it is not "
            "installed here: pip install labpkg\n"
        )
    )
    # another version installed since, without the attention: the recorded one is named
    (site / "labpkg-0.2.dist-info").mkdir()
    (site / "labpkg-0.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: labpkg\nVersion: 0.2\n"
    )
    code, _, err = run_cli(capsys, "eval", "-c", str(run / "config.yaml"))
    assert code == 2 and err.endswith(
        "labpkg 0.2, installed here, registers no 'lab_relu': pip install labpkg==0.1\n"
    )


_ORIGIN = {"package": "labpkg", "version": "0.1", "entry_point": "labpkg.attention"}


@pytest.mark.parametrize(
    "plugins",
    [
        ["labpkg"],
        {"attnxfer.attentions": ["lab_relu"]},
        {"attnxfer.attentions": {"lab_relu": "labpkg"}},
        {"attnxfer.attentions": {"lab_relu": dict(_ORIGIN, version=1)}},
        {"attnxfer.attentions": {"lab_relu": _ORIGIN}},
    ],
)
def test_a_hand_edited_plugins_record_gets_a_refusal_not_a_traceback(plugins, tmp_path, monkeypatch, capsys):
    """run.json's ``plugins`` edited by hand into another shape is read as if unrecorded (the generic refusal
    of an unknown name); one of the recorded shape names the package, with run_dir given relative to the
    folder the command runs in."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"plugins": plugins}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = run_cli(
        capsys, "train", "data.dataset=synthetic", "model.attention=lab_relu", "run_dir=../run"
    )
    recorded = plugins == {"attnxfer.attentions": {"lab_relu": _ORIGIN}}
    assert code == 2 and "Traceback" not in err, err
    assert err.endswith(
        "model.attention: 'lab_relu' came from the plug-in package labpkg 0.1 (labpkg.attention); it is not "
        "installed here: pip install labpkg\n"
        if recorded
        else "@register_attention in a module named by an 'attnxfer.attentions' entry point)\n"
    ), err


@pytest.mark.parametrize("recorded", [True, False])
def test_a_stage_1_checkpoints_plugins_record_names_the_package_and_an_older_one_gets_the_generic_refusal(
    recorded, tmp_path, capsys
):
    """A conversion stopped in stage 1 has no run.json (stage 2 writes it): its resume reads the plug-ins its
    stage 1 checkpoint's state.json records, and one saved before stage 1 recorded them gets the generic
    refusal, as before. (The whole stop and resume: the slow test below.)"""
    plugins = {"plugins": {"attnxfer.attentions": {"lab_relu": _ORIGIN}}} if recorded else {}
    weights = {"model": {"w": torch.zeros(2)}}
    CheckpointManager(tmp_path / "run" / "stage1").save(1, weights, {"step": 1, "complete": False, **plugins})
    code, _, err = run_cli(
        capsys,
        "convert",
        "data.dataset=synthetic",
        "convert.attention=lab_relu",
        f"run_dir={tmp_path / 'run'}",
    )
    assert code == 2 and "Traceback" not in err, err
    assert err.endswith(
        "convert.attention: 'lab_relu' came from the plug-in package labpkg 0.1 (labpkg.attention); it is not "
        "installed here: pip install labpkg\n"
        if recorded
        else "@register_attention in a module named by an 'attnxfer.attentions' entry point)\n"
    ), err


@pytest.mark.slow
def test_a_conversion_whose_attentions_package_was_uninstalled_names_it_to_export_and_inspect(
    install_package, tiny_teacher_dir, tmp_path, capsys
):
    """export and inspect rebuild a conversion's student from its checkpoint's spec, not from run.json: they
    name the package and the version to install as eval of the same folder does. (The student loader's
    wording alone, fast: test_a_student_loaded_without_its_attentions_package_names_the_package_to_install.)"""
    site = install_package(_FILES, _ENTRY_POINTS)
    run = tmp_path / "conversion"
    code, _, err = run_cli(
        capsys,
        "convert",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        *tiny_run(16, 8),
        "convert.attention=lab_relu",
        "convert.stage1_train=qk",
        "convert.stage1_steps=1",
        "schedule.max_steps=1",
        "transfer.mode=none",
        *tiny_convert_report(1, 2),
        "convert.speed_sweep=[]",
    )
    assert code == 0, err
    _uninstall_labpkg(site)
    said = (
        "'lab_relu' came from the plug-in package labpkg 0.1 (labpkg.attention); it is not installed here: "
        "pip install labpkg\n"
    )
    for argv in (
        ["eval", "-c", str(run / "config.yaml")],
        ["eval", f"run_dir={run}"],  # the folder, without its config
        ["export", str(run), str(tmp_path / "export")],
        ["inspect", f"local-dir:{tiny_teacher_dir}", str(run), "--num-images", "1"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.endswith(said), err


@pytest.mark.slow
def test_a_conversion_stopped_in_stage_1_names_its_attentions_package_to_its_resume(
    install_package, tiny_teacher_dir, tmp_path, capsys, monkeypatch
):
    """A conversion stopped during stage 1 has no run.json yet (stage 2 writes it): its stage 1 checkpoint
    records the plug-in's package, so its resume where the package is gone names what to install, not the
    generic refusal of an unknown attention."""
    site = install_package(_FILES, _ENTRY_POINTS)
    run = tmp_path / "conversion"
    args = [f"run_dir={run}", f"teacher.spec=local-dir:{tiny_teacher_dir}", *tiny_run(16, 8)]
    with monkeypatch.context() as patch:  # SIGTERM after stage 1's first step (SLURM's preemption)
        patch.setattr("attnxfer.train.stage1.stop_signal", lambda: signal.SIGTERM)
        code, _, err = run_cli(
            capsys,
            "convert",
            *args,
            "convert.attention=lab_relu",
            "convert.stage1_train=qk",
            "convert.stage1_steps=2",
        )
    assert code == 143 and not (run / "stage2").exists(), err
    _uninstall_labpkg(site)
    code, _, err = run_cli(capsys, "convert", "-c", str(run / "config.yaml"))
    assert code == 2 and err.endswith(
        "convert.attention: 'lab_relu' came from the plug-in package labpkg 0.1 (labpkg.attention); it is not "
        "installed here: pip install labpkg\n"
    ), err


def test_a_runs_own_attention_registered_by_no_package_is_named_as_the_runs(tmp_path, capsys):
    """A run trained with an attention a fork's file registered, scored where that file is gone: the nearest
    built-in name ("did you mean") would score another model, so the run's own attention is said."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"student": {"attention": ["lab_cos", "softmax"]}}))
    (run / "config.yaml").write_text(f"run_dir: {run}\nmodel:\n  attention: lab_cos\n")
    code, _, err = run_cli(capsys, "eval", "-c", str(run / "config.yaml"))
    assert code == 2 and "did you mean" not in err, err
    assert f"'lab_cos' is the attention {run} was trained with, and nothing registers it here" in err
