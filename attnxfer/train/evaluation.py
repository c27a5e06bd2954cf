"""Scoring a model on a validation loader, summed over ranks: classification, a self-supervised objective's own
loss, and the scores that need no head (final-feature agreement with the teacher, k-NN top-1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import count, islice

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, SequentialSampler

from ..analysis.features import feature_agreement
from ..analysis.knn import Autocast, evaluating, knn_comparison
from ..data.sampler import ResumableSampler
from ..data.seeding import sample_generator
from ..transfer.teacher_student import TransferOutput


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator) -> dict[str, float]:
    """Top-1/top-5, loss and ``count`` of ``model`` over ``loader``, summed over ranks. Each rank scores its own
    shard of an unpadded sampler, so ranks may run different numbers of batches: the forwards go to the
    unwrapped module (no collectives) and only the final sum is a collective."""
    model = accelerator.unwrap_model(model)
    totals = classification_sums(model, loader, accelerator.device, accelerator.autocast)
    totals = accelerator.reduce(totals, reduction="sum")
    n = max(1.0, totals[3].item())
    return {
        "top1": 100.0 * totals[0].item() / n,
        "top5": 100.0 * totals[1].item() / n,
        "loss": totals[2].item() / n,
        "count": int(totals[3].item()),  # images scored: what a 95 % interval of top1 needs
    }


@torch.no_grad()
def classification_sums(
    model: nn.Module,
    loader,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    *,
    loss: bool = True,
) -> torch.Tensor:
    """This rank's (top-1 correct, top-5 correct, summed cross-entropy, images) over ``loader``: the one count
    every top-1 reads. ``loss=False`` leaves the cross-entropy at 0, for labels the head may not cover."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for logits, y in _scored_batches(model, loader, device, autocast):
        top5 = _top5(logits)
        totals[0] += (top5[:, 0] == y).sum()
        totals[1] += (top5 == y[:, None]).any(-1).sum()
        if loss:
            totals[2] += F.cross_entropy(logits, y, reduction="sum")
        totals[3] += y.numel()
    return totals


@torch.no_grad()
def per_image_top1(
    model: nn.Module, loader, device: torch.device, autocast: Autocast = contextlib.nullcontext
) -> torch.Tensor:
    """One bool per image of ``loader``: is ``model``'s top-1 its label? (Two models paired image by image.)"""
    hits = [
        (_top5(logits)[:, 0] == y).cpu() for logits, y in _scored_batches(model, loader, device, autocast)
    ]
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def _top5(logits: torch.Tensor) -> torch.Tensor:
    """The (up to) 5 highest classes per row, best first: what top-1 and top-5 read."""
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def _scored_batches(
    model: nn.Module, loader, device: torch.device, autocast: Autocast
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) of ``model`` (in eval mode for the duration) per batch of ``loader``."""
    with evaluating(model):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                out = model(x)
            yield (out.logits if isinstance(out, TransferOutput) else out).float(), y


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader, accelerator, seed: int = 0) -> dict[str, float]:
    """Mean of a self-supervised objective's ``loss`` over ``loader``, summed over ranks. Its randomness (MAE's
    masks) comes from one generator per image, seeded by (``seed``, the image's index in the dataset): every
    world size and batch size scores each image with the same mask, and the training streams are left
    untouched. Where the loader's order is not known (a stream), see `image_keys`."""
    model = accelerator.unwrap_model(model)
    device = accelerator.device
    keys = image_keys(loader, accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss_sum, count
    with evaluating(model):
        for x, *_ in loader:  # labels, where there are any, are not read
            x = x.to(device, non_blocking=True)
            generators = [sample_generator(seed, 0, key) for key in islice(keys, x.shape[0])]
            with accelerator.autocast():
                out = model(x, generator=generators)
            totals[0] += out.loss.double() * x.shape[0]
            totals[1] += x.shape[0]
    totals = accelerator.reduce(totals, reduction="sum")
    return {"loss": totals[0].item() / max(1.0, totals[1].item())}


def image_keys(loader, rank: int = 0, world_size: int = 1) -> Iterator[int]:
    """Each image's index in ``loader``'s dataset, in the order the loader yields them, where its sampler's order
    repeats (ours, torch's sequential one). Otherwise (a stream, another sampler) this rank's k-th image gets
    k·world_size + rank: its place in a stream the ranks take image by image, read by one DataLoader worker
    (more workers interleave their shares), so such a loss compares only at the same world size and workers."""
    sampler = getattr(loader, "sampler", None)
    batches = getattr(loader, "batch_sampler", None)
    ordered = isinstance(sampler, ResumableSampler | SequentialSampler)
    if ordered and type(batches) is BatchSampler and batches.sampler is sampler:
        return (int(i) for i in sampler)
    return (k * world_size + rank for k in count())


@torch.no_grad()
def evaluate_features(model: nn.Module, loader, accelerator) -> dict[str, float]:
    """Final-feature agreement of a `TeacherStudent`'s student with its teacher, summed over ranks; reads no
    label (the evaluator of runs without labels)."""
    pair = accelerator.unwrap_model(model)
    teacher = getattr(pair, "teacher", None)
    if teacher is None:
        raise ValueError("feature agreement needs the run's teacher")
    images = (x.to(accelerator.device, non_blocking=True) for x, *_ in loader)
    return feature_agreement(
        pair.student,
        teacher,
        images,
        accelerator.autocast,
        reduce=lambda sums: accelerator.reduce(sums, reduction="sum"),
    ).as_dict()


@torch.no_grad()
def evaluate_knn(
    student: nn.Module,
    teacher: nn.Module | None,
    bank_loader,
    val_loader,
    accelerator,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """k-NN top-1 of the student's (and the teacher's) embeddings: the bank all of ``bank_loader`` on every
    rank, the queries each rank's shard of ``val_loader``, the counts summed over ranks."""
    return knn_comparison(
        student,
        teacher,
        bank_loader,
        val_loader,
        accelerator.device,
        k=k,
        temperature=temperature,
        autocast=accelerator.autocast,
        reduce=lambda t: accelerator.reduce(t, reduction="sum"),
    ).as_dict()
