"""`attnxfer submit --dry-run` through the CLI: every value that reaches the sbatch script is checked as
sbatch reads it (no cluster needed). The script is read back the way sbatch reads it: ``#SBATCH`` lines
count only up to the first command."""

from __future__ import annotations

import pytest
from helpers import run_cli

INJECTION = "x\necho INJECTED\n#"


#: a teacher for the jobs to name (a dry run loads none): without one, a job that transfers or converts is refused
_TEACHER = "teacher.spec=vit_tiny_patch16_224.augreg_in21k"


def _dry_run(capsys, tmp_path, *flags: str) -> tuple[int, str, str]:
    return run_cli(capsys, "submit", f"run_dir={tmp_path / 'run'}", _TEACHER, "--dry-run", *flags)


def _sbatch_header(text: str) -> tuple[list[str], list[str]]:
    """(#SBATCH lines sbatch reads, the command lines) of the script inside a dry run's output."""
    lines = text.splitlines()
    start = lines.index("#!/bin/bash")
    options, commands = [], []
    for line in lines[start + 1 :]:
        if line.startswith("# resolved config"):  # the dry run's own text after the script
            break
        if line.startswith("#SBATCH") and not commands:
            options.append(line)
        elif line.strip() and not line.startswith("#"):
            commands.append(line)
    return options, commands


@pytest.mark.parametrize(
    "flags",
    [
        ["--name", INJECTION],
        ["--partition", INJECTION],
        ["--account", INJECTION],
        ["--qos", INJECTION],
        ["--constraint", INJECTION],
        ["--exclude", INJECTION],
        ["--slurm", f"mail-user={INJECTION}"],
        ["--job-dir", f"/tmp/{INJECTION}"],
        ["--name", "tab\there"],
    ],
)
def test_control_characters_in_any_script_value_are_refused(capsys, tmp_path, flags):
    code, out, err = _dry_run(capsys, tmp_path, *flags)
    assert code == 2
    assert "#SBATCH" not in out and "INJECTED" not in out  # no script was printed at all
    [line] = err.strip().splitlines()  # one clear message naming the flag
    assert flags[0].split("=")[0] in line and "control characters" in line, line


def test_run_dir_with_a_line_break_is_refused_before_it_reaches_the_script(capsys, tmp_path):
    code, out, err = run_cli(capsys, "submit", f"run_dir={tmp_path}/a\necho INJECTED", _TEACHER, "--dry-run")
    assert code == 2 and "#SBATCH" not in out and "run_dir" in err  # (the config summary echoes it)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--partition", "gpu big"], "partition names have no spaces"),
        (["--partition", "gpu,,big"], "no empty items"),
        (["--account", "my lab"], "account names have no spaces"),
        (["--exclude", "n1, n2"], "node names have no spaces"),
        (["--constraint", "a100 ib"], "node features have no spaces"),
        (["--time", "25:99:99"], "--time '25:99:99': minutes must be below 60"),  # names the flag typed
        (["--time", "10:75"], "--time '10:75': seconds must be below 60"),
        (["--time", "1-24"], "--time '1-24': hours must be below 24"),
        (["--time", "1:2:3:4"], "--time must be MM, MM:SS"),
        (["--time", "0"], "--time must be at least one minute, got '0' (sbatch's 0, no limit, is not taken"),
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1, got 0"),
        (["--tasks-per-node", "0"], "--tasks-per-node must be >= 1, got 0"),
        (["--array-parallelism", "0"], "--array-parallelism must be >= 1, got 0"),
        (["--max-requeues", "-1"], "--max-requeues must be >= 0, got -1"),
        (["--mem", "lots"], "--mem must look like sbatch --mem"),
        (
            ["--gpus-per-node", "2", "--tasks-per-node", "3"],
            "--tasks-per-node 3 differs from --gpus-per-node 2",
        ),
        (["--cluster", "local", "--nodes", "2"], "use --nodes 1"),
        (["--nodes", "1", "--slurm", "nodes=4"], "use --nodes"),
        (["--slurm", "ntasks-per-node=8"], "use --tasks-per-node"),
        (["--slurm", "time=10"], "use --time"),
        (["--slurm", "part=gpu"], "use --partition"),  # sbatch takes unambiguous abbreviations
        (["--slurm", "N=4"], "long option name"),
        (["--slurm", "output=x.log"], "--slurm cannot set output: submitit manages it"),
        (
            ["--slurm", "mail-type"],
            "expects KEY=VALUE, got 'mail-type' (sbatch's switches alone: contiguous,",
        ),
        (["--max-preemptions", "-1"], "--max-preemptions must be >= 0"),
    ],
)
def test_values_sbatch_would_misread_are_refused_with_the_fix(capsys, tmp_path, flags, message):
    code, out, err = _dry_run(capsys, tmp_path, *flags)
    assert code == 2 and "#SBATCH" not in out
    [line] = err.strip().splitlines()
    assert message in line, line


def test_a_valid_dry_run_keeps_every_option_in_the_script_header(capsys, tmp_path):
    code, out, err = _dry_run(
        capsys,
        tmp_path,
        "--name",
        "my job; echo not-a-command",  # spaces and shell syntax are fine in a job name: quoted
        "--partition",
        "gpu,gpu-long",
        "--exclude",
        "node[1-3,5],big7",
        "--constraint",
        "a100&ib",
        "--time",
        "1-02:03:04",
        "--nodes",
        "2",
        "--tasks-per-node",
        "3",
        "--slurm",
        "mail-type=END",
        "--slurm",  # sbatch's switches: alone, or =true, which sbatch itself would refuse as --exclusive=true
        "exclusive",
        "--slurm",
        "requeue=true",
    )
    assert code == 0, err
    options, commands = _sbatch_header(out)
    for expected in (
        "#SBATCH --job-name='my job; echo not-a-command'",
        "#SBATCH --partition=gpu,gpu-long",
        "#SBATCH --exclude='node[1-3,5],big7'",
        "#SBATCH --constraint='a100&ib'",
        "#SBATCH --time=1564",  # 1 day + 2 h + 3 min + 4 s, rounded up to whole minutes
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=3",
        "#SBATCH --mail-type=END",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
    ):
        assert expected in options, (expected, options)
    assert any(o.startswith("#SBATCH --output=") for o in options)
    # the only commands: the executor export and srun of the task
    assert len(commands) == 2 and commands[0] == "export SUBMITIT_EXECUTOR=slurm", commands
    assert commands[1].startswith("srun ")
    assert "2 node(s) x 3 task(s)" in out  # the summary says what the script asks for


@pytest.mark.parametrize(
    "command, shown, hidden",
    [("train", [], ["convert", "mae", "search"]), ("convert", ["convert"], ["mae", "search"])],
)
def test_a_dry_run_shows_the_config_its_command_reads(capsys, tmp_path, command, shown, hidden):
    """As --print-config and the run's config.yaml do: another command's sections are not part of this job."""
    code, out, err = _dry_run(capsys, tmp_path, "--command", command)
    assert code == 0, err
    config = out.split("# resolved config")[1]
    sections = {line[:-1] for line in config.splitlines() if line.endswith(":") and not line.startswith(" ")}
    assert {"model", "transfer", "data"} <= sections
    assert set(shown) <= sections and not sections & set(hidden), sections


@pytest.mark.parametrize(
    "sweep, said",
    [
        (  # the same override without --sweep is refused: with it, two identical train jobs ran
            "convert.attention=performer,hedgehog",
            "--sweep convert.attention=performer: convert.attention: only `attnxfer convert` reads",
        ),
        (
            "model.name=vit_tiny_patch16_224,vit_tny",
            "--sweep model.name=vit_tny: model.name: 'vit_tny' is not",
        ),
    ],
)
def test_each_job_of_a_sweep_is_checked_before_submitting(capsys, tmp_path, sweep, said):
    """A value no job can run fails here, not inside a job after the queue's wait."""
    code, _, err = _dry_run(capsys, tmp_path, "transfer.mode=none", "--sweep", sweep)
    assert code == 2 and said in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, said",
    [
        (
            ["--command", "pretrain", "-c", "demo/mae_pretrain", "teacher.spec=vit_micro_patch4_28"],
            "pretrain does not read teacher.spec=",
        ),
        (  # a recipe of train's: its transfer section, which pretraining would drop
            ["--command", "pretrain", "-c", "demo/copy"],
            "transfer.mode: attnxfer pretrain does not read the transfer section and would drop it; remove it",
        ),
        (
            ["--command", "convert", "-c", "convert/demo_hedgehog", "model.attention=hedgehog"],
            "model.attention='hedgehog' is for a fresh student (`attnxfer train`)",
        ),
        (
            ["-c", "demo/distill", "data.labels=false"],
            "the task loss (cross-entropy of the student's logits)",
        ),
        (  # stage 2's task loss, named, on data read without labels
            [
                "--command",
                "convert",
                "-c",
                "convert/demo_hedgehog",
                "data.labels=false",
                "transfer.task_weight=1",
            ],
            "the task loss (cross-entropy of the student's logits) needs labels",
        ),
        (  # the report's top-1, asked for by name, on data read without labels
            [
                "--command",
                "convert",
                "-c",
                "convert/demo_hedgehog",
                "data.labels=false",
                "eval.metrics=[top1]",
            ],
            "eval.metrics=top1 needs labels",
        ),
        (  # a study's student with a task loss (copy's), on data read without labels
            [
                "--command",
                "study",
                "-c",
                "demo/distill",
                "--vary",
                "transfer.mode=copy,distill",
                "data.labels=false",
            ],
            "needs labels, but data.dataset=animal_mnist is read without labels (data.labels=false, or a dataset that has none); use labelled data, or transfer.mode=distill (copy needs a task loss)",
        ),
        (  # a study's own check: its students would share one process's loss scaler
            ["--command", "study", "-c", "demo/distill", "--vary", "optim.lr=1e-3,2e-3", "precision=fp16"],
            "precision=fp16 scales losses with one scaler per process",
        ),
        (  # in one job of a sweep only
            ["--command", "pretrain", "-c", "demo/mae_pretrain", "--sweep", "transfer.atd_weight=1,2"],
            "--sweep transfer.atd_weight=2: transfer.atd_weight: attnxfer pretrain does not read the transfer "
            "section and would drop it; remove it",
        ),
    ],
)
def test_what_the_command_refuses_of_its_config_is_refused_before_submitting(capsys, tmp_path, flags, said):
    """`attnxfer pretrain`, `attnxfer convert`, `attnxfer train` and `attnxfer study` refuse these keys at their
    start (by their own checks): a job would after the queue's wait."""
    code, _, err = _dry_run(capsys, tmp_path, *flags)
    assert code == 2 and said in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["-c", "demo/distill"],
        ["--command", "convert", "-c", "convert/demo_hedgehog", "transfer.task_weight=1"],
        ["--command", "study", "-c", "demo/distill", "--vary", "transfer.mode=copy,distill"],
    ],
)
def test_data_the_login_node_cannot_see_is_left_to_the_job(capsys, tmp_path, flags):
    """A data folder may exist on the compute nodes alone (staged to their local disks): the label checks
    submit runs read no data where the config reads labels, so the job is submitted and its start judges it."""
    missing = f"data.root={tmp_path / 'on-the-nodes-only'}"
    code, out, err = _dry_run(capsys, tmp_path, *flags, "data.dataset=folder", missing)
    assert code == 0 and "dry run: nothing submitted" in out, err


def test_pretraining_on_data_without_labels_is_submitted(capsys, tmp_path):
    """MAE pre-training reads no labels: the task-loss check of train must not refuse its label-free data."""
    code, out, err = run_cli(  # no teacher: pretrain reads none
        capsys,
        "submit",
        f"run_dir={tmp_path / 'run'}",
        "--dry-run",
        "--command",
        "pretrain",
        "-c",
        "demo/mae_pretrain",
        "data.labels=false",
    )
    assert code == 0 and "dry run: nothing submitted" in out, err


def test_print_config_shows_what_the_job_runs(capsys, tmp_path):
    """As `attnxfer convert --print-config` and `attnxfer study --print-config` show it: the convert section,
    each student."""
    code, out, err = run_cli(
        capsys, "submit", "--command", "convert", "-c", "convert/demo_hedgehog", "--print-config"
    )
    assert code == 0 and "\nconvert:\n  attention: hedgehog" in out, err
    study = tmp_path / "study.yaml"
    study.write_text("base: demo/distill\nstudents:\n  - {name: a, optim.lr: 0.001}\n  - {name: b}\n")
    code, out, err = run_cli(capsys, "submit", "--command", "study", "-c", str(study), "--print-config")
    assert code == 0 and "# student a:" in out and "# student b:" in out, err


def test_print_config_checks_and_says_a_sweep_and_refuses_a_vary_without_a_study(capsys):
    """--print-config printed the base config alone ("unchanged") and exited 0, whatever --sweep (a misspelt key
    too) or --vary said: a sweep's values are checked and the sweep said, and --vary is refused as the submit
    refuses it."""
    argv = ["submit", "-c", "demo/copy", "--print-config"]
    code, out, err = run_cli(capsys, *argv, "--sweep", "optim.lrr=1e-3,2e-3")
    assert code == 2 and not out and "unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in err, err
    code, out, err = run_cli(capsys, *argv, "--sweep", "optim.lr=1e-3,2e-3", "--sweep", "seed=1,2,3")
    assert code == 0 and "\noptim:\n  lr: 0.002\n" in out, err
    assert out.endswith(
        "# --sweep: 6 jobs, this config with each combination of optim.lr=1e-3,2e-3 x seed=1,2,3 (--dry-run "
        "prints every job's)\n"
    ), out
    code, out, err = run_cli(capsys, *argv, "--vary", "seed=1,2")
    assert code == 2 and not out and "--vary names what a study's students differ in" in err, err


def test_gpus_asked_for_by_gres_must_each_have_a_task(capsys, tmp_path):
    """The job runs one task per GPU of --gpus-per-node (or --tasks-per-node): a gres of 4 GPUs beside one task
    would leave three idle without a word."""
    code, _, err = _dry_run(capsys, tmp_path, "--slurm", "gres=nvme:1,gpu:4")
    assert code == 2 and "gres=nvme:1,gpu:4 asks for 4 GPUs a node, but the job runs 1 task(s) a node" in err
    code, out, err = _dry_run(capsys, tmp_path, "--slurm", "gres=gpu:a100:4", "--tasks-per-node", "4")
    assert code == 0 and "#SBATCH --gres=gpu:a100:4" in out and "#SBATCH --ntasks-per-node=4" in out, err


def test_a_dry_run_says_which_local_paths_of_the_job_this_machine_lacks(capsys, tmp_path, tiny_teacher_dir):
    """Said, not refused (the compute nodes may have what the submitting machine does not): a misspelt path
    would fail the job only after its wait in the queue. A path that is here, or a timm name, says nothing."""
    teacher, data, init = tmp_path / "teacher", tmp_path / "images", tmp_path / "w.safetensors"
    paths = [
        f"teacher.spec=local-dir:{teacher}",
        "data.dataset=folder",
        f"data.root={data}",
        f"model.init={init}",
    ]
    code, _, err = run_cli(capsys, "submit", f"run_dir={tmp_path / 'run'}", *paths, "--dry-run")
    assert code == 0, err
    said = f"warning: data.root={data}, model.init={init}, teacher.spec=local-dir:{teacher} do not exist on this "
    assert (
        said + "machine: the job reads them where it runs (a path the compute nodes alone have is fine" in err
    )
    data.mkdir()
    code, _, err = run_cli(
        capsys,
        "submit",
        f"run_dir={tmp_path / 'run'}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "data.dataset=folder",
        f"data.root={data}",
        "--dry-run",
    )
    assert code == 0 and "exist on this machine" not in err, err
    code, _, err = _dry_run(capsys, tmp_path)
    assert code == 0 and "exist on this machine" not in err, err
