"""A timm family, as attnxfer knows it: one file in `attnxfer.models.attention.families`, one `Family` record.

What a family file owns: the adapters of its timm attention classes (`register_adapter`; each adapter class
answers for its logits, its token partition, where its rows sit on the image, its conversion slot) and this
record, which answers for the rest — which timm modules' archs it covers (the coverage table's rows: counts
measured on the meta device and the workflows its tests cover), where its models keep the patch embedding,
whether its blocks rotate q and k by a rope. Generic code asks the record (`families`, `patch_embeddings`)
or the adapter, never a family's name: adding a family is one file.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "ModuleCoverage", "families", "patch_embeddings", "register_family"]

#: The workflows beside copy and distill that a family's tests cover (the coverage table's last columns).
WORKFLOWS = ("inspect", "convert", "export")


@dataclass(frozen=True)
class ModuleCoverage:
    """One timm module's row of the coverage table: its pretrained archs, how many plan a copy and a distill
    (measured on the meta device, `attnxfer.transfer.coverage`), and the workflows (`WORKFLOWS`) its family's
    tests cover on tiny models."""

    module: str
    archs: int
    copy: int
    distill: int
    workflows: tuple[str, ...] = ()

    @property
    def planned(self) -> int:
        """Archs that plan both a copy and a distillation."""
        return min(self.copy, self.distill)


@dataclass(frozen=True)
class Family:
    """What a family file declares besides its adapters.

    ``name`` is its file's name; ``title`` how people call its models; ``modules`` the timm modules whose
    archs it covers; ``hierarchical`` whether its models work in stages of changing token grids;
    ``patch_embedding`` where its models keep the module that cuts images into patches; ``rope`` whether its
    blocks hand their attention a rotary embedding (a zoo student applies it to q and k itself)."""

    name: str
    title: str
    modules: tuple[ModuleCoverage, ...]
    hierarchical: bool = False
    patch_embedding: str = "patch_embed"
    rope: bool = False

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
