"""The ``attnxfer`` command: the parser of its subcommands, and how the program answers and exits. User
errors print one line and exit 2 (``ATTNXFER_DEBUG=1``: the traceback). Each command imports its app inside
its handler, so `attnxfer --help` and argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import UserError
from ..speak import quiet, warn, warnings_as_lines
from ..version import __version__
from .commands import COMMANDS, load
from .commands.base import load_study, with_auto_resume
from .process_exit import end_program

EXAMPLES = """\
examples:
  attnxfer demo                                           # the animal-mnist demo (MAE teacher, 3 students)
  attnxfer train -c demo/copy schedule.epochs=5           # a built-in recipe (attnxfer/cfgs) or a YAML path
  attnxfer train -c paper/vit_large_copy data.root=/data/imagenet
  attnxfer eval  -c runs/my-run/config.yaml
  attnxfer pretrain -c demo/mae_pretrain                  # MAE pre-training, no labels -> RUN_DIR/export
  attnxfer convert -c convert/demo_hedgehog                # softmax teacher -> Hedgehog student + report
  attnxfer search -c search/demo                          # discover a formula attention for the teacher
  attnxfer inspect local-dir:runs/demo/mae/export runs/demo/mae_study-*/distill --data animal_mnist
  attnxfer submit -c paper/vit_large_distill data.root=/data/imagenet --nodes 8 --gpus-per-node 8
  attnxfer submit --command convert -c convert/vit_base_mae_performer data.root=/data/imagenet --gpus-per-node 8
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnxfer",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Attention transfer for Vision Transformers: attention copy, attention distillation and "
        "conversion to efficient attention, on timm models.",
    )
    parser.add_argument("--version", action="version", version=f"attnxfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():  # in `HELP_ORDER`
        command.add_to(sub)
    return parser


def _where_to_resume(args) -> str:
    """What a re-run of an interrupted command continues from (checkpoints are only ever whole)."""
    if args.command in ("inspect", "export"):  # each writes a temporary sibling of its output, moved in whole
        out = args.out if args.command == "inspect" else args.out_dir
        if getattr(args, "push_to_hub", None) and not args.overwrite and (Path(out) / "README.md").is_file():
            # its OUT was empty (else refused): a card there was moved in with the export, just before the push
            return f"the export in {out} is complete; push it with `hf upload {args.push_to_hub} {out} .`"
        return f"nothing was written to {out}: run the same command again"
    if args.command == "eval":  # it trains nothing, and its scores are written whole
        return "it changed no checkpoint: run the same command again"
    if args.command == "fetch":  # huggingface_hub resumes a file it left incomplete
        return "run the same command again: the download continues from what reached the cache"
    unknown = "run the same command again to continue from the newest checkpoint, if one was saved"
    cfg = _config_of(args)
    if cfg is None:
        return unknown
    run = Path(cfg.run_dir)
    # a run's (or a conversion's) checkpoints; a study's own (the step every student saved: a student's later
    # one is set aside), else its students' (a conversion study's stage 1)
    study = args.command == "study"
    runs = [run, *sorted(d for d in run.iterdir() if d.is_dir())] if study and run.is_dir() else [run]
    try:
        from ..checkpoints.run_lock import newest_checkpoint

        info = next(filter(None, map(newest_checkpoint, runs)), None)
    except Exception:
        return unknown
    if info is None:
        return f"no checkpoint was saved yet in {cfg.run_dir}: running the same command again starts over"
    if study and info.path.parent.parent != run:
        again = f"running the same command again{with_auto_resume(cfg)}"
        return f"{again} continues the study from its students' checkpoints (e.g. {info.path})"
    unit = "generation" if args.command == "search" else "step"  # a search saves generations
    return f"running the same command again{with_auto_resume(cfg)} continues from {unit} {info.step} ({info.path})"


def _config_of(args):
    """The stopped command's config (a study's: its base, whose run_dir is the study's folder), read again
    without a word (it was said when the command started); None where it does not read as one."""
    try:
        with quiet():
            return load_study(args).base if args.command == "study" else load(args)
    except Exception:
        return None


def _as_written(stray: list[str], argv: list[str]) -> list[tuple[str, str]]:
    """The unrecognised arguments as the user wrote them, each a flag with the value after it (``--epochs 3``,
    sbatch's ``-p gpu``: argparse took the value as an override, or left it an argument of its own) or
    ``(item, "")``."""
    written, start, values = [], 0, set()
    for item in stray:
        i = argv.index(item, start) if item in argv[start:] else None
        if i is not None and i in values:  # the value of the flag before it, written there
            continue
        after = argv[i + 1 : i + 2] if i is not None else []
        start = start if i is None else i + 1
        value = after[0] if after and not after[0].startswith("-") and "=" not in after[0] else ""
        if item == "--model-kwargs" and i is not None:  # timm's: the KEY=VALUE words after it, all
            pairs = itertools.takewhile(lambda word: "=" in word and not word.startswith("-"), argv[i + 1 :])
            written.append((item, " ".join(pairs)))
        elif item.startswith("-") and "=" not in item and value:
            taken = [start]  # timm's --input-size 3 224 224, --mean 0.5 0.5 0.5: the numbers after it, all
            while _number(value) and taken[-1] + 1 < len(argv) and _number(argv[taken[-1] + 1]):
                taken.append(taken[-1] + 1)
            written.append((item, " ".join(argv[j] for j in taken)))
            values.update(taken)
        else:
            written.append((item, ""))
    return written


def _number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


#: timm's train.py one-letter flags, by the long flag each stands for (-c is every command's config)
_SCRIPT_LETTERS = {"-b": "batch_size", "-j": "workers"}
#: timm's and MAE's switches (flags without a value) whose key is no boolean: the value each means
_SWITCHED_ON = {
    "amp": "bf16",  # mixed precision: attnxfer's is bfloat16 (auto: bf16 on GPU already)
    "model_ema": "0.9998",  # timm's --model-ema-decay default
    "log_wandb": "[tensorboard,wandb]",
    "bf16": "bf16",  # Hugging Face's
    "fp16": "fp16",
}


def _as_overrides(written: list[tuple[str, str]]) -> str:
    """Flags naming config keys (timm's and MAE's ``--epochs 5``) as what attnxfer takes: ``schedule.epochs=5``."""
    from typing import get_args, get_origin

    from ..config.keys import leaves
    from ..config.overrides import done_one_way, keys_meant
    from ..config.schema import TrainConfig

    leaves_by_name = {leaf.name: leaf for leaf in leaves(TrainConfig)}
    known = set(leaves_by_name)
    meant, one_way = [], []
    for item, after in written:
        if item in _SCRIPT_LETTERS:
            item = f"--{_SCRIPT_LETTERS[item]}"
        if not item.startswith("--"):
            continue
        name, _, value = item[2:].partition("=")
        if name == "model-kwargs":  # timm's --model-kwargs depth=4 drop_rate=0.1
            meant.append(
                " ".join(f"model.kwargs.{pair}" for pair in after.split()) or "model.kwargs.KEY=VALUE"
            )
            continue
        value, numbers = value or after, (value or after).split()
        if len(numbers) > 1:  # timm's --input-size C H W is the image size; any other, a list
            value = numbers[1] if name.replace("-", "_") == "input_size" else f"[{','.join(numbers)}]"
        # timm's --opt lamb: a choice attnxfer does not offer, said once however many flags ask for it
        if done := done_one_way(name.replace("-", "_")):
            one_way += [done] * (done not in one_way)
            continue
        keys = keys_meant(name.replace("-", "_"), TrainConfig, cutoff=0.75, sections=False)
        keys = [k for k in keys if k in known or k.startswith("model.kwargs.")]  # timm's own arguments
        types = [leaves_by_name[k].type for k in keys if k in leaves_by_name]  # model.kwargs.* have none
        if keys and not value:  # a switch: on, for a boolean key
            on = "true" if types and all(t in (bool, bool | None) for t in types) else ""
            value = _SWITCHED_ON.get(name.replace("-", "_"), on)
        lists = len(types) == len(keys) and all(list in map(get_origin, (t, *get_args(t))) for t in types)
        if value and not value.startswith("[") and lists:
            value = f"[{value}]"  # Hugging Face's --report_to wandb, timm's --mean 0.5: a list of one
        if keys:
            meant.append(" or ".join(f"{key}={value or 'VALUE'}" for key in keys))
    said = [f"attnxfer takes config values as key=value: {' '.join(meant)}"] * bool(meant) + one_way
    return "".join(f"; {s}" for s in said)


def _flags_meant(written: list[tuple[str, str]], parser: argparse.ArgumentParser) -> str:
    """The command's own flag a stray one misspells (``--print_config``, ``--skip_stage1``): argparse names none."""
    import difflib

    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    meant = []
    for item, _ in written:
        flag = item.partition("=")[0]
        begun = [f for f in flags if f.startswith(flag)]  # a flag's start: argparse takes none (allow_abbrev)
        close = (
            begun[:1]
            if len(begun) == 1
            else difflib.get_close_matches(flag.replace("_", "-"), flags, n=1, cutoff=0.8)
        )
        if flag.startswith("--") and close:  # of several strays, each says which it answers
            meant.append(f"{flag + ': ' if len(written) > 1 else ''}did you mean {close[0]}?")
    return f"; {'; '.join(meant)}" if meant else ""


def _refuse_positionals_as_flags(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """A command's argument written as a flag (``export R --out X``, ``inspect --teacher T --student S``, as
    timm's, MAE's and Hugging Face's scripts take them): refused with the command as it takes them. Asked
    before argparse, which would answer such a call with a missing argument or another flag that begins so
    (``--teacher`` for ``--teacher-arch``)."""
    import shlex

    if not argv or argv[0] not in COMMANDS:
        return
    own = parser._subparsers._group_actions[0].choices[argv[0]]
    arguments = [a for a in own._actions if not a.option_strings and a.dest != "overrides"]
    options = {o: a for a in own._actions for o in a.option_strings}

    def argument_meant(flag: str) -> argparse.Action | None:
        name = flag.lstrip("-").lower().replace("-", "_")
        exact = [a for a in arguments if name in (a.dest, a.dest.rstrip("s"))]
        if exact or not name or any(o.startswith(flag) for o in options if o.startswith("--")):
            return exact[0] if exact else None  # else the start of the command's own flag: that flag meant
        close = [a for a in arguments if a.dest.startswith(name) or name.startswith(a.dest.split("_")[0])]
        return close[0] if len(close) == 1 else None

    given: dict[str, list[str]] = {}  # each argument written as a flag: its values
    bare, kept, flags = [], [], []  # words without a flag; the command's own flags with their values
    i = 1
    while i < len(argv):
        item, i = argv[i], i + 1
        if not item.startswith("-") or item == "-":
            bare.append(item)
            continue
        flag, eq, inline = item.partition("=")
        argument = argument_meant(flag)
        long = [a for o, a in options.items() if o.startswith(flag) and flag.startswith("--")]
        action = argument or options.get(flag) or (long[0] if len(long) == 1 else None)
        after = []  # the values after the flag: one, or each up to the next flag
        while action is not None and action.nargs != 0 and i < len(argv) and not argv[i].startswith("-"):
            if (eq or after) and action.nargs not in ("+", "*"):
                break
            after.append(argv[i])
            i += 1
        if argument is None:  # the command's own flag, whole (`--num 3` is said as `--num-images 3`)
            whole = next((o for o, a in options.items() if a is action and o.startswith(flag)), flag)
            kept += [whole + eq + inline if flag.startswith("--") else item, *after]
        else:
            given.setdefault(argument.dest, []).extend([inline] * bool(eq) + after)
            flags.append(flag)
    if not flags:
        return
    written = []
    for argument in arguments:  # in their order: those given as flags, else the words without one
        values = given.get(argument.dest) or bare[: None if argument.nargs in ("+", "*") else 1]
        bare = bare if argument.dest in given else bare[len(values) :]
        written += values or [(argument.metavar or argument.dest).upper()]
    command = shlex.join(["attnxfer", argv[0], *written, *kept])
    them = "them as arguments" if len(flags) > 1 else "it as an argument"
    own.error(f"{', '.join(flags)}: {argv[0]} takes {them}, written without a flag: {command}")


def _refuse_values_meant_one_per_run(args) -> None:
    """``key=V1,V2`` among the overrides (Hydra's multirun spelling), a value the config refuses whole but takes
    each part of: meant as one run per value, which a study's ``--vary`` and submit's ``--sweep`` give (``--vary
    a=1,2 b=3,4`` hands ``--vary`` the first alone). Answered with the flag, not with the key's type."""
    from ..config import ConfigError, load_config
    from ..config.study_spec import COMMANDS as STUDY_COMMANDS, shared_by_students
    from .arguments import split_top_level

    def loads(override: str) -> bool:
        try:
            load_config(None, [override])
        except ConfigError:
            return False
        return True

    for given in getattr(args, "overrides", []):
        key, _, value = given.partition("=")
        parts = split_top_level(value)
        if len(parts) < 2 or loads(given) or not all(loads(f"{key}={part}") for part in parts):
            continue
        if "study" in (args.command, getattr(args, "job_command", None)):
            students = getattr(args, "study_command", None) or "train"
            if shared_by_students(key, students):  # one value a study, so a study for each
                raise ConfigError(
                    f"{given} gives every student one value, which {key} cannot take, and every student of a "
                    f"study shares {key}: a study for each is `attnxfer submit --command study --sweep {given}`"
                )
            raise ConfigError(
                f"{given} gives every student one value, which {key} cannot take: to give each student one of "
                f"them, write --vary {given} (one --vary for each key)"
            )
        if args.command == "submit":
            raise ConfigError(
                f"{given} gives every job one value, which {key} cannot take: to submit one job for each, write "
                f"--sweep {given} (one --sweep for each key)"
            )
        if args.command in ("train", "convert", "pretrain"):  # the commands a job or a study's student runs
            command = "" if args.command == "train" else f" --command {args.command}"
            studied = args.command in STUDY_COMMANDS and not shared_by_students(key, args.command)
            side_by_side = f" or `attnxfer study{command} --vary {given}` (one run, a student for each)"
            raise ConfigError(
                f"{given} is one value, which {key} cannot take: a run for each is `attnxfer submit{command} "
                f"--sweep {given}` (a job for each){side_by_side * studied}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may sit anywhere among the options (`-c x.yaml a=1 --nodes 2 b=2`)
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_positionals_as_flags(argv, parser)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray and hasattr(args, "overrides"):  # `-1]` of an unquoted `transfer.layers=[0, -1]`: an override's
        from ..config.overrides import continues_a_value  # piece, whose error says to quote it whole

        stray = [e for e in stray if e not in argv or not continues_a_value(argv, argv.index(e))]
    if stray or (extra and not hasattr(args, "overrides")):
        # the command's own usage, and a flag that names a config key (timm's and MAE's --epochs) as its override
        written = _as_written(stray or extra, argv)
        own = args.command_parser if args.command else parser
        slurm = {}  # sbatch's own spellings (-p gpu, --gres gpu:4): submit's flag for each
        if args.command == "submit":
            from .arguments import sbatch_spelling

            said = ((item.partition("=")[0], sbatch_spelling(item, value)) for item, value in written)
            slurm = {flag: answer for flag, answer in said if answer}
        rest = [(item, value) for item, value in written if item.partition("=")[0] not in slurm]
        # a shell pattern (runs/demo/mae_study-*/distill) that matched more folders than the command takes: two
        # given folders of one name or one parent
        folders = [Path(a) for a in argv[1:] if not a.startswith("-") and "=" not in a and Path(a).is_dir()]
        pair = next(
            (
                (a, b)
                for a, b in itertools.combinations(folders, 2)
                if a.name == b.name or a.parent == b.parent
            ),
            None,
        )
        own.error(
            f"unrecognized arguments: {' '.join(f'{item} {value}'.strip() for item, value in written)}"
            + (
                f"; {pair[0]} and {pair[1]} are both given: if a pattern (DIR/*) matched several folders, "
                "name one of them"
                if pair
                else ""
            )
            + "".join(f"; {flag} is sbatch's: {said}" for flag, said in slurm.items())
            + (  # convert's flag is a key's spelling, which a job is given as the key
                "; --skip-stage1 is convert's spelling of convert.stage1_steps=0: give the job that key"
                if args.command == "submit" and any(item == "--skip-stage1" for item, _ in written)
                else ""
            )
            + _flags_meant(rest, own)
            + (_as_overrides(rest) if hasattr(args, "overrides") else "")
        )
    if extra:
        args.overrides = [*args.overrides, *extra]
    # `attnxfer submit convert -c ...`: a job's or a study's command is its --command flag, not a word after it
    if named := next((o for o in getattr(args, "overrides", []) if o in COMMANDS), None):
        flag = next((a for a in args.command_parser._actions if "--command" in a.option_strings), None)
        args.command_parser.error(
            f"{named!r} is a command, not a key=value override: "
            + (
                f"name it with --command {named}" + (" (train is the default)" if named == "train" else "")
                if flag and named in flag.choices
                else f"run attnxfer {named} ... on its own"
            )
        )
    # a key pasted twice keeps its last value, as argparse does; said here, where only the user's keys are
    given: dict[str, list[str]] = {}
    for key, eq, value in (o.partition("=") for o in getattr(args, "overrides", [])):
        if eq:
            given.setdefault(key.strip(), []).append(value)
    # a value given whole after keys inside it replaces them (schedule={epochs: 2} drops a schedule.warmup_epochs
    # before it): deliberate where it clears (data.kwargs={}), else a key lost without a word
    order = [key.strip() for key, eq, _ in (o.partition("=") for o in getattr(args, "overrides", [])) if eq]
    for i, whole in enumerate(order):
        if inside := sorted({k for k in order[:i] if k.startswith(whole + ".")}):
            warn(
                f"warning: {whole}={given[whole][-1]} comes after {', '.join(inside)} and replaces "
                f"{'them' if len(inside) > 1 else 'it'}: give {whole}=... first to keep both"
            )
    if twice := [(k, v) for k, v in given.items() if len(v) > 1]:
        warn(
            "warning: "
            + "; ".join(
                f"{k} given {'twice' if len(v) == 2 else f'{len(v)} times'} ({', '.join(v[:-1])}, then {v[-1]}): "
                f"the last, {v[-1]}, is taken"
                for k, v in twice
            )
        )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with warnings_as_lines():
        try:
            _refuse_values_meant_one_per_run(args)
            if getattr(args, "print_config", False):
                return args.show_config(args)
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            warn(f"attnxfer {args.command}: interrupted; {_where_to_resume(args)}", all_ranks=True)
            return 130
        except BrokenPipeError:  # the reader of stdout went away (`attnxfer ... | head`): nothing left to say
            # so the exit's flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as e:
            # SIGTERM stopped a run at a step boundary, its checkpoint saved (module not loaded: nothing trained)
            stop = sys.modules.get("attnxfer.train.stop")
            if stop is not None and isinstance(e, stop.StopRequested):
                again = with_auto_resume(_config_of(args))
                warn(f"attnxfer {args.command}: {e}; re-run the same command{again} to resume")
                return e.exit_code
            # a gloo collective whose peer process ended: that rank's own error (or torchrun's summary, for a
            # killed one) is the cause, and this rank's traceback would bury it
            distributed = sys.modules.get("attnxfer.train.distributed")
            if (
                distributed is not None
                and distributed.joined_a_process_group()
                and isinstance(e, RuntimeError)
                and re.search(r"gloo.*(closed|reset) by peer", str(e), re.DOTALL)
                and not os.environ.get("ATTNXFER_DEBUG")
            ):
                rank = distributed.rank_and_world()[0]
                warn(
                    f"attnxfer {args.command}: rank {rank} stopped: another rank's process ended while this one "
                    "waited for it; that rank's error, above or in the launcher's summary, is the cause "
                    f"(ATTNXFER_DEBUG=1 shows where this rank waited); {_where_to_resume(args)}",
                    all_ranks=True,
                )
                return 1
            if os.environ.get("ATTNXFER_DEBUG") or not isinstance(e, UserError):  # else a bug: its traceback
                raise
            said = str(e)
            if "\nOriginal Traceback" in said:  # torch's re-raise of a DataLoader worker's: its line is last
                said = said.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
            warn(f"attnxfer {args.command}: error: {said}", all_ranks=True)
            return 2


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The program's entry point: `main`, then `end_program` with its exit code. A second Ctrl-C while the
    first is answered (its advice may import a module) ends it as the first does, without a traceback."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("attnxfer: interrupted\n")
        code = 130
    end_program(code)


if __name__ == "__main__":  # `python -m attnxfer.launch.cli` runs as `python -m attnxfer` does
    run()
