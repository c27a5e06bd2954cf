"""`attnxfer pretrain`: MAE pre-training of a timm ViT on any dataset attnxfer reads, without its labels.

The ``model`` section's ViT inside the ``mae`` section's `MaskedAutoencoder`, trained by the same `Engine`
as students (checkpoints, resume, SLURM, trackers); each evaluation scores the masked-patch loss and draws
reconstructions. The last checkpoint's encoder (MAE fine-tunes its final weights) is exported in timm's
layout to ``RUN_DIR/export`` (decoder dropped), a teacher (``teacher.spec``) or an init (``model.init``)
for later runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import IterableDataset
from torchvision.utils import make_grid

from ...checkpoints.export import export_run
from ...checkpoints.model_card import shape_phrase
from ...checkpoints.resume_point import ResumePoint
from ...checkpoints.store import set_aside
from ...config import DataConfig, TrainConfig, config_changes, refuse_unread_sections, to_dict
from ...data import data_identity
from ...errors import InputError
from ...models.image_input import image_input
from ...models.mae import MaskedAutoencoder, init_encoder_as_mae, kept_patches
from ...models.student import student_shape, student_spec
from ...sources.resolve import TeacherLoadError, read_state_dict
from ...speak import say
from ...train.compile import checkpoint_gradients, compile_blocks
from ...train.distributed import barrier
from ...train.engine import Engine, TrainResult
from ...train.evaluation import evaluate_loss
from ...train.objective import ModuleObjective
from ...train.optim import student_param_groups
from .loaders import data_info
from .parts import create_named_vit, load_init, normalisation, parts_around
from .resume import check_same_data
from .training import assemble_engine, check_eval_metrics, locked_run, loop_settings, record_run, start_run

#: what run.json says this run trained (export and the demo read it)
MODE = "mae-pretrain"


def build_mae(cfg: TrainConfig, in_chans: int, img_size: int | None) -> MaskedAutoencoder:
    """The ``model`` section's ViT (no head) inside the ``mae`` section's masked autoencoder."""
    m, a = cfg.model, cfg.mae
    kwargs = {"in_chans": in_chans, **m.kwargs}  # model.kwargs.in_chans first, as train's student
    if img_size is not None:
        kwargs["img_size"] = img_size
    encoder = create_named_vit(m, num_classes=0, **kwargs)
    mae = MaskedAutoencoder(
        encoder,
        decoder_dim=a.decoder_dim,
        decoder_depth=a.decoder_depth,
        decoder_heads=a.decoder_heads,
        mlp_ratio=a.decoder_mlp_ratio,
        mask_ratio=a.mask_ratio,
        norm_pix=a.norm_pix,
    )
    # MAE's init: its encoder, as its decoder, has fixed sin-cos positions, not learned ones
    init_encoder_as_mae(encoder)
    return mae


def _is_decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def _shape_errors(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    return [
        f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}"
        for k, v in want.items()
        if k in got and got[k].shape != v.shape
    ]


def init_mae(
    mae: MaskedAutoencoder,
    spec: str,
    img_size: int | None = None,
    cache_dir: str | None = None,
    data: DataConfig | None = None,
) -> tuple[str, dict[str, Any]]:
    """Load ``model.init`` into ``mae`` in place; returns what was loaded (one line) and the mean/std the
    encoder was trained on where its source records them (a model's, not a bare file's). A checkpoint file
    (MAE's ``*_full.pth``, a pretrain checkpoint) must hold every encoder weight in the encoder's shapes (a
    random encoder weight would be silent damage); its decoder is taken only if it fits whole. Any other spec
    gives the encoder only."""
    own = mae.state_dict()
    path = Path(spec).expanduser()
    stats: dict[str, Any] = {}
    encoder = None
    if path.is_file():
        # weights_only: a pickled argparse.Namespace is refused, with the fix for model.init
        state, _ = read_state_dict(path, "model.init")
    else:
        encoder = load_init(spec, img_size, file_model=None, cache_dir=cache_dir, data=data)
        state, stats = encoder.state_dict(), getattr(encoder, "pretrained_cfg", {})
    # a trained student's file (a fine-tune's, a run's checkpoint) has a classifier the headless encoder lacks
    head = sorted(k for k in state if k.startswith("head.") and k not in own)
    state = {k: v for k, v in state.items() if k not in head}
    enc_own = {k: v for k, v in own.items() if not _is_decoder_key(k)}
    dec_own = {k: v for k, v in own.items() if _is_decoder_key(k)}
    missing = sorted(set(enc_own) - set(state))
    unexpected = sorted(k for k in state if k not in own and not _is_decoder_key(k))
    mis_shaped = _shape_errors(enc_own, state)
    if missing or unexpected or mis_shaped:
        built_as = ""  # what a spec's model is, which a user of model.init reads nowhere else (transformers')
        if encoder is not None:
            built = student_spec(encoder)
            args = {k: v for k, v in built["model_args"].items() if k not in ("num_classes", "in_chans")}
            built_as = f" (it is {built['architecture']} with model.kwargs={json.dumps(args)}, data.in_chans="
            built_as += f"{built['model_args'].get('in_chans', 3)})"
        raise TeacherLoadError(
            f"model.init={spec!r} does not fit the encoder that model.name / model.kwargs build "
            f"(missing {missing[:8]}, unexpected {unexpected[:8]}, shapes checkpoint vs encoder {mis_shaped[:4]}); "
            f"set model.name / model.kwargs to the checkpoint's architecture{built_as}",
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    load = {k: state[k] for k in enc_own}
    dec_state = {k: v for k, v in state.items() if _is_decoder_key(k)}
    dec_differ = sorted(set(dec_own) ^ set(dec_state))  # a deeper or shallower decoder: not loaded
    dec_shapes = _shape_errors(dec_own, dec_state)
    if not dec_state:
        decoder = "decoder fresh (the checkpoint has none)"
    elif dec_differ or dec_shapes:
        what = (
            f"shapes checkpoint vs mae section {dec_shapes[:3]}"
            if dec_shapes
            else f"keys only one has {dec_differ[:4]}"
        )
        decoder = f"decoder fresh: the checkpoint's does not fit the mae section ({what})"
    else:
        load.update(dec_state)
        decoder = f"decoder loaded ({len(dec_state)} tensors)"
    with torch.no_grad():
        for k, v in load.items():
            own[k].copy_(v)  # state_dict tensors share storage with the parameters and buffers
    left_out = f", its classifier ({', '.join(head)}) left out" if head else ""
    return f"model.init: encoder loaded from {spec} ({len(enc_own)} tensors){left_out}, {decoder}", stats


def reconstruction_pictures(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """What the engine draws after each evaluation: one row per image (masked input, reconstruction,
    original), in pixels, enlarged 4 times (nearest) so 28-px images stay legible."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 1, -1, 1, 1)

    def draw(mae: nn.Module) -> dict[str, torch.Tensor]:
        was_training = mae.training
        mae.eval()
        device = next(mae.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)  # the same masks each time
        triplets = mae.reconstruct(images.to(device), generator=generator).cpu()
        mae.train(was_training)
        pixels = (triplets * std_t + mean_t).clamp(0, 1)
        grid = make_grid(pixels.flatten(0, 1), nrow=3, padding=1, pad_value=1.0)
        return {"val/reconstruction": F.interpolate(grid[None], scale_factor=4, mode="nearest")[0]}

    return draw


_NO_LABELS = "MAE's loss reads no label"
_SOFTMAX = (
    "the encoder keeps softmax attention; `attnxfer convert` turns the exported teacher into an efficient one"
)
#: keys MAE pre-training reads nowhere, each with why: set to anything but its default, one is refused rather
#: than silently unused (aug.label_smoothing stays quietly allowed: the ViT-B recipe sets it to 0); the
#: transfer section, read by no part of it, is refused whole (`refuse_unread_sections`); of teacher's keys
#: cache_dir is read (where model.init's downloads go)
_UNREAD_BY_PRETRAIN = {
    "teacher.spec": "it learns from pixels alone; attention transfer from a teacher is `attnxfer train`",
    "teacher.compile": "it has no teacher; model.compile compiles the MAE",
    "teacher.dtype": "it has no teacher; precision sets the MAE's",
    "teacher.arch": "it has no teacher; a model.init weights file is read as model.name / model.kwargs build it",
    "teacher.revision": "it has no teacher; model.init=hf-hub:ORG/NAME@REV names a revision",
    "model.attention": _SOFTMAX,
    "model.attention_kwargs": _SOFTMAX,
    "model.num_classes": "the encoder is exported headless; a head is fine-tuning's (`attnxfer train`, model.init)",
    "model.global_pool": "the pooling is fine-tuning's: set it on `attnxfer train` with model.init",
    "model.fc_norm": "the pooling is fine-tuning's: set it on `attnxfer train` with model.init",
    "ema.decay": "MAE pre-trains without an EMA of its weights",
    "optim.layer_decay": "layer-wise lr decay is fine-tuning's",
    "aug.mixup": _NO_LABELS,
    "aug.cutmix": _NO_LABELS,
    "aug.mixup_prob": _NO_LABELS,
    "aug.mixup_switch_prob": _NO_LABELS,
    "aug.label_smoothing": _NO_LABELS,
}


def build_pretrain_engine(
    cfg: TrainConfig, scoring: bool = False, found: ResumePoint | None = None
) -> Engine:
    """The MAE, data, optimiser and engine that ``cfg`` describes; ``scoring=True`` (`attnxfer eval`, with
    the checkpoint it ``found``) writes nothing into the run dir."""
    cfg, runtime, point = start_run(cfg, None, found, scoring=scoring, command="pretrain")
    if runtime.is_main and not scoring:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    barrier()
    d = cfg.data
    info = data_info(d)
    mae = build_mae(cfg, d.in_chans or info.in_chans, d.img_size)
    init_note, stats = (
        init_mae(mae, cfg.model.init, d.img_size, cfg.teacher.cache_dir, d) if cfg.model.init else (None, {})
    )
    # the encoder is the run's student; the loaders are the training ones (labels, if any, come along unread)
    inputs = image_input(mae.encoder)
    # as train refuses it: one stream, the encoder's channels
    if d.in_chans and d.in_chans != inputs.in_chans:
        raise InputError(
            f"data.in_chans={d.in_chans}, but the encoder takes {inputs.in_chans}-channel images (model.kwargs."
            "in_chans): drop data.in_chans"
        )
    mean, std = normalisation(d, stats, info, inputs.in_chans)
    parts = parts_around(
        cfg,
        info,
        mae.encoder,
        img_size=d.img_size or inputs.img_size[0],
        in_chans=inputs.in_chans,
        mean=mean,
        std=std,
        num_classes=info.num_classes or 0,  # labels, if any, are unread: a stream need not count its classes
        rank=runtime.rank,
        world_size=runtime.world,
        chosen_by=(cfg.model.name, "model.init's" if stats.get("mean") else "the dataset's"),
    )
    data = data_identity(parts.train_loader.dataset)
    if not scoring and not check_same_data(point, data, cfg):
        point = dataclasses.replace(point, restart_epoch=True)
    mae.to(runtime.device)
    settings = dataclasses.replace(
        loop_settings(cfg, runtime.world, resume=point, say_batch=not scoring),
        metric="val_loss",
        metric_mode="min",
    )
    if cfg.model.grad_checkpointing:
        checkpoint_gradients(mae)
    if cfg.model.compile:  # the encoder's and the decoder's blocks; parameter names stay MAE's
        compile_blocks([*mae.encoder.blocks, *mae.decoder_blocks], cfg.model.compile_mode)
    saved = (
        ((point.state.get("optimizer_meta") or {}).get("tree") or {}).get("param_groups", []) if point else []
    )
    if sum(len(g["params"]) for g in saved) == sum(p.requires_grad for p in mae.parameters()) + 1:
        # a run begun while the encoder learned its positions: its optimiser holds them, so it goes on learning
        mae.encoder.pos_embed.requires_grad_(True)
    groups = student_param_groups(mae, weight_decay=cfg.optim.weight_decay)
    pictures, val = [], parts.val_loader.dataset  # mae.pictures val images spread over the set
    if cfg.mae.pictures > 0:
        if isinstance(val, IterableDataset):  # a stream (wds/, hfids/): its first images
            shown = [x for x, *_ in islice(iter(val), cfg.mae.pictures)]
        else:
            shown = [val[i][0] for i in torch.linspace(0, len(val) - 1, cfg.mae.pictures).long().tolist()]
        pictures = [reconstruction_pictures(torch.stack(shown), parts.mean, parts.std)]
    engine = assemble_engine(
        cfg,
        runtime,
        ModuleObjective(mae, evaluate_loss),
        parts,
        groups,
        settings=settings,
        record={"teacher": None, "config": to_dict(cfg, "pretrain"), "data": data},
        pictures=pictures,
    )
    if not scoring:
        a = cfg.mae
        what = shape_phrase(student_shape(mae.encoder))  # its real shape, not only the name it was built from
        info = {
            "objective": "mae",
            "mode": MODE,
            "teacher": None,
            "student": student_spec(mae.encoder),
            "description": (
                f"{what[0].upper()}{what[1:]} (built as {cfg.model.name}), an encoder pre-trained as a masked "
                f"autoencoder (mask ratio {a.mask_ratio}, "
                f"{'normalised' if a.norm_pix else 'raw'} pixel targets, decoder {a.decoder_depth}x{a.decoder_dim} "
                f"dropped at export) on {cfg.data.dataset} without labels, with attnxfer."
            ),
            "best_mode": "min",
            "num_classes": 0,
            "mean": parts.mean,
            "std": parts.std,
        }
        record_run(cfg, engine, point, "pretrain", info)
    if init_note:
        say(init_note)
    n = mae._num_patches
    say(
        f"MAE pre-training of {cfg.model.name} on {cfg.data.dataset} (labels unused): the encoder sees "
        f"{kept_patches(n, cfg.mae.mask_ratio)} of {n} patches per image; decoder {cfg.mae.decoder_depth} blocks x "
        f"{cfg.mae.decoder_dim}; {'per-patch normalised' if cfg.mae.norm_pix else 'raw'} pixel loss on the masked "
        "patches"
    )
    return engine


def refuse_unread_keys(cfg: TrainConfig) -> None:
    """Keys MAE pre-training would leave unused, refused before any work (`attnxfer submit` too, before the
    queue's wait)."""
    refuse_unread_sections(cfg, "pretrain")  # a notebook's pretrain(cfg) too, not only the command line
    changed = config_changes(TrainConfig(), cfg)
    # no label smoothing (pretrain/mae_vit_base says so) is what MAE's loss has anyway: only a value is refused
    if changed.get("aug.label_smoothing", (None, None))[1] == 0:
        del changed["aug.label_smoothing"]
    unused = [
        f"{key}={changed[key][1]!r} ({why})" for key, why in _UNREAD_BY_PRETRAIN.items() if key in changed
    ]
    if unused:
        raise InputError(
            f"pretrain does not read {'; '.join(unused)}: remove {'it' if len(unused) == 1 else 'them'}"
        )


def pretrain(cfg: TrainConfig) -> TrainResult:
    """Pre-train (or resume) the MAE that ``cfg`` describes; export its encoder to ``RUN_DIR/export``."""
    refuse_unread_keys(cfg)
    check_eval_metrics(cfg, own_objective=True)  # as `attnxfer eval` of the run would, later
    with locked_run(cfg, "pretrain"):
        engine = build_pretrain_engine(cfg)
        result = engine.run()
        export = Path(cfg.run_dir) / "export"
        # a finished run resumed again keeps its export (one is made if the run stopped before it); a folder
        # given another run's finished checkpoint has no checkpoint to export
        kept = export.is_dir() or engine.resumes_other_run
        if cfg.mae.export and engine.is_main and not (result.nothing_to_do and kept):
            # the earlier export is the teacher of runs that check it by hash: kept, as a replaced checkpoint is
            if export.is_dir():
                say(
                    f"kept the earlier export, a teacher of runs trained from it, as {set_aside(export, 'replaced')}"
                )
            out = export_run(cfg.run_dir, export, weights="raw", overwrite=True)  # its latest checkpoint
            say(
                f"encoder of the last checkpoint, {Path(engine.last_ckpt or '').name} (MAE's rule: not the "
                f"lowest val loss), exported to {out}: teacher.spec=local-dir:{out}"
            )
        barrier()
        return result
