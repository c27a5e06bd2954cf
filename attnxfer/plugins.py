"""What installed packages add without a fork: a distribution names its modules in an entry-point group, and
the registry of datasets, comparison losses or attentions imports them the first time it is asked for a name
or for its names (docs/data.md, docs/distillation.md, docs/conversion.md)."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

from .speak import warn

DATASET_GROUP, LOSS_GROUP, ATTENTION_GROUP = "attnxfer.datasets", "attnxfer.losses", "attnxfer.attentions"


def entry_point_origin(group: str, module: str) -> dict[str, str] | None:
    """The installed distribution whose ``group`` entry point names ``module``'s top package (one naming the
    module or a package it is in first): its name, version and the entry point's value, else None. What a run
    records of a plug-in's loss or attention, so a run read where the package is gone names what to install."""
    if module.split(".")[0] == __name__.split(".")[0]:  # a built-in: no metadata to read (10 ms a group)
        return None
    found = [
        ep
        for ep in importlib.metadata.entry_points(group=group)
        if ep.dist and ep.module.split(".")[0] == module.split(".")[0]
    ]
    best = max(found, key=lambda ep: f"{module}.".startswith(f"{ep.module}."), default=None)
    return best and {"package": best.dist.name, "version": best.dist.version, "entry_point": best.value}


def missing_plugin(name: str, origin: Any) -> str | None:
    """Why ``name``, registered where it was recorded by the package ``origin`` (`entry_point_origin`'s
    record) says, is not registered here, ending in the pip command that brings it back: one wording for a
    run's config and an exported student alike. None where ``origin`` is not such a record (hand-edited)."""
    keys = ("package", "version", "entry_point")
    if not (isinstance(origin, dict) and all(origin.get(k) and isinstance(origin[k], str) for k in keys)):
        return None
    package, version = origin["package"], origin["version"]
    said = f"{name!r} came from the plug-in package {package} {version} ({origin['entry_point']})"
    try:
        here = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"{said}; it is not installed here: pip install {package}"
    return (
        f"{said}; {package} {here}, installed here, registers no {name!r}: pip install {package}=={version}"
    )


@functools.cache
def load_entry_points(group: str) -> None:
    """Import every module ``group``'s entry points name, once per process (each registers what it adds as it
    is imported); one that fails is said in one warning line and the rest of it skipped: it must not hide the
    built-ins. A name it registered before the failure stays (the registries are not this module's to undo)."""
    for ep in importlib.metadata.entry_points(group=group):
        try:
            ep.load()
        except Exception as e:
            warn(f"warning: {group} entry point {ep.name} = {ep.value} failed to load, rest skipped: {e!r}")
