"""What installed packages add without a fork: a distribution names its modules in an entry-point group, and
the registry of datasets, comparison losses or attentions imports them the first time it is asked for a name
or for its names (docs/data.md, docs/distillation.md, docs/conversion.md)."""

from __future__ import annotations

import functools
import importlib.metadata

from .speak import warn

DATASET_GROUP, LOSS_GROUP, ATTENTION_GROUP = "attnxfer.datasets", "attnxfer.losses", "attnxfer.attentions"


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
