"""A timm family as attnxfer knows it: one file in `families`, its adapters and one `Family` record, which
generic code asks (never a family's name), so adding a family is one file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


#: The workflows beside copy and distill that a family's tests cover.
WORKFLOWS = ("inspect", "convert", "export")


@dataclass(frozen=True)
class ModuleCoverage:
    """One timm module's row of the coverage table (counts measured by scripts/family_coverage.py)."""

    module: str
    archs: int
    copy: int
    distill: int
    workflows: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tiling:
    """One rule an image side must meet: whole ``stride``-px tokens in whole ``window``s of tokens; where
    ``shrinks``, a window larger than the grid becomes the grid (timm's Swin)."""

    stride: int
    window: int = 1
    shrinks: bool = False
    what: str = ""
    unit: str = "windows"

    def grid(self, side: int) -> int | None:
        return side // self.stride if side % self.stride == 0 else None

    def fits(self, side: int) -> bool:
        g = self.grid(side)
        if not g:
            return False
        window = min(g, self.window) if self.shrinks else self.window
        return g % window == 0

    def reason(self, side: int) -> str:
        g = self.grid(side)
        if not g:
            return f"{self.what}: {side} px is not a multiple of {self.stride} px"
        tokens = f"{side} px make {g} tokens of {self.stride} px"
        return f"{self.what}: {tokens}, not whole {self.window}-token {self.unit}"


def tilings_of(
    strides: Sequence[int], windows: Sequence[int] = (), what: str = "", **kw
) -> tuple[Tiling, ...]:
    """One `Tiling` per distinct (stride, window) of an (h, w) pair."""
    windows = tuple(windows) or (1,) * len(strides)
    return tuple(dict.fromkeys(Tiling(int(s), int(w), what=what, **kw) for s, w in zip(strides, windows)))


@dataclass(frozen=True)
class ImageSizes:
    """Which image sizes a family's models run at besides their own (``tilings``; None: whole patches), and
    how one is rebuilt there (``resize_weights`` where timm's checkpoint filter does not resample)."""

    tilings: Callable[[nn.Module], Sequence[Tiling]] | None = None
    size_argument: bool = True
    resize_weights: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    how: str = "position embeddings resampled by timm's checkpoint filter"


@dataclass(frozen=True)
class Family:
    """What a family file declares besides its adapters (``rope``: its blocks hand their attention a rotary
    embedding, which a zoo student applies to q and k itself)."""

    name: str
    title: str
    modules: tuple[ModuleCoverage, ...]
    hierarchical: bool = False
    patch_embedding: str = "patch_embed"
    rope: bool = False
    sizes: ImageSizes = field(default_factory=ImageSizes)

    @property
    def converts(self) -> bool:
        return any("convert" in m.workflows for m in self.modules)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
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
    """Every registered family: flat ones first, then by most pretrained archs, then by name."""
    return sorted(
        _FAMILIES.values(), key=lambda f: (f.hierarchical, -sum(m.archs for m in f.modules), f.name)
    )


def family_of(model: nn.Module) -> Family | None:
    """The family whose timm module defines ``model``'s class (or the nearest timm class it derives from)."""
    modules = {m.module: f for f in _FAMILIES.values() for m in f.modules}
    for cls in type(model).__mro__:
        owner, _, name = cls.__module__.rpartition(".")
        if owner == "timm.models" and name in modules:
            return modules[name]
    return None
