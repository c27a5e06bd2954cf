"""The run configuration's schema: one dataclass per section, one field per key, each declared once
(``key(...)``: type, default, range, resume rules); the tables other code reads are derived from the fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .keys import (
    ANY,
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    Range,
    key,
    leaves,
    resumable_keys,
    search_resumable_keys,
    section,
)
from .overrides import apply_overrides, dump_config


@dataclass
class ModelConfig:
    """The student. ``name`` is a timm architecture, built when no teacher is mirrored (with a teacher and
    ``mirror_teacher``, the student takes the teacher's architecture); ``kwargs`` go to timm.create_model."""

    name: str = key("vit_micro_patch4_28", range=ANY)  # timm architecture, unless a teacher is mirrored
    num_classes: int | None = key(None, range=AT_LEAST_1)  # default: the dataset's
    drop_path_rate: float = key(0.1, range=OPEN_FRACTION)  # stochastic depth, linear over blocks (timm)
    # copy the teacher's architectural choices (tokens, norms, ...)
    mirror_teacher: bool = key(True, range=ANY)
    # Pooling, applied after mirroring (so mirror_teacher never undoes it): null = the teacher's (or the
    # timm model's); "avg" = MAE's fine-tuning head, mean over patch tokens then fc_norm (timm's
    # global_pool="avg", fc_norm=True); "token" = class token after the final norm; timm's choices, "" = none.
    global_pool: str | None = key(None, choices=("token", "avg", "max", "avgmax", "map", ""))
    # null = timm's rule: a norm after pooling exactly when global_pool is avg, max or avgmax
    fc_norm: bool | None = key(None, range=ANY)
    # fine-tune: start from these weights (timm name with tag, hf-hub:, local-dir:, or a weights file built as
    # model.name / model.kwargs say)
    init: str | None = key(None, range=ANY)
    kwargs: dict[str, Any] = key(factory=dict, range=ANY)  # to timm.create_model, e.g. {depth: 6}
    # The student's attention: null = softmax (timm's); a registered zoo attention (performer, hedgehog, ...)
    # for every block, or a list with one name per block. A fresh student with it is distilled like any other
    # (transfer.mode: distill picks the map loss of each student layer's map kind). Names are checked against
    # attnxfer.models' registry as the CLI loads the config, before any model is built.
    attention: str | list[str] | None = key(None, range=ANY)
    attention_kwargs: dict[str, Any] = key(factory=dict, range=ANY)  # its options, e.g. {num_features: 64}
    # torch.compile of the student's blocks (as timm's --torchcompile; names and checkpoints unchanged)
    compile: bool = key(False, range=ANY, resumable=True)
    # default | max-autotune-no-cudagraphs (also for teacher.compile)
    compile_mode: str = key("default", choices=("default", "max-autotune-no-cudagraphs"), resumable=True)
    # timm's --grad-checkpointing: the blocks' activations recomputed in the backward pass instead of kept (the
    # same gradients, less memory, a step ~15 % longer; an MAE's, a conversion's stage 2); resumable
    grad_checkpointing: bool = key(False, range=ANY, resumable=True)


@dataclass
class TeacherConfig:
    """The pretrained teacher: timm name, ``hf-hub:ORG/NAME``, ``local-dir:PATH`` (an attnxfer export too), a file."""

    spec: str | None = key(
        None, range=ANY
    )  # timm name, hf-hub:ORG/NAME, local-dir:PATH or a file; null: none
    arch: str | None = key(None, range=ANY)  # architecture for a bare weights file
    revision: str | None = key(None, range=ANY)  # a Hub revision (branch, tag or commit) of teacher.spec
    # the Hugging Face cache to read (and download) weights in; null: the Hub's default
    cache_dir: str | None = key(None, range=ANY, resumable=True, search_resumable=True)
    # auto = the run's precision (bf16 on GPU, fp32 on CPU); or fp32 / bf16 / fp16
    dtype: str = key("auto", choices=("auto", "fp32", "bf16", "fp16"))
    # torch.compile of the teacher's blocks (no-grad graphs), mode model.compile_mode; resumable: how the step
    # runs, not what it computes
    compile: bool = key(False, range=ANY, resumable=True)


@dataclass
class TransferConfig:
    """How attention moves from teacher to student (see attnxfer.transfer.plan)."""

    # what the student borrows from or learns of the teacher: attnxfer.transfer.modes.MODES, whose keys these
    # choices are (tests/cli/test_config_validation.py holds the two equal), so a typo stops as the config loads
    mode: str = key(
        "distill",
        choices=(
            "none",
            "copy",
            "copy_q",
            "copy_k",
            "copy_v",
            "distill",
            "distill_q",
            "distill_k",
            "distill_v",
        ),
    )
    end_layer: int = key(0, range=ANY)  # 0 = all, -k = all but the last k (the paper's), k > 0: the first k
    layers: list[int] | None = key(None, range=ANY)  # student layers (-1: the last); wins over end_layer
    # weight of a distill mode's attention loss (the paper's 3.0); copy and none read it nowhere
    atd_weight: float = key(1.0, range=NON_NEGATIVE)
    # False: teacher deterministic (default); True: the paper's shared masks
    share_drop_path: bool = key(False, range=ANY)
    # weight of KL(teacher logits || student logits) beside the task loss: logit distillation's one spelling (a
    # transfer.losses entry {name: logit_kd, weight: W, temperature: T} is read as this and logit_temperature)
    logit_distill: float = key(0.0, range=NON_NEGATIVE)
    logit_temperature: float = key(1.0, range=POSITIVE)  # softening temperature T of that KL (scaled by T^2)
    # weight of feature distillation: cosine distance + smooth-L1 between the student's and the teacher's final
    # token features (forward_features, after the final norm; prefix and patch tokens), standardised by the
    # teacher token's own mean and std (transfer/feature_loss.py says why). null: 0 in train; in convert, 1
    # where stage 2 has no task loss (the label-free stage 2). Not resumable: it is what the run optimises
    feature_distill: float | None = key(None, range=NON_NEGATIVE)
    # weight of the task loss (cross-entropy of the student's logits on the labels); 0: no task loss, no label
    # is read anywhere in the run, no head is needed, and the run is scored by final-feature agreement with
    # the teacher. null: 1 in train; in convert, 1 where the student has a head to train (the teacher's, or
    # model.num_classes) and the data has labels, else 0. Not resumable: it is what the run optimises
    task_weight: float | None = key(None, range=NON_NEGATIVE)
    # more comparisons of the student with its teacher, each a registered comparison loss
    # (attnxfer.transfer.comparisons): {name: NAME, weight: W, signal: SIGNAL, layers: [...], <its options>},
    # e.g. [{name: mse, signal: v, weight: 1.0}, {name: mse, signal: q, weight: 0.5}]; a layer signal (maps, q,
    # k, v) is compared at the transfer's layers (layers / end_layer), or at those of them the entry's layers
    # names (spelt as transfer.layers; null: all). Built in: map, mse, feature_distill
    # (logit distillation is logit_distill above). Not resumable: it is what the run optimises
    losses: list[dict[str, Any]] = key(factory=list, range=ANY)
    # how a softmax student layer's exact CE is evaluated: auto (measured on the run's device and shapes
    # before the first step; a resumed run keeps its recorded choice) | rows | sdpa | attention_lse (the
    # student's attention kernel hands out its log-sum-exp: FlexAttention on CUDA) | triton (CUDA) |
    # materialised (the reference's N×N maps): attnxfer.transfer.losses.CE_PATHS. Resumable: the same loss, evaluated
    # another way
    ce_path: str = key(
        "auto", choices=("auto", "rows", "sdpa", "attention_lse", "triton", "materialised"), resumable=True
    )
    # memory the materialised path's maps may take (GiB, all distilled layers at the step's peak) for auto
    # to consider it; None = a quarter of the free memory (CPU: MemAvailable; CUDA: cudaMemGetInfo); 0 = never.
    # Resumable: which ways auto may consider
    materialise_budget_gib: float | None = key(None, range=NON_NEGATIVE, resumable=True)


@dataclass
class DataConfig:
    # animal_mnist | folder | synthetic | recall | hfds/NAME | hfids/NAME | wds/NAME | torch/NAME | a plug-in
    dataset: str = key("animal_mnist", range=ANY)
    # for folder datasets: ROOT/train/<class>/..., ROOT/val/<class>/...; animal_mnist: the folder its arrays are
    # cached in (its parent must exist); resumable: the same dataset at another path (a node-local copy)
    root: str | None = key(None, range=ANY, resumable=True)
    img_size: int | None = key(None, range=AT_LEAST_1)  # default: the teacher's, else the student's
    # default: the teacher's, else model.kwargs.in_chans, else the dataset's (the student is built for them)
    in_chans: int | None = key(None, range=AT_LEAST_1)
    # default: the teacher's (pretrained cfg), else model.init's, else the dataset's
    mean: list[float] | None = key(None, range=ANY)
    std: list[float] | None = key(None, range=POSITIVE)  # default: as data.mean
    batch_size: int = key(128, range=AT_LEAST_1)  # per process
    eval_batch_size: int | None = key(None, range=AT_LEAST_1, resumable=True)  # default: data.batch_size
    # DataLoader worker processes per process
    num_workers: int = key(0, range=NON_NEGATIVE, resumable=True, search_resumable=True)
    pin_memory: bool = key(False, range=ANY, resumable=True, search_resumable=True)  # pinned host memory
    # the seed of the data order and augmentation (sampler, random crops and flips, mixup); null: the run's
    # seed. A study's students share it whatever seeds their initialisation
    seed: int | None = key(None, range=Range(0, 2**32 - 1))
    # the dataset's own options, e.g. {length: 64} for synthetic (its builder's arguments)
    kwargs: dict[str, Any] = key(factory=dict, range=ANY)
    # false: read images only, never a label (folder: every image under ROOT/train and ROOT/val, class
    # folders optional; hfds/ without a label column; wds/ without .cls); work that needs labels stops first
    labels: bool = key(True, range=ANY)


@dataclass
class AugConfig:
    label_smoothing: float = key(0.1, range=OPEN_FRACTION)  # of the targets (with mixup, its soft ones)
    mixup: float = key(0.0, range=NON_NEGATIVE)  # alpha (timm's Mixup); 0 = off (MAE's fine-tune: 0.8)
    cutmix: float = key(0.0, range=NON_NEGATIVE)  # alpha; 0 = off (MAE's fine-tune: 1.0)
    mixup_prob: float = key(1.0, range=FRACTION)  # share of batches mixed at all
    mixup_switch_prob: float = key(0.5, range=FRACTION)  # share of mixed batches cutmixed (both on)
    # random erasing probability where the dataset's builder takes it (folder, hfds/, hfids/, wds/); the
    # in-memory animal_mnist, synthetic and recall make their own tensors: a run says it and auto_augment unused
    reprob: float = key(0.0, range=FRACTION)
    # random erasing fill: const (timm's default) | rand | pixel (MAE / the paper)
    remode: str = key("const", choices=("const", "rand", "pixel"))
    recount: int = key(1, range=AT_LEAST_1)  # random erasing: how many boxes per image
    # timm's policy, e.g. rand-m9-mstd0.5-inc1 (read where reprob is)
    auto_augment: str | None = key(None, range=ANY)


@dataclass
class OptimConfig:
    lr: float | None = key(None, range=POSITIVE, resumable=True)  # absolute; default blr * global_batch / 256
    # MAE's base lr, read where optim.lr is null; given over a config whose optim.lr is set (a recipe's), it
    # is refused naming both keys (optim.lr=null beside it makes it count)
    blr: float = key(1e-3, range=POSITIVE, resumable=True)
    min_lr: float = key(1e-6, range=NON_NEGATIVE, resumable=True)  # where the cosine ends
    # AdamW's, on all but norms, biases, position embeddings and tokens
    weight_decay: float = key(0.05, range=NON_NEGATIVE, resumable=True)
    layer_decay: float | None = key(None, range=Range(0, 1, low_open=True))  # e.g. 0.75; None or 1 = off
    # Which block gets which power of layer_decay (depth D, block i):
    #   timm               timm's / MAE's param_groups_lrd on a plain ViT: block i decay^(D-i), stem decay^(D+1)
    #   attention_transfer the paper's reference code (its lr_decay on the teacher–student model): block i
    #                      decay^(D-1-i) (the last block 1.0), stem decay^D
    # Head and fc_norm (avg pooling) get 1.0 under both; the final norm (class-token pooling) goes with the
    # last block (timm's group_matcher): decay^1 under timm, 1.0 under attention_transfer.
    layer_decay_rule: str = key("timm", choices=("timm", "attention_transfer"))
    beta1: float = key(0.9, range=OPEN_FRACTION, resumable=True)  # AdamW's first-moment decay
    beta2: float = key(0.999, range=OPEN_FRACTION, resumable=True)  # AdamW's; MAE pre-training's: 0.95
    eps: float = key(1e-8, range=POSITIVE, resumable=True)  # AdamW's
    clip_grad: float | None = key(None, range=POSITIVE, resumable=True)  # max gradient norm; null: none
    accum_steps: int = key(1, range=AT_LEAST_1)  # micro-batches of data.batch_size per optimiser step


@dataclass
class ScheduleConfig:
    epochs: int = key(10, range=AT_LEAST_1)  # passes over the training split
    warmup_epochs: float = key(1.0, range=NON_NEGATIVE)  # linear lr warmup, in epochs (fractions allowed)
    # the run's optimiser steps, at most (tests, smoke runs): the cosine runs over this shorter total, so a
    # resume with another value bends the rest of the lr curve; warmup stays warmup_epochs long
    max_steps: int | None = key(None, range=AT_LEAST_1)


@dataclass
class EMAConfig:
    # e.g. 0.9999; None = no EMA
    decay: float | None = key(None, range=Range(0, 1, low_open=True, high_open=True))


@dataclass
class LogConfig:
    every_steps: int = key(20, range=AT_LEAST_1)  # optimiser steps per train record (metrics.jsonl, trackers)
    # where metrics go besides metrics.jsonl: tensorboard | wandb | mlflow (pip install 'attnxfer[wandb]');
    # [] for none
    trackers: list[str] = key(factory=lambda: ["tensorboard"], choices=("tensorboard", "wandb", "mlflow"))
    project: str = key("attnxfer", range=ANY)  # the W&B project / MLflow experiment
    # validation images whose class-token maps go to each of log.trackers (and RUN_DIR/pictures/) at each
    # eval; none without trackers (0: none)
    attention_images: int = key(2, range=NON_NEGATIVE)
    progress: bool = key(True, range=ANY)  # a progress bar on the main rank


@dataclass
class CheckpointConfig:
    every_steps: int | None = key(None, range=AT_LEAST_1)  # also every this many optimiser steps
    # also save once this many minutes have passed since the last save (looked at every log.every_steps)
    every_minutes: float | None = key(None, range=POSITIVE)
    every_epoch: bool = key(True, range=ANY)  # save at the end of every epoch
    # the newest checkpoints kept (a search's: its newest generations)
    keep_last: int = key(3, range=AT_LEAST_1, search_resumable=True)
    # auto | none | PATH of a checkpoint dir (checked when the run resumes)
    resume: str = key("auto", range=ANY, search_resumable=True)
    # a resume on other training data than the checkpoint recorded (another file list, dataset or shard list;
    # the same files under another data.root are the same data) stops in one line unless this is true: then the
    # weights, optimiser and step resume and the epoch restarts on the new data
    allow_new_data: bool = key(False, range=ANY)


@dataclass
class EvalConfig:
    """What `attnxfer eval` scores besides the run's own evaluation (never read by training; a conversion's
    report scores its k-NN top-1 by the same rule)."""

    # auto: top1 where the data has labels, features where the run has a teacher, knn where the data has
    # labels; or a list of top1 | features | knn (each must be computable, else the eval stops first).
    # features: final-token agreement with the teacher; knn: k-NN top-1 of student and teacher embeddings
    metrics: list[str] = key(
        factory=lambda: ["auto"], choices=("auto", "top1", "features", "knn"), resumable=True
    )
    knn_k: int = key(20, range=AT_LEAST_1, resumable=True)  # neighbours that vote (DINO's k)
    knn_temperature: float = key(0.07, range=POSITIVE, resumable=True)  # vote weight exp(cos / T)
    # training images in the k-NN memory bank (evenly spaced through the split); null: all of them
    knn_bank_size: int | None = key(10_000, range=AT_LEAST_1, resumable=True)


@dataclass
class ConvertConfig:
    """`attnxfer convert`: the efficient-attention student and stage 1 (layer-parallel attention transfer).

    Stage 2 (end-to-end fine-tuning) is an ordinary training run of the converted student, so its recipe
    is the usual sections: schedule (epochs / max_steps), optim (lr, ...), aug, ema, and transfer
    (``task_weight`` and ``feature_distill``: null picks the labelled stage 2 for a classifier teacher on
    labelled data, else the label-free one, feature distillation with no task loss; ``logit_distill`` /
    ``logit_temperature`` for logit distillation; ``mode: distill`` with ``atd_weight`` for attention
    distillation; ``mode: none`` without it).
    """

    # a registered zoo attention (attnxfer.models.efficient's registry), one name per block, or auto: each block
    # softmax or one of convert.candidates, chosen by measured sensitivity and measured speed so that the
    # student is convert.speedup times faster than the teacher (attnxfer.apps.convert.selection);
    # names are checked as the CLI loads the config
    attention: str | list[str] = key("hedgehog", range=ANY)
    # attention=auto: the predicted speedup over the teacher the student must reach (> 1: the teacher is 1)
    speedup: float | None = key(None, range=Range(1, low_open=True))
    # attention=auto: the token count the speed is measured at (prefix + a square grid); null: the run's
    speed_tokens: int | None = key(None, range=AT_LEAST_1)
    # attention=auto: the zoo attentions a block may get instead of softmax
    candidates: list[str] = key(
        factory=lambda: ["relu_linear", "hedgehog", "performer", "cosformer"], range=ANY
    )
    # attention=auto: stage-1 steps of each candidate's fit before its sensitivity is measured; null:
    # convert.stage1_steps
    selection_steps: int | None = key(None, range=AT_LEAST_1)
    # attention=auto: validation batches the sensitivity (output KL, or final-feature error) is measured on
    selection_batches: int = key(2, range=AT_LEAST_1)
    # e.g. {num_features: 128, window_size: 4}
    attention_kwargs: dict[str, Any] = key(factory=dict, range=ANY)
    stage1_steps: int = key(200, range=NON_NEGATIVE)  # 0 = skip stage 1 (the ablation)
    stage1_lr: float = key(1e-2, range=POSITIVE)  # stage 1's AdamW lr (warmup, then cosine to 1 % of it)
    stage1_batch_size: int | None = key(None, range=AT_LEAST_1)  # default: data.batch_size
    stage1_warmup_steps: int = key(10, range=NON_NEGATIVE)  # stage 1's linear lr warmup
    stage1_weight_decay: float = key(0.0, range=NON_NEGATIVE)  # stage 1's AdamW weight decay
    stage1_clip_grad: float | None = key(1.0, range=POSITIVE)  # stage 1's gradient-norm clipping; null: none
    # new (only parameters without a softmax counterpart) | qk | new+qk
    stage1_train: str = key("new", choices=("new", "qk", "new+qk"))
    # auto (by map kind: ce / mse / output) | ce | mse | output
    map_loss: str = key("auto", choices=("auto", "ce", "mse", "output"))
    # weight of the attention-output MSE added to stage 1's map loss
    output_mse: float = key(0.0, range=NON_NEGATIVE)
    # validation batches of each rank for the per-layer map agreement (summed over ranks: one global batch's images)
    agreement_batches: int = key(4, range=AT_LEAST_1, resumable=True)
    speed_batch_size: int = key(64, range=AT_LEAST_1, resumable=True)  # images per timed forward
    speed_repeats: int = key(20, range=AT_LEAST_1, resumable=True)  # timed forwards of each model (median)
    # image sides of the report's break-even sweep (teacher, student and floor at batch 1 on the run's device,
    # rebuilt there with random weights: speed does not depend on weights): efficient attention pays only
    # above some token count, and this finds the smallest side where the student beats the teacher. null: the
    # run's side times 1, 2, 3 and 4 (each raised to the next side the family runs at), within a minute; []:
    # no sweep; a list: exactly those sides, each one the teacher's family runs at (checked before any work)
    speed_sweep: list[int] | None = key(None, range=AT_LEAST_1, resumable=True)


@dataclass
class MAEConfig:
    """`attnxfer pretrain`: masked-autoencoder pre-training of the ``model`` section's ViT; labels unused.

    The encoder is the model (its head is not built); the decoder is light and is dropped at export.
    """

    # share of patches hidden from the encoder, in (0, 1): at 0 no patch is masked, a loss of 0 throughout;
    # the encoder keeps MAE's int(N·(1 − x)) of N patches; a ratio keeping none is refused when it is built
    mask_ratio: float = key(0.75, range=Range(0, 1, low_open=True, high_open=True))
    decoder_dim: int = key(64, range=AT_LEAST_1)  # decoder width (divisible by 4 and by decoder_heads)
    decoder_depth: int = key(2, range=AT_LEAST_1)  # decoder blocks (MAE's: 8)
    decoder_heads: int = key(4, range=AT_LEAST_1)  # decoder attention heads (MAE's: 16)
    decoder_mlp_ratio: float = key(4.0, range=POSITIVE)  # decoder MLP width over decoder_dim
    norm_pix: bool = key(True, range=ANY)  # targets normalised per patch (mean 0, variance 1), as MAE
    # validation images in the reconstruction picture at each evaluation (0 = none)
    pictures: int = key(8, range=NON_NEGATIVE, resumable=True)
    # write the encoder to RUN_DIR/export (timm layout: a local-dir: teacher) at the end
    export: bool = key(True, range=ANY, resumable=True)


@dataclass
class SearchConfig:
    """`attnxfer search`: evolutionary search over formula attentions for the teacher (teacher/data sections).

    A candidate's fitness is its held-out map KL after ``fit_steps`` of stage 1 on the teacher's cached
    hidden inputs (data.batch_size images a batch, ``fit_batches`` distinct batches) and its speed as
    one attention layer at ``target_tokens`` tokens relative to softmax.
    """

    # formulas of generation 0, or names of zoo attentions the grammar writes (hedgehog); parsed when the
    # search starts, errors name the position; null = the hand-designed zoo as formulas
    seeds: list[str] | None = key(None, range=ANY)
    population: int = key(16, range=Range(2))  # kept per generation (NSGA-II)
    offspring: int = key(16, range=AT_LEAST_1)  # new children per generation
    generations: int = key(12, range=NON_NEGATIVE, search_resumable=True)  # after generation 0
    crossover_prob: float = key(0.5, range=FRACTION)  # else mutation
    # layers the candidate replaces and is scored on; null = all
    layers: list[int] | None = key(None, range=NON_NEGATIVE)
    # stage-1 steps per candidate: a short stage 1 of the search's own (hundreds of candidates are fitted), not
    # the conversion's convert.stage1_steps, which the winner's convert command reads from its recipe
    fit_steps: int = key(40, range=AT_LEAST_1)
    # each candidate's stage-1 learning rate (as fit_steps, its own)
    fit_lr: float = key(1e-2, range=POSITIVE)
    # what each candidate's stage 1 trains: new | qk | new+qk (new+qk: a formula without learned feature maps
    # has only q/k to fit); the winner's convert command is given it as convert.stage1_train
    fit_train: str = key("new+qk", choices=("new", "qk", "new+qk"))
    fit_batches: int = key(4, range=AT_LEAST_1)  # distinct training batches cached (cycled through fit_steps)
    held_out_images: int = key(128, range=AT_LEAST_1)  # validation images the KL is measured on
    # speed of one layer at this many tokens (class token + 56x56 grid)
    target_tokens: int = key(3137, range=Range(2))
    # time (measured wall clock) | flops (counted matrix products; deterministic, elementwise work free)
    speed: str = key("time", choices=("time", "flops"))
    speed_repeats: int = key(5, range=AT_LEAST_1)  # timed runs of candidate and softmax, interleaved (median)
    # the winner is the best fit among front members at least this fast (none that fast: the front's best fit,
    # and pareto.md says it misses this)
    min_speed: float = key(1.0, range=NON_NEGATIVE, search_resumable=True)
    # minutes the search may take, every process's together: it stops before a generation that would end past
    # them (the last generation's length is the guess); one that cannot fit generation 0 is refused at the start
    time_budget_min: float | None = key(None, range=POSITIVE, search_resumable=True)
    # the recipe the winner's convert command starts from
    convert_recipe: str = key("convert/demo_hedgehog", range=ANY, search_resumable=True)


@dataclass
class DistConfig:
    """How the ranks of a multi-process run (torchrun, `attnxfer submit`) wait for each other."""

    # seconds a rank waits for a silent peer: a rank's heartbeat (a thread, so long phases of the main thread
    # do not count) silent this long (a stopped or hung process) ends the others with one line naming it,
    # and the process group's own timeout (a collective waiting) follows a few seconds later. Minutes, not
    # torch's 10 (NCCL) or 30 (gloo). Resumable: how the run runs, not what it computes
    timeout: float = key(300.0, range=POSITIVE, resumable=True, search_resumable=True)


@dataclass
class TrainConfig:
    # the run's folder (config.yaml, run.json, metrics.jsonl, checkpoints/); resumable: a checkpoint of
    # another run may be given as checkpoint.resume=PATH
    run_dir: str = key("runs/default", range=ANY, resumable=True, search_resumable=True)
    # the initial weights (the same on every rank) and the training's draws (dropout, drop path, MAE's masks),
    # each rank's its own, seeded from it and the rank; data.seed (null: this one) orders and augments the data
    seed: int = key(0, range=Range(0, 2**32 - 1))
    device: str = key("auto", choices=("auto", "cpu", "cuda"), resumable=True)  # auto | cpu | cuda
    # auto = bf16 autocast on GPU, fp32 on CPU; fp32 | bf16 | fp16. The teacher follows it unless
    # teacher.dtype says otherwise, so precision=fp32 is the one switch to the reference's fp32 training.
    # A resume may change only the word, not the dtype (auto -> fp32 on CPU).
    precision: str = key("auto", choices=("auto", "fp32", "bf16", "fp16"))
    deterministic: bool = key(False, range=ANY, resumable=True)  # deterministic kernels, no CE path timed
    model: ModelConfig = section(ModelConfig)
    teacher: TeacherConfig = section(TeacherConfig)  # pretrain reads cache_dir alone (model.init's downloads)
    # MAE pre-training transfers nothing: its config.yaml and --print-config leave this section out
    # (transfer.mode=none, what it does, is allowed: an older pretrain run's config.yaml may say so)
    transfer: TransferConfig = section(TransferConfig, unread_by={"pretrain": {"mode": "none"}})
    data: DataConfig = section(DataConfig)
    aug: AugConfig = section(AugConfig)
    optim: OptimConfig = section(OptimConfig)
    schedule: ScheduleConfig = section(ScheduleConfig, resumable=True)
    ema: EMAConfig = section(EMAConfig)
    log: LogConfig = section(LogConfig, resumable=True, search_resumable=True)
    checkpoint: CheckpointConfig = section(CheckpointConfig, resumable=True)
    eval: EvalConfig = section(EvalConfig, resumable=True, search_resumable=True)
    # the sections one command alone reads: another command's config.yaml and --print-config leave them out
    convert: ConvertConfig = section(ConvertConfig, command="convert")
    mae: MAEConfig = section(MAEConfig, command="pretrain")
    search: SearchConfig = section(SearchConfig, command="search")
    dist: DistConfig = section(DistConfig)

    def __str__(self) -> str:
        return dump_config(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with dotted keys set (values already typed or YAML strings)."""
        return apply_overrides(self, overrides)


# -- tables derived from the fields (never written out: a new key is one field above) --------------------

#: every config key and what it accepts; numbers out of range fail with the key named
RANGES: dict[str, Range] = {leaf.name: leaf.range for leaf in leaves(TrainConfig)}

#: the dotted keys a resumed run may change (`attnxfer.apps.run.resume`); everything else names what the
#: checkpoint's weights, optimiser state and data position mean
RESUMABLE_KEYS: tuple[str, ...] = resumable_keys(TrainConfig)

#: the dotted keys a resumed search may change (`attnxfer.apps.search`): how long it goes on and how it
#: reports; everything else names what its population's candidates were fitted and scored with
SEARCH_RESUMABLE_KEYS: tuple[str, ...] = search_resumable_keys(TrainConfig)


def config_keys() -> list[str]:
    """Every leaf key of the schema, dotted (``optim.lr``, ...), in declaration order."""
    return [leaf.name for leaf in leaves(TrainConfig)]
