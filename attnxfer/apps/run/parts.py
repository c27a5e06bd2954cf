"""Turn a `TrainConfig` into the objects a run needs: teacher, student, data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ...config import DataConfig, ModelConfig, TrainConfig, require_teacher
from ...data import DatasetInfo, statistics_differ
from ...data.folder import decoded_image_info
from ...data.registry import dataset_options, dataset_reads_root
from ...errors import InputError, UserError
from ...models.attention import attention_blocks
from ...models.efficient import with_attention
from ...models.efficient.hierarchical import flat_blocks
from ...models.efficient.swap import refuses_an_option, timm_class
from ...models.image_input import ImageSizeError, check_image_size, image_input, sizes_that_fit
from ...models.student import student_like, student_spec
from ...models.vit import create_vit
from ...sources.resolve import Source, parse_teacher_spec
from ...sources.teacher import load_teacher
from ...speak import say, warn
from .loaders import build_loaders, data_info, data_seed, dataset_size


@dataclass
class RunParts:
    """Everything a run trains with. Build it yourself to train models a config can't name."""

    student: nn.Module
    teacher: nn.Module | None
    train_loader: Any
    val_loader: Any
    train_sampler: Any
    num_classes: int
    class_names: list[str] | None = None
    mean: Sequence[float] = ()
    std: Sequence[float] = ()
    teacher_record: dict[str, Any] | None = None
    student_spec: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None  # the side and channels of the images the loaders make
    in_chans: int | None = None
    # how the val loader resizes and crops decoded images (crop_pct, crop_mode, interpolation); {}: tensors
    preprocessing: dict[str, Any] = field(default_factory=dict)


def pooling_args(global_pool: str | None, fc_norm: bool | None) -> dict[str, Any]:
    """timm arguments for ``model.global_pool`` / ``model.fc_norm``. Pooling is always passed with its norm:
    ``global_pool="avg"`` alone on a mirrored class-token teacher would give "norm, then average", not MAE's
    head (average, then fc_norm). ``fc_norm: null`` takes timm's rule (a norm after avg/max pooling)."""
    args: dict[str, Any] = {}
    if global_pool is not None:
        args["global_pool"] = global_pool
        args["fc_norm"] = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
    elif fc_norm is not None:
        args["fc_norm"] = fc_norm
    return args


def load_init(
    spec: str,
    img_size: int | None,
    *,
    file_model: ModelConfig | None,
    cache_dir: str | None,
    data: DataConfig | None = None,
) -> nn.Module:
    """``model.init``'s pretrained encoder, headless, loaded as a teacher is; a weights file is built as
    ``file_model``'s ``name`` and ``kwargs`` say. Its errors are restated as ``model.init``'s: the loader's
    words name a teacher, and a run that has one would be told to change the wrong key. Statistics that are
    a guess are refused unless ``data`` gives both (`refuse_guessed_stats`)."""
    built_as = None
    try:
        if parse_teacher_spec(spec, role="model.init").source is Source.FILE:
            built_as = file_model
        arch, kwargs = (built_as.name, dict(built_as.kwargs)) if built_as else (None, {})
        img_size = kwargs.pop("img_size", None) or img_size  # the size the file's architecture is built at
        encoder, record = load_teacher(
            spec,
            arch=arch,
            cache_dir=cache_dir,
            img_size=img_size,
            num_classes=0,
            who=f"model.init={spec}",
            warn_guessed_stats=False,  # taken from data, or refused below
            stats_given=bool(data and data.mean and data.std),
            **kwargs,
        )
    except ImageSizeError as e:
        raise e.restated("data.img_size") from None
    except UserError as e:
        said = str(e).removeprefix("teacher ").removeprefix(f"{spec!r}: ").removeprefix(f"{spec}: ")
        if built_as and "do not fit architecture" in said:
            said += (
                f"\nA weights file is built as model.name={built_as.name} with model.kwargs={built_as.kwargs}: "
                "set them to the architecture it was trained as"
            )
        raise InputError(said if "model.init" in said else f"model.init={spec!r}: {said}") from None
    refuse_guessed_stats(data or DataConfig(), record.to_dict(), f"model.init={spec}")
    # the licence of the weights loaded (a run's checkpoint: its teacher's), which the student's card inherits;
    # timm's default for the architecture (apache-2.0) would relicense, say, MAE's non-commercial encoder
    encoder.pretrained_cfg = {k: v for k, v in encoder.pretrained_cfg.items() if k != "license"}
    if record.license:
        encoder.pretrained_cfg["license"] = record.license
    return encoder


def init_from_pretrained(
    m: ModelConfig,
    num_classes: int,
    img_size: int | None,
    cache_dir: str | None,
    kwargs: dict[str, Any],
    data: DataConfig | None = None,
) -> nn.Module:
    """A trainable copy of the pretrained encoder ``m.init`` (fine-tuning) with a fresh ``num_classes`` head and
    ``kwargs`` (timm's, pooling among them); any other weight missing is an error, never a random weight. A
    norm moved after the pooling (``fc_norm``) starts fresh and the encoder's final norm is dropped, as MAE's
    fine-tuning does."""
    pretrained = load_init(m.init, img_size, file_model=m, cache_dir=cache_dir, data=data)
    with _kwargs_refused(m, f"the student (model.init={m.init}'s architecture)"):
        student = student_like(pretrained, num_classes=num_classes, drop_path_rate=m.drop_path_rate, **kwargs)
    weights = pretrained.state_dict()
    result = student.load_state_dict(weights, strict=False)
    fresh, dropped = {"head", "fc_norm"}, {"norm"}
    missing = {n for n in result.missing_keys if n.split(".")[0] not in fresh}
    unexpected = [n for n in result.unexpected_keys if n.split(".")[0] not in dropped]
    if missing or unexpected:
        raise InputError(
            f"model.init={m.init!r} does not fit the student built from it: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    # what was taken, as MAE's fine-tuning prints its load_state_dict message
    started, unused = (
        {n.split(".")[0] for n in names} for names in (result.missing_keys, result.unexpected_keys)
    )
    say(
        f"model.init: {len(weights) - len(result.unexpected_keys)} tensors loaded from {m.init}"
        + (f"; fresh: {', '.join(sorted(started))}" if started else "")
        + (f"; not used: {', '.join(sorted(unused))}" if unused else "")
    )
    return student


def build_student(
    cfg: TrainConfig,
    teacher: nn.Module | None,
    num_classes: int,
    in_chans: int,
    img_size: int | None,
    *,
    quiet: bool = False,
) -> nn.Module:
    """The student: the teacher's architecture (mirrored) or a named timm ViT, randomly initialised, or with
    ``model.init`` that pretrained model; with ``model.attention``'s zoo attention in its blocks. ``quiet``: a
    ``model.name`` it is not goes unsaid (a build whose student's own build says it)."""
    m = cfg.model
    kwargs = {**m.kwargs, **pooling_args(m.global_pool, m.fc_norm)}
    if m.init:
        student = init_from_pretrained(m, num_classes, img_size, cfg.teacher.cache_dir, kwargs, cfg.data)
        if not quiet:
            _say_if_not_built(m, student, num_classes, kwargs)
    elif teacher is not None and m.mirror_teacher:
        with _kwargs_refused(m, "the student (the teacher's architecture: model.mirror_teacher=true)"):
            student = student_like(
                teacher, num_classes=num_classes, drop_path_rate=m.drop_path_rate, **kwargs
            )
        if not quiet:
            _say_if_not_built(m, student, num_classes, kwargs)
    else:
        kwargs.setdefault("in_chans", in_chans)
        optional: tuple[str, ...] = ()
        if img_size is not None and "img_size" not in kwargs:
            kwargs["img_size"], optional = img_size, ("img_size",)  # a conv stem (PVTv2) takes any size
        student = create_named_vit(m, num_classes=num_classes, optional=optional, **kwargs)
        _check_patches_tile(student, teacher)
    return student_attention(student, m.attention, m.attention_kwargs)


def _check_patches_tile(student: nn.Module, teacher: nn.Module | None) -> None:
    """A ViT's patches tile its image: timm would drop the pixels past the last whole patch without a word,
    and a patch larger than the image stops the first step. The answer is another image size or another patch:
    with a teacher, whose images the student reads, the teacher's patch, whose tokens a transfer needs."""
    if not isinstance(student, VisionTransformer):  # a conv stem (PVTv2) takes any size
        return
    io = image_input(student)
    side, patch, grid = io.img_size[0], io.patch_size[0], io.grid[0]
    if grid < 1 or grid * patch != side or io.grid[1] * io.patch_size[1] != io.img_size[1]:
        said = (
            f"the student's {patch} px patches (model.name / model.kwargs.patch_size) do not tile its {side} px "
            "images (data.img_size / model.kwargs.img_size)"
        )
        own = image_input(teacher).patch_size[0] if teacher is not None else None
        if own is not None and side % own == 0:
            raise InputError(
                f"{said}: give it the teacher's, model.kwargs.patch_size={own} (maps are token by token)"
            )
        fits = " and ".join(f"{s} px" for s in sizes_that_fit(student, side) if s)
        tiling = sorted((p for p in range(2, side // 2 + 1) if side % p == 0), key=lambda p: abs(p - patch))
        patches = " or ".join(", ".join(map(str, sorted(tiling[:3]))).rsplit(", ", 1))
        tile = f"; or patches that tile it: model.kwargs.patch_size={patches}" if tiling else ""
        raise InputError(f"{said}: sizes that work near it are {fits}{tile}")


def _say_if_not_built(m: ModelConfig, student: nn.Module, num_classes: int, kwargs: dict[str, Any]) -> None:
    """A ``model.name`` the student is not (its width or depth differ; ``model.init``'s or the mirrored
    teacher's architecture): said, not silently dropped. The default only where ``model.init`` replaces it: the
    run's recorded config still reads it, and nothing else says what was built."""
    default = m.name == ModelConfig().name
    if default and not m.init:
        return
    try:
        with torch.device("meta"):
            named = create_vit(m.name, num_classes=num_classes, **kwargs)
        asked = (
            named.num_features,
            len(attention_blocks(named)),
            type(named).__name__,
            _prefix_tokens(named),
        )
    except (AssertionError, TypeError, ValueError):  # kwargs only the built family takes; a model.name no ViT
        asked = None
    # of one shape, another family (an EVA teacher mirrored for a model.name of a plain ViT) is not it either,
    # nor one with other tokens before the patches' (a teacher's registers, or no class token: SigLIP)
    built = (
        student.num_features,
        len(attention_blocks(student)),
        type(student).__name__,
        _prefix_tokens(student),
    )
    if built != asked:
        shape = f", against {asked[0]} and {asked[1]}" if asked and asked[:2] != built[:2] else ""
        shape += f"; {built[2]}, not {asked[2]}" if asked and asked[2] != built[2] else ""
        shape += (
            f"; {built[3]} token{'s' * (built[3] != 1)} before the patches', not {asked[3]}"
            if asked and asked[3] != built[3]
            else ""
        )
        why, instead = f"model.init={m.init} gives the student its architecture", ""
        if not m.init:
            why = "with a teacher, model.mirror_teacher=true gives the student the teacher's architecture"
            instead = f"; model.mirror_teacher=false builds {m.name}"
        warn(
            f"warning: model.name={m.name}{' (the default)' if default else ''} is not built: {why} (width "
            f"{built[0]}, {built[1]} blocks{shape})"
            f"{instead}"
        )


def _prefix_tokens(model: nn.Module) -> int | None:
    """The class and register tokens before a ViT's patch tokens (None: a family without them, Swin)."""
    return getattr(model, "num_prefix_tokens", None)


@contextmanager
def _kwargs_refused(m: ModelConfig, built: str) -> Iterator[None]:
    """timm refusing the user's ``model.kwargs`` is one message naming them, not a traceback from inside timm."""
    try:
        yield
    except UserError:  # attnxfer's own answer (student_like's) already says what to change
        raise
    except (AssertionError, TypeError, ValueError) as e:  # how timm's constructors refuse arguments
        if not m.kwargs:  # without the user's kwargs, a failure is attnxfer's bug: its traceback
            raise
        raise InputError(
            f"{built} cannot be built with model.kwargs {m.kwargs}: {type(e).__name__}: {e}; "
            f"change model.kwargs (they go to timm.create_model)"
        ) from e


def create_named_vit(m: ModelConfig, **kwargs: Any) -> nn.Module:
    """``model.name`` with ``kwargs`` (``model.kwargs`` among them) and ``model.drop_path_rate``; timm refusing
    the user's ``model.kwargs`` is one message naming them, not a traceback from inside timm."""
    with _kwargs_refused(m, f"model.name={m.name}"):
        student = create_vit(m.name, drop_path_rate=m.drop_path_rate, **kwargs)
    try:
        attention_blocks(student)
    except TypeError as e:  # a CNN (resnet18), or a ViT left without blocks ({depth: 0})
        given, instead = (
            (f" with model.kwargs {m.kwargs}", " or change model.kwargs") if m.kwargs else ("", "")
        )
        raise InputError(f"model.name={m.name}{given}: {e}; name a ViT-style timm model{instead}") from None
    return student


def student_attention(
    student: nn.Module, attention: str | list[str] | None, options: dict[str, Any]
) -> nn.Module:
    """``model.attention``: the student's blocks with that zoo attention (null keeps softmax); a bad name
    or option is one message naming the key."""
    if not attention:
        if options:
            raise InputError("model.attention_kwargs is set but model.attention is not: name the attention")
        return student
    try:
        student = with_attention(student, attention, **options)
    except (KeyError, ValueError, TypeError) as e:
        # a refused option value ("window_size must be >= 1, got 0") or an option no attention takes
        of_options = refuses_an_option(e, options) or (isinstance(e, TypeError) and "option" in str(e))
        what = "model.attention_kwargs" if of_options else "model.attention"
        raise InputError(f"{what}: {e.args[0]}") from None
    # layers outside the block sequence the swap walks (CaiT's class attention, one query row: O(N) already)
    blocks = flat_blocks(student)
    inside = {id(module) for module in blocks.modules()} if blocks is not None else set()
    if kept := [
        f"{name} ({timm_class(module)})"
        for name, module in student.named_modules()
        if name.rsplit(".", 1)[-1] == "attn" and blocks is not None and id(module) not in inside
    ]:
        say(
            f"model.attention: the {len(blocks)} blocks of the student's block sequence take {attention}; "
            f"{', '.join(kept)} outside it keep{'s' if len(kept) == 1 else ''} softmax"
        )
    return student


def stamp_input_cfg(
    student: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    img_size: int,
    preprocessing: dict[str, Any] | None = None,
) -> None:
    """The student's pretrained config says how its inputs were prepared (what export writes and timm's
    ``resolve_data_config`` and a later run read back); ``preprocessing``: the val loader's resize and crop."""
    student.pretrained_cfg = {
        **getattr(student, "pretrained_cfg", {}),
        **(preprocessing or {}),
        "mean": tuple(mean),
        "std": tuple(std),
        "input_size": (in_chans, img_size, img_size),
    }


def num_classes_of(cfg: TrainConfig, info: DatasetInfo) -> int:
    """``model.num_classes``, else the dataset's (refused where it says none); a run without labels or task
    loss has 0 (a headless student) unless ``model.num_classes`` says otherwise."""
    d = cfg.data
    if not info.has_labels or cfg.transfer.task_weight == 0:
        return cfg.model.num_classes or 0
    num_classes = cfg.model.num_classes or info.num_classes
    if info.num_classes and num_classes < info.num_classes:  # a label past the head: an error mid-epoch
        raise InputError(
            f"model.num_classes={num_classes} is fewer than the {info.num_classes} classes of data.dataset="
            f"{d.dataset}: raise it, or leave it null for the dataset's"
        )
    if not num_classes:
        if d.root is None and not d.dataset.startswith(("hfds/", "hfids/")):  # Hub datasets: root is a cache
            raise InputError(f"data.dataset={d.dataset} reads its images from a folder: set data.root=PATH")
        raise InputError(f"dataset {d.dataset!r} does not say how many classes it has; set model.num_classes")
    return num_classes


def refuse_guessed_stats(d: DataConfig, record: dict[str, Any], who: str) -> None:
    """A model whose mean/std are a guess (a transformers checkpoint without preprocessor_config.json) is
    refused unless data.mean and data.std are both given: the wrong ones would skew it without a sign."""
    if record.get("mean_std_guessed") and not (d.mean and d.std):
        # as many values as the model takes channels (a grey model: the RGB defaults' mean), to paste as they are
        grey = (record.get("input_size") or (3,))[0] == 1
        mean, std = (
            ",".join(f"{v:g}" for v in ((sum(record[k]) / len(record[k]),) if grey else record[k]))
            for k in ("mean", "std")
        )
        raise InputError(
            f"{who} has no preprocessor_config.json beside its config.json, so the mean/std its weights were "
            f"trained with are unknown: set data.mean and data.std (the likeliest, its family's published "
            f"checkpoints' or timm's defaults for its architecture: data.mean=[{mean}] data.std=[{std}]), or "
            "put the model's preprocessor_config.json beside its config.json"
        )


def normalisation(d: DataConfig, stats: dict, info: DatasetInfo, in_chans: int) -> list[Sequence[float]]:
    """data.mean and data.std, each else ``stats``' (the teacher's or model.init's), else the dataset's; RGB
    statistics the config did not give are averaged for grey images (in_chans 1)."""
    chosen = ((d.mean, stats.get("mean") or info.mean), (d.std, stats.get("std") or info.std))
    return [given or ((sum(v) / 3,) if in_chans == 1 and len(v) == 3 else v) for given, v in chosen]


#: what a conversion without a teacher is told (`attnxfer convert`, and `attnxfer submit --command convert`)
def build_run_parts(
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    student_fn: Callable[[nn.Module | None, int], nn.Module] | None = None,
    *,
    labels: bool | None = None,
    shared: RunParts | None = None,
    quiet: bool = False,
    student_unsaid: bool = False,
) -> RunParts:
    """Teacher, student and data for ``cfg``. ``student_fn(teacher, num_classes)`` replaces the config's
    student; ``labels``: whether the loaders hand out labels (default: where the data has them and the task
    loss uses them); ``shared``: another run's teacher and loaders (a study's), only the student built here;
    ``quiet``: the data line and what the student's build says unsaid (a report scoring runs that said them
    when they trained); ``student_unsaid``: what the student's build says alone unsaid (a study's teacher and
    loaders, built from its first student's config: each student's own build says it, under its name)."""
    if labels is None:  # without a task loss (task_weight 0; null is 1) a run reads its images alone
        labels = cfg.transfer.task_weight is None or cfg.transfer.task_weight > 0
    if cfg.data.labels and not labels:  # the run reads its images alone
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=False))
    d = cfg.data
    info = data_info(d)
    teacher, record = None, None
    if shared is not None:
        teacher, record = shared.teacher, shared.teacher_record
    elif cfg.teacher.spec:
        # built aside from the run's random streams: the student's initial weights depend on the seed alone,
        # not on which teacher, stored in which format, was loaded first
        try:  # at data.img_size: rebuilt there as its family says, or refused with the sizes that work
            with torch.random.fork_rng(devices=[]):
                teacher, rec = load_teacher(
                    cfg.teacher.spec,
                    arch=cfg.teacher.arch,
                    revision=cfg.teacher.revision,
                    cache_dir=cfg.teacher.cache_dir,
                    img_size=d.img_size,
                    warn_guessed_stats=False,  # taken from data, or refused below
                    stats_given=bool(d.mean and d.std),
                )
        except ImageSizeError as e:
            raise e.restated("data.img_size") from None
        record = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else dict(rec)
        # before the student and data are built
        refuse_guessed_stats(d, record, f"teacher {cfg.teacher.spec}")
    else:
        require_teacher(cfg)
    num_classes = num_classes_of(cfg, info)
    in_chans = d.in_chans or (image_input(teacher).in_chans if teacher is not None else info.in_chans)
    img_size = d.img_size or (_input_size(teacher) if teacher is not None else None)
    student = (
        student_fn(teacher, num_classes)
        if student_fn is not None
        else build_student(cfg, teacher, num_classes, in_chans, img_size, quiet=quiet or student_unsaid)
    )
    img_size = img_size or _input_size(student)
    in_chans = image_input(student).in_chans
    # one image stream feeds the teacher and the student: a channel count either cannot take stops here, not
    # in the first step (or silently, where the student mirrors the teacher's channels)
    takes = image_input(teacher).in_chans if teacher is not None else in_chans
    who = "the teacher" if teacher is not None else "the student"
    if d.in_chans and d.in_chans != takes:
        raise InputError(
            f"data.in_chans={d.in_chans}, but {who} takes {takes}-channel images (and the teacher and the "
            "student read the same images): drop data.in_chans"
        )
    if takes != in_chans:
        raise InputError(
            f"the student takes {in_chans}-channel images and the teacher {takes}, but both read the same "
            f"images: set model.kwargs.in_chans={takes}"
        )
    # Normalisation: explicit config, else the teacher's pretrained statistics, else model.init's (what the
    # encoder fine-tuned was trained on, as timm's train.py reads them), else the dataset's.
    stats = record or (getattr(student, "pretrained_cfg", {}) if cfg.model.init else {})
    mean, std = normalisation(d, stats, info, in_chans)
    if shared is not None:
        return _around_shared(shared, student, img_size=img_size, in_chans=in_chans, mean=mean, std=std)
    if record and record.get("mean") and record.get("std") and not (record.get("mean_std_guessed") or quiet):
        # statistics given that the teacher was not trained on: it sees images as it never did, which lowers what
        # it scores and shows its students with no sign but its score; said once, beside the data line
        own = normalisation(dataclasses.replace(d, mean=None, std=None), record, info, in_chans)
        other = [
            f"data.{k} [{', '.join(f'{v:.4g}' for v in given)}] against its [{', '.join(f'{v:.4g}' for v in its)}]"
            for k, given, its in zip(("mean", "std"), (mean, std), own, strict=True)
            if statistics_differ(given, its)
        ]
        if other:
            warn(
                f"warning: the teacher {cfg.teacher.spec} was trained on images normalised otherwise "
                f"({'; '.join(other)}): leave data.mean and data.std out (data.mean=null data.std=null) to "
                "give it its own"
            )
    native = (record or {}).get("source_img_size")
    if native and tuple(native) != (img_size, img_size) and not quiet:  # a size its weights never saw
        say(
            f"teacher: made for {'x'.join(map(str, native))} px, run at {img_size} px "
            f"({record.get('resized_by') or 'rebuilt at that size'}): its maps and outputs are those of a size "
            "its weights were not trained at"
        )
    # images made for ``who`` (the teacher first) unless the config says: a 1-channel teacher turns RGB grey
    normalised_by = ("the teacher's" if record else "model.init's") if stats.get("mean") else "the dataset's"
    return parts_around(
        cfg,
        info,
        student,
        teacher=teacher,
        teacher_record=record,
        img_size=img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        num_classes=num_classes,
        rank=rank,
        world_size=world_size,
        chosen_by=None if quiet else (who, normalised_by),
    )


def parts_around(
    cfg: TrainConfig,
    info: DatasetInfo,
    student: nn.Module,
    *,
    teacher: nn.Module | None = None,
    teacher_record: dict[str, Any] | None = None,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    rank: int,
    world_size: int,
    chosen_by: tuple[str, str] | None = ("the student", "the dataset's"),
) -> RunParts:
    """A run's parts around its student: its input config stamped, the loaders at its size and normalisation,
    which it says in a line (``chosen_by``: whose input the images are made for and whose mean/std normalise
    them, where the config sets neither; None: no line)."""
    loaders = build_loaders(
        cfg.data,
        cfg.aug,
        img_size=img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        num_classes=num_classes,
        seed=data_seed(cfg),
        rank=rank,
        world_size=world_size,
    )
    # a train split of stages at other sizes (recall's curriculum): each one the models run at, not the first
    # step of that stage in timm's assertion
    for side in getattr(loaders.train_loader.dataset, "sizes", ()):
        for who, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            try:
                check_image_size(model, side)
            except ImageSizeError as e:
                raise e.restated("a data.kwargs.curriculum stage's img_size") from None
            if getattr(getattr(model, "patch_embed", None), "strict_img_size", False):  # timm's fixed size
                raise InputError(
                    f"a data.kwargs.curriculum stage's img_size={side}: the {who} runs at its own "
                    f"{image_input(model).img_size[0]} px only; build it with dynamic_img_size=true (as "
                    "recall/teacher's model.kwargs does), or give the stage the run's img_size"
                )
    preprocessing = loaders.val_info.eval_preprocessing() if loaders.val_info is not None else {}
    stamp_input_cfg(student, mean, std, in_chans, img_size, preprocessing)
    if chosen_by is not None:
        d, (made_for, normalised_by) = cfg.data, chosen_by
        # a dataset of decoded images (a folder, hfds/, wds/) states no statistics: it has timm's ImageNet ones
        stated_none = decoded_image_info("", None)
        imagenet = (
            normalised_by == "the dataset's"
            and not (d.mean and d.std)
            and (tuple(info.mean), tuple(info.std)) == (stated_none.mean, stated_none.std)
        )
        by = "ImageNet's" if imagenet else normalised_by
        mean_by, std_by = ("data." if given else f"{by} " for given in (d.mean, d.std))
        say(
            f"data: {d.dataset}{f' ({d.root})' if d.root and dataset_reads_root(d.dataset) else ''}, "
            f"{_count(loaders.train_loader)} train / "
            f"{_count(loaders.val_loader)} val images{f', {num_classes} classes' if num_classes else ''}; made "
            f"{in_chans}-channel {img_size} px for "
            f"{'data.img_size/in_chans' if d.img_size or d.in_chans else made_for}"
            f", normalised by {f'{mean_by}mean/std' if mean_by == std_by else f'{mean_by}mean and {std_by}std'}"
            + (
                " (timm's default: the dataset states none; data.mean / data.std set your data's)"
                if imagenet
                else ""
            )
        )
        options, a = dataset_options(d.dataset), cfg.aug
        unread = [f"aug.{k}={v}" for k, v in (("reprob", a.reprob), ("auto_augment", a.auto_augment)) if v]
        if unread and not {"re_prob", "auto_augment"} & options:  # the in-memory sets make their own tensors
            warn(
                f"warning: {', '.join(unread)} unused with data.dataset={d.dataset}, which makes its own "
                "tensors: random erasing and auto-augment apply to the datasets timm's transforms build "
                "(folder, hfds/, hfids/, wds/)"
            )
    return RunParts(
        student=student,
        teacher=teacher,
        train_loader=loaders.train_loader,
        val_loader=loaders.val_loader,
        train_sampler=loaders.train_sampler,
        num_classes=num_classes,
        class_names=list(info.class_names) if info.class_names else None,
        mean=list(mean),
        std=list(std),
        teacher_record=teacher_record,
        student_spec=student_spec(student),
        img_size=img_size,
        in_chans=in_chans,
        preprocessing=preprocessing,
    )


def _count(loader: Any) -> str:
    size = dataset_size(loader)
    return "streamed" if size is None else f"{size:,}"


def _around_shared(
    shared: RunParts,
    student: nn.Module,
    *,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> RunParts:
    """``shared``'s teacher and loaders around another student, which must take the images they make."""
    if (img_size, in_chans) != (shared.img_size, shared.in_chans):
        raise InputError(
            f"this student takes {in_chans}-channel {img_size} px images and the study's loaders make "
            f"{shared.in_chans}-channel {shared.img_size} px ones (students of a study read one stream of "
            "batches): set data.img_size / data.in_chans for the whole study"
        )
    # alone, a student without a teacher is fed images normalised by its model.init's statistics: in a study it
    # would read the loaders' (the first student's) and train on other images than alone
    ours, theirs = _per_channel((mean, std), in_chans), _per_channel((shared.mean, shared.std), in_chans)
    if ours != theirs:
        raise InputError(
            f"this student normalises its images by mean {list(ours[0])} and std {list(ours[1])} (its "
            f"model.init's, or the dataset's) and the study's loaders by mean {list(theirs[0])} and std "
            f"{list(theirs[1])} (students of a study read one stream of batches): set data.mean and data.std "
            "for the whole study"
        )
    stamp_input_cfg(student, mean, std, in_chans, img_size, shared.preprocessing)
    return dataclasses.replace(shared, student=student, student_spec=student_spec(student))


def _per_channel(stats: Sequence[Sequence[float]], in_chans: int) -> tuple[tuple[float, ...], ...]:
    """Mean and std, one value each per channel (a single value stands for every channel, as Normalize reads
    it)."""
    return tuple(tuple(float(v) for v in (s * in_chans if len(s) == 1 else s)) for s in stats)


def _input_size(model: nn.Module) -> int:
    """The image side a model is built for; the data pipeline makes square images of that side."""
    size = image_input(model).img_size
    if size is None:
        raise InputError(f"{type(model).__name__} records no image size: set data.img_size")
    return int(size[0])
