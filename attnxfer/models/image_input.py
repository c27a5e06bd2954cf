"""What a timm vision model takes as input (channels, image size, patch size and grid), read in one place
because families keep and describe their patch embedding differently; `check_image_size` refuses a size
before any work, naming the nearest sizes that work."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
from timm.models import get_model_traits

from ..errors import InputError
from .attention import families
from .attention.family import ImageSizes, Tiling, family_of

#: Where the families keep the patch embedding, looked up in this order (``patch_embed`` first).
PATCH_EMBEDDINGS = tuple(dict.fromkeys(["patch_embed", *(f.patch_embedding for f in families())]))


@dataclass(frozen=True)
class ImageInput:
    """A model's input geometry at its configured image size (``grid`` steps by the embedding's stride)."""

    where: str  # the patch embedding's module path
    in_chans: int
    img_size: tuple[int, int] | None
    patch_size: tuple[int, int]
    grid: tuple[int, ...]


def find_patch_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of ``model``'s patch embedding, or None."""
    for where in PATCH_EMBEDDINGS:
        try:
            return where, model.get_submodule(where)
        except AttributeError:
            continue
    return None


def image_input(model: nn.Module) -> ImageInput:
    """Input channels, image size, patch size and grid of any timm vision model of a known family."""
    found = find_patch_embedding(model)
    if found is None:
        known = ", ".join(f.title for f in families())
        raise InputError(
            f"{type(model).__name__} has no patch embedding attnxfer knows (looked for "
            f"{', '.join(PATCH_EMBEDDINGS)}); supported are the models of timm's families {known}"
        )
    where, embed = found
    proj = getattr(embed, "proj", None)
    stride = getattr(proj, "stride", None) if isinstance(proj, nn.Conv2d) else None
    patch = as_pair(getattr(embed, "patch_size", None) or stride)
    if patch is None:
        raise InputError(
            f"{type(model).__name__}.{where} records no patch size; attnxfer cannot lay out its tokens"
        )
    size = as_pair(getattr(embed, "img_size", None) or getattr(embed, "default_img_size", None))
    if size is None:
        size = as_pair(get_model_traits(model).get("img_size"))
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = as_pair(tuple(cfg["input_size"][-2:])) if cfg.get("input_size") else None
    grid = tuple(int(g) for g in (getattr(embed, "grid_size", None) or ()))
    if not grid and size is not None:
        step = as_pair(stride) or patch
        grid = (size[0] // step[0], size[1] // step[1])
    return ImageInput(where, _in_chans(model, where, embed, proj), size, patch, grid)


def _in_chans(model: nn.Module, where: str, embed: nn.Module, proj: nn.Module | None) -> int:
    """The embedding's own count, its conv's input channels, else the count its owner records."""
    chans = getattr(embed, "in_chans", None)
    if chans is None and isinstance(proj, nn.Conv2d):
        chans = proj.in_channels
    owner = model.get_submodule(where.rpartition(".")[0]) if "." in where else model
    for holder in (owner, model):
        if chans is None:
            chans = getattr(holder, "in_chans", None)
    if chans is None:
        raise InputError(f"{type(model).__name__}.{where} records no input channel count")
    return int(chans)


def as_pair(v) -> tuple[int, int] | None:
    """An (h, w) pair of ints from what timm's stems record; None for None or a sequence not two long."""
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return v if len(v) == 2 else None


class ImageSizeError(InputError):
    """A model cannot run at an image size ``side``; ``below``/``above``: the nearest sides that work."""

    def __init__(self, message: str, side: int, below: int | None, above: int | None) -> None:
        super().__init__(message)
        self.side, self.below, self.above = side, below, above

    def restated(self, key: str) -> ImageSizeError:
        """The same refusal, naming the setting that asked for the size."""
        return ImageSizeError(f"{key}={self.side}: {self.args[0]}", self.side, self.below, self.above)


def image_sizes(model: nn.Module) -> ImageSizes:
    """What ``model``'s family declares about other image sizes."""
    family = family_of(model)
    return family.sizes if family is not None else ImageSizes()


def size_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """The rules an image side must meet to run ``model`` (whole patches by default)."""
    declared = image_sizes(model).tilings
    if declared is not None:
        return tuple(declared(model))
    patch = image_input(model).patch_size
    return tuple(dict.fromkeys(Tiling(p, what=f"{p} px patches") for p in patch))


def _fits(tilings: tuple[Tiling, ...], side: int, native: int | None) -> bool:
    return side == native or all(t.fits(side) for t in tilings)


def sizes_that_fit(model: nn.Module, side: int) -> tuple[int | None, int | None]:
    """The nearest image sides below and above ``side`` at which ``model`` runs: the rules repeat with the
    lcm of their strides and windows, so one period around ``side`` holds both answers."""
    tilings = size_tilings(model)
    native = _native_side(model)
    period = math.lcm(*(t.stride * t.window for t in tilings)) if tilings else 1
    below = next(
        (s for s in range(side - 1, max(0, side - period - 1), -1) if _fits(tilings, s, native)), None
    )
    if below is None and native is not None and native < side:
        below = native
    above = next((s for s in range(side + 1, side + period + 1) if _fits(tilings, s, native)), None)
    return below, above


def check_image_size(model: nn.Module, side: int) -> ImageSizes:
    """Refuse an image side ``model`` cannot run at, else return its family's `ImageSizes`: the size the
    weights were made for always runs (padded windows included); another must meet every `Tiling`, so the
    model computes what it computes at its own size, on more or fewer tokens."""
    if side < 1:
        raise ImageSizeError(
            f"an image side must be a positive number of pixels, got {side}", side, None, None
        )
    tilings = size_tilings(model)
    native = _native_side(model)
    if _fits(tilings, side, native):
        return image_sizes(model)
    family = family_of(model)
    title = f"{family.title} model" if family is not None else type(model).__name__
    title = f"{'an' if title[0] in 'AEIOUaeiou' else 'a'} {title}"  # an EVA-02 model
    reason = next(t.reason(side) for t in tilings if not t.fits(side))
    below, above = sizes_that_fit(model, side)
    near = " and ".join(f"{s} px" for s in (below, above) if s is not None)
    made = f" (its weights were made for {native} px)" if native else ""
    raise ImageSizeError(
        f"{title}{made} cannot run at {side} px: {reason}; nearest sizes that work: {near}",
        side,
        below,
        above,
    )


def _native_side(model: nn.Module) -> int | None:
    """The square side ``model`` was built for (None if it records none or is not square)."""
    size = image_input(model).img_size
    return size[0] if size is not None and size[0] == size[1] else None
