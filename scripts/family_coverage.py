"""Which of timm's pretrained transformers can be a teacher: the coverage table, measured on the meta device.

Each family file (`attnxfer.models.attention.families`) declares the timm modules whose archs it covers, with
their counts (`attnxfer.models.attention.family.ModuleCoverage`); `COVERAGE` gathers them, one row per timm
module. `measure_coverage` builds every arch of ``timm.list_models(pretrained=True)`` in those modules on
``torch.device("meta")`` (no weights, no memory: a second per arch at most) twice, as teacher and as its
mirrored student (the same arch, freshly initialised), and asks `build_plan` for a ``copy`` and a ``distill``
plan. ``tests/families/test_coverage.py`` checks that timm still gives the declared counts, and that the
table in docs/families.md is `coverage_markdown` of them. It makes docs and tests only, so it lives here and
not in the package.

    python scripts/family_coverage.py [TIMM_MODULE ...] [--errors]    # measure and print the table
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import timm
import torch
from timm.models._registry import _model_to_module
from torch.overrides import TorchFunctionMode

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # this checkout's attnxfer, whatever is installed

from attnxfer.models.attention import families
from attnxfer.models.attention.family import WORKFLOWS, ModuleCoverage
from attnxfer.transfer import build_plan

#: Every timm module a family covers, in the table's order (the families' order: flat, then hierarchical).
COVERAGE: dict[str, ModuleCoverage] = {m.module: m for f in families() for m in f.modules}
TIMM_MODULES: tuple[str, ...] = tuple(COVERAGE)


def family_of_module(module: str) -> str:
    """The family (file) that covers timm ``module``."""
    return next(f.name for f in families() if any(m.module == module for m in f.modules))


#: In-place ops that only change values: on the meta device there are none to change, so `_MetaNoInit` skips
#: them (timm's ``trunc_normal_`` on meta tensors goes through torch's reference kernels: 5x the build time).
_VALUE_ONLY_INPLACE = frozenset(
    ("uniform_", "normal_", "clamp_", "clamp_min_", "clamp_max_", "erfinv_", "mul_", "add_", "sub_", "div_")
    + ("zero_", "fill_", "copy_", "exp_", "bernoulli_", "random_", "exponential_")
    # torch.nn.init's functions dispatch as themselves, and the ops they run inside are not seen by the mode
    + ("kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_")
    + ("constant_", "ones_", "zeros_", "orthogonal_", "eye_", "dirac_", "sparse_")
)


class _MetaNoInit(TorchFunctionMode):
    """Skips value-only in-place ops (weight initialisation) on meta tensors: shapes and classes are kept."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if (
            getattr(func, "__name__", "") in _VALUE_ONLY_INPLACE
            and isinstance(target, torch.Tensor)
            and target.is_meta
        ):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build models on the meta device, without running their weight initialisation."""
    with torch.device("meta"), _MetaNoInit():
        yield


def arch_module(arch: str) -> str | None:
    """The timm module an arch is registered in, tag stripped (``vit_small_patch16_224.augreg_in1k``
    -> ``vision_transformer``)."""
    return _model_to_module.get(arch.split(".", 1)[0])


def module_archs(modules: Iterable[str] = TIMM_MODULES) -> dict[str, list[str]]:
    """Pretrained arch names (without tags, each once) per timm module, in timm's order."""
    wanted = {m: [] for m in modules}
    seen = set()
    for name in timm.list_models(pretrained=True):
        arch = name.split(".", 1)[0]
        module = arch_module(arch)
        if module in wanted and arch not in seen:
            seen.add(arch)
            wanted[module].append(arch)
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
    modules: Iterable[str] = TIMM_MODULES, archs: dict[str, list[str]] | None = None
) -> tuple[dict[str, ModuleCoverage], dict[str, dict[str, str | None]]]:
    """Measure the table: ({timm module: counts}, {arch: {mode: error or None}}). The workflow columns are
    copied from the declared `COVERAGE` (they are not measured on the meta device)."""
    archs = module_archs(modules) if archs is None else archs
    rows, errors = {}, {}
    for module, names in archs.items():
        copy = distill = 0
        for arch in names:
            errors[arch] = plan_error(arch)
            copy += errors[arch]["copy"] is None
            distill += errors[arch]["distill"] is None
        known = COVERAGE.get(module)
        rows[module] = ModuleCoverage(module, len(names), copy, distill, known.workflows if known else ())
    return rows, errors


def coverage_markdown(table: dict[str, ModuleCoverage] | None = None) -> str:
    """The timm module × workflow table in Markdown (docs/families.md holds it verbatim)."""
    table = COVERAGE if table is None else table
    lines = [
        "| timm module | family | pretrained archs | copy | distill | " + " | ".join(WORKFLOWS) + " |",
        "|---|---|---:|---:|---:|" + ":-:|" * len(WORKFLOWS),
    ]
    for row in table.values():
        marks = ["yes" if w in row.workflows else "—" for w in WORKFLOWS]
        family = family_of_module(row.module)
        lines.append(
            f"| {row.module} | {family} | {row.archs} | {row.copy} | {row.distill} | "
            + " | ".join(marks)
            + " |"
        )
    total, copy, distill = (sum(getattr(r, c) for r in table.values()) for c in ("archs", "copy", "distill"))
    lines.append(f"| **all** | | {total} | {copy} | {distill} |" + " |" * len(WORKFLOWS))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TIMM_MODULES), help="timm modules to walk")
    parser.add_argument("--errors", action="store_true", help="also list each refused arch and why")
    args = parser.parse_args(argv)
    rows, errors = measure_coverage(args.modules)
    print(coverage_markdown(rows))
    if args.errors:
        for arch, errs in errors.items():
            for mode, err in errs.items():
                if err:
                    print(f"{arch} [{mode}]: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
