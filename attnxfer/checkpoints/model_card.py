"""The model card an export writes (README.md): what the student is, what it was trained from and on,
its licence (the teacher's, inherited where it is non-commercial) and its evaluation results."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.data import DEFAULT_CROP_PCT

from ..analysis.intervals import correct_count, top1_interval
from ..errors import InputError
from ..models.student import SOFTMAX, per_block_attention
from ..sources.teacher import TeacherRecord


@dataclass
class ModelCardInfo:
    """What the model card says beyond the model itself. ``teacher``: the run's `TeacherRecord` (or its
    dict); ``plan``: the printed transfer plan; ``recipe``: the resolved config YAML; ``license`` defaults to
    the teacher's (or ``init``'s), and a non-commercial one cannot be replaced (the student inherits it)."""

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
    #: the classifier's class names by index (config.json's ``label_names``, as timm's ``save_for_hf`` writes)
    class_names: Sequence[str] | None = None
    #: ``model.init``'s weights the student was fine-tuned from (``spec``, ``license``): its licence binds too
    init: dict[str, Any] | None = None
    #: where the student is a conversion's final one (``transfer_mode`` is then its stage 2's): the conversion's
    #: report.json ({} where none was written), ``logit_distill``, stage 2's weight, and ``measured_other``: the
    #: weights report.json measured where the export took other ones; None for any other
    conversion: dict[str, Any] | None = None

    def __post_init__(self):
        if isinstance(self.teacher, TeacherRecord):
            self.teacher = self.teacher.to_dict()


def _teacher_name(teacher: dict[str, Any] | None) -> str:
    if not teacher:
        return "(no teacher recorded)"
    if teacher.get("hf_repo"):
        commit = teacher.get("hf_commit")
        return f"{teacher['hf_repo']}" + (f"@{commit}" if commit else "")
    return str(teacher.get("spec") or teacher.get("architecture"))


def card_license(card: ModelCardInfo) -> tuple[str, str]:
    """(licence id for the card's metadata, the sentence that explains it). A student trained from a
    teacher's weights, or fine-tuned from ``model.init``'s, is a derivative of them: it inherits their licence
    by default, and a non-commercial one (MAE's CC-BY-NC-4.0) cannot be dropped."""
    sources = []  # (the weights it derives from, their licence); the Hub's "other"/"unknown" name none
    if card.teacher:
        sources.append(
            (f"The teacher's weights ({_teacher_name(card.teacher)})", card.teacher.get("license"))
        )
    if card.init:
        sources.append(
            (f"The weights it was fine-tuned from ({card.init['spec']})", card.init.get("license"))
        )
    sources = [(what, None if tl and tl.lower() in ("other", "unknown") else tl) for what, tl in sources]
    for what, tl in sources:
        if tl and re.search(r"(^|[-_ ])nc([-_ ]|$)", tl.lower()):  # a non-commercial licence
            if card.license and card.license.lower() != tl.lower():
                raise InputError(
                    f"{what} are licensed {tl} (non-commercial); a student trained from them inherits that "
                    f"licence and cannot be released as {card.license!r}. Drop license= or train from weights "
                    "whose licence allows it"
                )
            return tl.lower(), (
                f"{what} are licensed **{tl.upper()}**. This student was trained from them and **inherits "
                f"that licence: {tl.upper()}** (non-commercial use only)."
            )
    unknown = "".join(
        f" {what} have no recorded licence: check their terms." for what, tl in sources if not tl
    )
    licensed = [(what, tl) for what, tl in sources if tl]
    if card.license:
        known = "".join(f" {what} are licensed {tl}." for what, tl in licensed)
        return card.license.lower(), f"Released under {card.license}.{known}{unknown}"
    if licensed:
        what, tl = licensed[0]
        rest = "".join(f" {what} are licensed {tl}." for what, tl in licensed[1:])
        return (
            tl.lower(),
            f"{what} are licensed {tl}; this student inherits that licence ({tl}).{rest}{unknown}",
        )
    if not sources:  # trained from scratch, or MAE pre-training: no weights it derives from
        return "other", (
            "No licence was set (the metadata's `other`): check the terms of the data it was trained on."
        )
    return "other", f"{unknown.strip()[:-1]} before using or redistributing this model, trained from them."


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


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
            metric_type="accuracy", metric_value=float(top1), metric_name=name, metric_args=args, **common
        )
    ]
    if metrics.get(f"{prefix}_top5") is not None:
        top5 = float(metrics[f"{prefix}_top5"])
        out.append(
            EvalResult(
                metric_type="top-5 accuracy", metric_value=top5, metric_name="top-5 accuracy (%)", **common
            )
        )
    return out


def render_model_card(
    card: ModelCardInfo,
    spec: dict[str, Any],
    *,
    shape: dict[str, Any] | None = None,
    load_ref: str,
    native_arch: bool = True,
    formats: Sequence[str] = ("timm",),
    onnx: dict[str, Any] | None = None,
) -> str:
    """README.md text: metadata, licence, teacher, transfer, student, data, metrics, recipe, how to load
    (each format written; ``onnx`` is the ONNX export's report). ``shape`` (`student_shape`) names what the
    student is rather than the architecture it came from."""
    license_id, license_text = card_license(card)
    teacher = card.teacher or {}
    # a headless encoder (an MAE's, a label-free conversion's) hands out features, not classes
    task = "image-classification" if spec.get("num_classes") else "image-feature-extraction"
    tags = [task, "timm", "attnxfer", "attention-transfer", *card.tags]
    if card.conversion is not None or (card.transfer_mode and "distill" in card.transfer_mode):
        tags.append("knowledge-distillation")
    results = _eval_results(card)
    # what the Hub reads: licence, library, tags, base model, datasets, and the ``model-index`` of results
    data = ModelCardData(
        license=license_id,
        library_name="timm" if "timm" in formats else "onnx",
        pipeline_tag=task,
        tags=list(dict.fromkeys(tags)) + (["onnx"] if "onnx" in formats else []),
        base_model=teacher.get("hf_repo") or None,
        datasets=[card.dataset] if card.dataset else None,
        model_name=card.model_name if results else None,
        eval_results=results or None,
    )
    what = (
        shape_phrase(shape, spec.get("attention", SOFTMAX)) if shape else f"a {spec['architecture']} student"
    )
    mode = card.transfer_mode or "mode not recorded"  # none: logit or feature distillation alone
    by = "" if mode == "none" else f"by attention transfer ({mode}) "
    how = (
        f"trained {by}from the teacher {_teacher_name(card.teacher)}"
        if teacher
        else "trained without a teacher"
    )
    transfer = f"Mode: **{card.transfer_mode or 'not recorded'}**\n"
    if card.conversion is not None:
        how, transfer = _conversion_text(
            card.conversion, _teacher_name(card.teacher), spec.get("attention", SOFTMAX), mode
        )
    description = card.description or f"{what[0].upper()}{what[1:]}, {how}, with attnxfer."
    teacher_rows = [  # rows with no value are left out
        ("id", teacher.get("spec")),
        ("architecture", teacher.get("architecture")),
        ("source", teacher.get("source")),
        # a transformers checkpoint, its names and layout converted to the timm model's; none: timm's format
        ("format", teacher.get("source_format") or ("timm" if teacher.get("source") else None)),
        ("Hub repo", teacher.get("hf_repo")),
        ("revision", teacher.get("hf_revision")),
        ("commit", teacher.get("hf_commit")),
        ("weights sha256", teacher.get("sha256")),
        ("license", teacher.get("license") or "unknown"),
        ("mean / std", f"{teacher.get('mean')} / {teacher.get('std')}" if teacher.get("mean") else None),
        ("dropped checkpoint keys", len(teacher.get("dropped_keys") or []) or None),
        ("resampled position embeddings", teacher.get("resampled_pos_embed") or None),
    ]
    label = "Stage 2's transfer plan" if card.conversion is not None else "Transfer plan"
    plan = f"\n{label}:\n\n```text\n{card.plan.rstrip()}\n```\n" if card.plan else ""
    recipe = (
        card.recipe
        and f"\n## Recipe\n\nThe resolved attnxfer config of the run:\n\n```yaml\n{card.recipe.rstrip()}\n```\n"
    )
    sections = [
        f"# {card.model_name}\n\n" + description,
        "\n## License\n\n" + license_text + "\n",
        "\n## Teacher\n\n"
        + (
            "| field | value |\n|---|---|\n"
            + "".join(f"| {k} | `{_fmt(v)}` |\n" for k, v in teacher_rows if v not in (None, "", []))
            if teacher
            else "None: trained without a teacher.\n"
        ),
        "\n## Transfer\n\n" + transfer + plan,
        _student_section(card, spec, shape),
        "\n## Training data\n\n" + (card.training_data or "Not recorded: see the recipe.") + "\n",
        _metrics_section(card, data),
        recipe or "",
        _loading_section(spec, load_ref=load_ref, native_arch=native_arch) if "timm" in formats else "",
        "" if onnx is None else _onnx_section(onnx, load_ref, spec.get("pretrained_cfg", {})),
    ]
    # huggingface_hub writes the metadata (model-index included) and checks that it parses back
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "".join(sections)))


def _conversion_text(
    report: dict[str, Any], teacher: str, attention: str | list[str], mode: str
) -> tuple[str, str]:
    """(how the student was made, the card's transfer section) of a conversion's final student, from the
    conversion's report.json: attention distillation (stage 1), then stage 2's objective, and its figures."""
    stage1, stage2, speed = (report.get(key) or {} for key in ("stage1", "stage2", "speed"))
    into, logits = attention_label(attention), report.get("logit_distill")  # mixed: per block below
    then = ", ".join(
        [stage2.get("objective") or "training"]
        + ([f"logit distillation (weight {logits:g})"] if logits else [])
        + ([f"attention transfer ({mode})"] if mode not in ("none", "mode not recorded") else [])
    )
    skipped = stage1.get("skipped")
    stages = ([] if skipped else ["attention distillation (stage 1)"]) + [f"{then} (stage 2)"]
    knn = (report.get("knn") or {}).get("after_stage2") or {}
    cos = ((report.get("features") or {}).get("after_stage2") or {}).get("feat_cos_patch")
    # the weights the conversion measured, where the export took others: their quality is not these weights'
    other = report.get("measured_other")
    quality = [
        report.get("recovered_pct") is not None
        and f"top-1 {report['student_top1']:.2f} ({report['recovered_pct']:.1f}% of the teacher's)",
        knn.get("knn_top1") is not None
        and f"k-NN top-1 {knn['knn_top1']:.2f} (teacher {knn['knn_teacher_top1']:.2f})",
        cos is not None and f"final-feature cosine to the teacher {cos:.4f}",
    ]
    figures = [
        *([] if other else quality),
        speed.get("speedup") is not None
        and not speed.get("speedup_withheld")
        and f"{speed['speedup']:.2f}x the teacher's speed ({speed['device']}, batch {speed['batch']})",
    ]
    shown = "; ".join(f for f in figures if f)
    return (
        f"converted from the teacher {teacher} by " + ", then ".join(stages),
        f"Mode: **conversion** (`attnxfer convert`) into {into} attention, stage 2 in mode {mode}:\n\n"
        + (
            "1. stage 1: skipped\n"
            if skipped
            else f"1. stage 1, {stage1.get('steps', '?')} steps: attention "
            "distillation (the student's attention fitted to the teacher's maps)\n"
        )
        + f"2. stage 2, {stage2.get('steps', '?')} steps: {then}\n"
        + (f"\nMeasured by the conversion (its report.json): {shown}.\n" if shown else "")
        + (
            f"\nThe conversion's quality figures (its report.json) are of other weights ({other}), not of these: "
            "the metrics below are these weights'.\n"
            if other
            else ""
        ),
    )


def shape_phrase(shape: dict[str, Any] | None, attention: str | list[str] = SOFTMAX) -> str:
    """The student in words, from `student_shape`: "a ViT of width 96, 6 blocks, 3 heads, patch 4, 28 px,
    1 channel" (and its attention where it is not softmax)."""
    if not shape:
        return "a student"

    def pair(v: list[int]) -> str:
        return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

    parts = [
        f"width {shape['width']}" if "width" in shape else None,
        f"stage widths {'-'.join(map(str, shape['widths']))}" if "widths" in shape else None,
        f"{shape['blocks']} block{'s' * (shape['blocks'] != 1)}" if "blocks" in shape else None,
        f"{shape['heads']} head{'s' * (shape['heads'] != 1)}" if "heads" in shape else None,
        f"patch {pair(shape['patch'])}" if "patch" in shape else None,
        f"{pair(shape['img_size'])} px" if "img_size" in shape else None,
        f"{shape['in_chans']} channel{'s' if shape['in_chans'] != 1 else ''}"
        if shape.get("in_chans") != 3 and "in_chans" in shape
        else None,
    ]
    kind = attention_label(attention)
    article = "an" if shape["family"][:1].upper() in "AEIOU" else "a"
    phrase = f"{article} {shape['family']} of " + ", ".join(p for p in parts if p)
    return phrase + ("" if kind == SOFTMAX else f", with {kind} attention")


def _student_section(card: ModelCardInfo, spec: dict[str, Any], shape: dict[str, Any] | None) -> str:
    """What the student is, how timm builds it (architecture + arguments), attention (per block where blocks
    differ or take options), classes."""
    kind = attention_label(spec.get("attention", SOFTMAX))
    out = "\n## Student\n\n"
    if shape:
        out += f"- model: {shape_phrase(shape)}\n"
    built = "timm builds it from" if kind == SOFTMAX else "attnxfer builds it on"
    out += f"- {built}: `{spec['architecture']}` with the construction arguments below (they replace the name's own sizes)\n"
    if spec.get("registered_as"):
        out += f"- trained as: `{spec['registered_as']}` (registered by attnxfer)\n"
    names = list(card.class_names or ())
    more = f", ... ({len(names) - 20} more)" if len(names) > 20 else ""
    shown = f" ({', '.join(names[:20])}{more})" if names else ""
    out += f"- attention: `{kind}`\n- classes: {spec.get('num_classes')}{shown}\n"
    if card.checkpoint:
        out += f"- weights: {card.checkpoint}\n"
    out += f"\ntimm construction arguments:\n\n```json\n{json.dumps(spec['model_args'], indent=2)}\n```\n"
    if spec.get("attention_options"):
        layout = per_block_attention(spec["attention"], len(spec["attention_options"]))
        out += (
            "\nAttention per block (name and options):\n\n| block | attention | options |\n|---|---|---|\n"
            + "".join(
                f"| {i} | {name} | `{json.dumps(opts)}` |\n"
                for i, (name, opts) in enumerate(zip(layout, spec["attention_options"]))
            )
        )
    return out


def _metrics_section(card: ModelCardInfo, data: ModelCardData) -> str:
    """The evaluation results in words, then every recorded metric in a table."""
    results = data.eval_results or ()
    out = "\n## Metrics\n\n" + "".join(
        f"- {r.metric_name} on the {r.dataset_name} validation split: {_fmt(r.metric_value)}\n"
        for r in results
    )
    out += "\n" if results else ""
    table = "".join(f"| {k} | {_fmt(v)} |\n" for k, v in card.metrics.items())
    return out + (f"| metric | value |\n|---|---|\n{table}" if card.metrics else "No metrics recorded.\n")


def _loading_section(spec: dict[str, Any], *, load_ref: str, native_arch: bool) -> str:
    """How to load the export: plain timm or transformers' timm wrapper for a softmax student (after ``import
    attnxfer`` where attnxfer registers the architecture), else `load_student` (or ONNX without attnxfer)."""
    out = "\n## How to load\n\n"
    transform = (  # the preprocessing the export's pretrained_cfg records, as timm builds it
        "cfg = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**cfg, is_training=False)\n```\n"
    )
    kind = attention_label(spec.get("attention", SOFTMAX))
    if kind != SOFTMAX:
        return out + (
            f"This student uses **{kind}** attention, which timm does not provide: plain `timm.create_model` "
            "cannot build it (config.json's `model_args` open with an argument no timm model takes, so timm stops "
            "with an error naming `attnxfer.load_student` instead of loading these weights into softmax attention), "
            "and neither can transformers' timm wrapper, which builds through timm and stops with the same error. "
            "Load it with attnxfer, which rebuilds "
            'the student from `config.json["attnxfer"]["student"]` with its attention classes and options:\n\n'
            "```python\nimport timm\nfrom attnxfer import load_student\n\n"
            f'model = load_student("{load_ref}").eval()\n'
            + transform
            + "\nTo run it without attnxfer, run its ONNX graph (`model.onnx`, written by `attnxfer export RUN_DIR "
            "OUT --format onnx`) in ONNX Runtime.\n"
        )
    pre = "" if native_arch else f"import attnxfer.models  # registers {spec['architecture']} with timm\n"
    # the same student through transformers' timm wrapper, its image processor the transform above (read from
    # config.json): logits from a classifier, the pooled output of a headless encoder
    channels, high, wide = spec.get("pretrained_cfg", {}).get("input_size") or (3, 224, 224)
    where = load_ref.split(":", 1)[1]
    image = (  # the processor reads an image as it is given; timm's transform keeps its mode
        f'image = Image.new("L", ({wide}, {high}))  # your image, read in one channel: .convert("L")'
        if channels == 1
        else f'image = Image.new("RGB", ({wide}, {high}))  # your image'
    )
    if spec.get("num_classes"):
        auto, use = "AutoModelForImageClassification", "logits = model(**processor(image)).logits"
        one_call = (
            'transformers\' `pipeline("image-classification")` reads every image as RGB, which this one-channel '
            "model cannot take: give the processor images read in one channel, as above.\n"
            if channels == 1
            else f'`pipeline("image-classification", model="{where}")` does the same in one call.\n'
        )
    else:
        auto, use, one_call = "AutoModel", "features = model(**processor(image)).pooler_output", ""
    if not native_arch:
        out += (
            f"`{spec['architecture']}` is registered by attnxfer: import it before timm builds the model.\n\n"
        )
    return (
        f'{out}```python\nimport timm\n{pre}model = timm.create_model("{load_ref}", pretrained=True).eval()\n'
        f"{transform}\n{_validation_steps(spec.get('pretrained_cfg', {}))}\n"
        "\nIn transformers (its timm wrapper builds the same timm model, and `AutoImageProcessor` the transform "
        f"above):\n\n```python\nfrom PIL import Image\n{pre}from transformers import AutoImageProcessor, {auto}\n\n"
        f'processor = AutoImageProcessor.from_pretrained("{where}")\n'
        f'model = {auto}.from_pretrained("{where}").eval()\n{image}\n{use}\n```\n'
        + (f"\n{one_call}" if one_call else "")
    )


def _validation_steps(data_cfg: dict[str, Any]) -> str:
    """How the run prepared its validation images, from config.json's pretrained_cfg (what timm's transform
    makes): the sentence a timm user and an ONNX user, who has no transform to read it from, both need."""
    size, pct = data_cfg.get("input_size"), data_cfg.get("crop_pct")
    steps = (  # timm reads images as RGB, which a one-channel student refuses
        ['read in one channel (PIL `.convert("L")`, timm\'s `ImageDataset(..., input_img_mode="L")`)']
        if size and size[0] == 1
        else []
    )
    if size and pct is not None:
        interpolation, mode = data_cfg.get("interpolation", "bilinear"), data_cfg.get("crop_mode", "center")
        # timm's create_transform resizes to floor(size / crop_pct) px, then crops ``size``, for each crop mode
        high, wide = (math.floor(s / (pct or DEFAULT_CROP_PCT)) for s in size[-2:])
        resize = {
            "squash": f"squashed ({interpolation}) to {high} x {wide} px, the aspect ratio not kept",
            "border": f"resized ({interpolation}) to {wide} px on the long side, padded",
        }.get(
            mode,
            f"resized ({interpolation}) to {wide} px on the short side"
            if high == wide
            else f"resized ({interpolation}) to cover {high} x {wide} px, the aspect ratio kept",
        )
        steps.append(f"{resize}, then a center crop of {size[-2]} x {size[-1]} px (crop_pct {pct:g})")
    elif size:
        steps.append(f"{size[-2]} x {size[-1]} px")
    steps.append(f"normalised with mean {data_cfg.get('mean')} and std {data_cfg.get('std')}")
    return f"Images as the run validated them: {', '.join(steps)}."


def _onnx_section(report: dict[str, Any], load_ref: str, data_cfg: dict[str, Any]) -> str:
    """The ONNX graph: its input and output, opset, and how closely ONNX Runtime reproduced the student."""
    where, local = load_ref.split(":", 1)[1], load_ref.startswith("local-dir:")
    # a Hub repo's reader has the graph in no folder of theirs: the code fetches it from the repo
    path = f'"{where}/{report["file"]}"' if local else f'hf_hub_download("{where}", "{report["file"]}")'
    shape = " × ".join(str(d) for d in report["input_shape"])
    return (
        "\n## ONNX\n\n"
        f"`{report['file']}`: opset {report['opset']}, input `{report['input_name']}` ({shape}; the batch axis "
        f"is free), output `{report['output_name']}`. Exported with {report['exporter']}; checked with "
        f"onnx.checker and in ONNX Runtime {report['onnxruntime']} ({report['provider']}) against the PyTorch "
        f"forward at batch sizes {', '.join(map(str, report['check_batches']))}: max absolute difference "
        f"**{report['max_abs_diff']:.3g}** (outputs up to {report['max_abs_output']:.3g}). "
        f"{_validation_steps(data_cfg)}\n\n"
        "```python\nimport numpy as np\nimport onnxruntime as ort\n"
        + ("" if local else "from huggingface_hub import hf_hub_download\n")
        + f'\nsession = ort.InferenceSession({path}, providers=["CPUExecutionProvider"])\n'
        f"images = np.zeros(({1}, {', '.join(str(d) for d in report['input_shape'][1:])}), np.float32)  "
        "# normalised pixels\n"
        f'({report["output_name"]},) = session.run(None, {{"{report["input_name"]}": images}})\n```\n'
    )


def attention_label(attention: str | list[str]) -> str:
    """A spec's attention as one word: the name every block uses, or ``mixed``."""
    if isinstance(attention, str):
        return attention
    return attention[0] if len(set(attention)) == 1 else "mixed"


def _recipe_data(cfg: dict[str, Any], *, labels_read: bool = True) -> tuple[str | None, str | None]:
    """(the card's training-data block, the dataset as a card names it) from a run's recipe, read
    (``labels_read`` False: a run whose objective reads no label, as MAE pre-training, whatever its loaders
    handed out). The name: a Hub dataset's id (``hfds/ORG/NAME`` or streamed ``hfids/ORG/NAME`` ->
    ``ORG/NAME``), a webdataset's, torchvision's or a folder dataset's name (``wds/imagenet``,
    ``/data/imagenet`` -> ``imagenet``; ``torch/cifar10`` -> ``cifar10``), else the registered one."""
    data = cfg.get("data") or {}
    if not data:
        return None, None
    if not labels_read:
        data = {**data, "labels": False}
    block = "```yaml\n" + yaml.safe_dump({"data": data}, sort_keys=False).rstrip() + "\n```"
    if not labels_read:
        block = (
            "Trained on the images alone: no label was read in training (a k-NN figure, where the card "
            "gives one, is scored with labels).\n\n" + block
        )
    name = data.get("dataset")
    if not isinstance(name, str) or not name:
        return block, None
    # a Hub dataset read whole or streamed; shards' name; torchvision's download (torch/cifar10: cifar10)
    if name.startswith(("hfds/", "hfids/", "wds/", "torch/")):
        return block, name.split("/", 1)[1]
    if name == "folder" and data.get("root"):
        return block, Path(str(data["root"])).expanduser().name or name
    return block, name
