"""`attnxfer pretrain`: MAE pre-training of a timm ViT on any dataset attnxfer reads, without its labels.

A `TrainConfig` becomes a `MaskedAutoencoder` (the ``model`` section's ViT as encoder, the ``mae``
section's decoder and masking), data loaders and the same `Engine` that trains students: checkpoints,
``resume: auto``, SLURM through ``attnxfer submit --command pretrain``, metrics and TensorBoard. Each
evaluation scores the masked-patch loss on the validation set (the same masks every time) and draws
reconstructions of a few validation images (``pictures/`` and TensorBoard). At the end the encoder is
exported in timm's layout to ``RUN_DIR/export`` (decoder dropped): ``teacher.spec=local-dir:RUN_DIR/export``
makes it a teacher, ``model.init=local-dir:RUN_DIR/export`` fine-tunes it.

``model.init`` continues pre-training: from MAE's released full checkpoints (``mae_pretrain_vit_*_full.pth``:
encoder and decoder under MAE's names, in a ``model`` key; read with ``torch.load(weights_only=True)``), from
one of this command's own checkpoints, or the encoder alone from any teacher spec. The decoder is loaded
when the checkpoint has one of the ``mae`` section's shapes, else it starts fresh and the run says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import IterableDataset
from torchvision.utils import make_grid

from ...checkpoints.export import export_run
from ...checkpoints.model_card import shape_phrase
from ...checkpoints.resume_point import ResumePoint
from ...checkpoints.run_dir import RunDir
from ...checkpoints.run_lock import run_lock
from ...config import TrainConfig, dump_config, to_dict
from ...data import DatasetInfo, data_identity
from ...errors import InputError
from ...models.image_input import image_input
from ...models.mae import MaskedAutoencoder
from ...models.student import student_shape, student_spec
from ...models.vit import create_vit
from ...sources import load_teacher
from ...sources.resolve import TeacherLoadError, read_state_dict
from ...speak import say
from ...train.compile import compile_blocks
from ...train.distributed import DistributedInfo, backend_for, barrier, joined_process_group
from ...train.engine import Engine, TrainResult
from ...train.evaluation import evaluate_loss
from ...train.objective import ModuleObjective, Pictures
from ...train.optim import student_param_groups
from ...train.runtime import Runtime
from .loaders import data_info
from .parts import RunParts, num_classes_of, parts_around
from .resume import check_same_data
from .training import (
    assemble_engine,
    engine_facts,
    few_steps_warning,
    loop_settings,
    start_run,
)

#: what run.json says this run trained (export and the demo read it)
MODE = "mae-pretrain"


def build_mae(cfg: TrainConfig, in_chans: int, img_size: int | None) -> MaskedAutoencoder:
    """The ``model`` section's ViT (no head) inside the ``mae`` section's masked autoencoder."""
    m, a = cfg.model, cfg.mae
    kwargs = dict(m.kwargs, in_chans=in_chans)
    if img_size is not None:
        kwargs["img_size"] = img_size
    encoder = create_vit(m.name, num_classes=0, drop_path_rate=m.drop_path_rate, **kwargs)
    return MaskedAutoencoder(
        encoder,
        decoder_dim=a.decoder_dim,
        decoder_depth=a.decoder_depth,
        decoder_heads=a.decoder_heads,
        mlp_ratio=a.decoder_mlp_ratio,
        mask_ratio=a.mask_ratio,
        norm_pix=a.norm_pix,
    )


def _is_decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def _shape_errors(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    return [
        f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}"
        for k, v in want.items()
        if k in got and got[k].shape != v.shape
    ]


def init_mae(mae: MaskedAutoencoder, spec: str, img_size: int | None = None) -> str:
    """Load ``model.init`` into ``mae`` in place and say what was loaded (one line).

    A checkpoint file (MAE's ``*_full.pth``, a pretrain checkpoint's ``model.safetensors``) must hold every
    encoder weight in the encoder's shapes (anything else is an error naming the keys: a random encoder
    weight would be silent damage); its decoder is taken only if it has every decoder weight in this
    decoder's shapes. Any other spec (timm name, ``hf-hub:``, ``local-dir:``) gives the encoder only."""
    own = mae.state_dict()
    path = Path(spec).expanduser()
    if path.is_file():
        state, _ = read_state_dict(path)  # weights_only: a pickled argparse.Namespace is refused, with a fix
    else:
        encoder, _ = load_teacher(spec, img_size=img_size, num_classes=0)
        state = encoder.state_dict()
    enc_own = {k: v for k, v in own.items() if not _is_decoder_key(k)}
    dec_own = {k: v for k, v in own.items() if _is_decoder_key(k)}
    missing = sorted(set(enc_own) - set(state))
    unexpected = sorted(k for k in state if k not in own)
    mis_shaped = _shape_errors(enc_own, state)
    if missing or unexpected or mis_shaped:
        raise TeacherLoadError(
            f"model.init={spec!r} does not fit the encoder that model.name / model.kwargs build "
            f"(missing {missing[:8]}, unexpected {unexpected[:8]}, shapes checkpoint vs encoder {mis_shaped[:4]}); "
            "set model.name / model.kwargs to the checkpoint's architecture",
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    load = {k: state[k] for k in enc_own}
    dec_state = {k: v for k, v in state.items() if _is_decoder_key(k)}
    dec_missing = sorted(set(dec_own) - set(dec_state))
    dec_shapes = _shape_errors(dec_own, dec_state)
    if not dec_state:
        decoder = "decoder fresh (the checkpoint has none)"
    elif dec_missing or dec_shapes:
        what = (
            f"shapes checkpoint vs mae section {dec_shapes[:3]}"
            if dec_shapes
            else f"missing {dec_missing[:4]}"
        )
        decoder = f"decoder fresh: the checkpoint's does not fit the mae section ({what})"
    else:
        load.update(dec_state)
        decoder = f"decoder loaded ({len(dec_state)} tensors)"
    with torch.no_grad():
        for k, v in load.items():
            own[k].copy_(v)  # state_dict tensors share storage with the parameters and buffers
    return f"model.init: encoder loaded from {spec} ({len(enc_own)} tensors), {decoder}"


def reconstruction_pictures(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: int = 4, seed: int = 0
) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """What the engine draws after each evaluation: one row per image (masked input, reconstruction,
    original), in pixels, enlarged ``scale`` times (nearest) so 28-px images stay legible."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 1, -1, 1, 1)

    def draw(mae: nn.Module) -> dict[str, torch.Tensor]:
        was_training = mae.training
        mae.eval()
        device = next(mae.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        triplets = mae.reconstruct(images.to(device), generator=generator).cpu()
        mae.train(was_training)
        pixels = (triplets * std_t + mean_t).clamp(0, 1)
        grid = make_grid(pixels.flatten(0, 1), nrow=3, padding=1, pad_value=1.0)
        return {"val/reconstruction": F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]}

    return draw


def _write_run_files(cfg: TrainConfig, engine: Engine, parts: RunParts, mae: MaskedAutoencoder) -> None:
    if not engine.is_main:
        return
    run_dir = RunDir(cfg.run_dir)
    run_dir.write_config(dump_config(cfg, "pretrain"))
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
        "data": engine.record.get("data"),
        **engine_facts(engine),
    }
    run_dir.write_record(info)


def _pretrain_parts(
    cfg: TrainConfig, info: DatasetInfo, mae: MaskedAutoencoder, runtime: Runtime
) -> RunParts:
    """The encoder (as the run's student) and the loaders, normalised as ``data`` or the dataset says."""
    d, encoder = cfg.data, mae.encoder
    num_classes = num_classes_of(cfg, info)
    inputs = image_input(encoder)
    img_size = d.img_size or inputs.img_size[0]
    in_chans = inputs.in_chans
    mean, std = d.mean or info.mean, d.std or info.std
    return parts_around(
        cfg,
        info,
        encoder,
        img_size=img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        num_classes=num_classes,
        rank=runtime.rank,
        world_size=runtime.world,
    )


def build_pretrain_engine(
    cfg: TrainConfig,
    runtime: Runtime | None = None,
    scoring: bool = False,
    found: ResumePoint | None = None,
) -> Engine:
    """The MAE, data, optimiser and engine that ``cfg`` describes; ``scoring=True`` writes
    nothing into the run dir (`attnxfer eval` scoring it). A resume is judged by the same rule as `attnxfer
    train`'s (`attnxfer.apps.run.resume`): the MAE's shape, masking and loss cannot change under a checkpoint.
    ``found``: the checkpoint the caller already found (`attnxfer eval`)."""
    _refuse_teacher_keys(cfg)
    cfg, runtime, point = start_run(cfg, runtime, found, scoring=scoring, command="pretrain")
    if runtime.is_main and not scoring:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    barrier()
    d = cfg.data
    info = data_info(d)
    mae = build_mae(cfg, d.in_chans or info.in_chans, d.img_size)
    init_note = init_mae(mae, cfg.model.init, d.img_size) if cfg.model.init else None
    # The loaders are the training ones (labels, if data.labels reads any, come along unread); no teacher.
    parts = _pretrain_parts(cfg, info, mae, runtime)
    data = data_identity(parts.train_loader.dataset)
    if not scoring and not check_same_data(point, data, cfg):
        point = dataclasses.replace(point, restart_epoch=True)
    mae.to(runtime.device)
    settings = dataclasses.replace(
        loop_settings(cfg, runtime.world, resume=point), metric="val_loss", metric_mode="min"
    )
    if cfg.model.compile:  # the encoder's and the decoder's blocks; parameter names stay MAE's
        compile_blocks([*mae.encoder.blocks, *mae.decoder_blocks], cfg.model.compile_mode)
    groups = student_param_groups(mae, weight_decay=cfg.optim.weight_decay)
    pictures = _pictures(cfg, parts)
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
    if not scoring and not (point is not None and point.step >= engine.total_steps):
        _write_run_files(cfg, engine, parts, mae)  # (a finished run's files stay as they are)
        if warning := few_steps_warning(engine.settings, engine.steps_per_epoch, engine.total_steps):
            say(warning)
    if engine.is_main:
        _describe_pretraining(cfg, mae, init_note)
    return engine


def _refuse_teacher_keys(cfg: TrainConfig) -> None:
    """Pretraining learns from pixels: a teacher's keys would be silently unused."""
    if cfg.teacher.spec:
        raise InputError(
            f"pretrain learns from pixels alone; teacher.spec={cfg.teacher.spec!r} would be unused. "
            "Remove it (attention transfer from a teacher is `attnxfer train`)"
        )
    if cfg.teacher.compile:
        raise InputError("pretrain has no teacher; remove teacher.compile (model.compile compiles the MAE)")


def _pictures(cfg: TrainConfig, parts: RunParts) -> list[Pictures]:
    """The reconstructions drawn at each evaluation: ``mae.pictures`` validation images, spread over the
    set (a stream's first ones)."""
    if cfg.mae.pictures <= 0:
        return []
    val = parts.val_loader.dataset
    if isinstance(val, IterableDataset):  # a stream (wds/, hfids/): its first images
        shown = [x for x, *_ in islice(iter(val), cfg.mae.pictures)]
    else:
        picks = torch.linspace(0, len(val) - 1, cfg.mae.pictures).long().tolist()
        shown = [val[i][0] for i in picks]
    return [reconstruction_pictures(torch.stack(shown), parts.mean, parts.std)]


def _describe_pretraining(cfg: TrainConfig, mae: MaskedAutoencoder, init_note: str | None) -> None:
    """What the run does, in one line (after the note of its initial weights, if any)."""
    if init_note:
        say(init_note)
    n = mae._num_patches
    kept = max(1, round(n * (1 - cfg.mae.mask_ratio)))
    say(
        f"MAE pre-training of {cfg.model.name} on {cfg.data.dataset} (labels unused): the encoder sees {kept} of "
        f"{n} patches per image; decoder {cfg.mae.decoder_depth} blocks x {cfg.mae.decoder_dim}; "
        f"{'per-patch normalised' if cfg.mae.norm_pix else 'raw'} pixel loss on the masked patches"
    )


def pretrain(cfg: TrainConfig) -> TrainResult:
    """Pre-train (or resume) the MAE that ``cfg`` describes; export its encoder to ``RUN_DIR/export``.
    Scoring its newest checkpoint is `attnxfer eval` (`evaluate_run` with `build_pretrain_engine`)."""
    main = DistributedInfo.from_environment().is_main_process
    with (
        run_lock(cfg.run_dir, "pretrain", enabled=main),
        joined_process_group(backend_for(cfg.device), cfg.dist.timeout),
    ):
        engine = build_pretrain_engine(cfg)
        result = engine.run()
        export = Path(cfg.run_dir) / "export"
        # a finished run resumed again keeps its export (one is made if the run stopped before it)
        if cfg.mae.export and engine.is_main and not (result.nothing_to_do and export.is_dir()):
            out = export_run(cfg.run_dir, export, weights="raw", overwrite=True)
            say(f"encoder exported to {out}: teacher.spec=local-dir:{out}")
        barrier()
        return result
