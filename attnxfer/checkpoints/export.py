"""Students back to the Hub: timm's format, a model card, the teacher's licence.

`export_student` writes what ``timm.models.save_for_hf`` writes (config.json with the
architecture and its construction arguments, model.safetensors) plus a README model card.
A softmax student is first rebuilt as a *plain* timm model (timm's own `Attention`, no
attnxfer class anywhere) and checked to give bit-identical logits, so what is exported is
exactly what ``timm.create_model("local-dir:OUT", pretrained=True)`` will rebuild.

`export_run` does the same from a run directory (config.yaml, run.json, metrics.jsonl,
checkpoints/step-*/{model,ema}.safetensors).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models.vision_transformer import VisionTransformer

from ..analysis.intervals import correct_count, top1_interval
from ..errors import InputError, PathExistsError
from ..models.student import (
    SOFTMAX,
    per_block_attention,
    student_from_spec,
    student_spec,
    timm_args_from_traits,
    vit_traits,
)
from ..sources.teacher import TeacherRecord, hub_reachable
from ..transfer.plan import MODES
from ..version import __version__
from .run_dir import CheckpointChoice, ExportWeights, RunDir, _choice, select_checkpoint
from .store import _owner_is_alive, _owner_tag

__all__ = [
    "EXPORT_FILES",
    "CheckpointChoice",
    "ExportWeights",
    "ModelCardInfo",
    "card_license",
    "export_run",
    "export_student",
    "push_export",
    "render_model_card",
    "select_checkpoint",
]

_logger = logging.getLogger(__name__)

# What an export folder holds (and what overwrite=True replaces).
EXPORT_FILES = ("config.json", "model.safetensors", "README.md", "pytorch_model.bin")


@dataclass
class ModelCardInfo:
    """What the model card says beyond the model itself.

    ``teacher`` is the run's `TeacherRecord` (or its dict); ``plan`` the printed transfer plan;
    ``recipe`` the resolved config YAML; ``license`` defaults to the teacher's, and a
    non-commercial teacher licence cannot be replaced (the student inherits it).
    """

    model_name: str
    teacher: dict[str, Any] | None = None
    transfer_mode: str | None = None
    plan: str | None = None
    recipe: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data: str | None = None
    description: str | None = None
    license: str | None = None
    checkpoint: str | None = None
    repo_id: str | None = None
    tags: tuple[str, ...] = ()
    #: the training/validation data as the Hub names it (``datasets`` in the card's metadata, and the
    #: dataset of its ``model-index`` results); None: not recorded
    dataset: str | None = None
    #: which metrics score the exported weights: ``val`` (raw) or ``ema_val`` (``{prefix}_top1``, ``_count``)
    eval_prefix: str = "val"

    def __post_init__(self):
        if isinstance(self.teacher, TeacherRecord):
            self.teacher = self.teacher.to_dict()


# --------------------------------------------------------------------------------------------
# Licence


def _non_commercial(license_id: str) -> bool:
    return bool(re.search(r"(^|[-_ ])nc([-_ ]|$)", license_id.lower()))


def _teacher_name(teacher: dict[str, Any] | None) -> str:
    if not teacher:
        return "(no teacher recorded)"
    if teacher.get("hf_repo"):
        commit = teacher.get("hf_commit")
        return f"{teacher['hf_repo']}" + (f"@{commit}" if commit else "")
    return str(teacher.get("spec") or teacher.get("architecture"))


def card_license(card: ModelCardInfo) -> tuple[str, str]:
    """(licence id for the card's metadata, the sentence that explains it).

    A student trained from a teacher's weights is a derivative of them: it inherits the
    teacher's licence by default, and a non-commercial one (MAE's CC-BY-NC-4.0) cannot be dropped.
    """
    teacher = card.teacher or {}
    tl = teacher.get("license")
    name = _teacher_name(teacher)
    if tl and _non_commercial(tl):
        if card.license and card.license.lower() != tl.lower():
            raise InputError(
                f"the teacher {name} is licensed {tl} (non-commercial); a student trained from it "
                f"inherits that licence and cannot be released as {card.license!r}. Drop license= "
                "or train from a teacher whose licence allows it"
            )
        return tl.lower(), (
            f"The teacher's weights ({name}) are licensed **{tl.upper()}**. This student was trained "
            f"from them by attention transfer and **inherits that licence: {tl.upper()}** "
            "(non-commercial use only)."
        )
    if card.license:
        note = (
            f" The teacher ({name}) is licensed {tl}."
            if tl
            else f" The teacher's licence ({name}) was not recorded: check its terms."
        )
        return card.license.lower(), f"Released under {card.license}.{note}"
    if tl:
        return (
            tl.lower(),
            f"The teacher's weights ({name}) are licensed {tl}; this student inherits that licence ({tl}).",
        )
    return "other", (
        f"The teacher's licence ({name}) is unknown: check the teacher's terms before using or "
        "redistributing this model, which was trained from it."
    )


# --------------------------------------------------------------------------------------------
# Model card


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _eval_results(card: ModelCardInfo) -> list[EvalResult]:
    """The card's ``model-index``: top-1 (with its 95 % Wilson interval when the image count is recorded)
    and top-5 of the exported weights on the validation split, from the run's metrics."""
    metrics, prefix = card.metrics, card.eval_prefix
    top1 = metrics.get(f"{prefix}_top1")
    if top1 is None:
        return []
    dataset = card.dataset or "unknown"
    common = dict(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=dataset,
        dataset_name=dataset,
        dataset_split="validation",
    )
    n = int(metrics.get(f"{prefix}_count") or 0)
    name, args = "top-1 accuracy (%)", None
    if n:
        lo, hi = top1_interval(correct_count(top1, n), n)
        name = f"top-1 accuracy (%), 95% Wilson interval [{lo:.2f}, {hi:.2f}] on {n} images"
        args = {"interval_95_wilson": [round(float(lo), 4), round(float(hi), 4)], "images": n}
    out = [
        EvalResult(
            metric_type="accuracy", metric_name=name, metric_value=float(top1), metric_args=args, **common
        )
    ]
    if metrics.get(f"{prefix}_top5") is not None:
        out.append(
            EvalResult(
                metric_type="top-5 accuracy",
                metric_name="top-5 accuracy (%)",
                metric_value=float(metrics[f"{prefix}_top5"]),
                **common,
            )
        )
    return out


def _card_data(card: ModelCardInfo, license_id: str, tags: list[str]) -> ModelCardData:
    """The card's metadata through huggingface_hub (what the Hub reads: licence, library, tags, base model,
    datasets, and the ``model-index`` of eval results)."""
    teacher = card.teacher or {}
    results = _eval_results(card)
    return ModelCardData(
        license=license_id,
        library_name="timm",
        pipeline_tag="image-classification",
        tags=tags,
        base_model=teacher.get("hf_repo") or None,
        datasets=[card.dataset] if card.dataset else None,
        model_name=card.model_name if results else None,
        eval_results=results or None,
    )


def render_model_card(
    card: ModelCardInfo,
    spec: dict[str, Any],
    *,
    loads_in_plain_timm: bool,
    load_ref: str,
    native_arch: bool = True,
) -> str:
    """README.md text: metadata, licence, teacher, transfer, student, data, metrics, recipe, how to load."""
    license_id, license_text = card_license(card)
    teacher = card.teacher or {}
    tags = ["image-classification", "timm", "attnxfer", "attention-transfer", *card.tags]
    if card.transfer_mode and "distill" in card.transfer_mode:
        tags.append("knowledge-distillation")
    data = _card_data(card, license_id, list(dict.fromkeys(tags)))
    kind = attention_label(spec.get("attention", SOFTMAX))
    data_cfg = spec.get("pretrained_cfg", {})
    out: list[str] = [f"# {card.model_name}\n\n"]
    out.append(
        card.description
        or (
            f"A {spec['architecture']} student trained by attention transfer "
            f"({card.transfer_mode or 'mode not recorded'}) from the teacher {_teacher_name(teacher)}, with attnxfer."
        )
    )
    out.append("\n## License\n\n" + license_text + "\n")

    out.append("\n## Teacher\n\n| field | value |\n|---|---|\n")
    rows = [
        ("id", teacher.get("spec")),
        ("architecture", teacher.get("architecture")),
        ("source", teacher.get("source")),
        ("Hub repo", teacher.get("hf_repo")),
        ("revision", teacher.get("hf_revision")),
        ("commit", teacher.get("hf_commit")),
        ("weights sha256", teacher.get("sha256")),
        ("license", teacher.get("license") or "unknown"),
        ("mean / std", f"{teacher.get('mean')} / {teacher.get('std')}" if teacher.get("mean") else None),
        ("dropped checkpoint keys", len(teacher.get("dropped_keys") or []) or None),
        ("resampled position embeddings", teacher.get("resampled_pos_embed") or None),
    ]
    out.append("".join(f"| {k} | `{_fmt(v)}` |\n" for k, v in rows if v not in (None, "", [])))

    out.append(f"\n## Transfer\n\nMode: **{card.transfer_mode or 'not recorded'}**\n")
    if card.plan:
        out.append(f"\nTransfer plan:\n\n```text\n{card.plan.rstrip()}\n```\n")

    out.append(
        f"\n## Student\n\n- architecture: `{spec['architecture']}`\n- attention: `{kind}`\n"
        f"- classes: {spec.get('num_classes')}\n"
    )
    if card.checkpoint:
        out.append(f"- weights: {card.checkpoint}\n")
    out.append(
        f"\ntimm construction arguments:\n\n```json\n{json.dumps(spec['model_args'], indent=2)}\n```\n"
    )
    if spec.get("attention_options"):
        layout = per_block_attention(spec["attention"], len(spec["attention_options"]))
        out.append(
            "\nAttention per block (name and options):\n\n| block | attention | options |\n|---|---|---|\n"
            + "".join(
                f"| {i} | {name} | `{json.dumps(opts)}` |\n"
                for i, (name, opts) in enumerate(zip(layout, spec["attention_options"]))
            )
        )

    out.append("\n## Training data\n\n" + (card.training_data or "Not recorded: see the recipe.") + "\n")

    out.append("\n## Metrics\n\n")
    for result in data.eval_results or ():
        out.append(
            f"- {result.metric_name} on the {result.dataset_name} validation split: {_fmt(result.metric_value)}\n"
        )
    if data.eval_results:
        out.append("\n")
    if card.metrics:
        out.append(
            "| metric | value |\n|---|---|\n"
            + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in card.metrics.items())
        )
    else:
        out.append("No metrics recorded.\n")

    if card.recipe:
        out.append(
            f"\n## Recipe\n\nThe resolved attnxfer config of the run:\n\n```yaml\n{card.recipe.rstrip()}\n```\n"
        )

    out.append("\n## How to load\n\n")
    if loads_in_plain_timm:
        pre = "" if native_arch else f"import attnxfer  # registers {spec['architecture']} with timm\n"
        out.append(
            (
                ""
                if native_arch
                else f"`{spec['architecture']}` is registered by attnxfer: import it before timm "
                "builds the model.\n\n"
            )
            + "```python\nimport timm\n"
            + pre
            + f'model = timm.create_model("{load_ref}", pretrained=True).eval()\n'
            "cfg = timm.data.resolve_model_data_config(model)\n"
            "transform = timm.data.create_transform(**cfg, is_training=False)\n```\n"
            f"\nInputs are normalised with mean {data_cfg.get('mean')} and std {data_cfg.get('std')} "
            "(the teacher's).\n"
        )
    else:
        out.append(
            f"This student uses **{kind}** attention, which timm does not provide: plain `timm.create_model` "
            f'cannot build it (config.json names `attn_layer: "attnxfer:{kind}"`, so timm stops with an error '
            "instead of loading these weights into softmax attention). Load it with attnxfer, which rebuilds "
            'the student from `config.json["attnxfer"]["student"]` with its attention classes and options:\n\n'
            "```python\nimport timm\nfrom attnxfer import load_student\n\n"
            f'model = load_student("{load_ref}").eval()\n'
            "cfg = timm.data.resolve_model_data_config(model)\n"
            "transform = timm.data.create_transform(**cfg, is_training=False)\n```\n"
        )
    # huggingface_hub writes the metadata (model-index included) and checks that it parses back
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "".join(out)))


# --------------------------------------------------------------------------------------------
# Export


_TIMM_VIT_STAND_IN = (
    "vit_base_patch16_224"  # any timm entrypoint that builds a VisionTransformer from model_args
)


def _is_timm_native(arch: str) -> bool:
    from timm.models import model_entrypoint

    return model_entrypoint(arch).__module__.startswith("timm.")


def _plain_timm_twin(student: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The student rebuilt with timm's own classes only, holding the student's weights."""
    import timm

    cfg = dict(
        spec.get("pretrained_cfg", {}), architecture=spec["architecture"], num_classes=spec["num_classes"]
    )
    for k in ("input_size", "mean", "std"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    twin = timm.create_model(spec["architecture"], pretrained=False, pretrained_cfg=cfg, **spec["model_args"])
    result = twin.load_state_dict(student.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"the student's weights do not fit its plain-timm rebuild {spec['architecture']}: "
            f"missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return twin.eval()


def _rebuilt_from_spec(student: nn.Module, spec: dict[str, Any]) -> nn.Module:
    twin = student_from_spec(spec)
    twin.load_state_dict({k: v.detach().cpu() for k, v in student.state_dict().items()})
    return twin


@torch.no_grad()
def _check_same_logits(student: nn.Module, twin: nn.Module) -> None:
    """Both models, one seeded input, bit-identical outputs (else the export would not be the student)."""
    from timm.models import get_model_input_config

    was_training = student.training
    student.eval()
    try:
        size = get_model_input_config(student)["input_size"]
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        device = next(student.parameters()).device
        twin.to(device).eval()  # same device, same kernels
        a, b = student(x.to(device)).cpu(), twin(x.to(device)).cpu()
    finally:
        student.train(was_training)
        twin.cpu()
    if not torch.equal(a, b):
        raise RuntimeError(
            f"export check failed: the model rebuilt from the export gives different logits (max "
            f"|diff| {(a - b).abs().max().item():.3g}); the student has state its spec does not capture"
        )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PathExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PathExistsError(
            f"{out_dir} is not empty ({sorted(p.name for p in out_dir.iterdir())[:8]}); "
            "choose a new folder or pass overwrite=True (CLI: --overwrite)"
        )


_STAGING_MARK = ".export-"
_LEGACY_STAGING_RE = re.compile(r"^[a-z0-9_]{8}$")  # tempfile.mkdtemp's suffix (attnxfer before the mark)


def _staging_dir(out_dir: Path) -> Path:
    """A hidden folder beside ``out_dir`` (same filesystem: atomic moves) named after its owner process."""
    path = out_dir.parent / f".{out_dir.name}{_STAGING_MARK}{os.urandom(4).hex()}.{_owner_tag()}"
    os.mkdir(path, 0o700)
    return path


def clean_staging(out_dir: Path) -> list[Path]:
    """Remove what killed exports to ``out_dir`` left behind: staging folders whose process is gone (and
    unmarked ones of older versions holding nothing but export files). Returns what was removed."""
    removed = []
    prefix = f".{out_dir.name}"
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
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


def _install(staging: Path, out_dir: Path) -> None:
    """Move a finished export into ``out_dir``, replacing a previous export's files (nothing else)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for f in staging.iterdir():
        os.replace(f, out_dir / f.name)


def export_student(
    student: nn.Module,
    out_dir: str | os.PathLike,
    *,
    card: ModelCardInfo,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``student`` in timm's Hub format (config.json, model.safetensors) plus a README model card.

    Softmax students are saved from a plain-timm twin (``verify`` checks its logits are bit-identical),
    so ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` rebuilds them without attnxfer.
    Efficient-attention students cannot be built by timm: config.json says so (``attnxfer`` block, and an
    ``attn_layer`` timm refuses) and so does the card. ``out_dir`` must be new or empty unless ``overwrite``.
    ``push_to_hub="ORG/NAME"`` uploads the folder afterwards (`push_export`).
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    if card.repo_id is None and push_to_hub:
        card.repo_id = push_to_hub
    license_id, _ = card_license(card)  # a licence conflict fails before anything is written
    spec = student_spec(student)
    kind = attention_label(spec["attention"])
    native = _is_timm_native(spec["architecture"])
    if not native and type(student) is VisionTransformer:
        # An architecture only attnxfer registers (the demo's micro ViTs) is still timm's VisionTransformer:
        # name a timm entrypoint of that class, with arguments read off the modules that pin every choice
        # the entrypoint would otherwise set (the twin's logits are checked bit-identical below).
        traits = vit_traits(student)
        if (traits["block"], traits["mlp_layer"], traits["norm_layer"], traits["act_layer"]) == (
            "Block",
            "Mlp",
            "LayerNorm",
            "GELU",
        ):
            args = {**spec["model_args"], **timm_args_from_traits(traits)}
            spec = dict(
                spec, architecture=_TIMM_VIT_STAND_IN, registered_as=spec["architecture"], model_args=args
            )
            native = True
    plain = kind == SOFTMAX
    teacher = card.teacher or {}
    meta = {
        "pretrained_cfg": {"license": license_id},  # the card's licence, in timm's config too
        "attnxfer": {
            "version": _version(),
            "attention": spec["attention"],
            "loads_in_plain_timm": plain and native,
            "architecture_registered_by": "timm" if native else "attnxfer",
            "transfer_mode": card.transfer_mode,
            "teacher": {
                k: teacher.get(k)
                for k in ("spec", "architecture", "hf_repo", "hf_commit", "sha256", "license")
            },
            "student": dict(spec, pretrained_cfg=dict(spec["pretrained_cfg"], license=license_id)),
        },
    }
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in clean_staging(out_dir):
        _logger.warning("removed %s, left behind by an interrupted export", leftover)
    tmp = _staging_dir(out_dir)
    try:
        if plain:
            twin = _plain_timm_twin(student, spec)
            if verify:
                _check_same_logits(student, twin)
            save_for_hf(twin, tmp, model_config=meta, model_args=spec["model_args"], safe_serialization=True)
        else:
            if verify:  # what `load_student` will build, holding these weights
                _check_same_logits(student, _rebuilt_from_spec(student, spec))
            save_for_hf(
                student,
                tmp,
                model_config=meta,
                safe_serialization=True,
                model_args={**spec["model_args"], "attn_layer": f"attnxfer:{kind}"},
            )
        load_ref = f"hf-hub:{card.repo_id}" if card.repo_id else f"local-dir:{out_dir}"
        readme = render_model_card(
            card, spec, loads_in_plain_timm=plain, load_ref=load_ref, native_arch=native
        )
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _logger.info("exported %s student (%s attention) to %s", spec["architecture"], kind, out_dir)
    if push_to_hub:
        push_export(out_dir, push_to_hub)
    return out_dir


def attention_label(attention: str | list[str]) -> str:
    """A spec's attention as one word: the name every block uses, or ``mixed``."""
    if isinstance(attention, str):
        return attention
    return attention[0] if len(set(attention)) == 1 else "mixed"


def _version() -> str:
    return __version__


def push_export(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add attnxfer student",
) -> str:
    """Upload an export folder to the Hub repo ``repo_id`` (created if needed); returns the commit URL.

    Offline (HF_HUB_OFFLINE=1 or no route to the Hub) it stops at once, saying how to push later.
    """
    from huggingface_hub import HfApi, constants

    out_dir = Path(out_dir)
    later = (
        f"The export in {out_dir} is complete; push it from a machine with internet: "
        f"`hf upload {repo_id} {out_dir} .` (older huggingface_hub: `huggingface-cli upload {repo_id} {out_dir} .`)"
    )
    if constants.is_offline_mode():
        raise RuntimeError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set. {later}")
    if not hub_reachable():
        raise RuntimeError(f"cannot push to {repo_id}: {constants.ENDPOINT} cannot be reached. {later}")
    api = HfApi(token=token, library_name="attnxfer")
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message=commit_message)
    _logger.info("pushed %s to %s", out_dir, repo_id)
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------
# From a run directory


def _step_of(ckpt: Path) -> int:
    m = re.fullmatch(r"step-(\d+)", ckpt.name)
    return int(m.group(1)) if m else -1


def _card_metrics(run: RunDir, ckpt: Path) -> dict[str, Any]:
    state = run.checkpoint_state(ckpt)
    step = state.get("step", _step_of(ckpt))
    if state.get("metrics"):
        return {"step": step, **state["metrics"]}
    rows = run.metric_rows()
    at_step = [r for r in rows if r.get("step") == step]
    return dict((at_step or rows or [{}])[-1])


def _training_data(recipe: str | None) -> str | None:
    if not recipe:
        return None
    import yaml

    cfg = yaml.safe_load(recipe) or {}
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not data:
        return None
    return "```yaml\n" + yaml.safe_dump({"data": data}, sort_keys=False).rstrip() + "\n```"


def _dataset_id(recipe: str | None) -> str | None:
    """The run's dataset as a card names it: a Hub dataset's id (``hfds/ORG/NAME`` -> ``ORG/NAME``), a
    folder dataset's folder name (``/data/imagenet`` -> ``imagenet``), else the registered name."""
    if not recipe:
        return None
    import yaml

    cfg = yaml.safe_load(recipe) or {}
    data = (cfg.get("data") if isinstance(cfg, dict) else None) or {}
    name = data.get("dataset")
    if not isinstance(name, str) or not name:
        return None
    if name.startswith(("hfds/", "hf-hub:")):
        return name.split("/", 1)[1] if name.startswith("hfds/") else name.split(":", 1)[1]
    if name == "folder" and data.get("root"):
        return Path(str(data["root"])).expanduser().name or name
    return name


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: ExportWeights | str = "ema",
    checkpoint: CheckpointChoice | str = "best",
    push_to_hub: str | None = None,
    overwrite: bool = False,
    attn_layer: type | None = None,
) -> Path:
    """Export a run's student (``weights``: ``ema`` or ``raw``; ``checkpoint``: ``best`` or ``latest``).

    Reads run_dir/run.json (teacher record, student spec, plan text, mode), config.yaml (the recipe),
    metrics.jsonl and the chosen checkpoint's safetensors. Copy-mode students are refused: they
    compute attention from the teacher's q/k at inference and do not stand alone.
    """
    run = RunDir(run_dir)
    record = run.record()
    weights = _choice(ExportWeights, weights, "weights")
    mode = record.get("mode")
    if mode in MODES and MODES[mode].teacher_at_eval:
        raise InputError(
            f"run {run.path} trained in mode {mode!r}: its student attends with the teacher's "
            f"{MODES[mode].borrow!r} at inference too, so exported alone it would use untrained "
            "projections. Export a distillation run, or fine-tune this student without the teacher first"
        )
    loaded = run.load_student(checkpoint, weights, attn_layer=attn_layer)
    student, ckpt, why = loaded.model, loaded.checkpoint, loaded.why
    recipe = run.recipe()
    out_dir = Path(out_dir)
    card = ModelCardInfo(
        model_name=(push_to_hub or out_dir.name).split("/")[-1],
        teacher=record.get("teacher"),
        transfer_mode=mode,
        plan=record.get("plan"),
        recipe=recipe,
        metrics=_card_metrics(run, ckpt),
        training_data=_training_data(recipe),
        checkpoint=f"{why}, {weights} weights",
        description=record.get("description"),
        repo_id=push_to_hub,
        dataset=_dataset_id(recipe),
        eval_prefix="ema_val" if weights is ExportWeights.EMA else "val",
    )
    return export_student(student, out_dir, card=card, push_to_hub=push_to_hub, overwrite=overwrite)
