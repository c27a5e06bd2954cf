"""Students back to the Hub in timm's format (``save_for_hf``: config.json, model.safetensors) or as ONNX,
with a model card and the teacher's licence. A softmax student is saved as a *plain* timm model checked
bit-identical, so ``timm.create_model("local-dir:OUT")`` and transformers' timm wrapper rebuild it exactly."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from timm.models.vision_transformer import VisionTransformer

from ..analysis.knn import evaluating
from ..errors import HubUnreachableError, InputError, PathExistsError
from ..hub_reach import hub_reachable
from ..models.attention import require_model
from ..models.handover import Chunks
from ..models.student import (
    SOFTMAX,
    student_from_spec,
    student_shape,
    student_spec,
    timm_args_from_traits,
    vit_traits,
)
from ..run_layout import STAGE_DIRS, read_record
from ..sources.load_errors import copy_student_alone
from ..sources.resolve import weights_digest
from ..speak import debug, warn
from ..transfer import TeacherStudent
from ..transfer.modes import MODES
from ..version import __version__
from .atomic_io import give_normal_mode
from .model_card import (
    ModelCardInfo,
    _recipe_data,
    attention_label,
    card_license,
    render_model_card,
    shape_phrase,
)
from .onnx_export import ONNX_DATA_FILE, ONNX_FILE, require_onnx, write_onnx
from .run_dir import (
    CheckpointChoice,
    ExportWeights,
    RunDir,
    _at_work,
    default_weights,
    select_checkpoint as select_checkpoint,
)
from .run_lock import claim_new_file, in_run_folder, refuse_file_in_the_way, refuse_unwritable
from .store import _owner_is_alive, _owner_tag

# What an export folder holds (and what overwrite=True replaces).
REPORT_FILE = "export_report.json"  # what an ONNX export checked (opset, shapes, max |ORT - torch|)
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "README.md",
    "pytorch_model.bin",
    ONNX_FILE,
    ONNX_DATA_FILE,
    REPORT_FILE,
)

# any timm entrypoint that builds a VisionTransformer from model_args
_TIMM_VIT_STAND_IN = "vit_base_patch16_224"


def _plain_timm_twin(student: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The student rebuilt with timm's own classes only, holding the student's weights."""
    import timm

    cfg = dict(
        spec.get("pretrained_cfg", {}), architecture=spec["architecture"], num_classes=spec["num_classes"]
    )
    cfg |= {k: tuple(cfg[k]) for k in ("input_size", "mean", "std") if k in cfg}
    twin = timm.create_model(spec["architecture"], pretrained=False, pretrained_cfg=cfg, **spec["model_args"])
    result = twin.load_state_dict(student.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"the student's weights do not fit its plain-timm rebuild {spec['architecture']}: "
            f"missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return twin.eval()


@torch.no_grad()
def _check_same_logits(student: nn.Module, twin: nn.Module) -> None:
    """Both models, one seeded input, bit-identical outputs (else the export would not be the student)."""
    from timm.models import get_model_input_config

    try:
        with evaluating(student):
            size = get_model_input_config(student)["input_size"]
            x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
            param = next(student.parameters())  # a bf16 / fp16 student: its twin and input in its dtype
            twin.to(param.device, param.dtype).eval()  # same device, same kernels
            x = x.to(param.device, param.dtype)
            a, b = student(x).cpu(), twin(x).cpu()
    finally:
        twin.cpu()
    if not torch.equal(a, b):
        raise RuntimeError(
            f"export check failed: the model rebuilt from the export gives different logits (max "
            f"|diff| {(a - b).abs().max().item():.3g}); the student has state its spec does not capture"
        )


_STAGING_MARK = ".export-"
_LEGACY_STAGING_RE = re.compile(r"^[a-z0-9_]{8}$")  # tempfile.mkdtemp's suffix (attnxfer before the mark)


def clean_staging(out_dir: Path) -> list[Path]:
    """Remove what killed exports to ``out_dir`` left behind: staging folders whose process is gone (and
    unmarked ones of older versions holding nothing but export files). Returns what was removed."""
    removed = []
    prefix = f".{out_dir.name}"
    for entry in (e for home in (out_dir.parent, out_dir) if home.is_dir() for e in home.iterdir()):
        rest = entry.name[len(prefix) :] if entry.name.startswith(prefix) else None
        if rest is None or not entry.is_dir() or entry.is_symlink():
            continue
        if rest.startswith(_STAGING_MARK):
            if _owner_is_alive(entry.name):  # ends in .PID@HOST: a live export on this host
                continue
        elif not (
            rest.startswith(".")
            and _LEGACY_STAGING_RE.match(rest[1:])
            and {f.name for f in entry.iterdir()} <= set(EXPORT_FILES)
        ):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _install(staging: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Move a finished export into ``out_dir``, replacing a previous export's files (nothing else) where
    ``overwrite``; else its README.md, claimed first, refuses an export that wrote there meanwhile."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in EXPORT_FILES:
            (out_dir / name).unlink(missing_ok=True)
    else:
        claim_new_file(out_dir / "README.md", "export")
    for f in staging.iterdir():
        if f.is_file():
            give_normal_mode(f)  # every file as its neighbours: safetensors writes its own 0600
        os.replace(f, out_dir / f.name)


def export_student(
    student: nn.Module,
    out_dir: str | os.PathLike,
    *,
    card: ModelCardInfo,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    formats: Sequence[str] = ("timm",),
) -> Path:
    """Write ``student`` with a README model card in ``formats``: ``timm`` (config.json, model.safetensors),
    ``onnx`` (model.onnx checked in ONNX Runtime, and export_report.json), or both.

    ``verify``: the model timm (or, for efficient attention, `load_student`) rebuilds gives bit-identical
    logits. ``out_dir`` must be new or empty unless ``overwrite``; ``push_to_hub="ORG/NAME"`` uploads it.
    """
    if isinstance(student, TeacherStudent):  # its spec would be the pair's, which no architecture names
        raise TypeError("export_student exports the student model: pass pair.student, not the TeacherStudent")
    require_model(student)
    # the student of a copy-mode pair attends with its teacher's q/k (its own are frozen, untrained): exported
    # alone it would be another model, as `export_run` refuses a copy run for
    borrowed = Chunks(c for m in student.modules() for c in getattr(m, "borrowed_chunks", ()))
    if borrowed:
        raise InputError(
            f"this student attends with its teacher's {borrowed} (a copy-mode TeacherStudent's), so "
            "exported alone it would use its own untrained projections: export a distilled student, or first "
            "fine-tune it alone, e.g. in a TeacherStudent(teacher, student, mode='none')"
        )
    if not isinstance(card, ModelCardInfo):  # else an AttributeError on the first field read
        raise TypeError(
            f"card: a ModelCardInfo, got {type(card).__name__}: pass "
            "attnxfer.checkpoints.export.ModelCardInfo(model_name=...)"
        )
    out_dir = Path(out_dir)
    formats = _formats(formats)
    _check_repo_id(push_to_hub)
    if card.repo_id is None and push_to_hub:
        card.repo_id = push_to_hub
    license_id, _ = card_license(card)  # a licence conflict fails before anything is written
    spec, native = _export_spec(student)
    shape = student_shape(student)
    meta = _config_block(card, spec, license_id, native=native, shape=shape)
    refuse_file_in_the_way(out_dir, "OUT_DIR")
    refuse_unwritable(out_dir, "OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in clean_staging(out_dir):
        warn(f"removed {leftover}, left behind by an interrupted export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PathExistsError(
            f"{out_dir} is not empty ({sorted(p.name for p in out_dir.iterdir())[:8]}); "
            "choose a new folder or pass --overwrite (from Python: overwrite=True)"
        )
    present = [f for f in EXPORT_FILES if (out_dir / f).is_file()]
    # an earlier export's config.json (timm) or ONNX report holds the attnxfer block every export writes
    ours = any("attnxfer" in read_record(out_dir / name) for name in ("config.json", REPORT_FILE))
    if overwrite and present and not ours:  # a teacher's, or the user's own
        raise PathExistsError(
            f"{out_dir} holds {', '.join(present)} of no earlier export (no attnxfer block in its config.json): "
            "--overwrite replaces an export, not a model or files of your own; choose another folder"
        )
    # the files are staged in a hidden folder named after its owner process, on out_dir's filesystem (atomic
    # moves): inside out_dir where it exists (a mounted volume, a folder in a read-only one), else beside it;
    # then moved in together. A format is one writer of files into it
    home = out_dir if out_dir.is_dir() else out_dir.parent
    tmp = home / f".{out_dir.name}{_STAGING_MARK}{os.urandom(4).hex()}.{_owner_tag()}"
    os.mkdir(tmp, 0o700)
    try:
        reports = {name: FORMATS[name](student, spec, meta, tmp, verify=verify) for name in formats}
        reports = {name: r for name, r in reports.items() if r is not None}
        if reports:  # what each checked format wrote and measured, beside the student's spec
            report = {"formats": list(formats), **reports, "attnxfer": meta["attnxfer"]}
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
        readme = render_model_card(
            card,
            spec,
            shape=shape,
            # the folder by its absolute path: the card's snippets run from any working directory
            load_ref=f"hf-hub:{card.repo_id}" if card.repo_id else f"local-dir:{os.path.abspath(out_dir)}",
            native_arch=native,
            formats=formats,
            onnx=reports.get("onnx"),
        )
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        _install(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    debug(f"exported {meta['attnxfer']['description']} ({formats}) to {out_dir}")
    if push_to_hub:
        push_export(out_dir, push_to_hub)
    return out_dir


def _formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """The requested formats, known and non-empty, checked (with their packages) before any work."""
    formats = (formats,) if isinstance(formats, str) else tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"export format {unknown or formats!r}: choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        require_onnx()
    return formats


def _export_spec(student: nn.Module) -> tuple[dict[str, Any], bool]:
    """(the student's spec as the export names it, whether timm itself registers its architecture). An
    architecture only attnxfer registers (the demo's micro ViTs) is still timm's VisionTransformer: name a
    timm entrypoint of that class, with arguments read off the modules that pin every choice. Its input config
    is timm's view of the model (a teacher's fixed_input_size is not the student's), with a mean and std value
    per input channel (an RGB teacher's mean averaged for a grey student, as timm's loaders do; a grey one's
    repeated), which config.json's pretrained_cfg, written from it, says too."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import get_model_input_config, model_entrypoint

    spec = student_spec(student)
    current = get_model_input_config(student)
    chans, cfg = current["input_size"][0], spec["pretrained_cfg"]
    cfg.update(input_size=list(current["input_size"]), fixed_input_size=current["fixed_input_size"])
    for k, default in (("mean", IMAGENET_DEFAULT_MEAN), ("std", IMAGENET_DEFAULT_STD)):
        v = cfg.get(k, default)
        v = [v] if isinstance(v, (int, float)) else v  # timm takes one number too
        cfg[k] = list(v) if len(v) == chans else [sum(v) / len(v)] * chans
    native = model_entrypoint(spec["architecture"]).__module__.startswith("timm.")
    if native or type(student) is not VisionTransformer:
        return spec, native
    traits = vit_traits(student)
    parts = (traits["block"], traits["mlp_layer"], traits["norm_layer"], traits["act_layer"])
    if parts != ("Block", "Mlp", "LayerNorm", "GELU"):
        return spec, False
    args = {**spec["model_args"], **timm_args_from_traits(traits)}
    return dict(
        spec, architecture=_TIMM_VIT_STAND_IN, registered_as=spec["architecture"], model_args=args
    ), True


def _config_block(
    card: ModelCardInfo, spec: dict[str, Any], license_id: str, *, native: bool, shape: dict[str, Any]
) -> dict[str, Any]:
    """config.json beside timm's keys: licence, class names and the ``attnxfer`` block (the student in words
    and numbers, which `load_student` rebuilds; the teacher by id, never its weights)."""
    teacher = card.teacher or {}
    names = list(card.class_names or ())
    if names and len(names) != spec["num_classes"]:
        raise InputError(
            f"{len(names)} class names for a student of {spec['num_classes']} classes: give one name per class"
        )
    labels = {"label_names": names} if names else {}  # timm's field: index -> class name
    return {
        **labels,
        # the student's input config and the card's licence, as attnxfer.student says them
        "pretrained_cfg": dict(spec["pretrained_cfg"], license=license_id),
        "attnxfer": {
            "version": __version__,
            "description": shape_phrase(shape, spec["attention"]),
            "shape": shape,
            "attention": spec["attention"],
            "loads_in_plain_timm": attention_label(spec["attention"]) == SOFTMAX and native,
            "architecture_registered_by": "timm" if native else "attnxfer",
            "transfer_mode": card.transfer_mode,
            "teacher": {
                k: teacher.get(k)
                for k in ("spec", "architecture", "hf_repo", "hf_commit", "sha256", "license")
            },
            "student": dict(spec, pretrained_cfg=dict(spec["pretrained_cfg"], license=license_id)),
        },
    }


def _write_timm_format(
    student: nn.Module, spec: dict[str, Any], meta: dict[str, Any], folder: Path, *, verify: bool
) -> None:
    """config.json + model.safetensors as ``timm.models.save_for_hf`` writes them: a softmax student from its
    plain-timm twin; an efficient one as itself, with arguments timm (and transformers' wrapper) refuses with
    a message naming `load_student` (and ``attn_layer: attnxfer:KIND``, which `load_teacher` refuses)."""
    from timm.models import save_for_hf

    kind = attention_label(spec["attention"])
    if kind == SOFTMAX:
        model = rebuilt = _plain_timm_twin(student, spec)
        args = spec["model_args"]
    else:
        model, args = student, {**spec["model_args"], "attn_layer": f"attnxfer:{kind}"}
        if verify:  # what `load_student` will build, holding these weights
            rebuilt = student_from_spec(spec)
            rebuilt.load_state_dict({k: v.detach().cpu() for k, v in student.state_dict().items()})
    if verify:
        _check_same_logits(student, rebuilt)
    save_for_hf(model, folder, model_config=meta, model_args=args, safe_serialization=True)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # transformers' timm wrapper builds ``timm.create_model(architecture, num_classes=..., **model_args)``
    # (its own count: 0 for ``AutoModel``): a second ``num_classes`` in ``model_args`` fails the load;
    # timm itself reads the top-level ``num_classes``, so nothing is lost. Rewritten as timm wrote it
    config.get("model_args", {}).pop("num_classes", None)
    if kind != SOFTMAX:
        # the instruction is a keyword argument first in ``model_args``, which the student's timm class refuses
        # by name (``TypeError: ... unexpected keyword argument '...'``) in timm and, passed on as it is, under
        # transformers' wrapper; an architecture name of that sentence gets timm's ``Unknown model (...)``,
        # which the wrapper turns into advice to upgrade timm. No ':', '/' in it (a path's, to that wrapper).
        # The base stays in ``attnxfer.student``; one only attnxfer registers is timm's stand-in ViT here
        why = (
            f"attnxfer student with {kind} attention, which timm and transformers build only as softmax; load it "
            "with attnxfer.load_student, or run model.onnx (attnxfer export --format onnx) in ONNX Runtime"
        )
        try:  # a class that took any keyword would build softmax: that one gets the sentence as its name
            inspect.signature(type(student)).bind_partial(**{why: True})
            config["architecture"] = why
        except TypeError:  # refused by name, as timm and the wrapper will
            native = meta["attnxfer"]["architecture_registered_by"] == "timm"
            config["architecture"] = spec["architecture"] if native else _TIMM_VIT_STAND_IN
            config["model_args"] = {why: True, **config["model_args"]}
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_onnx_format(
    student: nn.Module, spec: dict[str, Any], meta: dict[str, Any], folder: Path, *, verify: bool
) -> dict[str, Any]:
    """model.onnx: the student itself traced, checked in ONNX Runtime whatever ``verify`` says (the check is
    what makes the graph trustworthy), at the input size the model is built for."""
    from timm.models import get_model_input_config

    return write_onnx(
        student, folder, input_size=tuple(get_model_input_config(student)["input_size"])
    ).to_dict()


# Export formats: name -> the writer of its files into the staging folder (returns its report, or None).
FORMATS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "timm": _write_timm_format,
    "onnx": _write_onnx_format,
}


def _check_repo_id(repo_id: str | None) -> None:
    """A Hub repo id the Hub would refuse, refused before the export is written (and named on its card)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id is None:
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f"--push-to-hub {repo_id!r} is not a Hub repo id (ORG/NAME): {e}") from None


def push_export(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add attnxfer student",
) -> str:
    """Upload an export folder to the Hub repo ``repo_id`` (created if needed); returns the commit URL.
    Offline (HF_HUB_OFFLINE=1 or no route to the Hub) it stops at once, saying how to push later."""
    from huggingface_hub import HfApi, constants

    out_dir = Path(out_dir)
    later = (
        f"The export in {out_dir} is complete; push it from a machine with internet: "
        f"`hf upload {repo_id} {out_dir} .` (older huggingface_hub: `huggingface-cli upload {repo_id} {out_dir} .`)"
    )
    if constants.is_offline_mode():
        raise HubUnreachableError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set. {later}")
    if not hub_reachable():
        raise HubUnreachableError(
            f"cannot push to {repo_id}: {constants.ENDPOINT} cannot be reached. {later}"
        )
    api = HfApi(token=token, library_name="attnxfer")
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message=commit_message)
    debug(f"pushed {out_dir} to {repo_id}")
    return str(getattr(info, "commit_url", info))


def _card_metrics(run: RunDir, ckpt: Path) -> dict[str, Any]:
    state = run.checkpoint_state(ckpt)
    named = re.fullmatch(r"step-(\d+)", ckpt.name)
    step = state.get("step", int(named.group(1)) if named else -1)
    if state.get("metrics"):
        row = {"step": step, **state["metrics"]}
    else:  # the row logged at the weights' step, else none: another step's figures would be these weights'
        at_step = [r for r in run.metric_rows() if r.get("step") == step]
        row = at_step[-1] if at_step else {"step": step}
    # a row's epoch counts the epochs trained (1 after the first), which the log's "epoch 0:" line ended; its
    # time is when it was logged, no measure of the model
    return {("epochs trained" if k == "epoch" else k): v for k, v in row.items() if k != "time"}


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: ExportWeights | str | None = None,
    checkpoint: CheckpointChoice | str | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    attn_layer: type | None = None,
    formats: Sequence[str] = ("timm",),
) -> Path:
    """Export a run's student (``weights``: ``ema`` or ``raw``, None: the EMA's where kept; ``checkpoint``:
    ``best`` or ``latest``, None: the run's own, as `RunDir.load_student` picks it; ``formats`` as
    `export_student`) with its record, recipe and metrics on the card.
    Copy-mode students are refused: they compute attention from the teacher's q/k at inference and do not
    stand alone."""
    formats = _formats(formats)  # an unknown format or a missing package stops before anything is read
    _check_repo_id(push_to_hub)
    run = RunDir(run_dir)
    record = run.record()
    # --overwrite would mix the model's files into a run's (this one's, a conversion's, a study's), or replace
    # the run's teacher where that is an attnxfer export too (the demo's MAE teacher): known by its weights, as
    # a relative local-dir: spec names another folder from another working directory
    teacher, held = record.get("teacher") or {}, Path(out_dir) / "model.safetensors"
    what = in_run_folder(out_dir)
    if teacher.get("sha256") and held.is_file() and weights_digest(held) == teacher["sha256"]:
        what = f"the run's teacher ({teacher.get('spec')}), which its resume and eval check by hash"
    if what:
        raise PathExistsError(f"OUT_DIR={out_dir} is {what}: export into {Path(run_dir) / 'export'}")
    mode = record.get("mode")
    if mode in MODES and MODES[mode].teacher_at_eval:
        raise InputError(
            f"run {run.path} trained in mode {mode!r}: its student attends with the teacher's "
            f"{MODES[mode].borrow!r} at inference too, so exported alone it would use untrained "
            f"projections: export a distillation run, or {copy_student_alone(run.path)}"
        )
    loaded = run.load_student(checkpoint, weights, attn_layer=attn_layer)
    # a conversion holds its lock in its own folder, above stage 2's run
    held = next(filter(None, map(_at_work, (run.path, run.path.parent))), None)
    if held is not None:
        warn(
            f"{run.path} is still training ({held}): exporting its checkpoint {loaded.why}; "
            "export again when the run ends for its final weights"
        )
    # a run that stopped (killed, preempted) before its schedule's end: its weights are not its final ones
    newest, total = run.latest(verify_hash=False), record.get("total_steps")
    stopped = held is None and newest is not None and isinstance(total, int) and newest.step < total
    if stopped:
        warn(
            f"{run.path} stopped at step {newest.step} of its {total} and is not running: exporting its "
            f"checkpoint {loaded.why}; run the command that trained it again (it resumes) and export again "
            "for its final weights"
        )
    recipe = run.recipe()
    recipe_cfg = (yaml.safe_load(recipe) if recipe else None) or {}
    recipe_cfg = recipe_cfg if isinstance(recipe_cfg, dict) else {}
    # MAE pre-training's loaders may hand labels out (data.labels: true); its objective reads none, nor does
    # a run without a task loss (transfer.task_weight 0: a label-free distillation or conversion; null is 1)
    task_weight = (recipe_cfg.get("transfer") or {}).get("task_weight")
    labels_read = record.get("objective") != "mae" and task_weight != 0
    # an older attnxfer wrote a transfer: block MAE never reads into a pretrain run's config.yaml (it now
    # leaves the section out): such a folder's card drops it too
    if recipe and record.get("objective") == "mae":
        recipe = re.sub(r"(?m)^transfer:\n(?:[ -].*\n)*", "", recipe)
    training_data, dataset = _recipe_data(recipe_cfg, labels_read=labels_read)
    # a fine-tuned student's spec keeps model.init's pretrained_cfg, and with it the licence of those weights
    init = (recipe_cfg.get("model") or {}).get("init")
    init_license = (record.get("student") or {}).get("pretrained_cfg", {}).get("license")
    # a conversion's final student (its stage 2): the card tells the whole conversion, from its report.json
    conversion = None
    if run.path.name == STAGE_DIRS[-1] and RunDir(run.path.parent).is_conversion():
        logits = (recipe_cfg.get("transfer") or {}).get("logit_distill")
        conversion = {**read_record(run.path.parent / "report.json"), "logit_distill": logits}
        # convert measured the weights an export takes by default: other ones (--checkpoint latest, --weights
        # raw) are not credited with its top-1, k-NN and feature figures
        default, _ = run.student_checkpoint(quiet=True)
        if (loaded.checkpoint, loaded.weights) != (default, default_weights(default)):
            conversion["measured_other"] = (conversion.get("stage2") or {}).get("measured") or "not recorded"
    out_dir = Path(out_dir)
    # named after the folder (absolute: `export RUN .` is not ''), or after the run where it is the run's export/
    # (pretrain's, the one a refusal points to), a conversion's after the conversion
    home, named = run.path.parent if conversion is not None else run.path, Path(os.path.abspath(out_dir))
    if named.name == "export" and named.parent in {Path(os.path.abspath(p)) for p in (run.path, home)}:
        named = Path(os.path.abspath(home))
    card = ModelCardInfo(
        model_name=(push_to_hub or named.name).split("/")[-1],
        teacher=record.get("teacher"),
        transfer_mode=mode,
        plan=record.get("plan"),
        recipe=recipe,
        metrics=_card_metrics(run, loaded.checkpoint),
        training_data=training_data,
        checkpoint=f"{loaded.why}, {loaded.weights} weights"
        + (f", of a run that stopped at step {newest.step} of {total} (unfinished)" if stopped else "")
        + (", of a run that was still training (unfinished)" if held else ""),
        description=record.get("description"),
        repo_id=push_to_hub,
        dataset=dataset,
        eval_prefix="ema_val" if loaded.weights is ExportWeights.EMA else "val",
        class_names=_class_names(record, loaded.model),
        init={"spec": init, "license": init_license} if init else None,
        conversion=conversion,
    )
    return export_student(
        loaded.model, out_dir, card=card, push_to_hub=push_to_hub, overwrite=overwrite, formats=formats
    )


def _class_names(record: dict[str, Any], student: nn.Module) -> list[str] | None:
    """The run's class names where they name the student's outputs: one per class of its head. A headless
    student (an encoder converted on labelled images) has none to name, whatever its data had."""
    names = record.get("class_names")
    classes = getattr(student, "num_classes", 0)
    return names if names and classes and len(names) == classes == record.get("num_classes") else None
