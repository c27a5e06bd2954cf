"""Where weights come from: a spec (timm name, ``hf-hub:``, ``local-dir:``, a file) resolved to files before
any weights are read, and weights read without unpickling code. Nothing here waits on a network that is not
there: offline, only the local cache is consulted, and a missing file raises `TeacherNotAvailable` with the
commands that fetch it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models._hub import load_model_config_from_path

from ..errors import InputError, MissingPathError
from ..run_layout import CHECKPOINTS_SUBDIR, DEMO_EXPORTS, DEMO_OUT, RUN_RECORD, missing_path, read_record
from ..speak import warn
from .hub import (
    _HUB_WEIGHT_FILES,
    _SHARD_INDEX,
    _hub_file,
    _hub_weights,
    _readme_license,
    _snapshot_commit,
    check_cached_blob,
    fetch_again,
)
from .load_errors import (
    TeacherLoadError,
    TeacherNotAvailable,
    UnsafeCheckpointError,
    run_folder_hint,
)
from .transformers_format import describe as describe_transformers, is_transformers_config, unreadable_config

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")
# Containers a training script wraps its state dict in; EMA first, as timm prefers it.
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict", "module")


class Source(StrEnum):
    """The form of a spec: which resolver turns it into files."""

    TIMM = "timm"
    HF_HUB = "hf-hub"
    LOCAL_DIR = "local-dir"
    FILE = "file"

    @property
    def on_hub(self) -> bool:
        """Fetched from the Hugging Face Hub (so a revision applies)."""
        return self in (Source.TIMM, Source.HF_HUB)

    @property
    def is_local(self) -> bool:
        """A folder or file on this machine: nothing to fetch."""
        return self in (Source.LOCAL_DIR, Source.FILE)


class Origin(StrEnum):
    """Where a resolved model's weights came from (recorded in run.json and model cards)."""

    TIMM_PRETRAINED = "timm-pretrained"
    HUB = "hub"
    LOCAL_DIR = "local-dir"
    FILE = "file"
    RANDOM_INIT = "random-init"  # built without weights (pretrained=False)

    @property
    def has_timm_metadata(self) -> bool:
        """Comes with a timm pretrained config (input size, classes) that can be trusted; a bare file does not."""
        return self is not Origin.FILE


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher spec: where its weights come from, and the name or path there."""

    source: Source
    name: str  # timm name (with tag), Hub repo id, or a path
    revision: str | None = None


class LocalModelMissing(MissingPathError):
    """A local model's folder or file (``spec``, given as ``role``) not found: ``said`` is what is missing, the
    message adds ``hint``, what makes it, where there is one (`demo_hint`)."""

    def __init__(self, said: str, spec: TeacherSpec, role: str, hint: str | None = None) -> None:
        super().__init__(f"{said}; {hint}" if hint else said)
        self.said, self.spec, self.role, self.hint = said, spec, role, hint

    def __reduce__(self):  # pickled as it was made (a SLURM task's error comes back through submitit)
        return type(self), (self.said, self.spec, self.role, self.hint)


#: where each role's checkpoint file names its architecture
_ARCH_KEY = {
    "teacher": "teacher.arch=NAME; --teacher-arch for inspect",
    "student": "--student-arch NAME",
    "model.init": "model.name=NAME",
}


def parse_teacher_spec(spec: str, revision: str | None = None, role: str = "teacher") -> TeacherSpec:
    """Split a teacher spec into its source and name; unknown forms are an error that lists the valid ones,
    naming the spec by its ``role`` (inspect reads its students' specs as teachers' too)."""
    if not isinstance(spec, str | os.PathLike):  # str() of a model would be read as a (too long) path
        raise TypeError(
            f"{role} spec: a name or path (str), got {type(spec).__name__}; a model already built needs no "
            "loading: pass it to build_plan / TeacherStudent as it is"
        )
    spec = str(spec).strip()
    prefix, sep, rest = spec.partition(":")
    if not spec or (sep and not rest.strip()):  # "" read as the current folder, a model's folder it is not
        raise InputError(
            f"{role} spec {spec!r} names nothing: give a timm name (vit_base_patch16_224.mae), "
            "hf-hub:ORG/NAME[@REVISION], local-dir:PATH or a weights file"
        )
    # a web address, read as a path, was "https:/... does not exist"
    if re.match(r"https?://", spec, flags=re.IGNORECASE):
        hub = r"https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([\w.\-]+/[\w.\-]+)(?:/(?:tree|blob|resolve)/([^/]+))?"
        if page := re.match(hub, spec):
            pin = f"@{page[2]}" if page[2] and page[2] != "main" else ""
            raise InputError(f"{role} spec {spec!r} is a Hub address: use 'hf-hub:{page[1]}{pin}'")
        raise InputError(
            f"{role} spec {spec!r} is a web address: attnxfer downloads no URL; download the file (wget "
            f"{spec}) and give its path, with the timm architecture it was trained as ({_ARCH_KEY[role]})"
        )
    if sep and prefix.lower() in ("hf-hub", "hf_hub"):
        repo, _, rev = rest.partition("@")
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
            raise InputError(f"{role} spec {spec!r}: expected hf-hub:ORG/NAME[@REVISION]")
        if rev and revision and rev != revision:
            raise InputError(
                f"{role} spec {spec!r} names revision {rev!r} but revision={revision!r} was also given "
                "(teacher.revision, fetch's --revision): give it once"
            )
        return TeacherSpec(Source.HF_HUB, repo, rev or revision)
    if sep and prefix.lower() == "local-dir":
        if revision:  # a folder has one version: the flag would be read by nothing
            raise InputError(
                f"{role} spec {spec!r} is a local folder: a revision ({revision!r}) is a Hub repo's: drop "
                "teacher.revision (fetch's --revision)"
            )
        return TeacherSpec(Source.LOCAL_DIR, str(Path(rest.strip()).expanduser()))
    if sep and (close := difflib.get_close_matches(prefix.lower(), ("hf-hub", "local-dir"), n=1, cutoff=0.8)):
        raise InputError(
            f"{role} spec {spec!r}: unknown prefix {prefix + ':'!r}; did you mean '{close[0]}:{rest}'?"
        )
    if spec.endswith(WEIGHT_SUFFIXES) or os.path.isfile(os.path.expanduser(spec)):
        return TeacherSpec(Source.FILE, str(Path(spec).expanduser()))
    name, at, rev = spec.partition("@")
    arch, _ = split_model_name_tag(name)
    if timm.is_model(arch):
        if at:  # hf-hub:ORG/NAME@REV's pin, which timm would read as part of the tag
            try:
                repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
            except RuntimeError:  # an unknown tag: the refusal below names the known ones
                repo = None
            pin = f"pin its Hub weights as 'hf-hub:{repo}@{rev}'" if repo else f"drop '@{rev}'"
            raise InputError(f"{role} spec {spec!r}: a timm name takes no @REVISION; {pin}")
        return TeacherSpec(Source.TIMM, spec, revision)
    _refuse_path(spec, role)
    if "/" in spec and not sep:  # ORG/NAME, no prefix of its own
        hint = f" (a Hub repo? use 'hf-hub:{spec}')"
    else:  # a misspelt architecture: the nearest one, its pretrained tag kept
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f" (did you mean {spec.replace(arch, close[0], 1)!r}?)" if close else ""
    raise InputError(
        f"unknown {role} {spec!r}{hint}. A {role} is {'a run folder, ' if role == 'student' else ''}a timm name "
        f"with a pretrained tag ('vit_base_patch16_224.mae'; see timm.list_pretrained('vit_*')), "
        f"'hf-hub:ORG/NAME[@REV]', 'local-dir:PATH' (config.json + model.safetensors), or a checkpoint file "
        f"({', '.join(WEIGHT_SUFFIXES)}) with the timm architecture it was trained as ({_ARCH_KEY[role]})"
    )


def _refuse_path(spec: str, role: str) -> None:
    """A spec that names a folder, or reads as a path (``./x``, ``runs/a/b``, ``runs/a`` where runs/ is a folder
    here), is refused with what is true of that path (other ``ORG/NAME`` may be a Hub repo: the caller's hint)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        hint = run_folder_hint(path, role)
        if hint is not None:
            raise InputError(f"{role} {spec!r}: {hint}")
        if (path / "config.json").is_file():
            raise InputError(f"{role} {spec!r}: the folder exists; use local-dir:{spec}")
        raise InputError(
            f"{role} {spec!r}: the folder exists but holds no config.json; a model's folder is timm's Hub "
            "layout (config.json + model.safetensors, as `attnxfer export` writes it), given as local-dir:PATH"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or ("/" in spec and path.parent.is_dir()):
        raise MissingPathError(f"{role} {spec!r}: {missing_path(path)}")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile prefixes (``module.``, ``_orig_mod.``)."""
    return {re.sub(r"^(?:(?:module|_orig_mod)\.)+", "", k): v for k, v in state_dict.items()}


def shard_files(index: str | os.PathLike) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names (beside it), in name order."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TeacherLoadError(
            f"{index} is not a safetensors shard index ({type(e).__name__}: {e})"
        ) from None
    if not names or any(Path(n).name != n or not n.endswith(".safetensors") for n in names):
        raise TeacherLoadError(f"{index}: its weight_map names no safetensors shards beside it: {names[:4]}")
    return [index.parent / n for n in names]


def weights_digest(path: str | os.PathLike) -> str:
    """The sha256 that identifies a teacher's weights: of the file, or of all shards of a sharded checkpoint."""
    if not str(path).endswith(_SHARD_INDEX):
        return _checked_digest(path)
    digests = b"".join(bytes.fromhex(_checked_digest(shard)) for shard in shard_files(path))
    return hashlib.sha256(digests).hexdigest()


def _checked_digest(path: str | os.PathLike) -> str:
    """A weights file's sha256, which a file of the Hub cache must match its blob's name by (`check_cached_blob`)."""
    digest = sha256_file(path)
    check_cached_blob(path, digest)
    return digest


#: where a converted checkpoint is given again, by the key the refused file was given to
_GIVE_AGAIN = {
    "teacher": "teacher.spec=... teacher.arch=... in a config, load_teacher(PATH, arch=...) in Python",
    "model.init": "model.init=... in a config, its architecture in model.name / model.kwargs",
}


def read_state_dict(
    path: str | os.PathLike, role: str = "teacher"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a checkpoint file (a shard index: of every shard) and the container key they were
    under (None if flat); a file that needs arbitrary unpickling is refused, saying how to convert it and
    where to give the result (``role``: the key the file was given to, a key of `_GIVE_AGAIN`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"checkpoint {path} does not exist")
    name = path.name.lower()
    if name.endswith(_SHARD_INDEX):
        merged: dict[str, torch.Tensor] = {}
        for shard in shard_files(path):
            merged.update(read_state_dict(shard, role)[0])
        return merged, None
    if name.endswith(".safetensors"):
        try:
            tensors = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise TeacherLoadError(
                f"{path} is not a readable safetensors file ({e}): truncated or corrupted? {fetch_again(path)}"
            ) from None
        if not tensors:
            raise TeacherLoadError(f"{path} holds no tensors")
        return _strip_wrappers(tensors), None
    if not name.endswith(WEIGHT_SUFFIXES):
        raise InputError(
            f"{path}: unsupported checkpoint type; use one of {', '.join(WEIGHT_SUFFIXES)} "
            "(JAX .npz weights: load them through their timm name instead)"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        with open(path, "rb") as f:
            head = f.read(24)
        # torch writes a zip archive, or (legacy) a pickle that opens with its protocol: other bytes (an HTML
        # page, a Git LFS pointer, safetensors named .pth) are no torch file, however torch's reader words it
        if not culprit and not head.startswith((b"PK\x03\x04", b"\x80")):
            raise TeacherLoadError(
                f"{path} is not a torch file: it begins {head!r} (a download's error page, a Git LFS pointer "
                f"or another format?). {fetch_again(path)}"
            ) from None
        why = (
            f"it pickles {culprit.group(1)}"
            if culprit
            else "it needs objects torch's weights-only reader refuses"
        )
        raise UnsafeCheckpointError(
            f"{path} cannot be read safely: {why}.\n"
            "attnxfer reads .pth/.bin files with torch.load(weights_only=True), which admits tensors and plain "
            "containers only; this file also holds pickled Python objects (an argparse.Namespace of training args, "
            "a custom class, ...). Unpickling those would run whatever code the file names, so it is refused.\n"
            "If you trust the file, convert it once on a trusted machine and load the result instead:\n"
            '    python -c "import torch; from safetensors.torch import save_file; '
            f"ck = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"sd = next((ck[k] for k in {_CHECKPOINT_KEYS} if isinstance(ck.get(k), dict)), ck) "
            "if isinstance(ck, dict) else ck.state_dict(); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')\"",
            path.with_suffix(".safetensors"),
            _GIVE_AGAIN[role],
        ) from None
    # a cut-off file, or bytes that are no torch file: what torch's readers raise for them
    except (RuntimeError, OSError, EOFError, KeyError, IndexError, ValueError) as e:
        raise TeacherLoadError(
            f"{path} is not a readable torch file ({type(e).__name__}: {e}): truncated or corrupted? "
            f"{fetch_again(path)}"
        ) from None
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


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in blocks by `hashlib.file_digest` (the one hashing helper: teacher
    weights here, checkpoint manifests in `checkpoints/store.py`)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Resolved:
    """What a spec resolved to before any weights are read."""

    source: Origin
    architecture: str  # timm name without tag
    pretrained_cfg: dict[str, Any]
    model_args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    files: list[str] = field(default_factory=list)
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_commit: str | None = None
    license: str | None = None
    named: str | None = None  # the name the user trained it as, when config.json names a timm stand-in
    # False: a file loaded with an untagged arch (preprocessing is timm's default guess)
    tag_known: bool = True
    # True: a transformers checkpoint without preprocessor_config.json (mean/std are timm's guess for the arch)
    mean_std_guessed: bool = False
    # the run whose run.json gave an untagged file's mean/std (a file of one of its checkpoints)
    stats_of_run: str | None = None
    # a transformers checkpoint: its state dict -> (timm's, dropped keys), given the weights file's name
    convert: Callable[[dict[str, torch.Tensor], str], tuple[dict[str, torch.Tensor], list[str]]] | None = None
    source_format: str | None = None  # "transformers vit (ViTForImageClassification)"; None: timm's format
    unrecorded_args: tuple[str, ...] = ()  # construction arguments no JSON value names (see load_teacher)

    @property
    def efficient_attention(self) -> str | None:
        """The attention an `attnxfer export` of an efficient student names (``attn_layer: attnxfer:KIND``),
        which only `load_student` builds; None for any other model."""
        saved = self.model_args.get("attn_layer")
        return (
            saved.removeprefix("attnxfer:")
            if isinstance(saved, str) and saved.startswith("attnxfer:")
            else None
        )


def registry_cfg(name: str, hub: bool = False) -> dict[str, Any]:
    """timm's pretrained config ``name``; ``hub``: one whose weights the Hub holds (as a native state dict,
    even where the original URL is a foreign format), else `TeacherNotAvailable` says what to download."""
    arch, _ = split_model_name_tag(name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None:
        raise InputError(
            f"timm has no pretrained config {name!r}; tags for {arch}: "
            f"{timm.list_pretrained(arch + '.*')[:10]}"
        )
    if hub and not cfg.hf_hub_id and not cfg.url:
        raise TeacherNotAvailable(
            f"teacher {name!r}: timm registers {arch} without pretrained weights (nothing to download); name a "
            f"trained one: local-dir:EXPORT_DIR (attnxfer pretrain or export writes one), or a weights file "
            f"with teacher.arch={arch} (load_teacher(PATH, arch={arch!r}) in Python)"
        )
    if hub and not cfg.hf_hub_id:
        raise TeacherNotAvailable(
            f"teacher {name!r}: timm has no Hub copy of these weights, only {cfg.url}. Download that "
            f"file on a machine with internet and load it here with load_teacher(PATH, arch={name!r})."
        )
    return cfg.to_dict()


def _resolve_timm(spec: TeacherSpec, cache_dir: str | None, pretrained: bool) -> Resolved:
    arch_name, _ = split_model_name_tag(spec.name)
    cfg = registry_cfg(spec.name, hub=pretrained)
    res = Resolved(Origin.TIMM_PRETRAINED, arch_name, cfg, license=cfg.get("license"))
    if not pretrained:
        return res
    repo = res.hf_repo = cfg["hf_hub_id"]
    res.hf_revision = spec.revision
    res.weights = _hub_weights(spec.name, repo, spec.revision, cache_dir, cfg.get("hf_hub_filename"))
    res.hf_commit = _snapshot_commit(res.weights)
    res.files = [res.weights]
    return res


def _registered_as(config: dict[str, Any]) -> str | None:
    """The architecture an attnxfer export was trained as, where its config.json names timm's stand-in
    (so that plain timm loads an architecture only attnxfer registers); the record keeps the real name."""
    meta = config.get("attnxfer") or {}
    named = (meta.get("student") or {}).get("registered_as") if isinstance(meta, dict) else None
    return named if isinstance(named, str) and named else None


def _read_json(path: str | Path, where: str) -> dict[str, Any]:
    """A JSON object from ``path``; broken JSON (or not an object) is one `InputError` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where}: {path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"{where}: {path} is not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: {path} holds a JSON {type(data).__name__}, not an object")
    return data


def _resolve_config(origin: Origin, cfg_path: str, where: str, find: Callable[[str], str | None]) -> Resolved:
    """A model folder's config.json (``find`` gives the path of a file beside it, or None): timm's format, read
    by timm, or transformers' (`transformers_format`: the timm model with the same computation, its
    preprocessing from ``preprocessor_config.json``); the licence from the model card."""
    config = _read_json(cfg_path, where)
    if "architecture" not in config and not is_transformers_config(config):
        keys = sorted(config)[:8]
        raise unreadable_config(
            f"{where}: {cfg_path}",
            f"it names neither a timm 'architecture' nor a transformers 'model_type' (keys {keys})",
        )
    # transformers' wrapper of a timm model: timm's name beside transformers' settings and weight names
    if config.get("model_type") == "timm_wrapper":
        saved = (config.get("architectures") or ["TimmWrapperModel"])[0]
        source = where.partition(":")[2]
        raise InputError(
            f"{where}: {cfg_path} is transformers' TimmWrapper around timm's {config.get('architecture')!r}, "
            "in transformers' names and settings; write the timm model once in timm's format, where "
            f"transformers is installed: `m = transformers.{saved}.from_pretrained({source!r}); "
            "timm.models.save_for_hf(m.timm_model, DIR, model_args=m.config.model_args)`, then use local-dir:DIR"
        )
    readme = find("README.md")
    if not is_transformers_config(config):
        cfg, architecture, model_args = load_model_config_from_path(Path(cfg_path).parent)
        license_id, card = cfg.get("license"), _readme_license(readme)
        # "other" states no terms (an export's card for weights that record none): config.json's stands
        if license_id and card and card.lower() not in (license_id.lower(), "other", "unknown"):
            # the card is the repo's licence statement; config.json's may be the default tag's a save copied
            warn(
                f"warning: {where}: its config.json says licence {license_id!r} but its model card (README.md) "
                f"says {card!r}: the card's is taken, as the repo's own statement; check which holds"
            )
            license_id = card
        license_id = license_id or card
        named = _registered_as(config)
        return Resolved(
            origin, architecture, cfg, model_args, files=[cfg_path], license=license_id, named=named
        )
    pre = find("preprocessor_config.json")
    license_id = _readme_license(readme)
    teacher = describe_transformers(
        config,
        where=f"{where} ({cfg_path})",
        preprocessor=_read_json(pre, where) if pre else None,
        license=license_id,
    )
    return Resolved(
        origin,
        teacher.architecture,
        teacher.pretrained_cfg,
        model_args=teacher.model_args,
        files=[cfg_path, *([pre] if pre else [])],
        license=license_id,
        convert=teacher.convert,
        source_format=teacher.source_format,
        unrecorded_args=teacher.unrecorded_args,
        mean_std_guessed=pre is None,
    )


def _resolve_hub(spec: TeacherSpec, cache_dir: str | None, pretrained: bool, role: str) -> Resolved:
    label = f"hf-hub:{spec.name}"

    def fetch(name: str, required: bool = False) -> str | None:
        return _hub_file(label, spec.name, name, spec.revision, cache_dir, required=required, role=role)

    res = _resolve_config(Origin.HUB, fetch("config.json", True), label, fetch)
    res.hf_repo, res.hf_revision, res.hf_commit = spec.name, spec.revision, _snapshot_commit(res.files[0])
    if pretrained:
        filename = res.pretrained_cfg.get("hf_hub_filename")
        res.weights = _hub_weights(label, spec.name, spec.revision, cache_dir, filename, role)
        shards = shard_files(res.weights) if res.weights.endswith(_SHARD_INDEX) else []
        res.files += [res.weights, *(fetch(p.name, True) for p in shards)]
    return res


def _resolve_local_dir(spec: TeacherSpec, pretrained: bool, role: str) -> Resolved:
    folder = Path(spec.name)
    if not folder.exists():
        raise MissingPathError(f"local-dir:{folder}: {missing_path(folder)}")
    if not (folder / "config.json").is_file():
        hint = run_folder_hint(folder, role)
        if hint is not None:
            raise InputError(f"local-dir:{folder}: {hint}")
        if folder.is_file() and (folder.parent / "config.json").is_file():  # a file of a model's folder
            raise InputError(
                f"local-dir:{folder} is a file of a model's folder: give the folder, local-dir:{folder.parent}"
            )
        if folder.is_file():  # a weights file is named as it is, with its architecture
            raise InputError(
                f"local-dir:{folder} is a file: name a weights file as it is, {folder}, with teacher.arch"
            )
        raise MissingPathError(
            f"local-dir:{folder}: no config.json there (timm's Hub layout is config.json + "
            "model.safetensors, as written by timm.models.save_for_hf or `attnxfer export`; transformers' "
            "save_pretrained writes the same two files)"
        )
    res = _resolve_config(
        Origin.LOCAL_DIR,
        str(folder / "config.json"),
        f"local-dir:{folder}",
        lambda name: str(folder / name) if (folder / name).is_file() else None,
    )
    if pretrained:
        # the Hub's order (`_hub_weights`): safetensors, whole or sharded, before any pickled file, so that a
        # downloaded repo holding both (transformers' large ones) is read as its Hub id reads it
        names = (_HUB_WEIGHT_FILES[0], _SHARD_INDEX, *_HUB_WEIGHT_FILES[1:])
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise MissingPathError(
                f"local-dir:{folder}: none of {[*_HUB_WEIGHT_FILES, _SHARD_INDEX]} there; "
                f"it holds {sorted(p.name for p in folder.iterdir())}"
            )
        res.weights = str(found[0])
        shards = shard_files(res.weights) if res.weights.endswith(_SHARD_INDEX) else []
        res.files += [res.weights, *map(str, shards)]
    return res


def _resolve_file(spec: TeacherSpec, arch: str | None, role: str) -> Resolved:
    path = Path(spec.name)
    if not path.is_file():
        raise MissingPathError(f"teacher checkpoint {missing_path(path)}")
    if (path.parent / RUN_RECORD).is_file():  # its config.yaml or run.json: weights are in its checkpoints
        raise InputError(f"{path} is a file in the run folder {path.parent}: give the folder itself")
    if path.suffix.lower() == ".onnx":  # asking for its architecture first would send the user the wrong way
        raise InputError(
            f"{path} is an ONNX model, for ONNX Runtime; attnxfer and timm read an export's timm format: "
            f"local-dir:{path.parent} if it holds model.safetensors, else export the run with --format timm onnx"
        )
    if not arch and path.parent.parent.name == CHECKPOINTS_SUBDIR:  # a run's student: no timm name builds it
        raise InputError(f"weights file {path}: {run_folder_hint(path.parent, role)}")
    if not arch:
        hint = (
            f" (this folder looks like timm's Hub layout: try 'local-dir:{path.parent}')"
            if (path.parent / "config.json").is_file()
            else ""
        )
        raise InputError(
            f"weights file {path}: name the timm architecture it was trained as (teacher.arch=NAME in a "
            "config, --teacher-arch / --student-arch for inspect, arch=NAME in Python), e.g. "
            f"vit_large_patch16_224.mae (the tag selects the preprocessing){hint}"
        )
    arch_name, tag = split_model_name_tag(arch)
    if not timm.is_model(arch_name):
        raise InputError(f"arch={arch!r} is not a timm architecture (see timm.list_models('vit_*'))")
    cfg = registry_cfg(arch)
    # An untagged arch gets timm's default tag's preprocessing, which says nothing about this file's licence;
    # a run's checkpoint (RUN/checkpoints/step-N/FILE) has its run's statistics and its teacher's licence
    run = path.parent.parent.parent
    ran = read_record(run / RUN_RECORD) if path.parent.parent.name == CHECKPOINTS_SUBDIR else {}
    stats = {k: tuple(ran[k]) for k in ("mean", "std") if isinstance(ran.get(k), list) and ran[k]}
    return Resolved(
        Origin.FILE,
        arch_name,
        {**cfg, **stats} if len(stats) == 2 and not tag else cfg,
        weights=str(path),
        files=[str(path)],
        license=cfg.get("license") if tag else (ran.get("teacher") or {}).get("license"),
        tag_known=bool(tag),
        stats_of_run=str(run) if len(stats) == 2 and not tag else None,
    )


def resolve(
    parsed: TeacherSpec,
    *,
    arch: str | None = None,
    cache_dir: str | None = None,
    pretrained: bool = True,
    role: str = "teacher",
) -> Resolved:
    """``parsed`` resolved to files by its source's resolver (timm registry, Hub cache, folder, file);
    ``role``, what it was given as, words what a run's folder given in its place is (`run_folder_hint`)."""
    try:
        if parsed.source is Source.TIMM:
            return _resolve_timm(parsed, cache_dir, pretrained)
        if parsed.source is Source.HF_HUB:
            return _resolve_hub(parsed, cache_dir, pretrained, role)
        if parsed.source is Source.LOCAL_DIR:
            return _resolve_local_dir(parsed, pretrained, role)
        return _resolve_file(parsed, arch, role)
    except MissingPathError as err:
        if not parsed.source.is_local:
            raise
        raise LocalModelMissing(str(err), parsed, role, demo_hint(parsed.name)) from None


def demo_hint(path: str | os.PathLike) -> str | None:
    """What to run first when a missing teacher path lies in the demo's folder (``runs/demo/...``, the paths
    the demo recipes and the docs' examples name): `attnxfer demo`, which writes its teachers there. None
    for any other path."""
    parts, demo = Path(path).parts, Path(DEMO_OUT).parts
    if not any(parts[i : i + len(demo)] == demo for i in range(len(parts))):
        return None
    first = "first, in the folder that holds runs/"
    written = {key: (*demo, *Path(rel).parts) for key, rel in DEMO_EXPORTS.items()}
    if parts[-len(written["mae"]) :] == written["mae"]:
        return f"`attnxfer demo` writes its MAE teacher there: run `attnxfer demo` (or `attnxfer demo --quick`) {first}"
    if parts[-len(written["supervised"]) :] == written["supervised"]:
        return (
            "`attnxfer demo --supervised` writes its supervised teacher there: run it (or `attnxfer demo "
            f"--quick --supervised`) {first}"
        )
    if parts[-2:] == ("hier_teacher", "export"):  # the hierarchical demo's: no `attnxfer demo` makes it
        train = "`attnxfer train -c demo/hier_teacher`, then `attnxfer export runs/demo/hier_teacher"
        return f"make it {first}: {train} {path}`"
    mae = "/".join(written["mae"])
    return (
        f"`attnxfer demo` writes its MAE teacher to {mae}, not there: name that one (after `attnxfer demo`, or "
        "`attnxfer demo --quick`), or make this one first"
    )
