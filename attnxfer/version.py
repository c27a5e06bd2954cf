"""The package version (one place: the package, export model cards and the CLI read it)."""

__version__ = "0.1.0"


def software_record() -> dict[str, object]:
    """What ran a job, for run.json: the versions a result depends on, attnxfer's git commit where it runs from a
    clone (``-dirty``: with uncommitted changes), the machine and the command line, so that a table in a paper
    names what made it."""
    import os
    import platform
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import timm
    import torch

    record: dict[str, object] = {
        "attnxfer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        **({"slurm_job": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}),
    }
    clone = Path(__file__).resolve().parent.parent
    # an editable install from a clone: the commit (a wheel's version says the rest)
    if (clone / ".git").exists():
        git = ["git", "-C", str(clone)]
        try:
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            changed = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):  # no git on this machine: the version alone
            return record
        if commit.returncode == 0:
            record["git_commit"] = commit.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")
    return record
