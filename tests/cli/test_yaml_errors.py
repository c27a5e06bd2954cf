"""A YAML file that says one key twice, or cannot be read, is refused before any work: one `error:` line
naming the file, the line and column (and the key), exit code 2, nothing written. pyyaml alone would keep the
last of two equal keys silently, and print a multi-line traceback for a syntax error."""

from __future__ import annotations

import pytest
from helpers import run_cli

from attnxfer.config import ConfigError, load_config
from attnxfer.launch.cli import main


def _refused(tmp_path, monkeypatch, capsys, text: str, *extra: str) -> str:
    """``attnxfer train -c FILE`` in this process: exit code 2, one stderr line, no run dir, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = tmp_path / "bad.yaml"
    config.write_text(text, encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "-c", str(config), f"run_dir={work / 'run'}", *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("attnxfer train: error: "), err
    assert "Traceback" not in err
    assert f"config file {str(config)!r}" in lines[0], lines[0]
    assert list(work.iterdir()) == []
    return lines[0]


@pytest.mark.parametrize(
    ("text", "where", "key", "first"),
    [
        ("schedule:\n  max_steps: 2\n  max_steps: 3\n", "line 3, column 3", "'schedule.max_steps'", "2"),
        ("data:\n  dataset: synthetic\nseed: 1\ndata:\n  batch_size: 4\n", "line 4, column 1", "'data'", "1"),
        ("transfer: {mode: copy, mode: distill}\n", "line 1, column 24", "'transfer.mode'", "1, column 12"),
    ],
    ids=["nested", "top-level", "flow-mapping"],
)
def test_a_key_given_twice_names_the_file_line_and_key(
    tmp_path, monkeypatch, capsys, text, where, key, first
):
    err = _refused(tmp_path, monkeypatch, capsys, text)
    assert f"{where}: key {key} is given twice (first on line {first}); keep one of them" in err, err


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ("schedule:\n\tmax_steps: 2\n", "line 2, column 1", "YAML indents with spaces, not tabs"),
        ("schedule:\n  max_steps: 2\n epochs: 1\n", "line 3, column 2", "check this line's indentation"),
        ("transfer:\n  layers: [0, 1\nseed: 1\n", "line 3, column 5", "expected ',' or ']'"),
        ("seed: 1\nrun_dir: \x07\n", "line 2, column 10", "character U+0007 is not allowed in YAML"),
        (
            "model:\n  attention_kwargs: {window_size:3}\n",
            "line 2, column 22",
            "'window_size:3' is read as a key without a value: YAML needs a space after the colon",
        ),
        (  # a study's --print-config prints one document per student
            "seed: 1\n---\nseed: 2\n",
            "line 2, column 1",
            "a config file holds one YAML document: keep one of those --- separates",
        ),
    ],
    ids=[
        "tab",
        "indentation",
        "unclosed-bracket",
        "control-character",
        "colon-without-space",
        "two-documents",
    ],
)
def test_a_yaml_syntax_error_is_one_line_with_the_file_and_line(
    tmp_path, monkeypatch, capsys, text, where, says
):
    err = _refused(tmp_path, monkeypatch, capsys, text)
    assert f"{where}: " in err and says in err, err


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "holds no keys (empty, or only comments): write its keys, or leave out -c to run the defaults"),
        ("# seed: 1\n", "holds no keys (empty, or only comments)"),
        (
            "seed: 1\noptim:\n#  lr: 1e-3\n",
            "optim: a section with no keys under it: give it keys, or leave it out",
        ),
    ],
    ids=["empty", "comments-only", "section-emptied"],
)
def test_a_file_or_section_left_without_keys_is_refused_not_trained_with_the_defaults(
    tmp_path, monkeypatch, capsys, text, says
):
    """A `--print-config > FILE` that failed leaves an empty file: run with it, the defaults trained into
    runs/default unasked. A section whose keys are all commented out was "expected a mapping, got None"."""
    assert says in _refused(tmp_path, monkeypatch, capsys, text)


@pytest.mark.parametrize(
    "text", ["", "schedule: [\n", "\xff\xfe", None], ids=["empty", "bad-yaml", "binary", "deleted"]
)
def test_a_runs_own_config_damaged_is_told_where_its_run_recorded_it(tmp_path, capsys, text):
    """A run's own config.yaml, emptied or damaged, was told to write its keys or 'leave out -c to run the
    defaults': a new run in runs/default, and to `attnxfer export`, which has no -c, no advice at all; deleted,
    train and eval only listed the folder. The config the run trained with is in its checkpoints' state.json."""
    run = tmp_path / "run"
    state = run / "checkpoints" / "step-00000004" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"step": 4, "config": {"seed": 0}}')
    (run / "run.json").write_text("{}")
    if text is not None:
        (run / "config.yaml").write_bytes(text.encode("latin-1"))
    for argv in (["export", str(run), str(tmp_path / "out")], ["train", "-c", str(run / "config.yaml")]):
        if text is None and argv[0] == "export":  # export reads the run without it
            continue
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "Traceback" not in err, err
        said = "gone" if text is None else "damaged"
        assert (
            f"it is the run's own config, {said}: write back the config its checkpoints record, 'config' in {state}"
            in err
        )
        assert "leave out -c" not in err
    kept = {"checkpoints", "run.json"} | ({"config.yaml"} if text is not None else set())
    assert not (tmp_path / "out").exists() and {p.name for p in run.iterdir()} == kept


def test_a_conversions_stage_1_given_as_a_config_points_at_the_conversions_own(tmp_path, capsys):
    """Stage 1 keeps checkpoints only (stage 2 is a run with a config.yaml of its own): -c STAGE1/config.yaml
    listed the folder's contents and left the user to guess that the conversion's config runs both stages."""
    conv = tmp_path / "conv"
    (conv / "stage1" / "checkpoints").mkdir(parents=True)
    (conv / "config.yaml").write_text("seed: 0\n")
    code, _, err = run_cli(capsys, "eval", "-c", str(conv / "stage1" / "config.yaml"))
    assert code == 2 and err.strip().endswith(
        f"{conv / 'stage1'} is stage 1 of the conversion {conv}, which keeps one config for both stages: "
        f"-c {conv / 'config.yaml'}"
    ), err


def test_a_key_given_twice_in_a_recipe_it_starts_from_names_that_recipe(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "parent.yaml"
    parent.write_text("optim:\n  lr: 1.0e-3\n  lr: 1.0e-4\n", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nseed: 1\n", encoding="utf-8")
    assert main(["train", "-c", str(child), f"run_dir={work / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"attnxfer train: error: config file {str(parent)!r}, line 3, column 3: "
        "key 'optim.lr' is given twice (first on line 2); keep one of them"
    )
    assert list(work.iterdir()) == []


def test_a_key_given_twice_in_an_override_value_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "convert.attention_kwargs={rank: 4, rank: 8}", "run_dir=run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnxfer train: error: override convert.attention_kwargs=")
    assert "key 'rank' is given twice" in err
    assert list(tmp_path.iterdir()) == []


def test_a_merge_key_may_restate_what_it_merged(tmp_path):
    """``<<: *anchor`` then a key of the anchor is YAML's own way to override it, not a key given twice."""
    config = tmp_path / "merge.yaml"
    config.write_text(
        "log: &every {every_steps: 5}\ncheckpoint:\n  <<: *every\n  every_steps: 7\n", encoding="utf-8"
    )
    cfg = load_config(config)
    assert (cfg.log.every_steps, cfg.checkpoint.every_steps) == (5, 7)


def test_numbers_read_as_written_not_as_yaml_1_1_reads_them(tmp_path):
    """pyyaml's YAML 1.1 reads 010 as octal 8 and 1:30 as 90: a batch of 010 trained at 8, a revision 0123 was
    asked for as '83'. Here a number's key refuses them and a string's key keeps them; 1e-3 is a float."""
    from attnxfer.config import ConfigError

    with pytest.raises(ConfigError, match="data.batch_size: expected an integer, got '010'"):
        load_config(None, ["data.batch_size=010"])
    with pytest.raises(ConfigError, match="checkpoint.every_minutes"):
        load_config(None, ["checkpoint.every_minutes=1:30"])
    (tmp_path / "c.yaml").write_text("teacher:\n  revision: 0123\noptim:\n  lr: 1e-3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.teacher.revision == "0123" and cfg.optim.lr == 1e-3


def test_a_lone_dot_is_a_path_not_a_number(tmp_path):
    """``data.root=.`` (the current directory) is a string, as in YAML 1.2; it was read as a float and failed
    with a ValueError traceback (0x_ as an int). A number needs a digit: .5, 1. and 0x1_0 still are numbers."""
    (tmp_path / "c.yaml").write_text("data:\n  root: .\n")
    assert load_config(tmp_path / "c.yaml").data.root == "."
    cfg = load_config(None, ["teacher.cache_dir=.", "optim.lr=.5", "optim.min_lr=1.", "teacher.revision=0x_"])
    assert (cfg.teacher.cache_dir, cfg.optim.lr, cfg.optim.min_lr) == (".", 0.5, 1.0)
    assert cfg.teacher.revision == "0x_" and load_config(None, ["seed=0x1_0"]).seed == 16


def test_a_number_given_to_a_string_key_keeps_its_spelling_and_its_config_yaml_reads_back_the_same(tmp_path):
    """teacher.revision=1.10 asked for revision '1.1' and data.root=1e3 for the folder '1000.0'; and a string
    the config.yaml wrote unquoted (1e3) read back as a number, so a resume saw a changed key."""
    from attnxfer.config import dump_config

    cfg = load_config(None, ["teacher.revision=1.10", "data.root=1e3", "log.project=2024.10"])
    assert (cfg.teacher.revision, cfg.data.root, cfg.log.project) == ("1.10", "1e3", "2024.10")
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(None, ["teacher.revision=null", "model.num_classes=10"]).model.num_classes == 10


def test_a_quoted_value_is_unquoted_whatever_the_type_of_its_key():
    """An override's value is YAML: data.root='/data/my set' (a key that may be null) lost its quotes, but
    run_dir='runs/my run' and log.project="my proj" (keys that are strings) kept them, a folder named 'runs."""
    cfg = load_config(None, ["run_dir='runs/my run'", 'log.project="my proj"', "data.root='/data/my set'"])
    assert (cfg.run_dir, cfg.log.project, cfg.data.root) == ("runs/my run", "my proj", "/data/my set")
    unquoted = load_config(None, ["run_dir=runs/it's", "log.project='~'"])  # as written; quoted: the text
    assert (unquoted.run_dir, unquoted.log.project) == ("runs/it's", "~")
    # YAML's null, unquoted, where a key takes text only: refused, not the text (run_dir=null wrote ./null,
    # run_dir=~ into the home folder)
    for null in ("null", "~"):
        with pytest.raises(
            ConfigError, match=rf"^override run_dir={null}: run_dir takes text, not null; give"
        ):
            load_config(None, [f"run_dir={null}"])


def test_none_on_the_command_line_is_null_where_a_key_takes_null_and_quoted_is_the_text():
    """ema.decay=None, as the docs and Python spell it, was refused, and teacher.revision=None or
    model.kwargs.init_values=None (timm's default) were the text 'None': a revision, a timm argument."""
    keys = ["teacher.revision", "aug.auto_augment", "ema.decay", "optim.lr", "model.kwargs.init_values"]
    cfg = load_config(None, [*(f"{k}=None" for k in keys), "model.global_pool= None"])
    got = (cfg.teacher.revision, cfg.aug.auto_augment, cfg.ema.decay, cfg.optim.lr, cfg.model.global_pool)
    assert got == (None,) * 5 and cfg.model.kwargs == {"init_values": None}
    quoted = load_config(None, ["teacher.revision='None'", "run_dir=None"])  # a string key: as written
    assert (quoted.teacher.revision, quoted.run_dir) == ("None", "None")


def test_none_in_a_config_file_is_null_as_on_the_command_line_and_lower_case_none_is_told_to_write_null(
    tmp_path,
):
    """A file's ``clip_grad: None`` was refused as the text 'None' where ``optim.clip_grad=None`` was null; and
    ``none`` (the word checkpoint.resume takes) was refused without the null to write."""
    file = tmp_path / "run.yaml"
    file.write_text("optim:\n  clip_grad: None\nteacher:\n  revision: 'None'\n")
    cfg = load_config(str(file))
    assert cfg.optim.clip_grad is None and cfg.teacher.revision == "None"
    with pytest.raises(ConfigError, match=r"got 'none' \(write null for none\)$"):
        load_config(None, ["optim.clip_grad=none"])
    file.write_text("run_dir: None\n")  # a text key: the null it does not take, and the text's spelling
    with pytest.raises(
        ConfigError, match=r"run_dir: expected a string, got None \(null, which it does not take"
    ):
        load_config(str(file))


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("model.kwargs.drop_rate=", "give one, or model.kwargs.drop_rate=null for null"),
        ("optim.lr= ", "give one, or optim.lr=null for null"),
        ("schedule.epochs=", "give one"),
        ("log.project=", "give one"),  # a text key: '' would reach W&B as a project without a name
        ("run_dir=", "give one"),
        (
            "model.global_pool=",
            "give one, or model.global_pool=null for null (model.global_pool=\"''\" for an empty string)",
        ),
    ],
)
def test_an_empty_override_value_is_refused_not_read_as_null(capsys, override, said):
    """model.kwargs.drop_rate=$DROP with DROP unset was null: timm's default dropout, and optim.lr= the blr
    scaling, without a word; key=null still says null."""
    code, _, err = run_cli(capsys, "train", "-c", "demo/copy", override, "--print-config")
    key = override.split("=")[0]
    assert code == 2 and err.strip() == (
        f"attnxfer train: error: override {key}= has no value (an unset shell variable?); {said}"
    ), err
    assert load_config(None, [f"{key}=null"] * (key not in ("schedule.epochs", "log.project", "run_dir")))


@pytest.mark.parametrize(
    ("text", "nested"),
    [
        ("schedule.max_steps: 3\n", "schedule: {max_steps: ...}"),
        ("model.kwargs.depth: 2\n", "model: {kwargs: {depth: ...}}"),
    ],
)
def test_a_dotted_key_in_a_yaml_file_is_told_to_nest(tmp_path, text, nested):
    """A dotted key is the command line's spelling; in a file it is unknown, and the nearest valid key offered
    for it was its own spelling ('did you mean schedule.max_steps?')."""
    from attnxfer.config import ConfigError

    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "run.yaml").write_text("base: c.yaml\nseed: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "run.yaml")  # named: the recipe it starts from, which holds the key
    key = text.split(":")[0]
    where = str(tmp_path / "c.yaml")
    assert (
        str(refused.value)
        == f"config file {where!r}: config key {key!r}: a YAML file nests its keys; write {nested}"
    )


def test_base_given_as_an_override_is_told_to_be_the_config_file(tmp_path, monkeypatch, capsys):
    """`base=paper/vit_large_copy` is a file's key; the nearest key offered for it was 'mae'."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "base=demo/copy", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == (
        "attnxfer train: error: base names the recipe a YAML file starts from; on the command line, give it "
        "as -c RECIPE"
    )


def test_a_yes_or_no_is_told_what_its_key_takes_a_quoted_string_or_a_number(tmp_path):
    """YAML 1.1 reads an unquoted no as false: ``name: no`` or ``teacher.revision=no`` was refused as
    'expected a string, got False', which does not say that the text was read as a switch; a number's key given
    true or false says it takes a number."""
    from attnxfer.config import ConfigError

    (tmp_path / "c.yaml").write_text("model:\n  name: no\n", encoding="utf-8")
    quote = r"\(YAML reads an unquoted yes, no, on, off, true or false as true/false: quote the text, e\.g\. "
    with pytest.raises(ConfigError, match=rf"model\.name: expected a string, got false {quote}'no'\)$"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(
        ConfigError, match=rf"teacher\.revision: expected a string or null, got true {quote}'yes'"
    ):
        load_config(None, ["teacher.revision=on"])
    with pytest.raises(ConfigError, match=rf"search\.seeds\[1\]: expected a string, got false {quote}'no'"):
        load_config(None, ["search.seeds=[hedgehog, off]"])
    assert load_config(None, ["teacher.revision='no'", "model.name=no"]).teacher.revision == "no"
    # a number's key: the switch it was read as, as YAML spells it, is no number
    with pytest.raises(
        ConfigError, match=r"^seed: expected an integer, got true \(a number, not a switch's true or false\)$"
    ):
        load_config(None, ["seed=yes"])


def test_an_alias_inside_the_value_its_anchor_names_is_one_error_at_its_line(tmp_path):
    """``kwargs: &x {depth: *x}`` made a mapping that holds itself: --print-config, and any run, ended in a
    RecursionError traceback. An alias to a value elsewhere (a sibling's anchor) still loads."""
    from attnxfer.config import ConfigError

    (tmp_path / "c.yaml").write_text("model:\n  kwargs: &x {depth: *x}\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"line 2, column 22: \*x is inside the value &x names: a config value"
    ):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"model.kwargs='&a \[\*a\]': value is not valid YAML"):
        load_config(None, ["model.kwargs=&a [*a]"])
    shared = "convert:\n  attention_kwargs: &ak {num_features: 64}\nmodel:\n  attention_kwargs: *ak\n"
    (tmp_path / "c.yaml").write_text(shared, encoding="utf-8")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.attention_kwargs == cfg.convert.attention_kwargs == {"num_features": 64}
