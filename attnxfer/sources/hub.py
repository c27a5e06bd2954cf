"""The Hugging Face Hub: its cache and one file or a model's weights from a repo
(offline: what to run where the Hub can be reached)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..hub_reach import offline_reason
from ..speak import warn
from .load_errors import TeacherLoadError, TeacherNotAvailable

# Weight files a timm Hub repo / local folder may hold, in timm's order of preference.
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# transformers' sharded safetensors (large models): the index names the shards beside it
_SHARD_INDEX = "model.safetensors.index.json"


#: the end of `fetch_instructions`' advice for the commands and functions that take a cache folder (inspect,
#: which takes none, drops it)
CACHE_DIR_ROUTE = (
    ", or name the cache folder: teacher.cache_dir=DIR for train/convert/pretrain/submit/eval (model.init reads "
    "it too), cache_dir=... in Python"
)


def fetch_instructions(
    spec: str,
    repo: str,
    revision: str | None,
    cache_dir: str | None,
    reason: str,
    missing: str,
    role: str = "teacher",
) -> str:
    cache = os.path.expanduser(cache_dir or constants.HF_HUB_CACHE)  # default: HF_HUB_CACHE, or HF_HOME/hub
    rev = f" --revision {revision}" if revision else ""
    folder = "models--" + repo.replace("/", "--")
    cached = Path(cache) / folder
    held = ""  # the repo is cached, not this revision of it: which ones are
    if cached.is_dir():
        want = revision or "main"  # what huggingface_hub looks up
        refs = sorted(p.name for p in (cached / "refs").glob("*") if p.is_file())
        commits = sorted(p.name for p in (cached / "snapshots").glob("*") if p.is_dir())
        # offline, huggingface_hub finds a snapshot by its whole commit only
        whole = next((c for c in commits if c.startswith(want) and c != want), None)
        shown = ", ".join(refs + [c[:12] for c in commits]) or "no revision"
        if whole:
            held = f" (the cache holds it as commit {whole}: pin all 40 hex digits)"
        elif want not in refs + commits:  # held, the file alone is missing: the sentence says so
            held = f" (the cache holds {repo} at {shown}, not {want})"
    return (
        f"{role} {spec!r}: {missing} of Hub repo {repo}{'@' + revision if revision else ''} is not in the local "
        f"cache ({cache}){held} and cannot be downloaded: {reason}.\n"
        "On a machine with internet, fetch it with one of:\n"
        f"    hf download {repo}{rev}      (huggingface_hub < 1.0 spells it: huggingface-cli download {repo}{rev})\n"
        f"    attnxfer fetch {spec.partition('@')[0]}{rev}\n"  # a spec's @REV is said once, as the flag
        "(add --cache-dir DIR to either to put it in a folder of your choice). Then make that cache visible here: "
        f"copy the folder {folder} into {cache}, or point HF_HUB_CACHE at the directory that holds {folder} "
        f"(or set HF_HOME=DIR when it is DIR/hub)"
        f"{CACHE_DIR_ROUTE if role == 'teacher' else ', or name the cache folder: cache_dir=... in Python'}."
    )


def _hub_file(
    spec: str,
    repo: str,
    filename: str,
    revision: str | None,
    cache_dir: str | None,
    *,
    required: bool = True,
    role: str = "teacher",
) -> str | None:
    """Path of ``filename`` from Hub ``repo`` in the cache, downloading only when the Hub can be reached;
    missing and not downloadable: `TeacherNotAvailable` if ``required``, else None."""
    # huggingface_hub's downloads expand a "~" in cache_dir (teacher.cache_dir=~/hf: no shell expands it after
    # "="), its offline lookup does not: it would not find a repo cached there
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
    reason = offline_reason()
    if reason is not None:
        # Offline: a purely local lookup (refs/<revision> -> snapshots/<commit>/<file>), no HTTP client at all.
        path = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(path, str):
            return path
        if not required:
            return None
        raise TeacherNotAvailable(fetch_instructions(spec, repo, revision, cache_dir, reason, filename, role))
    try:
        return hf_hub_download(
            repo, filename, revision=revision, cache_dir=cache_dir, library_name="attnxfer"
        )
    except EntryNotFoundError as e:  # LocalEntryNotFoundError too: not in the cache, and the download failed
        if not required:
            return None
        if isinstance(e, LocalEntryNotFoundError):
            why = fetch_instructions(spec, repo, revision, cache_dir, "the download failed", filename, role)
            raise TeacherNotAvailable(why) from None
        raise TeacherLoadError(f"{role} {spec!r}: Hub repo {repo} has no file {filename}") from None
    except (RevisionNotFoundError, RepositoryNotFoundError) as e:
        raise hub_refusal(spec, repo, revision, e, role) from None


def hub_refusal(
    spec: str,
    repo: str,
    revision: str | None,
    error: RevisionNotFoundError | RepositoryNotFoundError,
    role: str = "teacher",
) -> TeacherLoadError:
    """What the Hub's refusal of ``repo`` asks of the user: a gated repo wants its access granted on its page
    (DINOv3's are gated), which logging in alone does not give."""
    if isinstance(error, RevisionNotFoundError):
        return TeacherLoadError(f"{role} {spec!r}: Hub repo {repo} has no revision {revision!r}")
    if isinstance(error, GatedRepoError):
        return TeacherLoadError(
            f"{role} {spec!r}: Hub repo {repo} is gated: request access on https://huggingface.co/{repo}, "
            "then log in with `hf auth login` on this machine"
        )
    return TeacherLoadError(
        f"{role} {spec!r}: Hub repo {repo} does not exist or is private "
        "(log in with `hf auth login` for private repos)"
    )


def _hub_weights(
    spec: str,
    repo: str,
    revision: str | None,
    cache_dir: str | None,
    filename: str | None = None,
    role: str = "teacher",
) -> str:
    names = (filename,) if filename else (_HUB_WEIGHT_FILES[0], _SHARD_INDEX, *_HUB_WEIGHT_FILES[1:])
    for name in names:
        path = _hub_file(spec, repo, name, revision, cache_dir, required=False, role=role)
        if path:
            return path
    reason = offline_reason()
    if reason:
        raise TeacherNotAvailable(
            fetch_instructions(spec, repo, revision, cache_dir, reason, "the weights file", role)
        )
    raise TeacherLoadError(f"{role} {spec!r}: Hub repo {repo} has none of {list(names)}")


def _snapshot_dir(path: str | os.PathLike) -> Path | None:
    """The ``.../snapshots/<commit>`` folder of the Hub cache that holds ``path`` (None: outside the cache)."""
    return next((p for p in Path(path).parents if p.parent.name == "snapshots"), None)


def _snapshot_commit(path: str) -> str | None:
    """The commit hash of a file inside ``.../snapshots/<commit>/...`` of the Hub cache."""
    snapshot = _snapshot_dir(path)
    return None if snapshot is None else snapshot.name


def check_cached_blob(path: str | os.PathLike, digest: str) -> None:
    """A weights file of the Hub cache links to ``blobs/<its sha256>`` (the Hub's name for LFS content): one whose
    bytes hash otherwise (``digest``) changed after its download, e.g. damaged in a copy, and would load as other
    weights with no reader complaining; it is refused, saying how to replace it. Other files are not checked."""
    blob = Path(os.path.realpath(path))
    if _snapshot_dir(path) is None or blob.parent.name != "blobs" or blob == Path(path):
        return
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and blob.name != digest:
        raise TeacherLoadError(
            f"{path} is not the file the Hub sent: its sha256 is {digest[:12]}..., the Hub's {blob.name[:12]}... "
            f"(changed or damaged since its download); {fetch_again(path)}. A Hub mirror that names its files by "
            "another hash makes this check wrong: copy the snapshot folder out of the cache and give it as local-dir:COPY"
        )


def fetch_again(path: str | os.PathLike) -> str:
    """How to replace an unreadable weights file ``path``: one inside the Hub cache is never downloaded again
    while it is there (huggingface_hub trusts any cached file, so a plain `hf download` or `attnxfer fetch`
    leaves a truncated one as it is): the command that forces it; any other file is copied or downloaded again."""
    snapshot = _snapshot_dir(path)
    folder = snapshot.parent.parent.name if snapshot is not None else ""
    if not folder.startswith("models--") or "--" not in folder[len("models--") :]:
        return "Copy or download it again"
    repo = folder[len("models--") :].replace("--", "/", 1)
    file = Path(path).relative_to(snapshot).as_posix()
    cache = f" --cache-dir {snapshot.parent.parent.parent}"
    command = f"download {repo} {file} --revision {snapshot.name}{cache} --force-download"
    return (
        f"it is the Hub cache's copy of {repo}, which a plain download keeps: replace it with `hf {command}` "
        f"(huggingface_hub < 1.0: `huggingface-cli {command}`)"
    )


def _readme_license(path: str | None) -> str | None:
    """``license`` of a model card already on disk, read by huggingface_hub; metadata it cannot parse means
    an unknown licence (the export card then says to check the teacher's terms), with a warning."""
    if not path or not os.path.isfile(path):
        return None
    try:
        license_id = ModelCard.load(path).data.license
    except Exception as e:  # malformed YAML front matter: yaml's errors, huggingface_hub's ValueError
        warn(f"{path}: model card metadata does not parse ({e}): teacher licence unknown")
        return None
    if isinstance(license_id, list):  # the Hub's schema allows one id; a list is read as its first
        license_id = license_id[0] if license_id else None
    return str(license_id).strip() if license_id else None
