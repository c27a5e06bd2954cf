"""A timm family, as attnxfer knows it: one file in `attnxfer.models.attention.families`, one `Family` record.

What a family file owns: the adapters of its timm attention classes (`register_adapter`; each adapter class
answers for its logits, its token partition, where its rows sit on the image, its conversion slot) and this
record, which answers for the rest — which timm modules' archs it covers (the coverage table's rows: counts
measured on the meta device and the workflows its tests cover), where its models keep the patch embedding,
whether its blocks rotate q and k by a rope, and which image sizes its models run at besides the one they
were built for and how a model is rebuilt at one (`ImageSizes`). Generic code asks the record (`families`,
`patch_embeddings`, `family_of`) or the adapter, never a family's name: adding a family is one file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


#: The workflows beside copy and distill that a family's tests cover (the coverage table's last columns).
WORKFLOWS = ("inspect", "convert", "export")


@dataclass(frozen=True)
class ModuleCoverage:
    """One timm module's row of the coverage table: its pretrained archs, how many plan a copy and a distill
    (measured on the meta device, scripts/family_coverage.py), and the workflows (`WORKFLOWS`) its family's
    tests cover on tiny models."""

    module: str
    archs: int
    copy: int
    distill: int
    workflows: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tiling:
    """One rule an image side must meet to run a model: the side over ``stride`` pixels is a whole grid of
    tokens, and that grid is whole ``window``s of tokens (1: any grid). Where ``shrinks``, a window larger than
    the grid becomes the grid, as timm's Swin blocks do (a stage of 7 tokens in 12-token windows: one 7-token
    window). ``what`` names the rule for messages ("16 px patches", "the 1/8 stage"), ``unit`` its windows."""

    stride: int
    window: int = 1
    shrinks: bool = False
    what: str = ""
    unit: str = "windows"

    def grid(self, side: int) -> int | None:
        """Tokens along ``side`` at this stride, None where the stride does not divide it."""
        return side // self.stride if side % self.stride == 0 else None

    def fits(self, side: int) -> bool:
        """Whether ``side`` px make whole tokens and whole windows of them."""
        g = self.grid(side)
        if not g:
            return False
        window = min(g, self.window) if self.shrinks else self.window
        return g % window == 0

    def reason(self, side: int) -> str:
        """Why ``side`` does not fit, in words."""
        g = self.grid(side)
        if not g:
            return f"{self.what}: {side} px is not a multiple of {self.stride} px"
        tokens = f"{side} px make {g} tokens of {self.stride} px"
        return f"{self.what}: {tokens}, not whole {self.window}-token {self.unit}"


def tilings_of(
    strides: Sequence[int], windows: Sequence[int] = (), what: str = "", **kw
) -> tuple[Tiling, ...]:
    """One `Tiling` per distinct (stride, window) of an (h, w) pair: a square side meets both dimensions'."""
    windows = tuple(windows) or (1,) * len(strides)
    return tuple(dict.fromkeys(Tiling(int(s), int(w), what=what, **kw) for s, w in zip(strides, windows)))


@dataclass(frozen=True)
class ImageSizes:
    """Which image sizes a family's models run at besides the size their weights were made for, and how a
    model is rebuilt at one.

    ``tilings(model)``: the rules a side must meet (`Tiling`), read off a model of the family at any size;
    None: whole patches (the patch embedding's stride). ``size_argument``: timm builds the family's models
    for a size given as ``img_size=`` (False: they take any input and no size argument, PVTv2's conv stems;
    the size is then only recorded). ``resize_weights(state_dict, model)``: a model's weights (timm's names)
    fitted to ``model``, the same architecture built at another size, for families whose timm checkpoint
    filter does not resample (position embeddings, position tables); None: timm's filter does it when
    ``create_model(img_size=...)`` loads the checkpoint. ``how``: how a model is rebuilt, in words."""

    tilings: Callable[[nn.Module], Sequence[Tiling]] | None = None
    size_argument: bool = True
    resize_weights: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    how: str = "position embeddings resampled by timm's checkpoint filter"


@dataclass(frozen=True)
class Family:
    """What a family file declares besides its adapters.

    ``name`` is its file's name; ``title`` how people call its models; ``modules`` the timm modules whose
    archs it covers; ``hierarchical`` whether its models work in stages of changing token grids;
    ``patch_embedding`` where its models keep the module that cuts images into patches; ``rope`` whether its
    blocks hand their attention a rotary embedding (a zoo student applies it to q and k itself); ``sizes``
    which image sizes its models run at and how one is rebuilt at another (`ImageSizes`)."""

    name: str
    title: str
    modules: tuple[ModuleCoverage, ...]
    hierarchical: bool = False
    patch_embedding: str = "patch_embed"
    rope: bool = False
    sizes: ImageSizes = field(default_factory=ImageSizes)

    @property
    def converts(self) -> bool:
        """Its tests convert its models into zoo students (its adapters name a conversion slot)."""
        return any("convert" in m.workflows for m in self.modules)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Record ``family`` (once per name; a timm module belongs to one family)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"family {family.name!r} is already registered")
    taken = {m.module: f.name for f in _FAMILIES.values() if f.name != family.name for m in f.modules}
    clash = [m.module for m in family.modules if m.module in taken]
    if clash:
        raise ValueError(f"family {family.name!r}: timm module(s) {clash} belong to {taken[clash[0]]!r}")
    unknown = {w for m in family.modules for w in m.workflows} - set(WORKFLOWS)
    if unknown:
        raise ValueError(f"family {family.name!r}: unknown workflows {sorted(unknown)}; use {WORKFLOWS}")
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    """Every registered family: the flat ones first, then the hierarchical; within each, the families with
    the most pretrained archs first (then by name)."""
    return sorted(
        _FAMILIES.values(), key=lambda f: (f.hierarchical, -sum(m.archs for m in f.modules), f.name)
    )


def patch_embeddings() -> tuple[str, ...]:
    """Where the families' models keep their patch embedding, each path once (``patch_embed`` first)."""
    paths = ["patch_embed", *(f.patch_embedding for f in families())]
    return tuple(dict.fromkeys(paths))


def family_of(model: nn.Module) -> Family | None:
    """The family whose timm module defines ``model``'s class (or the nearest timm class it derives from);
    None for a model of no registered family."""
    modules = {m.module: f for f in _FAMILIES.values() for m in f.modules}
    for cls in type(model).__mro__:
        owner, _, name = cls.__module__.rpartition(".")
        if owner == "timm.models" and name in modules:
            return modules[name]
    return None
