"""Which of timm's pretrained transformers can be a teacher: the family table, measured on the meta device.

`measure_coverage` builds every arch of ``timm.list_models(pretrained=True)`` in the chosen families on
``torch.device("meta")`` (no weights, no memory: a second per arch at most) twice, as teacher and as its
mirrored student (the same arch, freshly initialised), and asks `build_plan` for a ``copy`` and a
``distill`` plan. `FAMILY_COVERAGE` holds the result as data: ``tests/test_family_coverage.py`` checks that
timm still gives it, and that the tables in README.md and docs/architecture.md are `coverage_markdown` of
it. Run ``python -m attnxfer.transfer.coverage`` to measure and print the table.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import timm
import torch
from timm.models._registry import _model_to_module
from torch.overrides import TorchFunctionMode

from .plan import build_plan

__all__ = [
    "FAMILIES",
    "FAMILY_COVERAGE",
    "FLAT_FAMILIES",
    "HIER_FAMILIES",
    "FamilyCoverage",
    "arch_family",
    "coverage_markdown",
    "family_archs",
    "measure_coverage",
    "on_meta",
    "plan_error",
]

#: timm modules whose transformers keep their blocks in one flat sequence (issue 26).
FLAT_FAMILIES = (
    "vision_transformer",
    "deit",
    "eva",
    "beit",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "cait",
    "naflexvit",
    "qwen3_vit",
    "gemma4_vit",
)

#: timm modules of hierarchical transformers: stages of windowed blocks (Swin), of spatial-reduction attention
#: (PVTv2, Twins' GSA), of padded local windows (Twins' LSA) and of mask units with pooled queries (Hiera)
#: (issue 27).
HIER_FAMILIES = (
    "swin_transformer",
    "swin_transformer_v2",
    "swin_transformer_v2_cr",
    "pvt_v2",
    "twins",
    "hiera",
)

#: Every family the table holds, in its order.
FAMILIES = FLAT_FAMILIES + HIER_FAMILIES

#: The columns of the table beside the counts (modes measured on the meta device: copy, distill).
WORKFLOWS = ("copy", "distill", "inspect", "convert", "export")


@dataclass(frozen=True)
class FamilyCoverage:
    """One family's row: pretrained archs, how many plan each measured mode, and the workflows its tests
    cover (``inspect``/``convert``/``export`` are checked on tiny models of the family, not on the meta walk).
    """

    family: str
    archs: int
    copy: int
    distill: int
    workflows: tuple[str, ...] = ()

    @property
    def planned(self) -> int:
        """Archs that plan both a copy and a distillation."""
        return min(self.copy, self.distill)


#: Measured with timm 1.0.31 (``python -m attnxfer.transfer.coverage``); kept equal by the coverage test.
#: The 4 vision_transformer archs that do not plan: ``vit_dlittle_*``/``vit_dwee_*`` use differential attention
#: (refused: signed maps), ``vit_pwee_*``/``vit_dpwee_*`` parallel blocks whose attention is computed inside
#: the block (no ``attn`` module to adapt).
FAMILY_COVERAGE: dict[str, FamilyCoverage] = {
    f.family: f
    for f in (
        FamilyCoverage("vision_transformer", 145, 141, 141, ("inspect", "convert", "export")),
        FamilyCoverage("deit", 16, 16, 16, ("inspect", "convert", "export")),
        FamilyCoverage("eva", 65, 65, 65, ("inspect", "convert", "export")),
        FamilyCoverage("beit", 7, 7, 7, ("inspect", "export")),
        FamilyCoverage("vision_transformer_relpos", 9, 9, 9, ("inspect", "export")),
        FamilyCoverage("vision_transformer_sam", 3, 3, 3, ("inspect", "export")),
        FamilyCoverage("cait", 10, 10, 10, ("inspect", "export")),
        FamilyCoverage("naflexvit", 11, 11, 11, ("inspect", "convert", "export")),
        FamilyCoverage("qwen3_vit", 9, 9, 9, ("inspect", "convert", "export")),
        FamilyCoverage("gemma4_vit", 4, 4, 4, ("inspect", "convert", "export")),
        FamilyCoverage("swin_transformer", 9, 9, 9, ("inspect", "convert", "export")),
        FamilyCoverage("swin_transformer_v2", 12, 12, 12, ("inspect", "export")),
        FamilyCoverage("swin_transformer_v2_cr", 3, 3, 3, ("inspect", "export")),
        FamilyCoverage("pvt_v2", 7, 7, 7, ("inspect", "convert", "export")),
        FamilyCoverage("twins", 6, 6, 6, ("inspect", "export")),
        FamilyCoverage("hiera", 7, 7, 7, ("inspect", "export")),
    )
}


#: In-place ops that only change values: on the meta device there are none to change, so `_MetaNoInit` skips
#: them (timm's ``trunc_normal_`` on meta tensors goes through torch's reference kernels: 5x the build time).
_VALUE_ONLY_INPLACE = frozenset(
    ("uniform_", "normal_", "clamp_", "clamp_min_", "clamp_max_", "erfinv_", "mul_", "add_", "sub_", "div_")
    + ("zero_", "fill_", "copy_", "exp_", "bernoulli_", "random_", "exponential_")
)


class _MetaNoInit(TorchFunctionMode):
    """Skips value-only in-place ops (weight initialisation) on meta tensors: shapes and classes are kept."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (
            getattr(func, "__name__", "") in _VALUE_ONLY_INPLACE
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_meta
        ):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build models on the meta device, without running their weight initialisation."""
    with torch.device("meta"), _MetaNoInit():
        yield


def arch_family(arch: str) -> str | None:
    """The timm module (family) an arch is registered in, tag stripped (``vit_small_patch16_224.augreg_in1k``
    -> ``vision_transformer``)."""
    return _model_to_module.get(arch.split(".", 1)[0])


def family_archs(families: Iterable[str] = FAMILIES) -> dict[str, list[str]]:
    """Pretrained arch names (without tags, each once) per family, in timm's order."""
    wanted = {f: [] for f in families}
    seen = set()
    for name in timm.list_models(pretrained=True):
        arch = name.split(".", 1)[0]
        fam = arch_family(arch)
        if fam in wanted and arch not in seen:
            seen.add(arch)
            wanted[fam].append(arch)
    return wanted


def plan_error(arch: str, modes: Sequence[str] = ("copy", "distill")) -> dict[str, str | None]:
    """For each mode, None if a teacher ``arch`` and its mirrored student plan that mode, else the error
    (type and first line). Both models are built on the meta device."""
    with on_meta():
        try:
            teacher = timm.create_model(arch, pretrained=False)
            student = timm.create_model(arch, pretrained=False)
        except Exception as e:  # a build failure is a row of the table, not a crash
            return {
                m: f"build: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for m in modes
            }
        result: dict[str, str | None] = {}
        for mode in modes:
            try:
                build_plan(teacher, student, mode)
                result[mode] = None
            except Exception as e:  # every refusal is counted, with its message
                result[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return result


def measure_coverage(
    families: Iterable[str] = FAMILIES, archs: dict[str, list[str]] | None = None
) -> tuple[dict[str, FamilyCoverage], dict[str, dict[str, str | None]]]:
    """Measure the family table: ({family: counts}, {arch: {mode: error or None}}). The workflow columns are
    copied from `FAMILY_COVERAGE` (they are not measured on the meta device)."""
    archs = family_archs(families) if archs is None else archs
    rows, errors = {}, {}
    for fam, names in archs.items():
        copy = distill = 0
        for arch in names:
            errors[arch] = plan_error(arch)
            copy += errors[arch]["copy"] is None
            distill += errors[arch]["distill"] is None
        known = FAMILY_COVERAGE.get(fam)
        rows[fam] = FamilyCoverage(fam, len(names), copy, distill, known.workflows if known else ())
    return rows, errors


def coverage_markdown(table: dict[str, FamilyCoverage] | None = None) -> str:
    """The family × workflow table in Markdown (README.md and docs/architecture.md hold it verbatim)."""
    table = FAMILY_COVERAGE if table is None else table
    lines = [
        "| family (timm module) | pretrained archs | copy | distill | inspect | convert | export |",
        "|---|---:|---:|---:|:-:|:-:|:-:|",
    ]
    for row in table.values():
        marks = ["yes" if w in row.workflows else "—" for w in WORKFLOWS[2:]]
        lines.append(
            f"| {row.family} | {row.archs} | {row.copy} | {row.distill} | " + " | ".join(marks) + " |"
        )
    total, copy, distill = (sum(getattr(r, c) for r in table.values()) for c in ("archs", "copy", "distill"))
    lines.append(f"| **all** | {total} | {copy} | {distill} | | | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help="timm modules to walk")
    parser.add_argument("--errors", action="store_true", help="also list each refused arch and why")
    args = parser.parse_args(argv)
    rows, errors = measure_coverage(args.families)
    print(coverage_markdown(rows))
    if args.errors:
        for arch, errs in errors.items():
            for mode, err in errs.items():
                if err:
                    print(f"{arch} [{mode}]: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
