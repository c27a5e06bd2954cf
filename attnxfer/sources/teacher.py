"""Teachers: a pretrained ViT named the way timm names it, or the file a user already has, built frozen with
TransferAttention and a `TeacherRecord` that makes a run traceable (where the weights came from, their hash,
licence and preprocessing). Weights go through timm's own loader, so the architecture's checkpoint filter
runs and the load is strict: a missing encoder weight is an error, never a random one.
"""

from __future__ import annotations

import collections
import difflib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from timm.models import get_model_input_config

from ..errors import InputError, MissingPathError
from ..hub_reach import offline_reason
from ..models.attention import ImageSizes, make_transfer_aware
from ..models.attention.families.vit import DIFF_ATTENTION_REASON
from ..models.image_input import as_pair, check_image_size, image_input
from ..models.vit import create_vit
from ..run_layout import CHECKPOINTS_SUBDIR
from ..speak import debug, warn
from .hub import fetch_instructions, hub_refusal
from .load_errors import run_folder_hint
from .resolve import (
    Origin,
    Resolved,
    Source,
    TeacherLoadError,
    TeacherNotAvailable,
    UnsafeCheckpointError as UnsafeCheckpointError,
    parse_teacher_spec,
    read_state_dict,
    registry_cfg,
    resolve,
    weights_digest,
)

# pretrained_cfg entries that say where weights live; a teacher's weights arrive as a state dict.
SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")


def create_teacher_model(
    arch: str, pretrained: bool, cfg: dict[str, Any], kwargs: dict[str, Any]
) -> nn.Module:
    """A ViT with `TransferAttention`, or a family with its own attention classes (EVA, BEiT, PVTv2, ...)
    that its adapter makes transfer-aware afterwards."""
    try:
        return create_vit(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    except TypeError as e:
        if "attn_layer" not in str(e) and "'img_size'" not in str(e):
            raise
        return create_family(arch, pretrained, cfg, kwargs)


@dataclass(frozen=True)
class OtherSize:
    """A teacher asked for at another size than its weights were made for: the side, the weights' size and
    how its family rebuilds it."""

    side: int
    native: tuple[int, int] | None
    sizes: ImageSizes


def other_size(
    res: Resolved, timm_kwargs: dict[str, Any], img_size: int | tuple[int, int] | None
) -> OtherSize | None:
    """What building at ``img_size`` takes, None where it is the weights' own size (or not given); a size the
    family cannot run at is refused here (`ImageSizeError`). The architecture at its own size is built on the
    meta device to ask (no memory, no weights)."""
    if img_size is None:
        return None
    pair = as_pair(img_size)
    if pair is None or pair[0] != pair[1]:
        raise InputError(f"img_size={img_size!r}: attnxfer runs square images; give one side in pixels")
    cfg = {k: v for k, v in res.pretrained_cfg.items() if k not in SOURCE_KEYS}
    with torch.device("meta"):  # the weights' own size: their recorded img_size, else the arch's
        native = create_family(res.architecture, False, cfg, {**res.model_args, **timm_kwargs})
    own_size = image_input(native).img_size
    if own_size == pair:
        return None
    return OtherSize(pair[0], own_size, check_image_size(native, pair[0]))


def create_family(arch: str, pretrained: bool, cfg: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` for a family with its own attention classes. A family whose constructor takes
    no ``img_size`` (PVTv2: any input its strides divide) is built without it."""
    try:
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    except TypeError as e:
        if "'img_size'" not in str(e) or "img_size" not in kwargs:
            raise
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)


@dataclass
class TeacherRecord:
    """Where a run's teacher came from and what it expects: ``hf_revision`` as asked for, ``hf_commit`` what
    it resolved to; ``sha256`` of the weights actually read."""

    spec: str
    architecture: str
    source: str  # an `Origin`: "timm-pretrained" | "hub" | "local-dir" | "file" | "random-init"
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_commit: str | None = None
    files: list[str] = field(default_factory=list)
    sha256: str | None = None
    checkpoint_key: str | None = None
    license: str | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    input_size: tuple[int, ...] = ()
    interpolation: str | None = None
    crop_pct: float | None = None
    num_classes: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    resampled_pos_embed: bool = False
    # (H, W) the weights were made for, where the teacher runs at another
    source_img_size: tuple[int, ...] = ()
    # how the teacher was rebuilt at the run's size (its family's `ImageSizes.how`)
    resized_by: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    source_format: str | None = None  # "transformers vit (ViTForImageClassification)"; None: timm's format
    # True: mean/std are timm's defaults for the architecture, not what the weights were trained with (a
    # transformers checkpoint without preprocessor_config.json): a run asks for data.mean / data.std
    mean_std_guessed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherRecord:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("mean", "std", "input_size", "source_img_size"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def _classifier_names(cfg: dict[str, Any]) -> tuple[str, ...]:
    c = cfg.get("classifier") or "head"
    return (c,) if isinstance(c, str) else tuple(c)


#: where an OpenCLIP image tower keeps its projection: its own layout's, and a timm trunk's linear one
_OPENCLIP_PROJECTIONS = ("visual.proj", "visual.head.proj.weight", "visual.head.proj.bias")


def _openclip_timm_trunk(state_dict: dict[str, torch.Tensor]) -> bool:
    """An OpenCLIP checkpoint whose image tower is a timm model (``visual.trunk.*``), as timm's ViT checkpoint
    filter recognises one."""
    return "visual.trunk.pos_embed" in state_dict or "visual.trunk.blocks.0.norm1.weight" in state_dict


def _openclip_projection(state_dict: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """An OpenCLIP / OpenAI CLIP image tower's projection (width x embedding), which timm's ViT checkpoint
    filter turns into the head: ``visual.proj`` where it finds ``visual.class_embedding``, a timm trunk's
    ``visual.head.proj.weight`` (embedding x width) beside ``visual.trunk.*``; None elsewhere."""
    if "visual.class_embedding" in state_dict:
        return state_dict.get("visual.proj")
    if _openclip_timm_trunk(state_dict) and "visual.head.proj.weight" in state_dict:
        return state_dict["visual.head.proj.weight"].t()
    return None


def _load_error(spec: str, arch: str, err: RuntimeError, sd_keys: frozenset[str]) -> TeacherLoadError:
    """torch's strict-load error, restated with the key lists and what to change."""
    msg = str(err)
    # built with attnxfer's attention: refused as such
    if any(k.endswith(".attn.lambda_q1") for k in sd_keys):
        return TeacherLoadError(
            f"teacher {spec!r}: {arch}'s blocks are timm's DiffAttention: {DIFF_ATTENTION_REASON}"
        )
    found: dict[str, list[str]] = {"Missing encoder": [], "Unexpected": []}
    for line in msg.splitlines():
        for kind in found:
            if f"{kind.split()[0]} key(s) in state_dict:" in line:
                found[kind] += re.findall(r'"([^"]+)"', line)
    hints = []
    if "fc_norm.weight" in sd_keys and "norm.weight" not in sd_keys:
        hints.append(
            "the checkpoint has fc_norm and no final norm: it was fine-tuned with average pooling "
            "(as MAE's fine-tuning recipe does): build it with global_pool='avg' (`load_teacher(..., "
            "global_pool='avg')`; for a config's teacher.spec, save it as a local-dir: folder that records it, "
            "as docs/teachers.md shows)"
        )
    if any(re.search(r"(^|\.)(embeddings|encoder\.layers?)\.", k) for k in sd_keys):
        hints.append(
            "the names are transformers' (save_pretrained): give the folder with its config.json as "
            "local-dir:DIR, which maps them onto timm's (docs/teachers.md)"
        )
    if "dist_token" in sd_keys:
        hints.append("the checkpoint has a distillation token: use a *_distilled_* arch of its timm model")
    mismatch = re.compile(r"size mismatch for (\S+): .*?Size\(\[(.*?)\]\).*?Size\(\[(.*?)\]\)")
    shapes = mismatch.findall(msg)
    if shapes:  # another width, depth or patch size: every tensor of it differs, the first two say how
        said = "; ".join(
            f"{name}: ({have}) in the file, ({want}) in the model" for name, have, want in shapes[:2]
        )
        hints.append(
            f"{len(shapes)} tensor{'s have' if len(shapes) > 1 else ' has'} other shapes than {arch!r} gives "
            f"them ({said}): name the timm architecture the weights were trained as"
        )
    # a model of another family or size lists hundreds of keys and shapes: the first ten keys of each kind (the
    # error keeps the whole key lists), and of torch's words only what the lists and hints above do not say
    rest = [
        line.strip()
        for line in msg.splitlines()[1:]
        if "key(s) in state_dict:" not in line and not mismatch.search(line)
    ]
    more = [f"... and {len(rest) - 10} more"] if len(rest) > 10 else []
    torch_said = "\n".join(["torch said: " + msg.splitlines()[0], *rest[:10], *more]) if rest else ""
    text = (
        f"teacher {spec!r}: the weights do not fit architecture {arch!r}; nothing was randomly "
        f"initialised in their place.\n"
        + "".join(
            f"{kind} keys ({len(keys)}): {keys[:10]}{' ...' if len(keys) > 10 else ''}\n"
            for kind, keys in found.items()
            if keys
        )
        + "".join(f"Hint: {h}\n" for h in hints)
        + torch_said
    ).rstrip("\n")
    return TeacherLoadError(text, found["Missing encoder"], found["Unexpected"])


def drop_unused_entries(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(encoder entries, dropped keys)``: an MAE pretraining checkpoint's decoder and mask token taken out.
    Only decoder_* marks the format: DINOv2 checkpoints also carry a mask_token, by which timm's filter
    recognises them."""
    if not any(k.startswith("decoder_") for k in state_dict):
        return state_dict, []
    unused = {k for k in state_dict if k.startswith("decoder_") or k == "mask_token"}
    return {k: v for k, v in state_dict.items() if k not in unused}, sorted(unused)


def drop_text_tower(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(image tower entries, dropped keys)``: an OpenCLIP / OpenAI CLIP checkpoint's text tower (every entry
    outside ``visual.``; with a timm trunk, every entry but ``visual.trunk.*`` and its linear projection)
    taken out, which timm's ViT checkpoint filter would skip unsaid."""
    if "visual.class_embedding" in state_dict:
        keep = {k for k in state_dict if k.startswith("visual.")}
    elif _openclip_timm_trunk(state_dict):
        keep = {k for k in state_dict if k.startswith("visual.trunk.") or k in _OPENCLIP_PROJECTIONS}
    else:
        return state_dict, []
    return {k: v for k, v in state_dict.items() if k in keep}, sorted(set(state_dict) - keep)


def load_teacher(
    spec: str,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    cache_dir: str | None = None,
    revision: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    who: str | None = None,
    warn_guessed_stats: bool = True,
    stats_given: bool = False,
    **timm_kwargs: Any,
) -> tuple[nn.Module, TeacherRecord]:
    """A frozen teacher ViT (TransferAttention in every block, ``eval()``, no grad) and its record.

    Args:
        spec: timm name with tag, ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH`` (timm's or transformers'
            format), or a checkpoint file.
        arch: timm architecture of a checkpoint file (``vit_large_patch16_224.mae``: the tag chooses the
            preprocessing and licence recorded; untagged, timm's default tag's preprocessing is used).
        pretrained: False builds the architecture with random weights (dry runs, tests).
        cache_dir: Hub cache folder (default: HF_HUB_CACHE / HF_HOME/hub).
        revision: Hub branch, tag or commit (or ``@REV`` in the spec).
        img_size: build for this input size (square), as the teacher's family says (`ImageSizes`): position
            embeddings resampled, position tables resized or a rope rebuilt; a size the family cannot run at
            is an `ImageSizeError` naming the nearest sizes that work, raised before the weights are read.
        num_classes: None keeps the checkpoint's head, 0 drops it (reported in ``dropped_keys``); any
            other value that differs from the checkpoint's is an error (it would be a random head).
        who: how its warnings name the model (default ``teacher SPEC``; a student's start says ``model.init=SPEC``).
        warn_guessed_stats: warn where the mean/std are timm's guess (a transformers folder without
            preprocessor_config.json); a run passes False: it takes data.mean/std, or refuses without them.
        stats_given: the caller normalises by its own mean/std (a run's data.mean and data.std), so no
            warning says the weights' may be a guess (timm's defaults for an untagged architecture).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``global_pool='avg'``).
    """
    if "attn_layer" in timm_kwargs:
        raise InputError(
            "load_teacher builds teachers with attnxfer's TransferAttention; don't pass attn_layer"
        )
    parsed = parse_teacher_spec(spec, revision)
    if not parsed.source.on_hub and revision:
        raise InputError(f"revision={revision!r} only applies to Hub teachers, not {parsed.source} {spec!r}")
    who = who or f"teacher {spec}"
    role = "student" if who.startswith("student ") else "teacher"  # inspect's students load here too
    # a run's folder, or a file of one of its checkpoints whose weights do not fit arch (an MAE pre-training's
    # encoder does), is first told where the run's model is, as without arch (model.init builds such a file as
    # model.name, its documented use, and says itself what to change)
    folder = Path(parsed.name) if parsed.source is Source.LOCAL_DIR else Path(parsed.name).parent
    in_run = parsed.source is Source.LOCAL_DIR or folder.parent.name == CHECKPOINTS_SUBDIR
    hint = run_folder_hint(folder, role) if arch and in_run and not who.startswith("model.init=") else None
    run_model = f"{hint}, without arch={arch!r} (teacher.arch, --teacher-arch)"
    if hint is not None and parsed.source is Source.LOCAL_DIR:
        raise InputError(f"{spec}: {run_model}")
    if (
        hint is not None and "is no model alone" in hint
    ):  # a copy student's checkpoint: it fits arch, untrained q/k
        raise InputError(f"{spec}: {hint}")
    if arch and parsed.source is not Source.FILE:  # the spec's own architecture would be built, arch unread
        raise InputError(
            f"{spec!r} names its architecture itself; arch={arch!r} (teacher.arch, --teacher-arch) is for a "
            "weights file: leave it out"
        )
    res = resolve(parsed, arch=arch, cache_dir=cache_dir, pretrained=pretrained, role=role)
    if res.mean_std_guessed and warn_guessed_stats and not stats_given:
        warn(
            f"{who}: no preprocessor_config.json beside its config.json: the mean/std its "
            f"weights were trained with are unknown; the likeliest stand in (its family's published "
            f"checkpoints' or timm's defaults for {res.architecture}: {res.pretrained_cfg.get('mean')}, "
            f"{res.pretrained_cfg.get('std')}); normalise its images as it "
            "was trained (data.mean / data.std in a run)"
        )
    if not pretrained:
        res.weights, res.source = None, Origin.RANDOM_INIT
    # a saved config may name an attention: timm's softmax one is replaced by TransferAttention, an attnxfer
    # efficient one cannot be a teacher
    if res.efficient_attention:
        raise TeacherLoadError(
            f"teacher {spec!r} is an efficient-attention student ({res.efficient_attention}); teachers "
            "need softmax attention (their q/k define the maps that are transferred)"
        )
    if res.model_args.get("attn_layer") in ("", "attn"):
        res.model_args = {k: v for k, v in res.model_args.items() if k != "attn_layer"}
    # only a config.json names an architecture unchecked: a newer timm's, or a typo
    if not timm.is_model(res.architecture):
        close = difflib.get_close_matches(res.architecture, timm.list_models(), n=1)
        raise TeacherLoadError(
            f"teacher {spec!r}: its config.json names architecture {res.architecture!r}, which timm "
            f"{timm.__version__} does not have: upgrade timm (pip install -U timm) if the model is newer, or "
            "correct the name in config.json" + (f" (did you mean {close[0]!r}?)" if close else "")
        )

    size = other_size(res, timm_kwargs, img_size)  # a size the family cannot run at stops here
    state_dict, checkpoint_key, dropped = _read_weights(who, res) if res.weights else ({}, None, [])
    num_classes, dropped_head = _choose_head(spec, res, state_dict, num_classes)
    if res.source is Origin.FILE:
        timm_kwargs = _file_channels(res, state_dict, timm_kwargs, adopt=not who.startswith("model.init="))
    source_pos = tuple(state_dict["pos_embed"].shape) if "pos_embed" in state_dict else None
    try:
        model = _build(spec, res, state_dict, num_classes, size, timm_kwargs)
    except TeacherLoadError as e:
        if hint is None:
            raise
        raise TeacherLoadError(
            f"teacher {spec!r}: the weights do not fit architecture {arch!r}; {run_model}",
            e.missing_keys,
            e.unexpected_keys,
        ) from None
    # timm's filter makes a timm trunk's linear projection the head, with a zero bias in place of the file's
    if "visual.head.proj.bias" in state_dict:
        with torch.no_grad():
            model.get_classifier().bias.copy_(state_dict["visual.head.proj.bias"])
    # a file named as an architecture of another patch size: timm's filter resampled its kernel, silently
    kernel, built = (sd.get("patch_embed.proj.weight") for sd in (state_dict, model.state_dict()))
    conv = res.source is Origin.FILE and built is not None and getattr(kernel, "ndim", 0) == 4  # not flat
    if conv and built.shape[-2:] != kernel.shape[-2:]:
        raise TeacherLoadError(
            f"teacher {spec!r}: the weights do not fit architecture {res.architecture!r}: their patches are "
            f"{kernel.shape[-1]} px, its {built.shape[-1]} px; name the timm architecture they were trained as"
        )
    del state_dict
    if res.stats_of_run:
        debug(
            f"{who}: mean/std {res.pretrained_cfg.get('mean')}, {res.pretrained_cfg.get('std')} of the run {res.stats_of_run}"
        )
    elif not res.tag_known and not stats_given:  # said once the weights fit: a file refused is not first told
        tags = timm.list_pretrained(f"{res.architecture}.*")  # the ones there are, not a guess
        # a tag the file's name spells (MAE's mae_pretrain_vit_base.pth: .mae), said first
        name = Path(spec).name.lower()
        named = [
            t for t in tags if re.search(rf"(^|[^a-z0-9]){re.escape(t.split('.', 1)[1])}($|[^a-z0-9])", name)
        ]
        warn(
            f"{who}: mean/std are timm's defaults for {res.architecture} (tag "
            f"{res.pretrained_cfg.get('tag')!r}); name the tag the weights were trained with in the "
            f"architecture if that is wrong"
            + (f" (its file's name says {', '.join(named)})" if named else "")
            + (f" (one of: {', '.join(tags)})" if len(tags) > 1 and not named else "")
        )

    record = _record(spec, res, model, checkpoint_key, dropped + dropped_head, source_pos, size)
    hf = f" ({res.hf_repo}@{res.hf_commit})" if res.hf_repo else ""
    debug(
        f"teacher {spec}: {record.architecture} from {res.source}{hf}, {record.num_classes} classes, "
        f"input {record.input_size}, mean {record.mean} std {record.std}"
    )
    return model, record


def _read_weights(who: str, res: Resolved) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """The checkpoint's tensors minus entries an encoder doesn't use: (state dict, container key, dropped keys)."""
    state_dict, checkpoint_key = read_state_dict(
        res.weights, "model.init" if who.startswith("model.init=") else "teacher"
    )
    if res.convert is not None:  # transformers' names and layout -> the timm model's
        state_dict, dropped = res.convert(state_dict, res.weights)
        user, kind = "the timm model", res.source_format
    else:
        state_dict, dropped = drop_unused_entries(state_dict)
        user, kind = "the encoder", "mae-decoder"
        if not dropped:
            state_dict, dropped = drop_text_tower(state_dict)
            user, kind = "the image tower", "CLIP text tower"
    if dropped:
        # a timm trunk's projection head (visual.head.mlp.*) is the image tower's, not the text tower's
        head = [k for k in dropped if k.startswith("visual.")] if kind == "CLIP text tower" else []
        beyond = "the image tower's projection head beyond a linear layer, which timm's ViT does not load"
        groups = ((kind, [k for k in dropped if k not in head], 1), (beyond, head, 3))
        warn(
            f"{who}: dropped {len(dropped)} checkpoint entries {user} does not use "
            + "; ".join(
                f"({what}): {_summarise_keys(keys, depth=depth)}" for what, keys, depth in groups if keys
            )
        )
    if dropped and kind == "mae-decoder" and not res.tag_known:  # timm's .mae tag: its preprocessing, licence
        guess = f"{res.architecture}.mae"
        if guess in timm.list_pretrained(guess):
            debug(f"{who}: mae-decoder checkpoint: preprocessing and licence of timm's {guess}")
            res.pretrained_cfg = registry_cfg(guess)
            res.license, res.tag_known = res.pretrained_cfg.get("license"), True
    return state_dict, checkpoint_key, dropped


def _choose_head(
    spec: str, res: Resolved, state_dict: dict[str, torch.Tensor], num_classes: int | None
) -> tuple[int, list[str]]:
    """The teacher's class count: the checkpoint's, or 0 (head dropped, reported). Never a random head."""
    # trusted metadata for timm-format sources (and random weights), the head's tensors for a file
    ckpt_classes = res.pretrained_cfg.get("num_classes")
    trunk = "visual.trunk." if _openclip_timm_trunk(state_dict) else ""  # timm's filter takes the prefix off
    if res.weights and (ckpt_classes is None or not res.source.has_timm_metadata):
        w = state_dict.get(trunk + _classifier_names(res.pretrained_cfg)[0] + ".weight")
        proj = _openclip_projection(state_dict) if w is None else None
        ckpt_classes = int(w.shape[0]) if w is not None else int(proj.shape[-1]) if proj is not None else 0
    ckpt_classes = int(ckpt_classes or 0)
    if num_classes is None or num_classes == ckpt_classes:
        return ckpt_classes, []
    if num_classes == 0:
        heads = {c.split(".")[0] for c in _classifier_names(res.pretrained_cfg)}
        dropped = sorted(
            k for k in state_dict if k.startswith(trunk) and k[len(trunk) :].split(".")[0] in heads
        )
        if _openclip_projection(state_dict) is not None:  # the head timm's filter would make of it
            dropped += [k for k in _OPENCLIP_PROJECTIONS if k in state_dict]
        for k in dropped:
            state_dict.pop(k)
        return 0, dropped
    if res.weights:
        has = f"a {ckpt_classes}-class head" if ckpt_classes else "no classifier head (a headless encoder)"
        keep = f"num_classes={ckpt_classes} (keep it) or 0 (drop it)" if ckpt_classes else "num_classes=0"
        raise TeacherLoadError(
            f"teacher {spec!r} has {has}; num_classes={num_classes} would give it a random one. Pass {keep}."
        )
    return num_classes, []


def _stem_channels(res: Resolved, state_dict: dict[str, torch.Tensor]) -> tuple[object, int | None]:
    """The architecture's stem (timm's ``first_conv``) and the image channels the weights' kernel of it takes."""
    stem = res.pretrained_cfg.get("first_conv")
    kernel = state_dict.get(f"{stem}.weight") if isinstance(stem, str) else None
    return stem, (int(kernel.shape[1]) if getattr(kernel, "ndim", 0) == 4 else None)


def _file_channels(
    res: Resolved, state_dict: dict[str, torch.Tensor], timm_kwargs: dict[str, Any], adopt: bool
) -> dict:
    """A bare weights file's teacher takes the channels its stem was trained on: the file says how many, and
    a teacher has no key to set in_chans with (``teacher.arch`` names the architecture alone), so a grey
    teacher's file given with its RGB architecture builds instead of being refused."""
    _, chans = _stem_channels(res, state_dict)
    own = tuple(res.pretrained_cfg.get("input_size") or (3, 224, 224))
    given = timm_kwargs.get("in_chans", res.model_args.get("in_chans"))
    # other channels given than the file's: timm's own refusal says so; model.init's are model.kwargs.in_chans,
    # not adopted unasked (its data is made for the student's channels)
    if chans is None or chans == own[0] or given not in (None, chans) or (given is None and not adopt):
        return timm_kwargs
    # timm compares the weights' channels with the cfg's, not the model's (given the file's own, it said
    # "input_size declares 3 source channels and the model has 1" and loaded them unchanged)
    res.pretrained_cfg = {**res.pretrained_cfg, "input_size": (chans, *own[1:])}
    return {**timm_kwargs, "in_chans": chans}


def _build(
    spec: str,
    res: Resolved,
    state_dict: dict[str, torch.Tensor],
    num_classes: int,
    size: OtherSize | None,
    timm_kwargs: dict[str, Any],
) -> nn.Module:
    """timm builds the model and loads ``state_dict`` through the architecture's checkpoint filter with a
    strict load; at another ``size`` the family says how (`ImageSizes`): timm's filter resamples at creation,
    or the model is loaded at its own size and its weights fitted to a twin built at the new one."""
    cfg = {k: v for k, v in res.pretrained_cfg.items() if k not in SOURCE_KEYS}
    cfg["num_classes"] = num_classes  # equal to the model's: timm keeps the load strict
    kwargs = {**res.model_args, **timm_kwargs, "num_classes": num_classes}
    if res.model_args:
        kwargs["pretrained_model_args"] = dict(res.model_args)  # the source grid, for resampling
    resize = size.sizes.resize_weights if size is not None and res.weights else None
    if size is not None and size.sizes.size_argument and resize is None:
        kwargs["img_size"] = size.side
    if res.weights:
        cfg["state_dict"] = state_dict
    try:
        model = create_teacher_model(res.architecture, bool(res.weights), cfg, kwargs)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" in str(e):
            raise _load_error(spec, res.architecture, e, frozenset(state_dict)) from None
        if not res.weights:
            raise
        # timm's refusals before the load (a channel count its filter cannot adapt), in the same words, and
        # the channels the file's stem takes: timm names only the architecture's, and in_chans is what to set
        stem, chans = _stem_channels(res, state_dict)
        took = f"; the file's {stem} takes {chans}-channel images (in_chans={chans})" if chans else ""
        raise TeacherLoadError(
            f"teacher {spec!r}: the weights do not fit architecture {res.architecture!r}; timm said: {str(e).rstrip('.')}{took}"
        ) from None
    except TypeError as e:  # a model that takes no ViT arguments (img_size): a CNN named in config.json
        raise TeacherLoadError(
            f"teacher {spec!r}: timm cannot build {res.architecture!r} as a ViT teacher: {e}"
        ) from None
    finally:
        cfg.pop("state_dict", None)
    # timm keeps the pretrained cfg it loaded from: don't let it pin the checkpoint's tensors in memory.
    for attr in ("pretrained_cfg", "default_cfg"):
        getattr(model, attr, {}).pop("state_dict", None)
    if size is not None and resize is not None:  # a twin built at the new size, its weights fitted strictly
        twin = create_teacher_model(res.architecture, False, cfg, {**kwargs, "img_size": size.side})
        twin.load_state_dict(resize(model.state_dict(), twin), strict=True)
        twin.pretrained_cfg, model = dict(model.pretrained_cfg), twin
    if size is not None:  # the size it runs at, in its pretrained config (what `image_input` reads for a
        # family that records none, PVTv2; what a mirrored student and the run record inherit)
        input_size = (image_input(model).in_chans, size.side, size.side)
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "input_size": input_size}
    if res.unrecorded_args:
        # construction arguments no JSON value names (a transformers teacher's LayerNorm eps) built the teacher
        # but stay out of the recorded ones students are built from and exports write
        names = res.unrecorded_args
        model._model_args = {k: v for k, v in getattr(model, "_model_args", {}).items() if k not in names}
        model._teacher_only_args = tuple(names)
    try:
        make_transfer_aware(model)
    except TypeError as e:
        raise TeacherLoadError(f"teacher {spec!r}: {e}") from None
    model.eval()
    model.requires_grad_(False)
    return model


def _summarise_keys(keys: Sequence[str], limit: int = 8, depth: int = 1) -> str:
    """``decoder_blocks.* (96), mask_token``: the keys grouped by top-level module, or by the module ``depth``
    names deep (``visual.head.mlp.* (3)``)."""
    groups = collections.Counter(".".join(k.split(".")[:depth]) for k in keys)
    parts = [
        g if g in keys else f"{g}.* ({n})" if n > 1 else next(k for k in keys if k.startswith(g + "."))
        for g, n in groups.items()
    ]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts)} groups)" if len(parts) > limit else "")


def _record(
    spec: str,
    res: Resolved,
    model: nn.Module,
    checkpoint_key: str | None,
    dropped: list[str],
    source_pos: tuple[int, ...] | None,
    size: OtherSize | None = None,
) -> TeacherRecord:
    cfg = model.pretrained_cfg
    resampled = False
    if source_pos is not None and getattr(model, "pos_embed", None) is not None:
        resampled = tuple(model.pos_embed.shape) != source_pos
        # Same token count, other grid (e.g. 8x2 vs 4x4): only timm-format metadata knows the source grid.
        src = res.model_args.get("img_size") or (
            res.pretrained_cfg.get("input_size", (0, 0, 0))[-2:] if res.source.has_timm_metadata else None
        )
        if src is not None:  # image_input: also Hiera, whose stem records no img_size
            src = (src, src) if isinstance(src, int) else tuple(src)
            resampled = resampled or image_input(model).img_size != src
    model_args = {  # the JSON-safe ones
        k: list(v) if isinstance(v, tuple) else v
        for k, v in getattr(model, "_model_args", {}).items()
        if k != "pretrained_model_args"
        and (v is None or isinstance(v, (bool, int, float, str, tuple, list, dict)))
    }
    # the (H, W) the weights were made for, where the teacher was rebuilt at another size and the source says
    # (timm's metadata or recorded arguments; a bare weights file is only known by its architecture's default)
    known = res.source.has_timm_metadata or res.model_args.get("img_size")
    native = size.native if size is not None and known else None
    return TeacherRecord(
        spec=spec,
        architecture=res.named
        or res.architecture + (f".{cfg['tag']}" if cfg.get("tag") and res.tag_known else ""),
        source=res.source,
        hf_repo=res.hf_repo,
        hf_revision=res.hf_revision,
        hf_commit=res.hf_commit,
        files=list(res.files),
        sha256=weights_digest(Path(res.weights)) if res.weights else None,
        checkpoint_key=checkpoint_key,
        license=res.license,
        mean=tuple(float(m) for m in cfg.get("mean", ())),
        std=tuple(float(s) for s in cfg.get("std", ())),
        input_size=tuple(int(i) for i in get_model_input_config(model)["input_size"]),
        interpolation=cfg.get("interpolation"),
        crop_pct=cfg.get("crop_pct"),
        num_classes=int(getattr(model, "num_classes", 0)),
        dropped_keys=list(dropped),
        resampled_pos_embed=bool(resampled),
        source_img_size=() if native is None else tuple(native),
        resized_by=size.sizes.how if size is not None else None,
        model_args=model_args,
        source_format=res.source_format,
        mean_std_guessed=res.mean_std_guessed,
    )


def fetch_teacher(spec: str, cache_dir: str | None = None, revision: str | None = None) -> str:
    """Download a teacher's config, weights and model card into the Hub cache (where there is internet, for
    a machine without); returns the snapshot folder, or a local spec's path."""
    parsed = parse_teacher_spec(spec, revision)
    if parsed.source.is_local:
        if not Path(parsed.name).expanduser().exists():
            raise MissingPathError(
                f"teacher {spec!r}: {parsed.name} does not exist (and a local teacher needs no fetch)"
            )
        if parsed.source is Source.LOCAL_DIR:  # read as a teacher would be: an empty or run folder is refused
            resolve(parsed)
        debug(f"teacher {spec} is local: nothing to fetch")
        return parsed.name
    if parsed.source is Source.TIMM:
        cfg = registry_cfg(parsed.name, hub=True)
        repo = cfg["hf_hub_id"]
        extra = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
    else:
        repo, extra = parsed.name, []
    reason = offline_reason()
    # config, a transformers checkpoint's preprocessing, weights (and the shards' index), model card
    patterns = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"]
    patterns += ["README.md", "LICENSE*", *extra]
    try:
        for allow in (patterns, ["*.bin", "*.pth"]):  # .bin/.pth only where there is no safetensors
            path = snapshot_download(
                repo,
                revision=parsed.revision,
                cache_dir=cache_dir,
                allow_patterns=allow,
                local_files_only=reason is not None,
                library_name="attnxfer",
            )
            if any(Path(path).glob("*.safetensors")) or extra:
                break
    except LocalEntryNotFoundError:
        raise TeacherNotAvailable(
            fetch_instructions(
                spec, repo, parsed.revision, cache_dir, reason or "the download failed", "the snapshot"
            )
        ) from None
    except (RevisionNotFoundError, RepositoryNotFoundError) as e:
        raise hub_refusal(spec, repo, parsed.revision, e) from None
    resolve(parsed, cache_dir=cache_dir)  # as a run finds it: offline, a cache of its config alone is refused
    debug(f"teacher {spec}: {repo} is in {path}")
    return str(path)
