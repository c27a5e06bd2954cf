"""One resume path, through the CLI: every command finds and judges its checkpoint the same way.

What a resume may change is one rule (the keys declared resumable), for `pretrain` as for `train`; a resume
with nothing left to do ends in one line; a resume on other data than the checkpoint recorded stops, unless
asked to go on (then its epoch restarts), while the same files at another ``data.root`` resume as before.
"""

from __future__ import annotations

import ast
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ONE_BLOCK_RUN, rewrite_checkpoint_state, run_cli, tiny_run
from PIL import Image

from attnxfer.apps.run.resume import check_same_data, check_teacher_content, config_changes, judge
from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.checkpoints.store import CheckpointError, optimizer_state_from_tensors
from attnxfer.checkpoints.verify import CheckpointInfo
from attnxfer.config import ConfigError, TrainConfig, load_config, to_dict
from attnxfer.errors import InputError, MissingPathError
from attnxfer.sources.resolve import sha256_file

PACKAGE = Path(__file__).resolve().parents[2] / "attnxfer"

# a 1-block model on synthetic data: 8 steps an epoch at batch 8
TINY = [
    *tiny_run(64, 8),
    "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
    "deterministic=true",
]


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_no_module_but_the_resume_point_parses_a_checkpoint_state():
    """The state a checkpoint saved is read in one place (`ResumePoint`): apps ask the point, never the file."""
    # a search saved by an older attnxfer kept its state at the run's top: the search adopts it into the store
    # and a teacher path's error tells a search's folder by the file's presence (it reads nothing of it)
    older_layout = {"apps/search.py", "sources/load_errors.py"}
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "checkpoints" or path.name == "run_layout.py":
            continue  # the store, its verification and the point itself
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        strings = {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        if "STATE_NAME" in names or "state.json" in strings:
            readers.append(str(path.relative_to(PACKAGE)))
    assert sorted(readers) == sorted(older_layout)


def test_a_refused_change_of_a_mapping_names_the_entries_that_differ_not_both_mappings_whole():
    """recall/teacher's data.kwargs (curriculum included) printed twice whole hid the one knob changed."""
    old = to_dict(load_config("recall/teacher"))
    changes = config_changes(
        old, load_config("recall/teacher", ["data.kwargs.distractors=8", "data.kwargs.hops=2"])
    )
    assert [str(c) for c in changes] == ["data.kwargs (distractors: 16 -> 8, hops: unset -> 2)"]
    assert str(config_changes(old, load_config("recall/teacher", ["seed=1"]))[0]) == "seed (0 -> 1)"


def test_a_changed_attention_alone_is_not_said_to_change_its_options_too():
    """Options in effect are compared over both runs' attentions: another attention with the same options
    was also refused as 'convert.attention_kwargs ()', a change of nothing, with an override to put it back."""
    old = to_dict(load_config(None, ["convert.attention=[softmax,hedgehog]"]))
    changes = config_changes(old, load_config(None, ["convert.attention=hedgehog"]), command="convert")
    assert [c.key for c in changes] == ["convert.attention"]
    old = to_dict(load_config(None, ["convert.attention_kwargs={feature_dim: 8}"]))
    changes = config_changes(old, load_config(None, ["convert.attention=relu_linear"]), command="convert")
    assert [str(c) for c in changes][1:] == ["convert.attention_kwargs (feature_dim: 8 -> unset)"]


def test_where_a_run_starts_from_is_no_change_of_the_run():
    """checkpoint.resume says where a run starts, not what it means: -c RUN/config.yaml and a requeued job
    resume with auto a run started with none, and a PATH names the checkpoint the resume line already says."""
    for old, new in (("none", "auto"), ("auto", "/elsewhere/checkpoints/step-00000002")):
        recorded = to_dict(load_config(None, [f"checkpoint.resume={old}"]))
        assert config_changes(recorded, load_config(None, [f"checkpoint.resume={new}"])) == []


@pytest.mark.slow
def test_pretrain_refuses_a_resume_that_changes_what_its_checkpoint_means(tmp_path, capsys):
    run = tmp_path / "mae"
    code, out, err = run_cli(
        capsys, "pretrain", *TINY, "schedule.max_steps=2", "mae.pictures=0", f"run_dir={run}"
    )
    assert code == 0 and "raise schedule.max_steps for an encoder that learns" in out, (
        err
    )  # it has no student
    before = _files(run)
    code, _, err = run_cli(
        capsys,
        "pretrain",
        *TINY,
        "mae.mask_ratio=0.5",
        "model.drop_path_rate=0.3",
        "schedule.max_steps=4",
        "mae.pictures=0",
        f"run_dir={run}",
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "mae.mask_ratio (0.75 -> 0.5)" in lines[0] and "model.drop_path_rate (0.1 -> 0.3)" in lines[0]
    assert "nothing was written" in lines[0] and "run_dir=" in lines[0]
    assert _files(run) == before
    # another run's checkpoint named as checkpoint.resume: that run's values, and how to start from its weights
    other = tmp_path / "other"
    step = run / "checkpoints" / "step-00000002"
    code, _, err = run_cli(
        capsys,
        "pretrain",
        *TINY,
        "mae.mask_ratio=0.5",
        "mae.pictures=0",
        f"run_dir={other}",
        f"checkpoint.resume={step}",
    )
    assert code == 2 and f"checkpoint.resume={step} is another run's checkpoint" in err, err
    assert f"attnxfer export {run} OUT, then model.init=local-dir:OUT" in err and not other.exists()
    # what may change (how long it trains) still resumes, and says so
    code, out, err = run_cli(
        capsys, "pretrain", *TINY, "schedule.max_steps=3", "mae.pictures=0", f"run_dir={run}"
    )
    assert code == 0, err
    assert "schedule.max_steps (2 -> 3)" in out and "resumed from checkpoint step 2" in out
    # its checkpoint given to a new folder with nothing left to train: no files there, and no export of none
    code, out, err = run_cli(
        capsys,
        "pretrain",
        *TINY,
        "schedule.max_steps=1",
        "mae.pictures=0",
        f"run_dir={other}",
        f"checkpoint.resume={step}",
    )
    assert (
        code == 0
        and f"nothing was written into {other}" in out.strip().splitlines()[-1]
        and not other.exists()
    ), err


@pytest.mark.slow
def test_a_weights_file_given_as_checkpoint_resume_is_told_to_be_model_init(tmp_path):
    """timm's and MAE's --resume take a checkpoint .pth (the CLI turns --resume into checkpoint.resume): it
    was refused as "not usable: not a directory", with no word of model.init, which reads such a file."""
    weights = tmp_path / "checkpoint-799.pth"
    weights.write_bytes(b"weights")
    with pytest.raises(InputError, match=f"is a file of no run's checkpoint .*model.init={weights}$"):
        ResumePoint.find(tmp_path / "run", str(weights))


def test_a_resume_with_nothing_left_to_do_ends_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, "transfer.mode=none", "checkpoint.every_steps=5", f"run_dir={run}"]
    code, _, err = run_cli(capsys, *args, "schedule.max_steps=8")
    assert code == 0, err
    mid_epoch = run / "checkpoints" / "step-00000005"  # a periodic save: no evaluation had run yet
    assert ResumePoint.find(run, mid_epoch).state["best"] is None
    before = _files(run)
    for steps, where in ((4, ", past"), (5, " of")):
        code, out, err = run_cli(
            capsys, *args, f"schedule.max_steps={steps}", f"checkpoint.resume={mid_epoch}"
        )
        assert code == 0 and err == ""
        last = out.strip().splitlines()[-1]
        # a run lowered below its step stands at it, past what it trains: not "past step 5 of the 4"
        assert last.startswith(f"nothing to do: {run} is at step 5{where} the {steps} this run trains")
        assert f"schedule.max_steps={steps}" in last and "step-00000005 is unchanged" in last
        assert "done:" not in out and "val top1" not in out  # nothing trained, nothing evaluated
    # given to another folder: the line names the checkpoint given, and that folder holds none of it
    other = tmp_path / "other"
    code, out, _ = run_cli(
        capsys, *args[:-1], "schedule.max_steps=4", f"checkpoint.resume={mid_epoch}", f"run_dir={other}"
    )
    last = out.strip().splitlines()[-1]
    assert code == 0 and last.startswith(
        f"nothing to do: checkpoint.resume={mid_epoch} is at step 5, past the 4"
    )
    assert (
        f"; nothing was written into {other}." in last and not other.exists()
    )  # no config.yaml, no run.json
    # a finished run run again: nothing to do either, and nothing rewritten
    code, out, _ = run_cli(capsys, *args, "schedule.max_steps=8")
    assert code == 0 and out.strip().splitlines()[-1].startswith(
        f"nothing to do: {run} is at step 8 of the 8"
    )
    assert _files(run) == before
    # its epochs end before max_steps: the line names them, the key that trains it longer
    code, out, _ = run_cli(capsys, *args, "schedule.max_steps=100", "schedule.epochs=1")
    last = out.strip().splitlines()[-1]
    assert code == 0 and "of the 8 this run trains (schedule.epochs=1 of 8 steps)" in last, last
    assert last.endswith("To train longer, raise schedule.epochs") and _files(run) == before
    # its run.json lost: export says how to get it back, and the run run again writes it anew
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(
        '{"mode": "none",'
    )  # damaged (by hand, a copy cut short): said, not a traceback
    for argv in (args, ["export", str(run), str(tmp_path / "export")]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and f"{run / 'run.json'} is damaged" in err and "move it aside, then run" in err, err
    (run / "run.json").unlink()
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "export"))
    assert code == 2 and f"{run} holds checkpoints but no run.json" in err
    assert f"run the command that trained it again, -c {run / 'config.yaml'}, which writes it anew" in err
    code, out, _ = run_cli(capsys, *args, "schedule.max_steps=8")
    assert code == 0 and "nothing to do" in out.strip().splitlines()[-1]
    assert json.loads((run / "run.json").read_text()) == record
    # the run's folder, its checkpoints/ or a file of one, given where one checkpoint belongs: which to give
    for given in (run, run / "checkpoints"):
        with pytest.raises(
            InputError, match=f"holds checkpoints, not one: .*the newest is {run}/checkpoints/step-00000008"
        ):
            ResumePoint.find(run, str(given))
    with pytest.raises(InputError, match=f"is a file of the checkpoint {mid_epoch}: give the folder"):
        ResumePoint.find(run, str(mid_epoch / "model.safetensors"))


def test_a_broken_checkpoint_given_as_checkpoint_resume_is_told_what_to_give_instead(trained, tmp_path):
    """A damaged checkpoint, or a folder that is none, named as checkpoint.resume stopped saying only what was
    wrong with it."""
    broken = tmp_path / "step-00000004"
    shutil.copytree(trained / "checkpoints" / "step-00000004", broken)
    (broken / "model.safetensors").write_bytes(b"cut short")
    for given in (broken, tmp_path / "empty"):
        given.mkdir(exist_ok=True)
        with pytest.raises(CheckpointError, match="give checkpoint.resume another checkpoint, or auto"):
            ResumePoint.find(tmp_path / "run", str(given))


def test_an_export_given_as_checkpoint_resume_is_told_to_be_model_init(exported, tmp_path):
    """An `attnxfer export` folder has no manifest: it was refused as a checkpoint whose "save never finished?",
    a damage it does not have, with no word of model.init, which reads it."""
    with pytest.raises(
        InputError, match=f"is an exported model, not a run's checkpoint .*model.init=local-dir:{exported}$"
    ):
        ResumePoint.find(tmp_path / "run", str(exported))


def test_a_state_json_edited_by_hand_without_an_entry_a_resume_reads_names_the_file_and_the_entry(
    trained, tmp_path
):
    """A state.json edited and its manifest re-hashed (so it verifies) but without ``epoch``: the resume ended in a
    bare KeyError: 'epoch'; it is refused naming the file, the entry and what to do instead."""
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    shutil.copytree(trained / "checkpoints" / "step-00000004", ckpt)
    rewrite_checkpoint_state(ckpt / "state.json", lambda state: state.pop("epoch"))
    point = ResumePoint.find(tmp_path / "run")
    assert point.state["step"] == 4 and point.state.get("epoch") is None  # what is there reads as before
    with pytest.raises(CheckpointError) as err:
        point.state["epoch"]
    assert str(err.value).startswith(f"{ckpt / 'state.json'} has no 'epoch' entry"), err.value
    assert "checkpoint.resume=none" in str(err.value)


def test_an_empty_checkpoint_resume_is_refused_not_read_as_the_current_directory(tmp_path):
    """``checkpoint.resume=$CKPT`` with the variable unset: '' was the path '.', the folder the command ran in,
    refused as "checkpoint . is not usable" (or, run inside a checkpoint, resumed from it)."""
    with pytest.raises(InputError, match="^checkpoint.resume: use auto, none, or a checkpoint directory"):
        ResumePoint.find(tmp_path / "run", "")


def test_a_checkpoint_resume_that_is_not_there_shows_the_checkpoints_beside_it(tmp_path):
    """A step pruned by checkpoint.keep_last, or mistyped, said only "does not exist": which steps are there?"""
    kept = tmp_path / "run" / "checkpoints" / "step-00000008"
    kept.mkdir(parents=True)
    with pytest.raises(
        MissingPathError, match=f"step-00000004 does not exist \\({kept.parent} holds: step-00000008/\\)"
    ):
        ResumePoint.find(tmp_path / "run", str(kept.parent / "step-00000004"))


def _image_folder(root: Path, per_class: int, start: int = 0) -> None:
    """``root/{train,val}/{a,b}/NNN.png``: small RGB images of two classes (more calls add more images)."""
    rng = np.random.default_rng(start)
    for split, n in (("train", per_class), ("val", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(start, start + n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_a_resume_on_data_that_changed_stops_unless_asked_and_a_moved_copy_resumes(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    _image_folder(data, per_class=12)  # 24 training images: 3 steps an epoch at batch 8
    args = [
        "train",
        # the length is the synthetic dataset's option; the others this run sets below
        *(a for a in TINY if not a.startswith(("data.kwargs", "data.dataset", "model.kwargs"))),
        "data.dataset=folder",
        "data.img_size=16",
        "transfer.mode=none",
        "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2, patch_size: 4}",
        "checkpoint.every_steps=2",
        f"run_dir={run}",
    ]
    code, _, err = run_cli(capsys, *args, f"data.root={data}", "schedule.max_steps=2")  # saved mid-epoch
    assert code == 0, err
    saved = ResumePoint.find(run)
    assert saved.state["position"] == 16 and saved.data["samples"] == 24 and saved.data["of"] == "file list"
    # the same files at another root (a node-local copy) are the same data: the run resumes where it stood
    local = tmp_path / "local-copy"
    shutil.copytree(data, local)
    code, out, err = run_cli(capsys, *args, f"data.root={local}", "schedule.max_steps=3")
    assert code == 0, err
    assert "position 16" in out and "data.root" in out
    # the folder grows: its sampler position would point at other images
    _image_folder(local, per_class=10, start=100)
    before = _files(run)
    code, out, err = run_cli(capsys, *args, f"data.root={local}", "schedule.max_steps=5")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "training data changed" in lines[0] and "24 training samples" in lines[0]
    assert "44 training samples" in lines[0] and "checkpoint.allow_new_data=true" in lines[0]
    assert _files(run) == before
    # asked for explicitly: the weights and the step go on, the epoch restarts on the new data
    code, out, err = run_cli(
        capsys, *args, f"data.root={local}", "schedule.max_steps=5", "checkpoint.allow_new_data=true"
    )
    assert code == 0, err
    assert "the epoch restarts" in out and "position 0" in out
    assert ResumePoint.find(run).data["samples"] == 44


def test_data_hashed_another_way_by_an_older_attnxfer_resumes_where_the_sample_counts_agree(capsys):
    """Streams and Hugging Face tables were once hashed by listing their files (reading every sample); now
    they say what they hold. A checkpoint of then and the data of now compare by their sample counts."""
    info = CheckpointInfo(4, Path("run/checkpoints/step-00000004"), None, "", {}, True)
    older = ResumePoint(info, {"data": {"samples": 48, "of": "file list", "fingerprint": "aa"}})
    cfg = load_config(None, ["run_dir=run"])
    assert check_same_data(older, {"samples": 48, "of": "shard list", "fingerprint": "bb"}, cfg)
    assert "hashed its data another way (file list)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="training data changed"):  # other data, whatever the hashing
        check_same_data(older, {"samples": 60, "of": "shard list", "fingerprint": "bb"}, cfg)
    with pytest.raises(ConfigError, match="training data changed"):
        check_same_data(older, {"samples": 48, "of": "file list", "fingerprint": "bb"}, cfg)


def test_a_precision_that_trains_as_the_recorded_one_on_this_device_resumes_and_another_is_refused(trained):
    """precision=fp32 on a CPU run recorded with auto: both train in fp32 there, so the checkpoint means what it
    did (auto's own dtype already follows the device); bf16 would train otherwise, and is refused."""
    point = ResumePoint.find(trained, "auto", verify_hash=False)
    same = judge(point, load_config(str(trained / "config.yaml"), ["device=cpu", "precision=fp32"]))
    assert [str(c) for c in same.allowed if c.key == "precision"] == [
        "precision ('auto' -> 'fp32') [both train in fp32 on cpu]"
    ]
    with pytest.raises(ConfigError, match=r"precision \('auto' -> 'bf16'\)\. These cannot change"):
        judge(point, load_config(str(trained / "config.yaml"), ["device=cpu", "precision=bf16"]))


def test_a_hub_teacher_whose_branch_moved_is_told_the_commit_the_run_trained_with():
    """hf-hub:ORG/NAME follows its branch: once the branch moves, the commit the run recorded is the spec that
    reads the weights its checkpoint learned from again."""
    info = CheckpointInfo(4, Path("run/checkpoints/step-00000004"), None, "", {}, True)
    commit = "a" * 40
    teacher = {"spec": "hf-hub:acme/vit", "sha256": "11", "hf_repo": "acme/vit", "hf_commit": commit}
    point = ResumePoint(info, {"teacher": teacher})
    with pytest.raises(
        ConfigError, match=f"recorded file \\(hf-hub:acme/vit@{commit}, the commit it trained"
    ):
        check_teacher_content(point, {**teacher, "sha256": "22"}, "hf-hub:acme/vit")
    # the hash is the file's: the same weights resaved (.pth as .safetensors) are told so, not called others
    local = ResumePoint(info, {"teacher": {"spec": "local-dir:t", "sha256": "11"}})
    with pytest.raises(ConfigError) as refused:
        check_teacher_content(local, {"sha256": "22"}, "local-dir:t")
    said = str(refused.value)
    assert "another teacher file than the one step-00000004 recorded" in said and "other weights" not in said
    assert "the same weights saved in another format are another file" in said
    assert "point teacher.spec at the recorded file; to train" in said and "checkpoint.resume=none" in said


def test_a_local_teacher_replaced_since_is_found_where_it_was_set_aside_and_an_eval_alone_is_not_refused(
    tmp_path, capsys
):
    """A later export into the teacher's folder set the earlier one aside as FOLDER.replaced-TIME: the refusal
    names the copy that holds the recorded weights (by their hash, not the newest copy). Scoring a student that
    attends without its teacher reads none of it: said, not refused."""
    folder = tmp_path / "export"
    for name, weights in (("replaced-20260101T000000", b"recorded"), ("replaced-20260102T000000", b"other")):
        aside = tmp_path / f"export.{name}"
        aside.mkdir()
        (aside / "model.safetensors").write_bytes(weights)
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"now")
    want = sha256_file(tmp_path / "export.replaced-20260101T000000" / "model.safetensors")
    info = CheckpointInfo(4, Path("run/checkpoints/step-00000004"), None, "", {}, True)
    point = ResumePoint(info, {"teacher": {"spec": f"local-dir:{folder}", "sha256": want}})
    now = {"sha256": sha256_file(folder / "model.safetensors")}
    with pytest.raises(ConfigError) as refused:
        check_teacher_content(point, now, f"local-dir:{folder}")
    aside = tmp_path / "export.replaced-20260101T000000"
    assert f"point teacher.spec at the recorded file (local-dir:{aside}, where the folder's" in str(
        refused.value
    )
    check_teacher_content(point, now, f"local-dir:{folder}", scoring_alone=True)
    said = capsys.readouterr().err
    assert "The student's own scores do not depend on it" in said and f"local-dir:{aside}" in said


def _record_every_section(run: Path, unread: dict) -> None:
    """``run`` as an attnxfer that recorded every section in every run wrote it: config.yaml and each
    checkpoint's state also hold the convert, mae and search sections (``unread``: values a later default
    may no longer match). The checkpoint's manifest is rewritten with the state's new size and hash."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, **unread}, sort_keys=False))
    for state_file in run.glob("checkpoints/step-*/state.json"):
        rewrite_checkpoint_state(state_file, lambda state: state["config"].update(unread))


def test_a_run_recorded_with_every_section_resumes_from_its_config_and_from_its_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, "transfer.mode=none", "checkpoint.every_steps=2", f"run_dir={run}"]
    code, _, err = run_cli(capsys, *args, "schedule.max_steps=2")
    assert code == 0, err
    state = json.loads((run / "checkpoints" / "step-00000002" / "state.json").read_text())
    for recorded in (yaml.safe_load((run / "config.yaml").read_text()), state["config"]):  # what train reads
        assert "model" in recorded and not {"convert", "mae", "search"} & set(recorded)
    unread = to_dict(TrainConfig())
    unread = {name: unread[name] for name in ("convert", "mae", "search")}
    unread["convert"]["stage1_steps"], unread["mae"]["mask_ratio"], unread["search"]["fit_steps"] = 9, 0.5, 3
    _record_every_section(run, unread)
    # its own config.yaml (sections train never reads included) loads and compares equal with the checkpoint
    own = load_config(str(run / "config.yaml"))
    assert own.convert.stage1_steps == 9 and config_changes(ResumePoint.find(run, "auto").config, own) == []
    # the same run from its recipe's words, whose unread sections hold other values, resumes
    code, out, err = run_cli(capsys, *args, "schedule.max_steps=3")
    assert code == 0, err
    assert (
        "resume: changed since step-00000002: schedule.max_steps (2 -> 3)" in out and "done: 3 steps" in out
    )
    assert "convert." not in out and "mae." not in out and "search." not in out
    # and writes its config.yaml as train's own again
    assert not {"convert", "mae", "search"} & set(yaml.safe_load((run / "config.yaml").read_text()))


@pytest.mark.slow  # two short runs of a 1-block model
def test_optimiser_options_changed_on_resume_are_the_ones_it_steps_with(tmp_path, capsys):
    """weight_decay, beta1, beta2 and eps may change on resume: the optimiser's state comes back from the
    checkpoint, its options from this run's config (torch's load_state_dict alone put back the saved ones)."""
    run = tmp_path / "run"
    args = ["train", *TINY, "transfer.mode=none", "checkpoint.every_steps=2", f"run_dir={run}"]
    code, _, err = run_cli(capsys, *args, "schedule.max_steps=2")
    assert code == 0, err
    changed = ("optim.weight_decay=0.5", "optim.beta1=0.8", "optim.beta2=0.95", "optim.eps=1e-6")
    code, out, err = run_cli(capsys, *args, "schedule.max_steps=4", *changed)
    assert code == 0, err
    assert "optim.weight_decay (0.05 -> 0.5)" in out
    point = ResumePoint.find(run, "auto")
    saved = optimizer_state_from_tensors(point.load_tensors()["optimizer"], point.state["optimizer_meta"])
    groups = saved["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.5]  # biases, norms, tokens: never decayed
    assert {(tuple(g["betas"]), g["eps"]) for g in groups} == {((0.8, 0.95), 1e-6)}


@pytest.mark.slow  # three short runs and an eval of a 1-block model
def test_going_back_before_a_runs_later_checkpoints_keeps_them_aside_and_eval_moves_nothing(tmp_path, capsys):
    """checkpoint.resume=none, or a PATH before the run's last save: the earlier attempt's later checkpoints
    would be resumed by the next auto, exported as the run's weights and kept over its own saves."""
    run = tmp_path / "run"
    argv = [
        "train",
        f"run_dir={run}",
        *TINY,
        "transfer.mode=none",
        "schedule.epochs=2",
        "checkpoint.keep_last=5",
    ]
    assert run_cli(capsys, *argv)[0] == 0
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["step-00000008", "step-00000016"]
    # scoring an earlier checkpoint moves nothing
    earlier = run / "checkpoints" / "step-00000008"
    assert run_cli(capsys, "eval", "-c", str(run / "config.yaml"), f"checkpoint.resume={earlier}")[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved
    assert run_cli(capsys, "eval", "-c", str(run / "config.yaml"))[0] == 0  # and the newest, step 16
    # on from step 8 with another lr, stopping at 12: step 16 of the first attempt is kept aside, with its score
    code, _, err = run_cli(
        capsys, *argv, f"checkpoint.resume={earlier}", "optim.lr=1e-3", "schedule.max_steps=12"
    )
    assert code == 0 and "step-00000016 was saved after step 12 by an earlier attempt; kept it as" in err, err
    assert "eval-00000016.json scored an earlier attempt's checkpoint; kept it as" in err, err
    assert [p.name for p in run.glob("eval-*.json")] == ["eval-00000008.json"]  # step 8's is still its own
    assert ResumePoint.find(run, "auto").step == 12
    # starting over, stopping at 8: its step 8 has other weights, and step 12 came after it
    earlier_records = (run / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, *argv, "checkpoint.resume=none", "seed=5", "schedule.epochs=1")
    assert (
        code == 0 and "a different checkpoint for step 8 existed" in err and "step-00000012 was saved" in err
    )
    assert "kept the earlier attempt's eval-00000008.json as" in err and not list(run.glob("eval-*.json"))
    # and the earlier attempt's records are kept beside them, not dropped with the fresh start
    [kept] = run.glob("metrics.jsonl.replaced-*")
    assert kept.read_text() == earlier_records and len(list(run.glob("summary.csv.replaced-*"))) == 1
    assert "checkpoint.resume=none: kept the earlier attempt's metrics.jsonl as" in err, err
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "." not in p.name) == ["step-00000008"]
    assert ResumePoint.find(run, "auto").config["seed"] == 5


@pytest.mark.slow  # two short runs of a 1-block model
def test_starting_over_keeps_an_earlier_attempts_checkpoint_of_a_step_before_its_first_save(tmp_path, capsys):
    """checkpoint.resume=none whose first save comes after the earlier attempt's last: that checkpoint is not
    this attempt's, so it is kept aside, not counted by keep_last and deleted by the new save's pruning."""
    run = tmp_path / "run"
    argv = ["train", f"run_dir={run}", *TINY, "transfer.mode=none", "checkpoint.keep_last=1"]
    assert run_cli(capsys, *argv, "schedule.max_steps=2")[0] == 0
    earlier = (run / "checkpoints" / "step-00000002" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, *argv, "schedule.max_steps=3", "checkpoint.resume=none", "seed=5")
    assert code == 0 and "step-00000002 was saved by an earlier attempt (this one started over)" in err, err
    [kept] = (run / "checkpoints").glob("step-00000002.replaced-*")
    assert (kept / "model.safetensors").read_bytes() == earlier
    assert ResumePoint.find(run, "auto").step == 3


def test_a_refused_resume_gives_the_overrides_that_continue_the_run(tmp_path, capsys):
    """A value the run took from the command line is not the recipe's: "drop the new value" would fall to the
    recipe's and be refused again, so the advice names the recorded values, and they resume the run as written."""
    base = [*ONE_BLOCK_RUN, "checkpoint.every_steps=1", f"run_dir={tmp_path / 'run'}"]
    assert run_cli(capsys, "train", *base, "model.drop_path_rate=0.2", "schedule.max_steps=1")[0] == 0
    again = [*base, "model.drop_path_rate=0.3", "schedule.max_steps=2"]
    code, _, err = run_cli(capsys, "train", *again)
    assert code == 2 and "model.drop_path_rate (0.2 -> 0.3)" in err
    advice = err.split("give them the values it recorded: ")[1].split(" (its config")[0]
    assert advice == "model.drop_path_rate=0.2"
    code, _, err = run_cli(capsys, "train", *again, *shlex.split(advice))
    assert code == 0 and (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir(), err
    # the run's own config.yaml edited since it was written: named as where the values go back, not as the
    # place that keeps them
    own = tmp_path / "run" / "config.yaml"
    own.write_text(own.read_text().replace("drop_path_rate: 0.2", "drop_path_rate: 0.4"))
    code, _, err = run_cli(capsys, "train", "-c", str(own), "schedule.max_steps=3")
    assert code == 2 and "model.drop_path_rate (0.2 -> 0.4)" in err, err
    assert err.rstrip().endswith(
        f"model.drop_path_rate=0.2, in {own}, which says the new values since it was edited"
    )


def test_a_loss_option_written_out_at_its_default_is_no_change_and_another_value_is():
    """transfer.losses entries are compared as the run uses them: a resume that spells out a loss's default
    (weight 1, mse's first signal q) was refused as a change, also against an older run's record without it."""
    recorded = to_dict(load_config(None, ["transfer.losses=[{name: mse, signal: v}, {name: mse}]"]))
    same = "transfer.losses=[{name: mse, signal: v, weight: 1.0}, {name: mse, signal: q, weight: 1}]"
    assert config_changes(recorded, load_config(None, [same])) == []
    other = load_config(None, ["transfer.losses=[{name: mse, signal: v, weight: 0.5}, {name: mse}]"])
    assert [(c.key, c.allowed) for c in config_changes(recorded, other)] == [("transfer.losses", False)]


def test_an_entrys_layers_changed_on_resume_is_a_change_it_refuses():
    """An entry's ``layers`` is what the run optimises, as its weight is; null is the entry without it."""
    recorded = to_dict(load_config(None, ["transfer.losses=[{name: mse, signal: v, layers: [0, 1]}]"]))
    same = load_config(None, ["transfer.losses=[{name: mse, signal: v, layers: [0, 1]}]"])
    assert config_changes(recorded, same) == []
    other = load_config(None, ["transfer.losses=[{name: mse, signal: v, layers: [1]}]"])
    assert [(c.key, c.allowed) for c in config_changes(recorded, other)] == [("transfer.losses", False)]
    unset = to_dict(load_config(None, ["transfer.losses=[{name: mse, signal: v}]"]))
    null = load_config(None, ["transfer.losses=[{name: mse, signal: v, layers: null}]"])
    assert config_changes(unset, null) == []


def test_an_attention_option_written_out_at_its_default_is_no_change_and_another_value_is():
    """model/convert.attention_kwargs are compared as the attention is built with them: a resume that spells
    out an option's default (nystrom's 32 landmarks), or leaves out one the first run wrote, was refused."""
    named = ["model.attention=nystrom", "convert.attention=performer"]
    written = [
        *named,
        "model.attention_kwargs={num_landmarks: 32}",
        "convert.attention_kwargs={orthogonal: true}",
    ]
    for old, new in ((named, written), (written, named)):
        assert (
            config_changes(to_dict(load_config(None, old)), load_config(None, new), command="convert") == []
        )
    other = load_config(
        None,
        [*named, "model.attention_kwargs={num_landmarks: 8}", "convert.attention_kwargs={orthogonal: false}"],
    )
    changes = config_changes(to_dict(load_config(None, named)), other, command="convert")
    assert [(c.key, c.allowed) for c in changes] == [
        ("model.attention_kwargs", False),
        ("convert.attention_kwargs", False),
    ]


def test_a_resume_that_finds_run_json_gone_says_it_writes_it_again(tmp_path, capsys):
    """A run's run.json deleted (or lost) beside its checkpoints: the resume wrote a new one without a word."""
    argv = ["train", *ONE_BLOCK_RUN, "checkpoint.every_steps=1", f"run_dir={tmp_path / 'run'}"]
    assert run_cli(capsys, *argv, "schedule.max_steps=1")[0] == 0
    (tmp_path / "run" / "run.json").unlink()
    code, _, err = run_cli(capsys, *argv, "schedule.max_steps=2")
    assert code == 0 and "run.json was missing beside the run's checkpoints: written again" in err, err
    assert (tmp_path / "run" / "run.json").is_file()
    code, _, err = run_cli(capsys, *argv, "schedule.max_steps=3")  # there again: nothing said
    assert code == 0 and "was missing" not in err
