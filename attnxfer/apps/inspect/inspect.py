"""`attnxfer inspect`: does a student attend like its teacher, where, and with which heads? This module
loads the models (any spec; a copy-mode run comes with its teacher), prepares the images the teacher's way,
measures and writes the report folder, staged so that an interrupted inspection leaves ``--out`` as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform

from ...analysis import InspectedStudent, Inspection, compare_attention, input_size, token_layout
from ...analysis.pictures import agreement_figure, save_figure
from ...checkpoints.processes import process_alive
from ...checkpoints.run_dir import ExportWeights, RunDir
from ...checkpoints.run_lock import claim_new_file, in_run_folder, refuse_file_in_the_way, refuse_unwritable
from ...checkpoints.store import atomic_write_json, atomic_write_text
from ...config import TrainConfig
from ...data import build_dataset, statistics_differ
from ...data.folder import eight_bit
from ...data.registry import dataset_reads_root
from ...errors import InputError, MissingPathError, PathExistsError, UserError
from ...models import make_transfer_aware
from ...models.image_input import ImageSizeError, image_input
from ...run_layout import STAGE_DIRS, is_exported_model
from ...sources import (
    TeacherLoadError,
    TeacherNotAvailable,
    UnsafeCheckpointError,
    load_student,
    load_teacher,
)
from ...sources.hub import CACHE_DIR_ROUTE
from ...sources.resolve import Origin, parse_teacher_spec
from ...speak import say, warn
from ...transfer.modes import MODES
from ...transfer.plan import build_plan
from ..run.loaders import data_seed
from ..run.resume import config_as_trained
from .drawings import draw_pictures
from .report_text import agreement_sentence, json_safe, render_report


@dataclass
class LoadedModel:
    """A model to inspect and where it came from; ``borrow`` lists the layers that attend with the teacher's
    q/k (attention copy): {student layer: (teacher layer, chunks)}."""

    spec: str
    model: nn.Module
    source: str
    borrow: dict[int, tuple[int, str]] = field(default_factory=dict)
    sha256: str | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    checkpoint: Path | None = None  # a RUN_DIR's: the checkpoint folder its weights came from
    run: RunDir | None = None  # the training run it was loaded from (a conversion's: its stage 2)
    # mean/std are timm's defaults for the architecture, not the weights' (a transformers folder without
    # preprocessor_config.json)
    stats_guessed: bool = False

    @property
    def subject(self) -> InspectedStudent:
        """The model as `compare_attention` takes it: with the teacher layers it borrows."""
        return InspectedStudent(self.model, self.borrow)


def _run_of(spec: str) -> RunDir | None:
    """The training run ``spec`` names, as export reads it: a RUN_DIR, or a conversion's folder (its final
    student, stage 2's run); None for any other spec."""
    run = RunDir(spec).final_student() if Path(spec).is_dir() else None
    return run if run is not None and run.is_run() else None


def _load_run(spec: str, run_dir: RunDir, teacher: LoadedModel | None) -> LoadedModel:
    """A training run's student, from the checkpoint `attnxfer export` takes (the best; an MAE pre-training's
    latest, what its export holds); a copy-mode run gets the plan's borrowed layers and must come with the
    teacher it was trained with."""
    loaded = run_dir.load_student()
    run, mode = loaded.record, loaded.record.get("mode")
    student = make_transfer_aware(loaded.model).eval().requires_grad_(False)
    model = LoadedModel(
        spec,
        student,
        # as report.md names it: "step-00000040, best val top-1 71.20, EMA weights"
        f"{loaded.why.replace(' (', ', ', 1).removesuffix(')')}, "
        f"{'EMA' if loaded.weights is ExportWeights.EMA else 'raw'} weights",
        mean=tuple(run.get("mean") or ()),
        std=tuple(run.get("std") or ()),
        checkpoint=loaded.checkpoint,
        run=run_dir,
    )
    if mode in MODES and MODES[mode].is_copy:
        model.borrow = _copy_layers(run_dir.path, run, student, teacher)
    return model


def _copy_layers(
    run_dir: Path, run: dict, student: nn.Module, teacher: LoadedModel | None
) -> dict[int, tuple[int, str]]:
    mode = MODES[run["mode"]]
    trained_with = run.get("teacher") or {}
    if teacher is None:
        raise InputError(
            f"{run_dir} is a {mode.name}-mode student: it attends with its teacher's {mode.borrow!r} "
            f"({trained_with.get('spec', 'the run’s teacher')}), so it can only be inspected with that teacher; "
            "pass it as TEACHER"
        )
    want, have = trained_with.get("sha256"), teacher.sha256
    if want and want != have:
        got = f"has sha256 {have[:12]}…" if have else f"holds a trained student ({teacher.source})"
        raise InputError(
            f"{run_dir} is a {mode.name}-mode student trained with teacher {trained_with.get('spec')!r} "
            f"(weights sha256 {want[:12]}…), but TEACHER {teacher.spec!r} "
            f"{'has random weights' if teacher.source == Origin.RANDOM_INIT else got}: a copy student attends "
            "with its own teacher's q/k, so pass that teacher"
        )
    cfg = config_as_trained(RunDir(run_dir), "inspect")
    plan = build_plan(
        teacher.model, student, mode.name, end_layer=cfg.transfer.end_layer, layers=cfg.transfer.layers
    )
    return {s: (t, mode.borrow) for s, t in plan.pairs}


def load_model(
    spec: str,
    *,
    teacher: LoadedModel | None = None,
    pretrained: bool = True,
    arch: str | None = None,
    img_size: int | None = None,
    role: str = "student",
) -> LoadedModel:
    """Any spec as a model to inspect (a RUN_DIR, an `attnxfer export` folder, any teacher spec), named by its
    ``role`` when it is none of them; ``teacher`` is needed for copy-mode runs. ``img_size``: teachers are
    rebuilt at that size as their family says; a trained student keeps the size it was trained at, and
    another is refused."""
    spec = str(spec)
    run = _run_of(spec)
    # a model's folder given as a path, as run folders are: read as local-dir (a teacher spec must say so)
    folder = Path(spec).expanduser()
    source = f"local-dir:{spec}" if folder.is_dir() and (folder / "config.json").is_file() else spec
    # a spec that names nothing is refused as what it was given as
    trained = run is not None or parse_teacher_spec(source, role=role).source.is_local
    if not pretrained and trained:
        raise InputError(f"--random-weights is for timm names; {spec} holds trained weights: leave it out")
    if run is not None:
        return _at_size(_load_run(spec, run, teacher), img_size)
    if role == "student":  # an export folder's record says the size it was trained at, as a run's does
        _refuse_other_size(spec, trained_size(spec), img_size)
    try:
        model, record = load_teacher(
            source,
            arch=arch,
            pretrained=pretrained,
            img_size=img_size,
            who=f"{role} {spec}",
            warn_guessed_stats=False,  # a teacher's are given by --mean/--std, or refused; a student's unused
        )
    except UnsafeCheckpointError as err:  # its words say where a teacher's file goes in a config
        raise err.restated(
            f"attnxfer inspect's {role.upper()}, with --{role}-arch; {role}= and {role}_arch= of inspect_attention"
        ) from None
    except (TeacherLoadError, TeacherNotAvailable) as err:  # the sources call what they load a teacher
        msg = re.sub(r"^teacher ", f"{role} ", str(err)).replace(CACHE_DIR_ROUTE, "")  # inspect takes none
        if "efficient-attention student" not in msg:
            raise type(err)(msg) from None
        model = load_student(source)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return _at_size(
            LoadedModel(
                spec, model, "attnxfer export", mean=tuple(cfg.get("mean", ())), std=tuple(cfg.get("std", ()))
            ),
            img_size,
        )
    return LoadedModel(
        spec,
        model,
        record.source,
        sha256=record.sha256,
        mean=record.mean,
        std=record.std,
        stats_guessed=record.mean_std_guessed,
    )


def _at_size(loaded: LoadedModel, img_size: int | None) -> LoadedModel:
    """A trained student as it was trained: at ``img_size`` (when given), else refused."""
    size = image_input(loaded.model).img_size
    _refuse_other_size(loaded.spec, size[0] if size is not None else None, img_size)
    return loaded


def _refuse_other_size(spec: str, trained: int | None, img_size: int | None) -> None:
    if img_size is not None and trained is not None and trained != img_size:
        raise InputError(
            f"{spec} was trained at {trained} px and is inspected at the size it was trained at: pass "
            f"--img-size {trained} (the teacher is rebuilt there), or leave --img-size out"
        )


def trained_size(spec: str) -> int | None:
    """The image side a trained student (RUN_DIR, export folder) was trained at, from its record; else None."""
    spec = str(spec)
    run = _run_of(spec)
    try:
        if run is not None:
            cfg = (run.record().get("student") or {}).get("pretrained_cfg") or {}
        else:
            folder = Path(spec.removeprefix("local-dir:")).expanduser()
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            if not (config.get("attnxfer") or {}).get("student"):
                return None
            cfg = config["attnxfer"]["student"].get("pretrained_cfg") or {}
    except (OSError, ValueError, AttributeError):
        return None
    size = cfg.get("input_size")
    return int(size[-1]) if isinstance(size, (list, tuple)) and size else None


def _input_settings(teacher: LoadedModel) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    (size, _), chans = input_size(teacher.model)
    return size, chans, tuple(teacher.mean or (0.5,) * chans), tuple(teacher.std or (0.5,) * chans)


def load_images(
    teacher: LoadedModel,
    *,
    files: Sequence[str | Path] = (),
    data: str | None = None,
    data_root: str | None = None,
    split: str = "val",
    num_images: int = 64,
    data_options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """(B, C, H, W) images prepared for ``teacher``: ``files`` (as timm's eval transform does), or the first
    ``num_images`` of a registered dataset's ``split`` (made with ``data_options``, the dataset's own)."""
    size, chans, mean, std = _input_settings(teacher)
    if files and data:
        raise InputError("give either image files (--images) or a dataset (--data), not both")
    if files:
        transform = create_transform(input_size=(chans, size, size), mean=mean, std=std, crop_pct=1.0)
        paths = [Path(f).expanduser() for f in files]
        folder = " (a folder: give the image files in it)"
        if missing := [f"{p}{folder if p.is_dir() else ''}" for p in paths if not p.is_file()]:
            raise MissingPathError(f"--images names files that do not exist: {', '.join(missing)}")
        out = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    out.append(transform(eight_bit(img).convert("L" if chans == 1 else "RGB")))
            except OSError as e:  # not an image (PIL's UnidentifiedImageError), or a truncated one
                raise InputError(f"--images {path} cannot be read as an image: {e}") from e
        return torch.stack(out)
    if data:
        if num_images < 1:
            raise InputError(f"--num-images must be at least 1, got {num_images}")
        ds = build_dataset(
            data,
            split,
            root=data_root,
            img_size=size,
            in_chans=chans,
            mean=mean,
            std=std,
            **(data_options or {}),
        )
        n = min(num_images, len(ds))
        if n == 0:
            raise InputError(f"dataset {data!r} split {split!r} has no images")
        return torch.stack([ds[i][0] for i in range(n)])
    raise InputError(
        "no images to inspect: give image files (--images A.png B.jpg) or a dataset (--data NAME); a student "
        "given as its run folder brings the data it was trained on"
    )


def inspect_models(
    teacher: nn.Module,
    students: Mapping[str, nn.Module | InspectedStudent],
    images: torch.Tensor,
    *,
    batch_size: int = 16,
    **settings: Any,
) -> Inspection:
    """`compare_attention` on images already prepared, in batches; ``settings`` are its keywords."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise InputError(
            f"no images to inspect: expected a (B, C, H, W) batch with B >= 1, got {tuple(images.shape)}"
        )
    batches = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    return compare_attention(teacher, students, batches, **settings)  # its refusals are InputErrors


def write_report(
    out: str | Path,
    insp: Inspection,
    teacher: LoadedModel,
    students: Mapping[str, LoadedModel],
    images: torch.Tensor,
    *,
    picture_images: int = 1,
) -> list[Path]:
    """metrics.json, report.md and the pictures (of the first ``picture_images``) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {n: s.spec for n, s in students.items()}
    payload = {"specs": {"teacher": teacher.spec, "students": specs}, **dataclasses.asdict(insp)}
    atomic_write_json(out / "metrics.json", json_safe(payload))
    # a run folder by the checkpoint and weights read from it too: its path alone says neither
    named = lambda m: f"`{m.spec}`" + (f" ({m.source})" if m.run else "")
    names = {n: named(s) for n, s in students.items()}
    atomic_write_text(out / "report.md", render_report(insp, named(teacher), names))
    _, _, mean, std = _input_settings(teacher)
    subjects = {n: s.subject for n, s in students.items()}
    return [
        out / "metrics.json",
        out / "report.md",
        *draw_pictures(out, insp, teacher.model, subjects, images[: max(1, picture_images)], mean, std),
    ]


#: what `inspect_attention` wrote into its --out folder: an --overwrite deletes those files, and no others
MANIFEST = "inspect-manifest.json"
# the files of a report written before manifests existed (metrics.json, report.md and these pictures)
_OWN_PICTURES = ("curves.png", "rollout_img*.png", "cls_maps_*_img*.png", "heads_*.png", "queries_*_img*.png")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to write the report into, removed whatever happens (Ctrl-C
    included): an interrupted inspection leaves ``out`` as it was. Siblings left by a killed run go too."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _previous_report(out: Path) -> list[str]:
    """The files an earlier inspection wrote into ``out``: its manifest's list (plain names only), or for a
    report from before manifests, its own names (metrics.json, report.md, the pictures it draws)."""
    manifest = out / MANIFEST
    if manifest.exists():
        names = []
        with contextlib.suppress(OSError, ValueError, AttributeError):
            names = json.loads(manifest.read_text()).get("files", [])
        return [n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")]
    if not (out / "metrics.json").exists():
        return []
    own = {"metrics.json", "report.md"}
    for pattern in _OWN_PICTURES:
        own.update(p.name for p in out.glob(pattern))
    return sorted(own)


def _publish(tmp: Path, out: Path, names: Sequence[str], overwrite: bool = False) -> None:
    """Move the report from ``tmp`` into ``out``: one rename when ``out`` does not exist; else file by file
    (each replace atomic), deleting what the previous inspection wrote (``overwrite``; else its manifest,
    claimed first, refuses an inspection that wrote there meanwhile) and nothing of the user's own,
    metrics.json last (its presence is what marks a finished report)."""
    atomic_write_json(tmp / MANIFEST, {"files": [*names, MANIFEST]})
    if not out.exists():
        try:
            return os.replace(tmp, out)
        except OSError as e:  # a folder made meanwhile, with files in it: never replaced by a rename
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    previous = _previous_report(out)
    # the user's own files under a report's name (a picture's: only known once drawn)
    if own := [n for n in names if n not in previous and (out / n).exists()]:
        raise PathExistsError(
            f"{out} holds files of its own that the report would replace ({', '.join(own)}); choose another --out"
        )
    if not overwrite:
        claim_new_file(out / MANIFEST, "inspection")
    new = [n for n in names if n != "metrics.json"] + [MANIFEST, "metrics.json"]
    stale = [n for n in previous if n not in new]
    for name in new[:-1]:
        os.replace(tmp / name, out / name)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    os.replace(tmp / "metrics.json", out / "metrics.json")


def _student_names(specs: Sequence[str]) -> list[str]:
    names = []
    for spec in specs:
        base = Path(spec.split(":", 1)[-1].rstrip("/")).name or spec
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def inspect_attention(
    teacher: str,
    students: Sequence[str],
    *,
    images: Sequence[str | Path] = (),
    data: str | None = None,
    data_root: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    split: str = "val",
    num_images: int = 64,
    out: str | Path | None = None,
    overwrite: bool = False,
    pretrained: bool = True,
    teacher_arch: str | None = None,
    student_arch: str | None = None,
    batch_size: int = 16,
    picture_images: int = 1,
    seed: int = 0,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Load ``teacher`` and ``students`` (specs), measure on ``images`` (files) or ``data`` (made with
    ``data_options``, the dataset's own; neither: the data the first student given as a run was trained on),
    write the report under ``out`` (if given); returns the metrics.json dict. ``pretrained=False``: random
    weights (``seed`` for the teacher, seed+1, ... for the students). ``img_size`` defaults to the size the
    trained students were trained at, where they agree, else the teacher's. ``mean``/``std``: the teacher's
    input normalisation (every model is given the teacher's), in place of its pretrained config's."""
    # a study's folder stands for its students, in the study's order, but those that saved no checkpoint (a
    # conversion's student: its stage 2)
    given, students = students, []
    for spec in given:
        runs = RunDir(spec).study_runs()
        for run in runs or [spec]:
            final = RunDir(run / STAGE_DIRS[-1]) if runs and RunDir(run).is_conversion() else RunDir(run)
            if runs and final.latest(verify_hash=False) is None:
                say(f"{run}: left out, its student saved no checkpoint")
            else:
                students.append(str(run))
    if not students:
        raise InputError("name at least one student to inspect against the teacher")
    if (mean is None) != (std is None):
        raise InputError("--mean and --std normalise the teacher's images together: give both")
    if data_options and data is None:  # a run folder's own data would take their place without a word
        raise InputError("--data-kwargs are options of the dataset --data names: give --data NAME")
    if out is not None:
        refuse_file_in_the_way(out, "--out")
        refuse_unwritable(out, "--out")
        model = is_exported_model(Path(out)) and "an exported model, which --push-to-hub uploads whole"
        if what := in_run_folder(out) or model:
            raise PathExistsError(f"--out={out} is {what}: choose another --out (runs/inspect, the default)")
    if out is not None and (Path(out) / "metrics.json").exists() and not overwrite:
        raise PathExistsError(
            f"{out} already holds an inspection (metrics.json); choose another --out or pass --overwrite"
        )
    own = [name for name in ("report.md", MANIFEST, "curves.png") if out and (Path(out) / name).exists()]
    if own and not (Path(out) / "metrics.json").exists():  # no inspection's files: the user's own
        raise PathExistsError(
            f"{out} holds files of its own that a report would replace ({', '.join(own)}); choose another --out"
        )
    trained = {spec: px for spec in students if (px := trained_size(spec)) is not None}
    if len(set(trained.values())) > 1:  # each runs at its own size, the teacher with it: no one size for all
        named = ", ".join(f"{spec} at {px} px" for spec, px in trained.items())
        raise InputError(
            f"the students were trained at different image sizes ({named}), and a trained student is inspected "
            "at its own size, beside the teacher rebuilt there: inspect them separately, one `attnxfer inspect` "
            "per size"
        )
    size = img_size or next(iter(trained.values()), None)
    torch.manual_seed(seed)
    try:
        t = load_model(teacher, pretrained=pretrained, arch=teacher_arch, img_size=size, role="teacher")
        token_layout(t.model)  # a family with no adapter, or a refused one (DiffAttention): one message, here
        chans = input_size(t.model)[1]
        if mean is not None and std is not None:
            if len(mean) != chans or len(std) != chans:
                raise InputError(
                    f"--mean and --std need {chans} values each, one per channel of the teacher {t.spec}'s "
                    f"images; got {len(mean)} and {len(std)}"
                )
            t = dataclasses.replace(t, mean=tuple(mean), std=tuple(std), stats_guessed=False)
        loaded: dict[str, LoadedModel] = {}
        for k, (name, spec) in enumerate(zip(_student_names(students), students), start=1):
            torch.manual_seed(seed + k)
            loaded[name] = load_model(
                spec, teacher=t, pretrained=pretrained, arch=student_arch, img_size=size
            )
            token_layout(loaded[name].model)
        # unknown statistics: a run's own (its data.mean/std, which fed its teacher), else refused, since the
        # wrong ones would skew every figure without a sign
        ran = next((s for s in loaded.values() if s.run is not None and s.mean and s.std), None)
        if t.stats_guessed and pretrained and ran is not None:
            say(
                f"teacher {t.spec}: its images normalised as the run {ran.spec} normalised them (its data.mean/std)"
            )
            t = dataclasses.replace(t, mean=ran.mean, std=ran.std, stats_guessed=False)
        if t.stats_guessed and pretrained:
            guess = [" ".join(f"{v:g}" for v in vs) for vs in (t.mean, t.std)]
            raise InputError(
                f"teacher {t.spec} has no preprocessor_config.json beside its config.json, so the mean/std its "
                f"weights were trained with are unknown: give them as --mean and --std (timm's defaults for its "
                f"architecture: --mean {guess[0]} --std {guess[1]}), or put the model's preprocessor_config.json "
                "beside its config.json"
            )
    except ImageSizeError as err:
        if img_size is not None or not trained:
            raise err.restated("--img-size") from None
        # the size a trained student keeps, which no other --img-size changes
        raise InputError(
            f"{next(iter(trained))} was trained at {size} px, the size every model is inspected at beside it: "
            f"{err}. Inspect it with a teacher that runs at {size} px"
        ) from None
    # every model runs at the teacher's image size (maps are compared token by token), else one message
    want, want_chans = image_input(t.model).img_size, input_size(t.model)[1]
    _, _, mean, std = _input_settings(t)
    for s in loaded.values():
        got, chans = image_input(s.model).img_size, input_size(s.model)[1]
        if want is not None and got is not None and got != want:
            raise InputError(
                f"{s.spec} runs at {got[0]} px, the teacher {t.spec} at {want[0]} px: pass --img-size "
                f"{got[0]} to rebuild the teacher (and every model loaded as one) there"
            )
        if chans != want_chans:  # both see the same images, prepared the teacher's way
            raise InputError(
                f"{s.spec} takes {chans}-channel images, the teacher {t.spec} {want_chans}-channel ones: "
                "inspect a student with a teacher of the same input (the teacher it was trained from)"
            )
        # prepared the teacher's way too: a student trained on other statistics (data.mean, data.std) is
        # measured on inputs it never saw, which no figure of the report shows (random weights saw none)
        other = [
            f"{k} [{', '.join(f'{v:.4g}' for v in own)}] against [{', '.join(f'{v:.4g}' for v in theirs)}]"
            for k, own, theirs in (("mean", s.mean, mean), ("std", s.std, std))
            if pretrained and own and not s.stats_guessed and statistics_differ(own, theirs)
        ]
        if other:
            warn(
                f"warning: {s.spec} was trained on images normalised otherwise than the teacher {t.spec}'s "
                f"({'; '.join(other)}): every model is given the teacher's, so {s.spec}'s maps are measured on "
                "inputs it was not trained on"
            )
    # neither files nor a dataset: the data the first student given as a run was trained on, as the run
    # made it (its data.kwargs and data seed: a recall task's glyphs depend on them)
    runs = [s.run for s in loaded.values() if s.run is not None]
    # the settings the user gave as flags, by the config keys a dataset's refusals name them by
    given_root = data_root
    flags = {"data.root": "--data-root"} if data_root is not None else {}
    flags.update({"data.dataset": "--data"} if data is not None else {})
    flags.update({"data.kwargs.": "--data-kwargs ", "data.kwargs": "--data-kwargs"} if data_options else {})
    from_runs = bool(runs) and not images and data is None
    if from_runs:
        made = [(run, _data_settings(config_as_trained(run, "inspect"), data_root)) for run in runs]
        data, data_root, data_options = _dataset_call(made[0][1])
        whose = "the students' run" if len(runs) == 1 else runs[0].path
        say(f"images: {data}'s {split} split as {whose} made it (the data it was trained on)")
    if "data.root" in flags and data is not None and not dataset_reads_root(data):  # else dropped unsaid
        raise InputError(
            f"--data-root {given_root} is unused: {data} generates its images and reads no folder; drop it"
        )
    try:
        x = load_images(
            t,
            files=images,
            data=data,
            data_root=data_root,
            split=split,
            num_images=num_images,
            data_options=data_options,
        )
    except UserError as err:
        _name_flags(err, flags)
        raise
    if from_runs:
        _warn_of_other_data(t, made, x, split=split, num_images=num_images)
    subjects = {n: s.subject for n, s in loaded.items()}
    insp = inspect_models(t.model, subjects, x, batch_size=batch_size, **settings)
    if out is not None:
        with _staging(Path(out)) as tmp:
            written = write_report(tmp, insp, t, loaded, x, picture_images=picture_images)
            _publish(tmp, Path(out), [p.name for p in written], overwrite)
    specs = {"teacher": t.spec, "students": {n: s.spec for n, s in loaded.items()}}
    return json_safe({"specs": specs, **dataclasses.asdict(insp)})


#: the keys a run's data seed comes from
_SEED_KEYS = "data.seed (else seed)"


def _data_settings(cfg: TrainConfig, data_root: str | None) -> dict[str, Any]:
    """The settings a run's images are made with, by the config keys that set them: its dataset, root (none
    for a dataset that reads no folder; ``data_root``, --data-root, instead of the run's), data seed (its
    data.seed, else its seed) and data.kwargs."""
    dataset = cfg.data.dataset
    root = (data_root or cfg.data.root) if dataset_reads_root(dataset) else None
    kwargs = {f"data.kwargs.{k}": v for k, v in cfg.data.kwargs.items()}
    return {"data.dataset": dataset, "data.root": root, _SEED_KEYS: data_seed(cfg), **kwargs}


def _dataset_call(settings: Mapping[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """`load_images`' data, data_root and data_options of `_data_settings`' ``settings``."""
    kwargs = {k.removeprefix("data.kwargs."): v for k, v in settings.items() if k.startswith("data.kwargs.")}
    return settings["data.dataset"], settings["data.root"], {"seed": settings[_SEED_KEYS], **kwargs}


def _warn_of_other_data(
    teacher: LoadedModel, made: Sequence[tuple[RunDir, Mapping[str, Any]]], x: torch.Tensor, **how: Any
) -> None:
    """Every student is measured on ``x``, made with the first run's data settings: a warning for each other
    run whose own settings make other images, naming the keys, both values and the run whose images are
    used. Settings that differ but make the same images (the seed of a folder's val split, which it does
    not augment; a longer synthetic split) are no difference; data that cannot be read here is one."""
    (first, want), *others = made
    for run, got in others:
        keys = [k for k in {**want, **got} if want.get(k) != got.get(k)]
        if not keys:
            continue
        data, root, options = _dataset_call(got)
        try:
            theirs = load_images(teacher, data=data, data_root=root, data_options=options, **how)
        except UserError:  # its data cannot be read here: nothing shows it made the same images
            theirs = None
        if theirs is not None and theirs.shape == x.shape and torch.equal(theirs, x):
            continue
        differ = "; ".join(f"{k}: {want.get(k)} in {first.path}, {got.get(k)} in {run.path}" for k in keys)
        warn(
            f"warning: {run.path} made its data otherwise than {first.path} ({differ}): every student is "
            f"measured on the images {first.path}'s settings make, not those {run.path} was trained and "
            f"evaluated on; give --data (and --data-root) to choose the images for all, or inspect {run.path} "
            "on its own"
        )


def _name_flags(err: UserError, flags: Mapping[str, str]) -> None:
    """``err`` of a dataset made to name its config keys (``data.root=PATH``) as the flags the user gave them
    with (``--data-root PATH``): a dataset's refusals name the key a run sets, which inspect's user never
    wrote. Its type and traceback stay."""
    message = str(err)
    for key, flag in flags.items():
        message = re.sub(rf"\b{re.escape(key)}=", f"{flag} ", message)
        message = re.sub(rf"\b{re.escape(key)}\b", flag, message)
    err.args = (message,)


def demo_agreement(out: str | Path, teacher_dir: str | Path, runs: Mapping[str, str | Path]) -> Path:
    """The demo's per-layer agreement of each student run with its teacher: ``out/agreement.png``, and a
    sentence of what it shows (agreement.md, printed)."""
    out = Path(out)
    teacher = load_model(f"local-dir:{teacher_dir}", role="teacher")
    students = {label: load_model(str(run_dir), teacher=teacher) for label, run_dir in runs.items()}
    x = load_images(teacher, data="animal_mnist", num_images=64)
    insp = inspect_models(teacher.model, {n: s.subject for n, s in students.items()}, x)
    sentence = agreement_sentence(insp)
    path = out / "agreement.png"
    save_figure(
        agreement_figure(insp, title="students against the teacher, per layer (animal-mnist val)"), path
    )
    atomic_write_text(out / "agreement.md", f"# Attention agreement with the teacher\n\n{sentence}\n")
    atomic_write_json(out / "agreement.json", json_safe(dataclasses.asdict(insp)))
    say(f"[demo] attention: {sentence}")
    return path
