"""Keys merged into others keep reading their old spelling (`attnxfer/config/renamed.py`): in a YAML recipe, a
dotted override and a run's recorded config, each with a note that says the new spelling, and a run recorded
with the old spellings resumes without a change to refuse."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import yaml

from attnxfer.apps.run.resume import config_changes
from attnxfer.config import RENAMED_KEYS, ConfigError, RenamedKeyWarning, config_keys, load_config, to_dict
from attnxfer.config.study_spec import load_study
from attnxfer.launch.slurm.task import TrainingTask
from attnxfer.speak import warnings_as_lines


def _load(*overrides: str, path=None):
    with pytest.warns(RenamedKeyWarning) as said:
        cfg = load_config(path, list(overrides))
    return cfg, [str(w.message) for w in said if w.category is RenamedKeyWarning]


def test_every_old_spelling_is_gone_from_the_schema_and_names_its_new_one():
    keys = set(config_keys())
    for renamed in RENAMED_KEYS:
        assert renamed.old not in keys
        assert renamed.note.startswith(f"{renamed.old} is now ")


def test_log_tensorboard_false_is_trackers_without_tensorboard(tmp_path):
    cfg, said = _load("log.tensorboard=false")
    assert cfg.log.trackers == [] and said == [
        next(r.note for r in RENAMED_KEYS if r.old == "log.tensorboard")
    ]
    assert "log.trackers" in said[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"log": {"tensorboard": False, "trackers": ["tensorboard", "wandb"]}}))
    cfg, said = _load(path=recipe)
    assert cfg.log.trackers == ["wandb"]
    # the list names tensorboard and the switch takes it out: said, not one of the two lost without a word
    assert said[0].endswith(
        "log.trackers=[tensorboard, wandb] is given beside it and loses tensorboard: log.tensorboard=false "
        "leaves it out"
    ), said
    cfg, said = _load("log.tensorboard=false", "log.trackers=[tensorboard]")
    assert cfg.log.trackers == [] and "loses tensorboard" in said[0]
    cfg, said = _load("log.tensorboard=false", "log.trackers=[wandb]")  # no conflict: nothing more said
    assert cfg.log.trackers == ["wandb"] and "loses" not in said[0]
    cfg, _ = _load("log.tensorboard=true")  # TensorBoard on: what log.trackers says
    assert cfg.log.trackers == ["tensorboard"]
    for value in ("0", "maybe", "null"):  # not a switch: refused, not read as true (TensorBoard left on)
        with pytest.raises(ConfigError, match="log.tensorboard: expected true/false, got "):
            load_config(None, [f"log.tensorboard={value}"])


def test_eval_only_false_loads_and_true_says_to_use_attnxfer_eval():
    cfg, said = _load("eval_only=false")
    assert cfg == load_config(None) and "attnxfer eval" in said[0]
    with pytest.raises(ConfigError, match=r"eval_only: true .*attnxfer eval -c RUN_DIR/config.yaml"):
        load_config(None, ["eval_only=true"])


def test_convert_knn_bank_size_is_eval_knn_bank_size():
    cfg, said = _load("convert.knn_bank_size=16")
    assert cfg.eval.knn_bank_size == 16 and "eval.knn_bank_size" in said[0]
    cfg, _ = _load("convert.knn_bank_size=16", "eval.knn_bank_size=32")  # the new spelling wins
    assert cfg.eval.knn_bank_size == 32


def test_an_old_spelling_beside_its_new_key_says_which_value_is_dropped(tmp_path):
    """The new spelling wins where one source gives both; the one note says so where the two differ (the old
    value was dropped with only 'X is now Y' said, as if it had been moved)."""
    cfg, said = _load("convert.knn_bank_size=16", "eval.knn_bank_size=32")
    assert cfg.eval.knn_bank_size == 32 and said == [
        "convert.knn_bank_size is now eval.knn_bank_size (attnxfer eval's and conversion reports' k-NN bank); "
        "its 16 is dropped: eval.knn_bank_size=32 is given beside it and wins"
    ]
    _, said = _load(
        "convert.knn_bank_size=null", "eval.knn_bank_size=null"
    )  # the same value: nothing dropped
    assert said == [next(r.note for r in RENAMED_KEYS if r.old == "convert.knn_bank_size")]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"data": {"dataset": "synthetic", "synthetic_length": 64, "kwargs": {"length": 8}}})
    )
    cfg, said = _load(path=recipe)
    assert cfg.data.kwargs == {"length": 8} and len(said) == 1
    assert said[0].endswith("its 64 is dropped: data.kwargs.length=8 is given beside it and wins")


def test_data_synthetic_length_is_the_synthetic_datasets_own_length(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "kwargs": {"noise": 0.2}}}))
    cfg, said = _load("data.synthetic_length=64", path=recipe)
    assert cfg.data.kwargs == {"noise": 0.2, "length": 64} and "data.kwargs.length" in said[0]
    cfg, _ = _load("data.synthetic_length=512", path=recipe)  # its old default: the dataset's own default
    assert cfg.data.kwargs == {"noise": 0.2}


def test_data_synthetic_length_is_dropped_for_a_dataset_that_ignored_it(tmp_path):
    """An old folder recipe that set it (the key did nothing there) still loads: the folder dataset has no
    ``length`` option, so moving it would make the recipe an error."""
    cfg, said = _load("data.dataset=folder", "data.root=/data", "data.synthetic_length=64")
    assert cfg.data.kwargs == {} and "data.kwargs.length" in said[0]
    assert said[0].endswith("its 64 is dropped: data.dataset=folder is not the synthetic dataset it set")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"dataset": "folder", "root": "/data"}}))
    cfg, _ = _load("data.synthetic_length=64", path=recipe)
    assert cfg.data.kwargs == {}


def test_a_logit_kd_entry_of_transfer_losses_is_transfer_logit_distill(tmp_path):
    """Logit distillation has one spelling; the comparison list's entry for it moves there, the other
    entries stay, and an entry the key cannot hold (twice, or beside the key) stops with what to write."""
    cfg, said = _load(
        "transfer.losses=[{name: logit_kd, weight: 0.5, temperature: 2}, {name: mse, signal: v}]"
    )
    assert (cfg.transfer.logit_distill, cfg.transfer.logit_temperature) == (0.5, 2.0)
    assert cfg.transfer.losses == [{"name": "mse", "signal": "v"}] and "transfer.logit_distill" in said[0]
    recipe = tmp_path / "r.yaml"  # the entry's own temperature (default 1), not the key's from the same file
    recipe.write_text(
        yaml.safe_dump({"transfer": {"logit_temperature": 3.0, "losses": [{"name": "logit_kd"}]}})
    )
    cfg, _ = _load(path=recipe)
    assert (cfg.transfer.logit_distill, cfg.transfer.logit_temperature, cfg.transfer.losses) == (1.0, 1.0, [])
    for overrides in (
        ["transfer.losses=[{name: logit_kd}, {name: logit_kd, weight: 2}]"],
        ["transfer.logit_distill=1", "transfer.losses=[{name: logit_kd}]"],
    ):
        with pytest.raises(ConfigError, match="write one logit distillation as transfer.logit_distill"):
            load_config(None, overrides)


def test_a_run_recorded_with_old_spellings_resumes_without_a_change(tmp_path):
    """What an older attnxfer wrote: every old key beside the new ones, in config.yaml and in the checkpoints'
    state. Resuming from that config.yaml compares equal with the recorded config, key by key."""
    cfg = load_config(None, ["data.dataset=synthetic", "data.kwargs={length: 64}", "log.trackers=[]"])
    recorded = to_dict(cfg)
    recorded["eval_only"] = False
    recorded["data"]["kwargs"], recorded["data"]["synthetic_length"] = {}, 64
    recorded["log"]["tensorboard"], recorded["log"]["trackers"] = False, ["tensorboard"]
    recorded["convert"]["knn_bank_size"], recorded["eval"]["knn_bank_size"] = 10_000, None
    recorded["transfer"]["losses"] = [{"name": "logit_kd", "weight": 0.5}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    resumed, said = _load(path=tmp_path / "config.yaml")
    assert len(said) == len(RENAMED_KEYS)
    assert (resumed.data.kwargs, resumed.log.trackers, resumed.eval.knn_bank_size) == (
        {"length": 64},
        [],
        None,
    )
    assert (resumed.transfer.logit_distill, resumed.transfer.losses) == (0.5, [])
    assert config_changes(recorded, resumed) == []  # no key changed, none to refuse


def test_a_study_varies_an_old_spelling_as_its_new_key(tmp_path):
    """``--vary`` reads its values as the run does: an old spelling was looked up on the config by its old name
    (an AttributeError traceback)."""
    with pytest.warns(RenamedKeyWarning):
        spec = load_study(None, [f"run_dir={tmp_path}"], {"convert.knn_bank_size": ["16", "32"]})
        assert [c.eval.knn_bank_size for _, c in spec.configs()] == [16, 32]
        with pytest.raises(ConfigError, match="sets log.tensorboard, which every student of a study shares"):
            load_study(None, [f"run_dir={tmp_path}"], {"log.tensorboard": ["true", "false"]})


def test_the_cli_shows_an_old_spelling_as_one_warning_line(tmp_path):
    """In a real process, where Python itself shows the warning (pytest records it instead): the note alone
    after ``warning:``, as attnxfer's other warnings read, without the ``config:0: RenamedKeyWarning:`` frame."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnxfer",
            "train",
            "-c",
            "demo/copy",
            "log.tensorboard=false",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    note = next(r.note for r in RENAMED_KEYS if r.old == "log.tensorboard")
    assert res.returncode == 0 and res.stderr.splitlines() == [f"warning: {note}"], res.stderr


def test_only_attnxfers_own_warnings_lose_pythons_frame_and_only_inside():
    """Another package's warning keeps its file and line (they help there); outside, Python's format is back."""
    python_format = warnings.formatwarning
    with warnings_as_lines():
        own = warnings.formatwarning("a is now b", RenamedKeyWarning, "config", 0)
        other = warnings.formatwarning("old API", DeprecationWarning, "m.py", 3)
    assert own == "warning: a is now b\n" and other.startswith("m.py:3: DeprecationWarning: old API")
    assert warnings.formatwarning is python_format


def test_one_warning_met_in_several_places_reads_as_one_line():
    """A broken checkpoint is met by every listing (latest, best, list) of one command: one line says it."""
    from attnxfer.checkpoints.verify import CorruptCheckpointWarning

    with warnings_as_lines():
        said = [warnings.formatwarning(m, CorruptCheckpointWarning, "store", n) for n, m in enumerate("aab")]
    assert said == ["warning: a\n", "", "warning: b\n"]


def test_ranks_other_than_0_keep_attnxfers_warnings_to_themselves(monkeypatch):
    """Every rank reads the same config and checkpoints: one ``warning:`` line for the job, not one per rank."""
    monkeypatch.setenv("RANK", "1")
    with warnings_as_lines():
        own = warnings.formatwarning("a is now b", RenamedKeyWarning, "config", 0)
        other = warnings.formatwarning("old API", DeprecationWarning, "m.py", 3)
    assert own == "" and other.startswith("m.py:3: DeprecationWarning: old API")


def test_a_submitted_jobs_log_reads_attnxfers_warnings_as_the_cli_shows_them(monkeypatch):
    """A SLURM job runs its task, not the CLI: the task puts the same format around the run it calls."""
    for var in ("RANK", "SLURM_PROCID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    task = TrainingTask(
        lambda cfg: warnings.formatwarning("a is now b", RenamedKeyWarning, "config", 0), cfg=None
    )
    assert task() == "warning: a is now b\n"
