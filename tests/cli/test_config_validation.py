"""Every config key fed wrong types and out-of-range values: refused with one config error naming the key.

Two sources of cases. The generic ones are derived from each key's declaration (its annotation and the
range or choices of `key(...)` in attnxfer/config/schema.py), so a new key is covered without an edit
here and a key declared without a range fails `test_every_key_declares_its_range_and_resume_rule`.
`MEANING` is written by hand from what keys mean (not read from the schema): ``True`` = the value is
valid, ``False`` = a config error naming the key. It checks the declarations themselves (batch_size=0 is
refused because a batch needs an image, not because the schema says so); add a row where a key's meaning
says more than its type.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from attnxfer.config import (
    RESUMABLE_KEYS,
    ConfigError,
    TrainConfig,
    config_changes,
    config_keys,
    find_key,
    load_config,
    to_dict,
)
from attnxfer.config.keys import (
    ANY,
    Range,
    key,
    leaves,
    resumable_keys,
    rule_of,
    search_resumable_keys,
    section,
)

STR, NUM, BOOL = "[1, 2]", "abc", "maybe"  # a wrong type for strings, numbers, booleans

# key: (wrong type, zero valid?, negative valid?, out-of-range value or None)
# None for zero/negative: not a number-like key (a string takes "0" as a name, a bool refuses both)
MEANING: dict[str, tuple[str, bool | None, bool | None, str | None]] = {
    "run_dir": (STR, None, None, None),
    "seed": (NUM, True, False, str(2**32)),
    "device": (STR, False, False, "tpu"),
    "precision": (STR, False, False, "fp8"),
    "deterministic": (BOOL, False, False, None),
    "model.name": (STR, None, None, None),
    "model.num_classes": (NUM, False, False, None),
    "model.drop_path_rate": (NUM, True, False, "1.0"),
    "model.mirror_teacher": (BOOL, False, False, None),
    "model.kwargs": ("[1]", False, False, None),
    "model.global_pool": (STR, False, False, "bogus"),
    "model.fc_norm": (BOOL, False, False, None),
    "model.init": (STR, None, None, None),
    "model.attention": ("{a: 1}", None, None, None),  # a name or a list of names; the registry checks names
    "model.attention_kwargs": ("[1]", False, False, None),
    "model.compile": (BOOL, False, False, None),
    "model.compile_mode": (STR, False, False, "reduce-overhead"),  # CUDA graphs: not offered
    "teacher.spec": (STR, None, None, None),
    "teacher.arch": (STR, None, None, None),
    "teacher.revision": (STR, None, None, None),
    "teacher.cache_dir": (STR, None, None, None),
    "teacher.dtype": (STR, False, False, "bogus"),
    "teacher.compile": (BOOL, False, False, None),
    "transfer.mode": (STR, None, None, None),
    "transfer.end_layer": (NUM, True, True, None),
    "transfer.layers": ("3", False, False, None),  # [0, -1]: -1 is the last block
    "transfer.atd_weight": (NUM, True, False, None),
    "transfer.share_drop_path": (BOOL, False, False, None),
    "transfer.logit_distill": (NUM, True, False, None),
    "transfer.logit_temperature": (NUM, False, False, None),
    "transfer.ce_path": (STR, False, False, "flash"),
    "transfer.materialise_budget_gib": (NUM, True, False, None),  # 0: never materialise
    "data.dataset": (STR, None, None, None),
    "data.root": (STR, None, None, None),
    "data.img_size": (NUM, False, False, None),
    "data.in_chans": (NUM, False, False, None),
    "data.mean": ("0.5", False, False, None),
    "data.std": ("0.5", False, False, "[0.5, 0]"),
    "data.batch_size": (NUM, False, False, None),
    "data.eval_batch_size": (NUM, False, False, None),
    "data.num_workers": (NUM, True, False, None),
    "data.pin_memory": (BOOL, False, False, None),
    "data.kwargs": ("[1]", False, False, None),
    "aug.label_smoothing": (NUM, True, False, "1.0"),
    "aug.mixup": (NUM, True, False, None),
    "aug.cutmix": (NUM, True, False, None),
    "aug.mixup_prob": (NUM, True, False, "1.5"),
    "aug.mixup_switch_prob": (NUM, True, False, "1.5"),
    "aug.reprob": (NUM, True, False, "1.5"),
    "aug.remode": (STR, False, False, "pixels"),
    "aug.recount": (NUM, False, False, None),
    "aug.auto_augment": (STR, None, None, None),
    "optim.lr": (NUM, False, False, ".nan"),
    "optim.blr": (NUM, False, False, ".inf"),
    "optim.min_lr": (NUM, True, False, None),
    "optim.weight_decay": (NUM, True, False, None),
    "optim.layer_decay": (NUM, False, False, "1.5"),
    "optim.layer_decay_rule": (STR, False, False, "mae"),
    "optim.beta1": (NUM, True, False, "1.0"),
    "optim.beta2": (NUM, True, False, "1.0"),
    "optim.eps": (NUM, False, False, None),
    "optim.clip_grad": (NUM, False, False, None),
    "optim.accum_steps": (NUM, False, False, "1.5"),
    "schedule.epochs": (NUM, False, False, "1.5"),
    "schedule.warmup_epochs": (NUM, True, False, None),
    "schedule.max_steps": (NUM, False, False, None),
    "ema.decay": (NUM, False, False, "1.0"),
    "log.every_steps": (NUM, False, False, None),
    "log.trackers": ("3", False, False, "[tensorboard, nope]"),
    "log.project": (STR, None, None, None),
    "log.progress": (BOOL, False, False, None),
    "log.attention_images": (NUM, True, False, None),
    "mae.mask_ratio": (NUM, False, False, "1.0"),  # at 0 no patch is masked: nothing to learn
    "mae.decoder_dim": (NUM, False, False, None),
    "mae.decoder_depth": (NUM, False, False, None),
    "mae.decoder_heads": (NUM, False, False, None),
    "mae.decoder_mlp_ratio": (NUM, False, False, None),
    "mae.norm_pix": (BOOL, False, False, None),
    "mae.pictures": (NUM, True, False, None),
    "mae.export": (BOOL, False, False, None),
    "checkpoint.every_steps": (NUM, False, False, None),
    "checkpoint.every_minutes": (NUM, False, False, None),
    "checkpoint.every_epoch": (BOOL, False, False, None),
    "checkpoint.keep_last": (NUM, False, False, None),
    "checkpoint.resume": (STR, None, None, None),
    "convert.attention": ("{a: 1}", None, None, None),
    "convert.attention_kwargs": ("[1]", False, False, None),
    "convert.stage1_steps": (NUM, True, False, None),
    "convert.stage1_lr": (NUM, False, False, None),
    "convert.stage1_batch_size": (NUM, False, False, None),
    "convert.stage1_warmup_steps": (NUM, True, False, None),
    "convert.stage1_weight_decay": (NUM, True, False, None),
    "convert.stage1_clip_grad": (NUM, False, False, None),
    "convert.stage1_train": (STR, False, False, "all"),
    "convert.map_loss": (STR, False, False, "kl"),
    "convert.output_mse": (NUM, True, False, None),
    "convert.agreement_batches": (NUM, False, False, None),
    "convert.speed_batch_size": (NUM, False, False, None),
    "convert.speed_repeats": (NUM, False, False, None),
    "convert.speed_sweep": ("3", False, False, "[224, -32]"),  # image sides: positive, in a list
    "search.seeds": ("{a: 1}", None, None, None),
    "search.population": (NUM, False, False, "1"),
    "search.offspring": (NUM, False, False, None),
    "search.generations": (NUM, True, False, None),
    "search.crossover_prob": (NUM, True, False, "1.5"),
    "search.layers": ("3", False, False, "[0, -1]"),
    "search.fit_steps": (NUM, False, False, None),
    "search.fit_lr": (NUM, False, False, None),
    "search.fit_train": (STR, False, False, "all"),
    "search.fit_batches": (NUM, False, False, None),
    "search.held_out_images": (NUM, False, False, None),
    "search.target_tokens": (NUM, False, False, "1"),
    "search.speed": (STR, False, False, "fast"),
    "search.speed_repeats": (NUM, False, False, None),
    "search.min_speed": (NUM, True, False, None),
    "search.time_budget_min": (NUM, False, False, None),
    "search.convert_recipe": (STR, None, None, None),
}


def _meaning_cases():
    for name, (wrong, zero_ok, negative_ok, out_of_range) in MEANING.items():
        yield name, wrong, False
        if zero_ok is not None:
            yield name, "0", zero_ok
        if negative_ok is not None:
            yield name, "-1", negative_ok
        if out_of_range is not None:
            yield name, out_of_range, False


# -- cases derived from each key's declaration ----------------------------------------------------------


def _kinds(tp) -> set:
    """The plain types an annotation admits: ``int | None`` -> {int, NoneType}, ``list[int]`` -> {list}."""
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        return set().union(*(_kinds(a) for a in typing.get_args(tp)))
    return {typing.get_origin(tp) or tp}


def _item(tp):
    """The item type of a list annotation (``list[int] | None`` -> int), else the annotation itself."""
    for arg in typing.get_args(tp) if typing.get_origin(tp) is not list else (tp,):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return tp


def _text(value, as_list: bool) -> str:
    return (
        yaml.safe_dump([value] if as_list else value, default_flow_style=True)
        .strip()
        .removesuffix("...")
        .strip()
    )


def _derived_cases():
    """(key, YAML value, valid?) from each key's type and declared range: a mapping where none is taken, a
    value just past each bound, a name outside the choices, a non-finite float; each choice and each
    closed bound as valid values, and the default."""
    for leaf in leaves(TrainConfig):
        kinds, rule = _kinds(leaf.type), leaf.range
        as_list = list in kinds
        number = _item(leaf.type) if as_list else next((k for k in (int, float) if k in kinds), None)
        yield leaf.name, ("[1]" if dict in kinds else "{a: 1}"), False
        if rule.choices is not None:
            yield leaf.name, _text("not-a-choice", as_list), False
            for choice in rule.choices:
                yield leaf.name, _text(choice, as_list), True
        for bound, is_open, step in ((rule.low, rule.low_open, -1), (rule.high, rule.high_open, 1)):
            if bound is None:
                continue
            past = bound if is_open else bound + step
            yield leaf.name, _text(number(past), as_list), False
            if not is_open:
                yield leaf.name, _text(number(bound), as_list), True
        if number is float:
            yield leaf.name, _text(math.inf, as_list), False
        default = getattr(_section(leaf.name), leaf.name.rsplit(".", 1)[-1])
        yield leaf.name, _text(default, False) if default is not None else "null", True


def _section(name: str):
    node = TrainConfig()
    for part in name.split(".")[:-1]:
        node = getattr(node, part)
    return node


DERIVED = list(dict.fromkeys(_derived_cases()))
MEANING_CASES = list(_meaning_cases())


_FILES = itertools.count()


def _config_file(folder, key, value):
    """A YAML config setting ``key`` (dotted) to ``value`` (YAML text): strings can be lists there."""
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{section}:\n" for i, section in enumerate(sections))
    path = folder / f"{key}={next(_FILES)}.yaml"
    path.write_text(f"{text}{'  ' * len(sections)}{leaf}: {value}\n")
    return path


def test_every_key_declares_its_range_and_resume_rule():
    """Each leaf field of the schema is a `key(...)`: its range (`ANY` said on purpose) and resume rule are
    metadata, and the tables others read are those, not a second list."""

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                yield from walk(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, f

    declared = dict(walk(TrainConfig))
    assert list(declared) == config_keys()
    assert len(declared) > 100
    for name, f in declared.items():
        assert isinstance(rule_of(f), Range), name
        assert {v for k, v in f.metadata.items() if k.endswith("resumable")} <= {True, False}, name
    assert set(RESUMABLE_KEYS) < set(declared)
    # what the resume rule means, by hand: the optimiser's lr may change, the model being trained may not
    assert {"optim.lr", "data.num_workers", "schedule.epochs", "log.every_steps"} <= set(RESUMABLE_KEYS)
    assert not {"model.name", "transfer.mode", "data.batch_size", "seed"} & set(RESUMABLE_KEYS)


def test_the_search_resume_rule_is_a_second_flag_on_the_same_declaration():
    """``search_resumable=`` on a key or a section, read like ``resumable=`` and independent of it."""

    @dataclass
    class Inner:
        a: int = key(1, range=ANY)

    @dataclass
    class Outer:
        both: int = key(1, range=ANY, resumable=True, search_resumable=True)
        train_only: int = key(1, range=ANY, resumable=True)
        search_only: int = key(1, range=ANY, search_resumable=True)
        neither: int = key(1, range=ANY)
        inner: Inner = section(Inner, search_resumable=True)

    assert search_resumable_keys(Outer) == ("both", "search_only", "inner.a")
    assert resumable_keys(Outer) == ("both", "train_only")


def test_a_range_names_its_bounds_as_written():
    """A bound is printed whole, not cut to six digits (4.29497e+09 is no seed one could type)."""
    with pytest.raises(ConfigError, match=r"seed: must be >= 0 and <= 4294967295; got -1$"):
        load_config(None, ["seed=-1"])
    # inf is > 1 and nan compares as nothing: the bound alone would not say what is wrong
    with pytest.raises(ConfigError, match=r"convert.speedup: must be a finite number > 1; got inf$"):
        load_config(None, ["convert.speedup=.inf"])


def test_an_integer_too_large_for_any_key_is_a_config_error_not_a_traceback(tmp_path):
    """A very large integer was an OverflowError (a range check, or a float key, made it a float) or, past
    Python's 4300 digits for int(str), a ValueError from the YAML reader: a traceback, not the key named."""
    huge = "1" + "0" * 400  # past a float's range
    with pytest.raises(ConfigError, match=r"^seed: must be >= 0 and <= 4294967295; got 10{400}$"):
        load_config(None, [f"seed={huge}"])
    for override, where in (
        (f"optim.lr={huge}", "optim.lr"),  # float or null: the number's own error, not "expected a number"
        (f"data.mean=[{huge}, 1, 1]", r"data.mean\[0\]"),
        (f"schedule.warmup_epochs={huge}", "schedule.warmup_epochs"),
    ):
        with pytest.raises(
            ConfigError, match=rf"^{where}: must be a finite number; got an integer of about 401"
        ):
            load_config(None, [override])
    assert load_config(None, [f"data.batch_size={huge}"]).data.batch_size == 10**400  # an int: no bound
    longest = "9" * 5000  # int("9" * 5000) raises ValueError
    with pytest.raises(ConfigError, match="an integer of 5000 characters is too large for any config value"):
        load_config(None, [f"seed={longest}"])
    (tmp_path / "c.yaml").write_text(f"schedule:\n  epochs: {longest}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.yaml', line 2, column 11: an integer of 5000 characters"):
        load_config(tmp_path / "c.yaml")


def test_a_key_without_a_range_is_refused():
    """A field added as a plain default (no `key`), or a `key` naming no range, is a schema error at once."""

    @dataclass
    class Section:
        declared: int = key(1, range=ANY)
        bare: int = 3

    with pytest.raises(TypeError, match="'bare' is declared without its range"):
        list(leaves(Section))
    with pytest.raises(TypeError, match="range="):
        key(3)
    with pytest.raises(TypeError, match="range="):
        key("a", range=ANY, choices=("a",))


def test_derived_cases_cover_every_key():
    refused = {name for name, _, ok in DERIVED if not ok}
    accepted = {name for name, _, ok in DERIVED if ok}
    assert refused == accepted == set(config_keys())
    assert ("data.batch_size", "0", False) in DERIVED and ("optim.beta1", "1.0", False) in DERIVED
    assert ("seed", str(2**32), False) in DERIVED and ("aug.remode", "pixel", True) in DERIVED


@pytest.mark.parametrize("key,value", [(k, v) for k, v, ok in MEANING_CASES if ok], ids=str)
def test_valid_values_are_accepted(key, value, tmp_path):
    """Taken as written, from a file as from an override, and nothing but that key changes."""
    from_file = load_config(_config_file(tmp_path, key, value))
    from_cli = load_config(None, [f"{key}={value}"])
    assert config_changes(from_file, from_cli) == {}
    assert set(config_changes(TrainConfig(), from_file)) <= {key}
    got, want = find_key(to_dict(from_file), key)[1], yaml.safe_load(value)
    assert got == want or (isinstance(want, list) and list(got) == want) or float(got) == float(want)


def test_declared_valid_values_are_accepted():
    for name, value, ok in DERIVED:
        if ok:
            cfg = load_config(None, [f"{name}={value}"])
            assert set(config_changes(TrainConfig(), cfg)) <= {name}, name


def test_invalid_values_are_config_errors_naming_the_key(tmp_path):
    """Every bad value, hand-written or derived, from a YAML file (where a string key can be given a list): a
    ConfigError whose message names the key."""
    bad = [(k, v) for k, v, ok in [*MEANING_CASES, *DERIVED] if not ok]
    assert len(bad) > 400
    for name, value in bad:
        with pytest.raises(ConfigError) as e:
            load_config(_config_file(tmp_path, name, value))
        assert name in str(e.value), (name, value, str(e.value))


def test_invalid_values_are_one_line_cli_errors(tmp_path, monkeypatch, capsys):
    """For every key, a bad value from a YAML file through the CLI (its own error path, no start-up): exit
    code 2, one line naming the key, no traceback, nothing written. One in-process call per key."""
    configs, work = tmp_path / "configs", tmp_path / "work"
    configs.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    one_each = {name: value for name, value, ok in reversed([*MEANING_CASES, *DERIVED]) if not ok}
    assert set(one_each) == set(config_keys())
    for name, value in one_each.items():
        cfg = _config_file(configs, name, value)
        run_dir = [f"run_dir={work / 'run'}"] if name != "run_dir" else []
        code, _, err = run_cli(capsys, "train", "-c", str(cfg), *run_dir)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (name, value, err)
        assert len(lines) == 1 and lines[0].startswith("attnxfer train: error: "), (name, value, err)
        assert name in lines[0], (name, value, lines[0])
        assert "Traceback" not in err
        assert list(work.iterdir()) == [], (name, value)


def test_a_value_out_of_range_is_named_by_the_file_that_set_it_and_mended_by_the_command_line(
    tmp_path, capsys
):
    """A chain of recipes: the refusal names the file that set the value last (the command line names none,
    its own value being the one refused); a file's bad value the command line replaces is no refusal."""
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text("data:\n  batch_size: -3\n")
    child.write_text(f"base: {base}\nseed: 1\n")
    with pytest.raises(
        ConfigError, match=rf"^config file '{re.escape(str(base))}': data.batch_size: must be >= 1"
    ):
        load_config(child)
    child.write_text(f"base: {base}\ndata:\n  batch_size: 0\n")
    with pytest.raises(
        ConfigError, match=rf"^config file '{re.escape(str(child))}': data.batch_size: .* got 0$"
    ):
        load_config(child)
    with pytest.raises(ConfigError, match=r"^data.batch_size: must be >= 1; got -1$"):
        load_config(child, ["data.batch_size=-1"])
    code, out, err = run_cli(capsys, "train", "-c", str(child), "data.batch_size=4", "--print-config")
    assert code == 0 and "#   data.batch_size: 0 -> 4" in out, err


@pytest.mark.parametrize(
    "command,own",
    [
        ("train", {"transfer"}),
        ("convert", {"convert", "transfer"}),
        ("pretrain", {"mae"}),  # MAE transfers nothing; it reads teacher.cache_dir (model.init's downloads)
        ("search", {"search", "transfer"}),
    ],
)
def test_print_config_holds_the_sections_its_command_reads(command, own, capsys):
    """`convert`, `mae` and `search` are each read by one command, `transfer` by every one but pretrain: a
    command's config leaves out the sections it does not read."""
    code, out, err = run_cli(capsys, command, "--print-config")
    printed = yaml.safe_load(out)  # the YAML, then what changed as comments
    assert code == 0, err
    assert {"convert", "mae", "search", "transfer"} & set(printed) == own
    assert {"model", "teacher", "dist"} <= set(printed)


def test_print_config_names_the_entry_an_option_mapping_dropped(capsys):
    """Emptied, a recipe's attention options once read `null -> {}`: the entry dropped did not show. A mapping
    is compared whole, and said by the entries that differ."""
    code, out, err = run_cli(
        capsys,
        "convert",
        "-c",
        "convert/demo_hedgehog",
        "convert.attention=relu_linear",
        "convert.attention_kwargs={}",
        "convert.stage1_train=qk",
        "--print-config",
    )
    assert code == 0, err
    changed = [line.strip("# ") for line in out.splitlines() if line.startswith("#   ")]
    assert changed == [
        "convert.attention: hedgehog -> relu_linear",
        "convert.attention_kwargs: feature_dim: 32 -> unset",
        "convert.stage1_train: new -> qk",
    ]


def test_a_run_folder_named_like_an_override_is_told_to_be_given_with_c(tmp_path):
    """A study names its students' folders by their values (lr=1e-3): given without -c, such a folder is not
    read as the key 'STUDY/lr'."""
    from attnxfer.config import dump_config

    student = tmp_path / "study" / "lr=1e-3"
    student.mkdir(parents=True)
    (student / "config.yaml").write_text(dump_config(load_config(None, [f"run_dir={student}"])))
    with pytest.raises(
        ConfigError, match=r"is not a key=value override; to read its config, pass -c .*lr=1e-3/config"
    ):
        load_config(None, [str(student)])


def test_a_folder_here_named_like_a_built_in_recipe_does_not_hide_the_recipe(tmp_path, monkeypatch):
    """The demo writes its teacher's run into OUT/teacher: run from OUT's parent with --out demo, the folder
    demo/teacher sits where the recipe's name points. A folder is no config, so the recipe is read; a
    folder no recipe is named like is still refused as a folder."""
    from attnxfer.config import RECIPES

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "teacher").mkdir(parents=True)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert load_config("demo/teacher") == load_config(RECIPES / "demo" / "teacher.yaml")
    with pytest.raises(ConfigError, match="config 'runs/x' is a directory, not a YAML file"):
        load_config("runs/x")


def test_a_config_that_exists_but_is_no_regular_file_is_not_said_to_be_missing():
    """-c /dev/null (or a pipe) was answered 'does not exist' with every built-in recipe's name."""
    with pytest.raises(
        ConfigError, match=r"^config '/dev/null' is not a regular file \(a device or pipe\?\)"
    ):
        load_config("/dev/null")


def test_a_checkpoint_folder_given_as_config_names_its_runs_config_and_how_to_choose_the_step(tmp_path):
    """-c RUN/checkpoints/step-N (to score that step) was told it is a directory, with no word of the run's
    config.yaml, as the run's own folder is, nor of checkpoint.resume, which chooses the step."""
    step = tmp_path / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("schedule: {epochs: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(step))
    assert str(e.value).endswith(
        f"a run's config is {tmp_path / 'config.yaml'} (with checkpoint.resume={step} to score or go on from "
        "this step)"
    )


def test_a_mistyped_run_config_path_shows_what_its_folder_holds(tmp_path, monkeypatch):
    """-c runs/my-rn/config.yaml (a run's folder mistyped) was answered with the names of every built-in
    recipe, none of which was meant; the folders that are there show the typo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match=r"runs/my-rn/config.yaml does not exist \(.*runs holds: my-run/\)$"
    ):
        load_config("runs/my-rn/config.yaml")


def test_a_missing_run_folder_names_a_run_of_its_name_one_folder_deeper(tmp_path, monkeypatch):
    """The demo's students live in its study's folder (runs/demo/mae_study-<hash>/distill): runs/demo/distill,
    the recipe's run_dir, was answered with a listing cut at eight entries, the study's folder past the cut."""
    from attnxfer.run_layout import missing_path

    monkeypatch.chdir(tmp_path)
    for name in [f"other{i}" for i in range(9)] + ["study-1/distill"]:
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "study-1" / "distill" / "config.yaml").write_text("{}\n")
    said = missing_path(Path("runs/distill"))
    assert said.endswith("(10 entries)); a run of that name is runs/study-1/distill"), said


def test_a_runs_json_record_given_as_its_config_points_to_its_config_yaml(tmp_path):
    """run.json parses as YAML (JSON is a subset), so it read as a config and failed on its first record key
    ("teacher: expected a mapping, got None"); a run's config is the config.yaml beside it."""
    (tmp_path / "config.yaml").write_text("schedule: {epochs: 1}\n")
    (tmp_path / "run.json").write_text('{"teacher": null, "student": {}}')
    with pytest.raises(ConfigError, match=r"is a record of the run in .*, not its config: -c .*config\.yaml"):
        load_config(str(tmp_path / "run.json"))


@pytest.mark.parametrize(
    "override,meant",
    [
        ("model=vit_tiny_patch16_224", "model.name=vit_tiny_patch16_224"),
        ("transfer=copy", "transfer.mode=copy"),
        ("ema=0.9999", "ema.decay=0.9999"),  # was 'ema: expected a mapping, got 0.9999', no key named
        ("convert=performer", "convert.attention=performer"),
        ("data=torch/cifar10", "data.dataset=torch/cifar10"),
        ("data=/data/imagenet", "data.root=/data/imagenet"),  # a folder: was data.dataset=/data/imagenet
    ],
)
def test_a_section_given_a_value_names_the_key_that_value_means(override, meant):
    """timm's and MAE's scripts take ``--model NAME``: ``model=NAME`` is the model's name, not a mapping."""
    with pytest.raises(ConfigError, match=f"is a section, not a value: did you mean {re.escape(meant)}\\?"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,said",
    [
        ("model.attention=[performer,null]", "model.attention[1]: expected a string, got None"),
        ("convert.attention=[hedgehog,[a]]", "convert.attention[1]: expected a string, got ['a']"),
    ],
)
def test_a_bad_item_of_a_list_of_names_is_named_not_the_list_called_no_list(override, said):
    """A key that takes a name or a list of names said of a list with one bad item "expected a string or a
    list, got [...]": it is a list, and which item to change went unsaid."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == said


@pytest.mark.parametrize(
    "argv,said",
    [
        (
            ["transfer.losses=[{name:", "mse,", "signal:", "v}]", "optim.lr=1e-3"],
            "the shell split 'transfer.losses=[{name:' at its spaces: quote the whole override, "
            "'transfer.losses=[{name: mse, signal: v}]'",
        ),
        (
            ["run_dir=runs/my", "run"],
            "if it is part of the value before it, quote the whole override: 'run_dir=runs/my run'",
        ),
    ],
)
def test_an_unquoted_value_the_shell_split_is_told_to_be_quoted_whole(argv, said):
    """The docs' own examples ({name: mse, signal: v}) hold spaces: typed unquoted, the shell hands a
    fragment ('mse,') that was refused as 'not key=value' without a word on the quotes that were missing."""
    with pytest.raises(ConfigError) as e:
        load_config(None, argv)
    assert str(e.value).endswith(said), e.value


def test_a_stray_word_before_any_override_is_not_said_to_be_split():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["nope", "optim.lr=1e-3"])
    assert str(e.value) == "override 'nope' is not key=value (e.g. transfer.mode=copy)"


def test_a_dataset_folder_or_a_yaml_file_given_alone_is_told_its_key_or_flag(tmp_path):
    """timm's train.py takes its DATA_DIR as an argument of its own: given so, it was 'not key=value' alone."""
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.yaml").write_text("students: []\n")
    for given, said in (
        (str(tmp_path / "study"), f"; a study's folder is given as -c {tmp_path}/study/study.yaml"),
        (
            str(tmp_path / "imagenet"),
            f"; a dataset's folder (timm's DATA_DIR) is given as data.root={tmp_path}/imagenet",
        ),
        ("/data/imagenet", "; a dataset's folder (timm's DATA_DIR) is given as data.root=/data/imagenet"),
        ("my_recipe.yaml", "; a config file is given as -c my_recipe.yaml"),
        # Hydra's delete, of a section's key or a top one (~seed had been read as a user's home folder)
        ("~optim.lr", "; a key is never removed: give it the value you want, optim.lr=VALUE (null where it"),
        ("~seed", "; a key is never removed: give it the value you want, seed=VALUE (null where it takes"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(None, [given])
        assert str(e.value).startswith(f"override {given!r} is not key=value (e.g. transfer.mode=copy){said}")
    with pytest.raises(
        ConfigError, match="a key is never removed: give it the value you want, schedule.max_steps="
    ):
        load_config(None, ["data.batch_size=8", "~schedule.max_steps"])  # not one override the shell split


@pytest.mark.parametrize(
    "override,said",
    [
        ("=1", "override '=1' has an empty key (e.g. transfer.mode=copy)"),
        ("optim..lr=1", "override 'optim..lr=1' has an empty key part; write optim.lr=1"),
        (".optim.lr=1", "override '.optim.lr=1' has an empty key part; write optim.lr=1"),
        (  # Hydra's append and force: not an unknown key '+optim'
            "++optim.lr=1",
            "override '++optim.lr=1': overrides set any key without Hydra's '+' or '++': write optim.lr=1",
        ),
    ],
)
def test_an_override_with_an_empty_key_or_key_part_says_so(override, said):
    """Not an unknown key '' with the top level's first keys as guesses (run_dir, seed, device)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == said


@pytest.mark.parametrize(
    "override,said",
    [
        ("schedule.epochs=1e3", "schedule.epochs: expected an integer, got 1000.0 (write 1000)"),
        ("schedule.epochs=2.5", "schedule.epochs: expected an integer, got 2.5"),
        # an optional integer too (the hint was lost in the union's own message)
        ("model.num_classes=10.0", "model.num_classes: expected an integer or null, got 10.0 (write 10)"),
        # a quoted number is YAML's string, for a float's key as for an int's ("1e-3" was taken, "3" refused)
        (
            "schedule.epochs='3'",
            "schedule.epochs: expected an integer, got '3' (a quoted string: write 3 without quotes)",
        ),
        (
            'optim.min_lr="1e-3"',
            "optim.min_lr: expected a number, got '1e-3' (a quoted string: write 1e-3 without quotes)",
        ),
        (  # no number unquoted either: YAML's text, said why
            "optim.min_lr=010",
            "optim.min_lr: expected a number, got '010' (a leading zero makes it text in YAML: write 10)",
        ),
        # a factor or a share as the docs' prose writes them ("a 1.5x budget")
        (
            "convert.speedup=2x",
            "convert.speedup: expected a number or null, got '2x' (write 2: a plain number)",
        ),
        (
            "optim.weight_decay=5%",
            "optim.weight_decay: expected a number, got '5%' (write 0.05: a plain number)",
        ),
        (
            "log.trackers=null",
            "log.trackers: expected a list, got None (write e.g. log.trackers=[] for none)",
        ),
    ],
)
def test_a_refused_value_shows_the_spelling_that_is_taken(override, said):
    """YAML reads 1e3 as a float, refused where a key counts (the safe side); and null where a list is kept
    was shown a list of two made-up names: each refusal shows what to write instead."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == said


@pytest.mark.parametrize(
    "first,then",
    [
        ("schedule.warmup_epochs=3", "schedule={epochs: 2}"),
        ("model.kwargs.depth=4", "model.kwargs={embed_dim: 32}"),
    ],
)
def test_a_whole_value_given_after_keys_inside_it_says_it_replaces_them(first, then, capsys):
    """A section or mapping given whole after one of its keys replaces that key (the warm-up, the depth gone):
    deliberate where it clears (data.kwargs={}), so said, not refused; given first, the key after it refines it."""
    code, _, err = run_cli(capsys, "train", first, then, "--print-config")
    assert code == 0 and f"warning: {then} comes after {first.split('=')[0]} and replaces it" in err, err
    cfg = load_config(None, [then, first])  # the whole value first, the key inside it after: both kept
    if then.startswith("schedule"):
        assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (2, 3)
    else:
        assert cfg.model.kwargs == {"embed_dim": 32, "depth": 4}
    assert "replaces" not in run_cli(capsys, "train", then, first, "--print-config")[2]
