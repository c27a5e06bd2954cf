"""`attnxfer eval`, through the CLI: it writes only its result file, a second evaluation with other settings
keeps the first's scores, another run's checkpoint is scored with that run's config, a run without a
checkpoint is refused (a folder inside a run names the run), and a run evaluated trains on. Its tests write
into the run (scores, then a fifth step), in this order: the module trains its own `trained`, not the
session's read-only one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ONE_BLOCK_RUN as S, run_cli, train_one_block_run

from attnxfer.launch import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_one_block_run(tmp_path_factory)


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def test_eval_writes_only_its_result_file(trained, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), "log.every_steps=3")
    assert code == 0, err
    result = json.loads((trained / "eval-00000004.json").read_text())
    assert result["step"] == 4 and "val_top1" in result["metrics"]
    after = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    assert after.pop("eval-00000004.json")
    assert after == before  # config.yaml, run.json, metrics.jsonl untouched
    assert (
        "eval_only" not in (trained / "config.yaml").read_text()
        or "eval_only: false" in (trained / "config.yaml").read_text()
    )


def test_eval_takes_a_run_folder_as_export_and_inspect_do(trained, tmp_path, capsys):
    """`attnxfer eval RUN_DIR` reads RUN_DIR/config.yaml: the scores of `-c RUN_DIR/config.yaml`, also for
    a folder named like an override (a study names its students so: lr=1e-3)."""
    code, out, err = run_cli(capsys, "eval", str(trained), "log.every_steps=3")
    assert code == 0, err
    by_folder = json.loads((trained / "eval-00000004.json").read_text())
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), "log.every_steps=3")
    assert code == 0, err
    assert json.loads((trained / "eval-00000004.json").read_text())["metrics"] == by_folder["metrics"]
    assert "val_top1 (%) [95% Wilson interval, 64 images]" in out
    student = shutil.copytree(
        trained, tmp_path / "study" / "lr=1e-3", ignore=shutil.ignore_patterns("eval-*")
    )
    code, _, err = run_cli(capsys, "eval", str(student), "log.every_steps=3")
    assert code == 0, err
    assert json.loads((student / "eval-00000004.json").read_text())["metrics"] == by_folder["metrics"]


def test_a_second_eval_of_a_step_with_other_settings_keeps_the_firsts_scores(trained, capsys, monkeypatch):
    def scored(*overrides: str) -> Path:
        code, out, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), *overrides)
        assert code == 0, err
        return Path(out.strip().splitlines()[-1].rsplit(" -> ", 1)[1])

    first = scored()
    kept, files = first.read_bytes(), set(trained.glob("eval-*.json"))
    other = scored("eval.metrics=[top1]")
    assert first.read_bytes() == kept and other not in files and other.name.startswith("eval-00000004-")
    assert json.loads(other.read_text())["config"]["eval"]["metrics"] == ["top1"]
    code, out, _ = run_cli(
        capsys, "eval", "-c", str(trained / "config.yaml"), "eval.metrics=[top1]", "log.every_steps=3"
    )
    # what eval computes is no change to what was trained: the config's header says it, the scoring line not
    assert code == 0 and "\n  eval.metrics: [auto] -> [top1]\n" in out, out
    scoring = next(line for line in out.splitlines() if line.startswith("scoring step-00000004 with keys"))
    assert scoring.endswith("changed since it was saved: log.every_steps (1 -> 3)"), scoring
    third = Path(out.strip().splitlines()[-1].rsplit(" -> ", 1)[1])
    assert "resume:" not in out  # eval resumes nothing
    assert scored() == first  # the first evaluation again replaces only its own scores
    monkeypatch.chdir(trained.parent)  # and so does it with the run named from elsewhere (or moved)
    assert trained.parent / scored(f"run_dir={trained.name}") == first
    assert set(trained.glob("eval-*.json")) == files | {other, third}


def test_eval_of_another_runs_checkpoint_names_that_runs_config_not_training_advice(
    trained, tmp_path, capsys
):
    other = tmp_path / "other"
    assert cli.main(["train", *S, "schedule.max_steps=1", "ema.decay=0.9", f"run_dir={other}"]) == 0
    step = other / "checkpoints" / "step-00000001"
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), f"checkpoint.resume={step}")
    # its scores would have been filed in this run's folder, under a step this run never had
    assert code == 2 and f"is a checkpoint of the run {other}, not of {trained}" in err, err
    assert f"its scores belong with that run, where eval writes them: attnxfer eval {step}" in err
    assert "model.init" not in err  # how to train from its weights is no answer to scoring it
    assert not list(trained.glob("eval-00000001*"))


def test_eval_of_a_folder_scores_that_folder_or_says_it_is_missing(trained, tmp_path, capsys):
    """A folder holding a copy of another run's config.yaml scored that other run (its run_dir, as written)
    and wrote its eval file there; a misspelt folder was 'not key=value'."""
    (tmp_path / "copied").mkdir()
    shutil.copy(trained / "config.yaml", tmp_path / "copied")
    before = sorted(p.name for p in trained.iterdir())
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "copied"))
    assert code == 2 and f"{tmp_path / 'copied'} has no run.json" in err, err
    assert sorted(p.name for p in trained.iterdir()) == before  # nothing scored or written there
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "nope"))
    assert code == 2 and f"run folder {tmp_path / 'nope'} does not exist (" in err, err


def test_eval_of_a_run_without_checkpoint_refuses(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", *S, f"run_dir={tmp_path / 'never'}")
    assert code == 2 and "no checkpoint to evaluate" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_eval_of_no_metric_says_the_list_is_empty_not_that_labels_or_a_teacher_are_missing(trained, capsys):
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), "eval.metrics=[]")
    assert code == 2 and "nothing to score: eval.metrics is empty" in err and "need labels" not in err, err


def test_eval_of_a_runs_checkpoints_or_one_checkpoint_scores_the_run_there(trained, tmp_path, capsys):
    """Given as export and inspect take folders: the run's checkpoints/ is its newest checkpoint, a step-*
    folder that checkpoint (they had been read as a dataset's folder, 'not key=value'); a run that lost its
    config.yaml is told where its checkpoints recorded it."""
    step = trained / "checkpoints" / "step-00000004"
    for given, said in ((trained / "checkpoints", "the checkpoints"), (step, "a checkpoint")):
        code, out, err = run_cli(capsys, "eval", str(given), "eval.metrics=[top1]")
        assert code == 0, err
        assert f"attnxfer eval: {given} is {said} of the run {trained}" in out
        assert f"at {step}) -> {trained / 'eval-00000004'}" in out, out
    lost = shutil.copytree(trained, tmp_path / "lost", ignore=shutil.ignore_patterns("config.yaml", "eval-*"))
    code, _, err = run_cli(capsys, "eval", str(lost))
    assert (
        code == 2 and "it is the run's own config, gone: write back the config its checkpoints record" in err
    )


def test_eval_given_a_runs_checkpoints_folder_names_the_run_to_give(trained, capsys):
    """Not "no RUN/checkpoints/checkpoints/step-*": the folder given is the run's checkpoints."""
    for given in (trained / "checkpoints", trained / "checkpoints" / "step-00000004"):
        code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), f"run_dir={given}")
        assert code == 2 and f"give the run's folder, {trained}" in err, err


def test_a_run_of_an_objective_eval_cannot_score_is_refused_not_scored_as_a_transfer(
    trained, tmp_path, capsys
):
    """A fork's objective records its own mode: scored as a plain student, its checkpoint would be misread."""
    run = shutil.copytree(trained, tmp_path / "simclr")
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "mode": "simclr"}))
    scores = set(run.glob("eval-*.json"))
    code, _, err = run_cli(capsys, "eval", "-c", str(run / "config.yaml"))
    assert code == 2 and "names the objective 'simclr', which eval has no scorer for" in err, err
    assert "attnxfer.launch.commands.eval" in err and set(run.glob("eval-*.json")) == scores


def test_eval_of_a_classifier_run_refuses_keys_of_sections_it_does_not_read(trained, capsys):
    """mae.* (a pretrain run's), convert.* and search.* change nothing a train run's checkpoint is scored
    with: named in one line, not dropped without a word; the run's other keys are still taken."""
    scores = set(trained.glob("eval-*.json"))
    given = ("mae.mask_ratio=0.9", "search.population=3", "eval.knn_k=5")
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), *given)
    assert code == 2 and err.count("\n") == 1, err
    assert f"mae.mask_ratio, search.population: eval of {trained} does not read them: " in err, err
    assert "only `attnxfer pretrain` (and eval of its runs) reads mae.*, only `attnxfer search` reads" in err
    assert "knn_k" not in err and set(trained.glob("eval-*.json")) == scores


def test_a_run_trained_after_eval_trains(trained, capsys):
    code, _, err = run_cli(capsys, "train", "-c", str(trained / "config.yaml"), "schedule.max_steps=5")
    assert code == 0, err
    assert "step-00000005" in _steps(trained)


def test_eval_of_a_conversions_stage_1_names_the_conversion_not_a_config_to_give(trained, tmp_path, capsys):
    """Stage 1 holds checkpoints alone, of a student the conversion's config does not build."""
    conversion = tmp_path / "conversion"
    shutil.copytree(trained / "checkpoints", conversion / "stage1" / "checkpoints")
    shutil.copy(trained / "config.yaml", conversion / "config.yaml")
    code, _, err = run_cli(
        capsys, "eval", "-c", str(conversion / "config.yaml"), f"run_dir={conversion / 'stage1'}"
    )
    assert code == 2 and f"is a stage of the conversion {conversion}, whose final student" in err, err
    assert not list((conversion / "stage1").glob("eval-*.json"))


def test_a_copied_runs_folder_is_no_change_in_evals_config_header(trained, tmp_path, capsys):
    """A run's config.yaml names its folder as loaded, eval its path as given: the same folder was said to be
    a changed run_dir in the config's header, and the copy's old folder in the scoring line."""
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    code, out, err = run_cli(capsys, "eval", str(moved), "eval.metrics=[top1]")
    assert code == 0, err
    assert "value(s) changed:\n  eval.metrics: [auto] -> [top1]\n" in out and "run_dir" not in out, out
    assert "keys changed since it was saved" not in out
