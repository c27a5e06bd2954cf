"""Teachers: a pretrained ViT named the way timm names it, or the file a user already has.

`load_teacher` accepts

* a timm name with a pretrained tag: ``vit_large_patch16_224.mae``,
* a Hub repo in timm's format: ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION``,
* a local folder in timm's Hub layout (config.json + model.safetensors): ``local-dir:PATH``,
* a checkpoint file (``.safetensors``, ``.pth``, ``.bin``) plus ``arch=`` (a timm architecture,
  optionally with the tag whose preprocessing it was trained with), including MAE's pretraining
  checkpoints (decoder and mask token are dropped and reported) and DeiT/fine-tuned ones.

Weights are read without unpickling code (safetensors, or ``torch.load(weights_only=True)``)
and handed to timm's own loader, so the architecture's checkpoint filter runs (position-embedding
resampling, layout conversions) and the load is strict: a missing encoder weight is an error,
never a random one. The returned `TeacherRecord` makes a run traceable (where the weights came
from, their hash, their licence, the preprocessing they expect).

Nothing here waits on a network that is not there: with ``HF_HUB_OFFLINE=1`` or an unreachable
Hub, only the local cache is consulted, and a missing teacher raises `TeacherNotAvailable` with
the commands that fetch it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..models.attention import make_transfer_aware
from ..models.vit import create_vit

__all__ = [
    "DROP_RULES",
    "KeyDropRule",
    "TeacherLoadError",
    "TeacherNotAvailable",
    "TeacherRecord",
    "TeacherSpec",
    "UnsafeCheckpointError",
    "drop_unused_entries",
    "fetch_teacher",
    "hub_cache_dir",
    "hub_reachable",
    "load_teacher",
    "parse_teacher_spec",
    "read_state_dict",
]

_logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")
# Weight files a timm Hub repo / local folder may hold, in timm's order of preference.
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# Containers a training script wraps its state dict in; EMA first, as timm prefers it.
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict", "module")
# pretrained_cfg entries that say where weights live; a teacher's weights arrive as a state dict.
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")


class TeacherNotAvailable(RuntimeError):
    """The teacher's weights are neither on this machine nor reachable; the message says how to get them."""


class TeacherLoadError(ValueError):
    """The weights do not fit the architecture (missing/unexpected/mis-shaped keys, wrong head)."""

    def __init__(self, message: str, missing_keys: Sequence[str] = (), unexpected_keys: Sequence[str] = ()):
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that can only be read by unpickling arbitrary Python objects."""


# --------------------------------------------------------------------------------------------
# The record


@dataclass
class TeacherRecord:
    """Where a run's teacher came from and what it expects; JSON-serialisable with `asdict`.

    ``hf_revision`` is what was asked for (None = the default branch), ``hf_commit`` the commit
    it resolved to in the cache. ``sha256`` hashes the weights file that was actually read.
    """

    spec: str
    architecture: str
    source: str  # "timm-pretrained" | "hub" | "local-dir" | "file" | "random-init"
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_commit: str | None = None
    files: list[str] = field(default_factory=list)
    sha256: str | None = None
    checkpoint_key: str | None = None
    license: str | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    input_size: tuple[int, ...] = ()
    interpolation: str | None = None
    crop_pct: float | None = None
    num_classes: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    resampled_pos_embed: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherRecord:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("mean", "std", "input_size"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher spec: ``source`` is one of ``timm``, ``hf-hub``, ``local-dir``, ``file``."""

    source: str
    name: str  # timm name (with tag), Hub repo id, or a path
    revision: str | None = None


def parse_teacher_spec(spec: str, revision: str | None = None) -> TeacherSpec:
    """Split a teacher spec into its source and name; unknown forms are an error that lists the valid ones."""
    import timm
    from timm.models import split_model_name_tag

    spec = str(spec).strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in ("hf-hub", "hf_hub"):
        repo, _, rev = rest.partition("@")
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
            raise ValueError(f"teacher spec {spec!r}: expected hf-hub:ORG/NAME[@REVISION]")
        rev = rev or None
        if rev and revision and rev != revision:
            raise ValueError(
                f"teacher spec {spec!r} names revision {rev!r} but revision={revision!r} was also given"
            )
        return TeacherSpec("hf-hub", repo, rev or revision)
    if sep and prefix.lower() == "local-dir":
        return TeacherSpec("local-dir", str(Path(rest).expanduser()))
    if spec.endswith(WEIGHT_SUFFIXES) or os.path.isfile(os.path.expanduser(spec)):
        return TeacherSpec("file", str(Path(spec).expanduser()))
    arch, _ = split_model_name_tag(spec)
    if timm.is_model(arch):
        return TeacherSpec("timm", spec, revision)
    hint = f" (a Hub repo? use 'hf-hub:{spec}')" if "/" in spec else ""
    raise ValueError(
        f"unknown teacher {spec!r}{hint}. A teacher is a timm name with a pretrained tag "
        f"('vit_base_patch16_224.mae'; see timm.list_pretrained('vit_*')), 'hf-hub:ORG/NAME[@REV]', "
        f"'local-dir:PATH' (config.json + model.safetensors), or a checkpoint file "
        f"({', '.join(WEIGHT_SUFFIXES)}) together with arch="
    )


# --------------------------------------------------------------------------------------------
# Reading checkpoints safely


def _unsafe_message(path: Path, why: str) -> str:
    return (
        f"{path} cannot be read safely: {why}.\n"
        "attnxfer reads .pth/.bin files with torch.load(weights_only=True), which admits tensors and plain "
        "containers only; this file also holds pickled Python objects (an argparse.Namespace of training args, "
        "a custom class, ...). Unpickling those would run whatever code the file names, so it is refused.\n"
        "If you trust the file, convert it once on a trusted machine and load the result instead:\n"
        '    python -c "import torch; from safetensors.torch import save_file; '
        f"ck = torch.load('{path.name}', map_location='cpu', weights_only=False); "
        "sd = ck.get('model', ck) if isinstance(ck, dict) else ck.state_dict(); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\"\n"
        f"then: load_teacher('{path.stem}.safetensors', arch=...)"
    )


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile prefixes (``module.``, ``_orig_mod.``)."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a checkpoint file and the container key they were under (None if flat).

    ``.safetensors`` is read directly; ``.pth``/``.pt``/``.bin`` with ``torch.load(weights_only=True)``.
    A file that needs arbitrary unpickling raises `UnsafeCheckpointError` explaining how to convert it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), None
        except SafetensorError as e:
            raise TeacherLoadError(
                f"{path} is not a readable safetensors file ({e}): truncated or corrupted? "
                "Copy or download it again"
            ) from None
    if not name.endswith(WEIGHT_SUFFIXES):
        raise ValueError(
            f"{path}: unsupported checkpoint type; use one of {', '.join(WEIGHT_SUFFIXES)} "
            "(JAX .npz weights: load them through their timm name instead)"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = (
            f"it pickles {culprit.group(1)}"
            if culprit
            else "it needs objects torch's weights-only reader refuses"
        )
        raise UnsafeCheckpointError(_unsafe_message(path, why)) from None
    if _is_tensor_dict(obj):
        return _strip_wrappers(obj), None
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return _strip_wrappers(obj[key]), key
        raise TeacherLoadError(
            f"{path}: no state dict found; top-level keys are {sorted(map(str, obj))[:20]}. "
            f"Expected a flat dict of tensors or one under {list(_CHECKPOINT_KEYS)}"
        )
    raise TeacherLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")


@dataclass(frozen=True)
class KeyDropRule:
    """Checkpoint entries an encoder does not use, dropped (and reported) when ``detect`` recognises the format.

    ``tag`` names the timm pretrained tag whose preprocessing such checkpoints expect (used when the
    caller gave an architecture without a tag).
    """

    name: str
    detect: Callable[[frozenset[str]], bool]
    drop: Callable[[str], bool]
    tag: str | None = None


DROP_RULES: list[KeyDropRule] = [
    # MAE pretraining checkpoints: encoder + decoder_embed/decoder_blocks/decoder_norm/decoder_pred/
    # decoder_pos_embed + mask_token. Only decoder_* marks the format: DINOv2 checkpoints also carry a
    # mask_token and timm's filter recognises them by it.
    KeyDropRule(
        "mae-decoder",
        detect=lambda keys: any(k.startswith("decoder_") for k in keys),
        drop=lambda k: k.startswith("decoder_") or k == "mask_token",
        tag="mae",
    ),
]


def _apply_drop_rules(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[KeyDropRule]]:
    keys = frozenset(state_dict)
    matched = [r for r in DROP_RULES if r.detect(keys)]
    if not matched:
        return state_dict, [], []
    dropped = sorted(k for k in state_dict if any(r.drop(k) for r in matched))
    kept = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    return kept, dropped, matched


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The Hub, without hanging


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hub cache in use: ``cache_dir`` or huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir else constants.HF_HUB_CACHE


_REACHABLE: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0, ttl: float = 60.0) -> bool:
    """Whether the Hub endpoint answers HTTP within ``timeout`` seconds (any status counts).

    huggingface_hub retries an unreachable endpoint for ~25 s per file before falling back to the
    cache; one bounded probe (DNS included, run in a daemon thread) decides up front instead.
    Proxies from the environment are honoured. The answer is remembered for ``ttl`` seconds.
    """
    import time

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    now = time.monotonic()
    cached = _REACHABLE.get(endpoint)
    if cached and now - cached[0] < ttl:
        return cached[1]
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # it answered
        except urllib.error.URLError as e:
            # A TLS complaint means something answered: let huggingface_hub (its own CA settings) decide.
            answer.append(isinstance(e.reason, ssl.SSLError))
        except Exception:
            answer.append(False)

    t = threading.Thread(target=probe, name="attnxfer-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    ok = bool(answer and answer[0])
    _REACHABLE[endpoint] = (now, ok)
    if not ok:
        _logger.info("Hugging Face Hub at %s is not reachable: using the local cache only", endpoint)
    return ok


def _offline_reason() -> str | None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    if not hub_reachable():
        return f"{constants.ENDPOINT} cannot be reached"
    return None


def _fetch_instructions(
    spec: str, repo: str, revision: str | None, cache_dir: str | None, reason: str, missing: str
) -> str:
    cache = hub_cache_dir(cache_dir)
    rev = f" --revision {revision}" if revision else ""
    folder = "models--" + repo.replace("/", "--")
    return (
        f"teacher {spec!r}: {missing} of Hub repo {repo}{'@' + revision if revision else ''} is not in the local "
        f"cache ({cache}) and cannot be downloaded: {reason}.\n"
        "On a machine with internet, fetch it with one of:\n"
        f"    huggingface-cli download {repo}{rev}      (huggingface_hub >= 1.0 spells it: hf download {repo}{rev})\n"
        f"    attnxfer fetch {spec}{rev}\n"
        "(add --cache-dir DIR to either to put it in a folder of your choice). Then make that cache visible here: "
        f"copy the folder {folder} into {cache}, or point HF_HUB_CACHE at the directory that holds {folder} "
        "(or set HF_HOME=DIR when it is DIR/hub), or pass cache_dir=... (CLI: --cache-dir)."
    )


def _hub_file(
    spec: str, repo: str, filename: str, revision: str | None, cache_dir: str | None, *, required: bool = True
) -> str | None:
    """Path of ``filename`` from Hub ``repo`` in the cache, downloading only when the Hub can be reached.

    Missing and not downloadable: `TeacherNotAvailable` if ``required``, else None.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reason = _offline_reason()
    if reason is not None:
        # Offline: a purely local lookup (refs/<revision> -> snapshots/<commit>/<file>), no HTTP client at all.
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(path, str):
            return path
        if not required:
            return None
        raise TeacherNotAvailable(_fetch_instructions(spec, repo, revision, cache_dir, reason, filename))
    try:
        return hf_hub_download(
            repo, filename, revision=revision, cache_dir=cache_dir, library_name="attnxfer"
        )
    except LocalEntryNotFoundError:
        if not required:
            return None
        raise TeacherNotAvailable(
            _fetch_instructions(spec, repo, revision, cache_dir, reason or "the download failed", filename)
        ) from None
    except EntryNotFoundError:
        if not required:
            return None
        raise TeacherLoadError(f"teacher {spec!r}: Hub repo {repo} has no file {filename}") from None
    except RevisionNotFoundError:
        raise TeacherLoadError(f"teacher {spec!r}: Hub repo {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise TeacherLoadError(
            f"teacher {spec!r}: Hub repo {repo} does not exist or is private "
            "(log in with `hf auth login` for private repos)"
        ) from None


def _hub_weights(
    spec: str, repo: str, revision: str | None, cache_dir: str | None, filename: str | None = None
) -> str:
    names = (filename,) if filename else _HUB_WEIGHT_FILES[:2]
    for name in names:
        path = _hub_file(spec, repo, name, revision, cache_dir, required=False)
        if path:
            return path
    reason = _offline_reason()
    if reason:
        raise TeacherNotAvailable(
            _fetch_instructions(spec, repo, revision, cache_dir, reason, "the weights file")
        )
    raise TeacherLoadError(f"teacher {spec!r}: Hub repo {repo} has none of {list(names)}")


def _snapshot_commit(path: str) -> str | None:
    """The commit hash of a file inside ``.../snapshots/<commit>/...`` of the Hub cache."""
    p = Path(path)
    for parent in p.parents:
        if parent.parent.name == "snapshots":
            return parent.name
    return None


def _readme_license(path: str | None) -> str | None:
    """``license:`` from a model card's YAML front matter."""
    if not path or not os.path.isfile(path):
        return None
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1]
    m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front, flags=re.M)
    return m.group(1).strip() if m else None


# --------------------------------------------------------------------------------------------
# Resolving a spec to (architecture, pretrained cfg, weights file)


@dataclass
class _Resolved:
    """What a spec resolved to before any weights are read."""

    source: str
    architecture: str  # timm name without tag
    pretrained_cfg: dict[str, Any]
    model_args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    files: list[str] = field(default_factory=list)
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_commit: str | None = None
    license: str | None = None
    tag_known: bool = (
        True  # False: a file loaded with an untagged arch (preprocessing is timm's default guess)
    )


def _registry_cfg(name: str) -> dict[str, Any]:
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _ = split_model_name_tag(name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None:
        import timm

        raise ValueError(
            f"timm has no pretrained config {name!r}; tags for {arch}: "
            f"{timm.list_pretrained(arch + '.*')[:10]}"
        )
    return cfg.to_dict()


def _resolve_timm(
    spec: TeacherSpec, *, arch: str | None, cache_dir: str | None, pretrained: bool
) -> _Resolved:
    from timm.models import split_model_name_tag

    arch_name, _ = split_model_name_tag(spec.name)
    cfg = _registry_cfg(spec.name)
    res = _Resolved("timm-pretrained", arch_name, cfg, license=cfg.get("license"))
    if not pretrained:
        return res
    # The Hub copy is a native state dict even where the original URL is a foreign format (custom_load).
    repo = cfg.get("hf_hub_id")
    if not repo:
        url = cfg.get("url") or "(no URL)"
        raise TeacherNotAvailable(
            f"teacher {spec.name!r}: timm has no Hub copy of these weights, only {url}. Download that file on a "
            f"machine with internet and load it here with load_teacher(PATH, arch={spec.name!r})."
        )
    res.hf_repo, res.hf_revision = repo, spec.revision
    res.weights = _hub_weights(spec.name, repo, spec.revision, cache_dir, cfg.get("hf_hub_filename"))
    res.hf_commit = _snapshot_commit(res.weights)
    res.files = [res.weights]
    return res


def _parse_timm_config(folder: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """timm's own reading of a Hub-layout config.json: (pretrained_cfg, architecture, model_args)."""
    from timm.models._hub import load_model_config_from_path

    return load_model_config_from_path(folder)


def _resolve_hub(
    spec: TeacherSpec, *, arch: str | None, cache_dir: str | None, pretrained: bool
) -> _Resolved:
    label = f"hf-hub:{spec.name}"
    cfg_path = _hub_file(label, spec.name, "config.json", spec.revision, cache_dir)
    cfg, architecture, model_args = _parse_timm_config(Path(cfg_path).parent)
    readme = _hub_file(label, spec.name, "README.md", spec.revision, cache_dir, required=False)
    res = _Resolved(
        "hub",
        architecture,
        cfg,
        model_args=model_args,
        hf_repo=spec.name,
        hf_revision=spec.revision,
        hf_commit=_snapshot_commit(cfg_path),
        files=[cfg_path],
        license=cfg.get("license") or _readme_license(readme),
    )
    if pretrained:
        res.weights = _hub_weights(label, spec.name, spec.revision, cache_dir, cfg.get("hf_hub_filename"))
        res.files.append(res.weights)
    return res


def _resolve_local_dir(
    spec: TeacherSpec, *, arch: str | None, cache_dir: str | None, pretrained: bool
) -> _Resolved:
    folder = Path(spec.name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"local-dir:{folder}: no config.json there (timm's Hub layout is config.json + "
            "model.safetensors, as written by timm.models.save_for_hf or `attnxfer export`)"
        )
    cfg, architecture, model_args = _parse_timm_config(folder)
    res = _Resolved(
        "local-dir",
        architecture,
        cfg,
        model_args=model_args,
        files=[str(folder / "config.json")],
        license=cfg.get("license") or _readme_license(str(folder / "README.md")),
    )
    if pretrained:
        found = [folder / n for n in _HUB_WEIGHT_FILES if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"local-dir:{folder}: none of {list(_HUB_WEIGHT_FILES)} there; "
                f"it holds {sorted(p.name for p in folder.iterdir())}"
            )
        res.weights = str(found[0])
        res.files.append(res.weights)
    return res


def _resolve_file(
    spec: TeacherSpec, *, arch: str | None, cache_dir: str | None, pretrained: bool
) -> _Resolved:
    from timm.models import split_model_name_tag

    path = Path(spec.name)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    if not arch:
        hint = (
            f" (this folder looks like timm's Hub layout: try 'local-dir:{path.parent}')"
            if (path.parent / "config.json").is_file()
            else ""
        )
        raise ValueError(
            f"teacher file {path}: pass arch=, the timm architecture it was trained as, e.g. "
            f"arch='vit_large_patch16_224.mae' (the tag selects the preprocessing){hint}"
        )
    arch_name, tag = split_model_name_tag(arch)
    import timm

    if not timm.is_model(arch_name):
        raise ValueError(f"arch={arch!r} is not a timm architecture (see timm.list_models('vit_*'))")
    cfg = _registry_cfg(arch)
    # An untagged arch gets timm's default tag's preprocessing, which says nothing about this file's licence.
    return _Resolved(
        "file",
        arch_name,
        cfg,
        weights=str(path),
        files=[str(path)],
        license=cfg.get("license") if tag else None,
        tag_known=bool(tag),
    )


_RESOLVERS: dict[str, Callable[..., _Resolved]] = {
    "timm": _resolve_timm,
    "hf-hub": _resolve_hub,
    "local-dir": _resolve_local_dir,
    "file": _resolve_file,
}


# --------------------------------------------------------------------------------------------
# Building


def _classifier_names(cfg: dict[str, Any]) -> tuple[str, ...]:
    c = cfg.get("classifier") or "head"
    return (c,) if isinstance(c, str) else tuple(c)


def _checkpoint_classes(res: _Resolved, sd: dict[str, torch.Tensor]) -> int:
    """Classes of the checkpoint's head: trusted metadata for timm-format sources, the tensors for files."""
    if res.source != "file" and res.pretrained_cfg.get("num_classes") is not None:
        return int(res.pretrained_cfg["num_classes"])
    w = sd.get(_classifier_names(res.pretrained_cfg)[0] + ".weight")
    return int(w.shape[0]) if w is not None else 0


def _load_error(spec: str, arch: str, err: RuntimeError, sd_keys: frozenset[str]) -> TeacherLoadError:
    """torch's strict-load error, restated with the key lists and what to change."""
    msg = str(err)
    found: dict[str, list[str]] = {"Missing": [], "Unexpected": []}
    for line in msg.splitlines():
        for kind in found:
            if f"{kind} key(s) in state_dict:" in line:
                found[kind] += re.findall(r'"([^"]+)"', line)
    hints = []
    if "fc_norm.weight" in sd_keys and "norm.weight" not in sd_keys:
        hints.append(
            "the checkpoint has fc_norm and no final norm: it was fine-tuned with average pooling "
            "(MAE/BEiT fine-tuning): pass global_pool='avg'"
        )
    if "dist_token" in sd_keys:
        hints.append("the checkpoint has a distillation token: use a deit_*_distilled_* arch")
    text = (
        f"teacher {spec!r}: the weights do not fit architecture {arch!r}; nothing was randomly "
        f"initialised in their place.\n"
        + (
            f"Missing encoder keys ({len(found['Missing'])}): {found['Missing']}\n"
            if found["Missing"]
            else ""
        )
        + (
            f"Unexpected keys ({len(found['Unexpected'])}): {found['Unexpected']}\n"
            if found["Unexpected"]
            else ""
        )
        + "".join(f"Hint: {h}\n" for h in hints)
        + f"torch said: {msg}"
    )
    return TeacherLoadError(text, found["Missing"], found["Unexpected"])


def _json_safe(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in args.items():
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list, dict)):
            out[k] = v
    return out


def drop_unused_entries(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(encoder entries, dropped keys)``: what `DROP_RULES` recognise (e.g. an MAE decoder) taken out."""
    kept, dropped, _ = _apply_drop_rules(state_dict)
    return kept, dropped


def load_teacher(
    spec: str,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    cache_dir: str | None = None,
    revision: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    **timm_kwargs: Any,
) -> tuple[nn.Module, TeacherRecord]:
    """A frozen teacher ViT (TransferAttention in every block, ``eval()``, no grad) and its record.

    Args:
        spec: timm name with tag, ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH``, or a checkpoint file.
        arch: timm architecture of a checkpoint file (``vit_large_patch16_224.mae``: the tag chooses the
            preprocessing and licence recorded; untagged, timm's default tag's preprocessing is used).
        pretrained: False builds the architecture with random weights (dry runs, tests).
        cache_dir: Hub cache folder (default: HF_HUB_CACHE / HF_HOME/hub).
        revision: Hub branch, tag or commit (or ``@REV`` in the spec).
        img_size: build for this input size; position embeddings are resampled from the checkpoint's.
        num_classes: None keeps the checkpoint's head, 0 drops it (reported in ``dropped_keys``); any
            other value that differs from the checkpoint's is an error (it would be a random head).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``global_pool='avg'``).
    """
    if "attn_layer" in timm_kwargs:
        raise ValueError(
            "load_teacher builds teachers with attnxfer's TransferAttention; don't pass attn_layer"
        )
    parsed = parse_teacher_spec(spec, revision)
    if parsed.source not in ("hf-hub", "timm") and revision:
        raise ValueError(f"revision={revision!r} only applies to Hub teachers, not {parsed.source} {spec!r}")
    res = _RESOLVERS[parsed.source](parsed, arch=arch, cache_dir=cache_dir, pretrained=pretrained)
    if not pretrained:
        res.weights, res.source = None, "random-init"
    _check_saved_attention(spec, res)

    state_dict, checkpoint_key, dropped = _read_weights(spec, res) if res.weights else ({}, None, [])
    num_classes, dropped_head = _choose_head(spec, res, state_dict, num_classes)
    source_pos = tuple(state_dict["pos_embed"].shape) if "pos_embed" in state_dict else None
    model = _build(spec, res, state_dict, num_classes, img_size, timm_kwargs)
    del state_dict

    record = _record(spec, res, model, checkpoint_key, dropped + dropped_head, source_pos)
    _logger.info(
        "teacher %s: %s from %s%s, %d classes, input %s, mean %s std %s",
        spec,
        res.architecture,
        res.source,
        f" ({res.hf_repo}@{res.hf_commit})" if res.hf_repo else "",
        record.num_classes,
        record.input_size,
        record.mean,
        record.std,
    )
    return model, record


def _check_saved_attention(spec: str, res: _Resolved) -> None:
    """A saved config may name an attention: timm's softmax one is replaced by TransferAttention,
    an attnxfer efficient one cannot be a teacher."""
    saved = res.model_args.get("attn_layer", None)
    if isinstance(saved, str) and saved.startswith("attnxfer:"):
        raise TeacherLoadError(
            f"teacher {spec!r} is an efficient-attention student ({saved[9:]}); teachers "
            "need softmax attention (their q/k define the maps that are transferred)"
        )
    if saved in ("", "attn"):
        res.model_args = {k: v for k, v in res.model_args.items() if k != "attn_layer"}


def _read_weights(spec: str, res: _Resolved) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """The checkpoint's tensors minus entries an encoder doesn't use: (state dict, container key, dropped keys)."""
    state_dict, checkpoint_key = read_state_dict(res.weights)
    state_dict, dropped, rules = _apply_drop_rules(state_dict)
    if dropped:
        _logger.warning(
            "teacher %s: dropped %d checkpoint entries the encoder does not use (%s): %s",
            spec,
            len(dropped),
            ", ".join(r.name for r in rules),
            _summarise_keys(dropped),
        )
    tagged = [r.tag for r in rules if r.tag]
    if not res.tag_known and tagged:
        import timm

        guess = f"{res.architecture}.{tagged[0]}"
        if guess in timm.list_pretrained(guess):
            _logger.info(
                "teacher %s: %s checkpoint: preprocessing and licence of timm's %s",
                spec,
                rules[0].name,
                guess,
            )
            res.pretrained_cfg = _registry_cfg(guess)
            res.license, res.tag_known = res.pretrained_cfg.get("license"), True
    if not res.tag_known:
        _logger.warning(
            "teacher %s: mean/std are timm's defaults for %s (tag %r); name the tag the weights were "
            "trained with in arch= (e.g. %s.mae) if that is wrong",
            spec,
            res.architecture,
            res.pretrained_cfg.get("tag"),
            res.architecture,
        )
    return state_dict, checkpoint_key, dropped


def _choose_head(
    spec: str, res: _Resolved, state_dict: dict[str, torch.Tensor], num_classes: int | None
) -> tuple[int, list[str]]:
    """The teacher's class count: the checkpoint's, or 0 (head dropped, reported). Never a random head."""
    ckpt_classes = (
        _checkpoint_classes(res, state_dict) if res.weights else res.pretrained_cfg.get("num_classes", 0)
    )
    if num_classes is None or num_classes == ckpt_classes:
        return ckpt_classes, []
    if num_classes == 0:
        heads = {c.split(".")[0] for c in _classifier_names(res.pretrained_cfg)}
        dropped = sorted(k for k in state_dict if k.split(".")[0] in heads)
        for k in dropped:
            state_dict.pop(k)
        return 0, dropped
    if res.weights:
        raise TeacherLoadError(
            f"teacher {spec!r} has a {ckpt_classes}-class head; num_classes={num_classes} would "
            f"give it a random one. Pass num_classes={ckpt_classes} (keep it) or 0 (drop it)."
        )
    return num_classes, []


def _build(
    spec: str,
    res: _Resolved,
    state_dict: dict[str, torch.Tensor],
    num_classes: int,
    img_size: int | tuple[int, int] | None,
    timm_kwargs: dict[str, Any],
) -> nn.Module:
    """timm builds the model and loads ``state_dict`` through the architecture's checkpoint filter
    (position-embedding resampling, layout conversion) with a strict load; frozen, eval, TransferAttention."""
    cfg = {k: v for k, v in res.pretrained_cfg.items() if k not in _SOURCE_KEYS}
    cfg["num_classes"] = num_classes  # equal to the model's: timm keeps the load strict
    if res.weights:
        cfg["state_dict"] = state_dict
    kwargs = {**res.model_args, **timm_kwargs, "num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if res.model_args:
        kwargs["pretrained_model_args"] = dict(res.model_args)  # the source grid, for resampling
    try:
        model = create_vit(res.architecture, pretrained=bool(res.weights), pretrained_cfg=cfg, **kwargs)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise _load_error(spec, res.architecture, e, frozenset(state_dict)) from None
    except TypeError as e:
        if "attn_layer" in str(e):
            raise TeacherLoadError(
                f"teacher {spec!r}: {res.architecture} is not a timm VisionTransformer with "
                "standard attention; attnxfer teachers are ViT/DeiT/MAE-style models"
            ) from e
        raise
    finally:
        cfg.pop("state_dict", None)
    # timm keeps the pretrained cfg it loaded from: don't let it pin the checkpoint's tensors in memory.
    for attr in ("pretrained_cfg", "default_cfg"):
        getattr(model, attr, {}).pop("state_dict", None)
    make_transfer_aware(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _summarise_keys(keys: Sequence[str], limit: int = 8) -> str:
    """``decoder_blocks.* (96), mask_token``: the keys grouped by top-level module."""
    groups: dict[str, int] = {}
    for k in keys:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    parts = [g if g in keys else f"{g}.* ({n})" for g, n in groups.items()]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts)} groups)" if len(parts) > limit else "")


def _record(
    spec: str,
    res: _Resolved,
    model: nn.Module,
    checkpoint_key: str | None,
    dropped: list[str],
    source_pos: tuple[int, ...] | None,
) -> TeacherRecord:
    from timm.models import get_model_input_config

    cfg = model.pretrained_cfg
    resampled = False
    if source_pos is not None and getattr(model, "pos_embed", None) is not None:
        resampled = tuple(model.pos_embed.shape) != source_pos
        # Same token count, other grid (e.g. 8x2 vs 4x4): only timm-format metadata knows the source grid.
        src = res.model_args.get("img_size") or (
            cfg.get("input_size", (0, 0, 0))[-2:] if res.source != "file" else None
        )
        if src is not None:
            src = (src, src) if isinstance(src, int) else tuple(src)
            resampled = resampled or tuple(model.patch_embed.img_size) != src
    model_args = {k: v for k, v in getattr(model, "_model_args", {}).items() if k != "pretrained_model_args"}
    return TeacherRecord(
        spec=spec,
        architecture=res.architecture + (f".{cfg['tag']}" if cfg.get("tag") and res.tag_known else ""),
        source=res.source,
        hf_repo=res.hf_repo,
        hf_revision=res.hf_revision,
        hf_commit=res.hf_commit,
        files=list(res.files),
        sha256=_sha256(Path(res.weights)) if res.weights else None,
        checkpoint_key=checkpoint_key,
        license=res.license,
        mean=tuple(float(m) for m in cfg.get("mean", ())),
        std=tuple(float(s) for s in cfg.get("std", ())),
        input_size=tuple(int(i) for i in get_model_input_config(model)["input_size"]),
        interpolation=cfg.get("interpolation"),
        crop_pct=cfg.get("crop_pct"),
        num_classes=int(getattr(model, "num_classes", 0)),
        dropped_keys=list(dropped),
        resampled_pos_embed=bool(resampled),
        model_args=_json_safe(model_args),
    )


# --------------------------------------------------------------------------------------------
# Fetching (for `attnxfer fetch`)


def fetch_teacher(spec: str, cache_dir: str | None = None, revision: str | None = None) -> str:
    """Download a teacher's config, weights and model card into the Hub cache; returns the snapshot folder.

    Run it where there is internet, then copy the cache (or point HF_HUB_CACHE at it) where there is none.
    Local specs (``local-dir:``, files) need no fetching and return their path.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    parsed = parse_teacher_spec(spec, revision)
    if parsed.source in ("local-dir", "file"):
        _logger.info("teacher %s is local: nothing to fetch", spec)
        return parsed.name
    if parsed.source == "timm":
        cfg = _registry_cfg(parsed.name)
        repo = cfg.get("hf_hub_id")
        if not repo:
            raise TeacherNotAvailable(
                f"timm has no Hub copy of {parsed.name!r}; download {cfg.get('url')} and load "
                f"it with load_teacher(PATH, arch={parsed.name!r})"
            )
        extra = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
    else:
        repo, extra = parsed.name, []
    reason = _offline_reason()
    patterns = ["config.json", "*.safetensors", "README.md", "LICENSE*"] + extra
    try:
        path = snapshot_download(
            repo,
            revision=parsed.revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=reason is not None,
            library_name="attnxfer",
        )
        if not any(Path(path).glob("*.safetensors")) and not extra:
            path = snapshot_download(
                repo,
                revision=parsed.revision,
                cache_dir=cache_dir,
                allow_patterns=["*.bin", "*.pth"],
                local_files_only=reason is not None,
                library_name="attnxfer",
            )
    except LocalEntryNotFoundError:
        raise TeacherNotAvailable(
            _fetch_instructions(
                spec, repo, parsed.revision, cache_dir, reason or "the download failed", "the snapshot"
            )
        ) from None
    _logger.info("teacher %s: %s is in %s", spec, repo, path)
    return str(path)
