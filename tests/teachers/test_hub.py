"""Teachers from the Hub / local files, and students that mirror them (CPU, no network).

Hub tests run `load_teacher` in a subprocess: huggingface_hub reads HF_HUB_OFFLINE, HF_HUB_CACHE
and HF_ENDPOINT at import time, so the environment must be set before it is imported. The
cache is built here in huggingface_hub's real layout from files written by timm's `save_for_hf`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_same_tensors
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerScale, resample_abs_pos_embed
from timm.models import save_for_hf

from attnxfer.errors import MissingPathError
from attnxfer.models import create_vit
from attnxfer.models.attention import TransferAttention
from attnxfer.models.student import student_from_spec, student_like, student_spec, vit_traits
from attnxfer.sources.teacher import (
    TeacherLoadError,
    TeacherNotAvailable,
    TeacherRecord,
    UnsafeCheckpointError,
    fetch_teacher,
    load_teacher,
    read_state_dict,
)

ROOT = Path(__file__).resolve().parents[2]
# A tiny ViT: 32x32 input, 8-px patches (4x4 grid), width 48, 3 heads, 2 blocks.
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
REV = "0123456789abcdef0123456789abcdef01234567"
HUB_CFG = {"pretrained_cfg": {"license": "cc-by-nc-4.0", "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}}


def tiny_timm(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kwargs})


def put_in_hub_cache(cache: Path, repo: str, model: torch.nn.Module, rev: str = REV, **save_kwargs) -> Path:
    """Save ``model`` with timm's save_for_hf and lay it out as huggingface_hub's cache does:
    models--ORG--NAME/{blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/<sha256>, refs/main}."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / rev
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, safe_serialization=True, **save_kwargs)
        for f in Path(tmp).iterdir():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, folder / "blobs" / digest)
            os.symlink(f"../../blobs/{digest}", snap / f.name)
    (folder / "refs" / "main").write_text(rev)
    return snap


def run_python(code: str, env: dict, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter (worktree on sys.path); it prints one JSON line last."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The Hub cache, offline


@pytest.mark.slow
def test_hub_cache_loads_offline_with_saved_weights(tmp_path):
    cache = tmp_path / "hub"
    model = tiny_timm(num_classes=5, reg_tokens=2, qk_norm=True)
    snap = put_in_hub_cache(cache, "acme/tiny-vit", model, model_config=HUB_CFG)
    reference = tmp_path / "reference.safetensors"
    save_file(model.state_dict(), str(reference))
    # A timm registry name, whose weights timm keeps in the Hub repo timm/<name> (tiny dims, to stay fast).
    full = tiny_timm(seed=3, num_classes=1000)
    put_in_hub_cache(cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", full)
    full_ref = tmp_path / "full.safetensors"
    save_file(full.state_dict(), str(full_ref))

    out = run_python(
        f"""
        import json, torch
        from dataclasses import asdict
        from safetensors.torch import load_file
        from attnxfer.sources.teacher import load_teacher, fetch_teacher
        from attnxfer.models.attention import TransferAttention

        def same(model, path):
            ref = load_file(path)
            sd = model.state_dict()
            return sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)

        res = {{}}
        for spec in ("hf-hub:acme/tiny-vit", "hf-hub:acme/tiny-vit@{REV}"):
            m, rec = load_teacher(spec)
            res[spec] = dict(record=asdict(rec), same=same(m, {str(reference)!r}), training=m.training,
                             grad=any(p.requires_grad for p in m.parameters()),
                             transfer=all(isinstance(b.attn, TransferAttention) for b in m.blocks))
        m, rec = load_teacher("vit_tiny_patch16_224.augreg_in21k_ft_in1k", **{TINY!r})
        res["timm"] = dict(record=asdict(rec), same=same(m, {str(full_ref)!r}))
        res["fetch"] = fetch_teacher("hf-hub:acme/tiny-vit")
        print(json.dumps(res))
    """,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
    )

    for spec in ("hf-hub:acme/tiny-vit", f"hf-hub:acme/tiny-vit@{REV}"):
        r = out[spec]
        assert r["same"], "loaded weights differ from the saved ones"
        assert r["transfer"] and not r["training"] and not r["grad"]
        rec = r["record"]
        assert rec["source"] == "hub" and rec["hf_repo"] == "acme/tiny-vit" and rec["hf_commit"] == REV
        assert rec["sha256"] == sha256(snap / "model.safetensors")
        assert rec["license"] == "cc-by-nc-4.0"  # from the repo's config.json, not timm's registry
        assert rec["mean"] == [0.1, 0.2, 0.3] and rec["std"] == [0.4, 0.5, 0.6]
        assert rec["num_classes"] == 5 and rec["input_size"] == [3, 32, 32] and not rec["resampled_pos_embed"]
        json.dumps(rec)
    assert out[f"hf-hub:acme/tiny-vit@{REV}"]["record"]["hf_revision"] == REV
    t = out["timm"]
    assert t["same"]
    assert t["record"]["source"] == "timm-pretrained"
    assert t["record"]["hf_repo"] == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert (
        t["record"]["mean"] == [0.5, 0.5, 0.5] and t["record"]["license"] == "apache-2.0"
    )  # timm's registry cfg
    assert Path(out["fetch"]) == snap


@pytest.mark.slow
def test_offline_and_uncached_says_how_to_fetch_within_seconds(tmp_path):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    out = run_python(
        """
        import json, time
        from attnxfer.sources.teacher import load_teacher, fetch_teacher, TeacherNotAvailable
        res = {}
        for name, call in (("load", lambda: load_teacher("vit_large_patch16_224.mae")),
                           ("fetch", lambda: fetch_teacher("vit_large_patch16_224.mae"))):
            t = time.perf_counter()
            try:
                call()
                res[name] = dict(raised=None)
            except TeacherNotAvailable as e:
                res[name] = dict(raised=type(e).__name__, runtime=isinstance(e, RuntimeError), message=str(e))
            res[name]["elapsed"] = time.perf_counter() - t
        print(json.dumps(res))
    """,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(empty)},
    )
    for name in ("load", "fetch"):
        r = out[name]
        assert r["raised"] == "TeacherNotAvailable" and r["runtime"]
        assert r["elapsed"] < 15, f"{name} took {r['elapsed']:.1f} s: something waited on the network"
        msg = r["message"]
        assert "hf download timm/vit_large_patch16_224.mae" in msg
        assert "attnxfer fetch vit_large_patch16_224.mae" in msg
        assert "HF_HUB_CACHE" in msg and "HF_HOME" in msg and "cache_dir" in msg
        assert str(empty) in msg and "HF_HUB_OFFLINE=1" in msg


def test_a_hub_repo_whose_weights_are_a_pth_loads_from_the_cache_as_fetch_left_it(tmp_path, monkeypatch):
    """`attnxfer fetch` takes .pth/.bin where a repo has no safetensors: loading reads them too."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    model = tiny_timm(num_classes=5)
    snap = put_in_hub_cache(tmp_path, "acme/pth-only", model)
    (snap / "model.safetensors").unlink()
    torch.save(model.state_dict(), snap / "model.pth")
    teacher, rec = load_teacher("hf-hub:acme/pth-only", cache_dir=str(tmp_path))
    assert rec.files[-1].endswith("model.pth") and all(
        torch.equal(teacher.state_dict()[k], v) for k, v in model.state_dict().items()
    )


def test_a_truncated_file_in_the_hub_cache_is_told_the_download_that_replaces_it(tmp_path, monkeypatch):
    """huggingface_hub returns any file its cache holds without checking it, so "download it again" (`hf download`,
    `attnxfer fetch`) would leave a cut-off cached file as it is: the message gives the forced download."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    snap = put_in_hub_cache(tmp_path, "acme/cut", tiny_timm())
    blob = (snap / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    command = f"download acme/cut model.safetensors --revision {REV} --cache-dir {tmp_path} --force-download"
    with pytest.raises(TeacherLoadError, match=re.escape(f"`hf {command}`")) as err:
        load_teacher("hf-hub:acme/cut", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    # a .pth cut short in the cache: the same command for its file
    (snap / "model.safetensors").unlink()
    torch.save(tiny_timm().state_dict(), snap / "model.pth")
    (snap / "model.pth").write_bytes((snap / "model.pth").read_bytes()[:1000])
    with pytest.raises(TeacherLoadError, match=re.escape(command.replace("model.safetensors", "model.pth"))):
        load_teacher("hf-hub:acme/cut", cache_dir=str(tmp_path))


def test_a_hub_cache_file_changed_since_its_download_is_refused_not_loaded_as_other_weights(
    tmp_path, monkeypatch
):
    """A byte of a tensor changed in the cache (a damaged copy of the cache between machines) leaves a file that
    every reader takes; its blob is named by the sha256 the Hub sent, which the load already computes: refused."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    snap = put_in_hub_cache(tmp_path, "acme/flipped", tiny_timm())
    assert load_teacher("hf-hub:acme/flipped", cache_dir=str(tmp_path))[1].sha256 == sha256(
        snap / "model.safetensors"
    )
    blob = (snap / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x40  # the last tensor's last byte: header and size as they were
    blob.write_bytes(bytes(data))
    with pytest.raises(TeacherLoadError, match=r"is not the file the Hub sent: .*--force-download`") as err:
        load_teacher("hf-hub:acme/flipped", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    # where a mirror's names are no sha256, the way out the message gives: the snapshot copied out, as a folder
    assert "copy the snapshot folder out of the cache and give it as local-dir:COPY" in str(err.value)
    copy = shutil.copytree(snap, tmp_path / "copy")
    assert load_teacher(f"local-dir:{copy}")[1].sha256 == hashlib.sha256(bytes(data)).hexdigest()


def test_a_cache_dir_under_the_home_folder_is_read_offline_as_downloads_read_it(tmp_path, monkeypatch):
    """teacher.cache_dir=~/hf (no shell expands "~" after "=", YAML never does): huggingface_hub's downloads
    expand it, its offline lookup did not, so a cached repo was said not to be in "~/hf" and to be copied there."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setenv("HOME", str(tmp_path))
    put_in_hub_cache(tmp_path / "hf", "acme/tiny", tiny_timm())
    assert load_teacher("hf-hub:acme/tiny", cache_dir="~/hf")[1].hf_commit == REV
    assert Path(fetch_teacher("hf-hub:acme/tiny", cache_dir="~/hf")).name == REV
    with pytest.raises(
        TeacherNotAvailable, match=rf"\(the cache holds acme/tiny at main, {REV[:12]}, not v2\)"
    ):
        load_teacher("hf-hub:acme/tiny@v2", cache_dir="~/hf")


def test_a_revision_the_cache_lacks_names_the_ones_it_holds(tmp_path, monkeypatch):
    """The repo's folder is in the cache: "copy the folder into the cache" would be no answer."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    put_in_hub_cache(tmp_path, "acme/tiny", tiny_timm())
    for get in (load_teacher, fetch_teacher):  # fetch names the spec as given, its @deadbeef included
        with pytest.raises(
            TeacherNotAvailable, match=rf"\(the cache holds acme/tiny at main, {REV[:12]}, not deadbeef\)"
        ) as refused:
            get("hf-hub:acme/tiny@deadbeef", cache_dir=str(tmp_path))
        # each command names the revision once, as the commands take it (a spec's @REV and --revision agree)
        said = str(refused.value)
        assert "\n    hf download acme/tiny --revision deadbeef  " in said, said
        assert "\n    attnxfer fetch hf-hub:acme/tiny --revision deadbeef\n" in said, said


def test_fetching_offline_from_a_cache_that_holds_a_repos_config_alone_is_refused_as_the_run_would_be(
    tmp_path, monkeypatch
):
    """Offline, `attnxfer fetch` checks the cache: one that holds the config and no weights said "fetched"."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    snap = put_in_hub_cache(tmp_path, "acme/tiny", tiny_timm())
    (snap / "model.safetensors").unlink()
    with pytest.raises(
        TeacherNotAvailable, match="the weights file of Hub repo acme/tiny is not in the local"
    ):
        fetch_teacher("hf-hub:acme/tiny", cache_dir=str(tmp_path))


def test_the_cache_is_said_to_lack_the_revision_only_where_it_does(tmp_path, monkeypatch):
    """A snapshot that holds its config and not its weights said "the cache holds acme/tiny at main, <commit>,
    not <commit>"; a cache of commits alone (`attnxfer fetch hf-hub:X@<commit>` writes no refs/main) said the
    repo is not cached, unpinned, and to copy in the folder that is there."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    snap = put_in_hub_cache(tmp_path, "acme/tiny", tiny_timm())
    (snap / "model.safetensors").unlink()
    for spec in ("hf-hub:acme/tiny", f"hf-hub:acme/tiny@{REV}"):
        with pytest.raises(TeacherNotAvailable, match="the weights file of Hub repo acme/tiny") as refused:
            load_teacher(spec, cache_dir=str(tmp_path))
        assert "the cache holds" not in str(refused.value)
    (tmp_path / "models--acme--tiny" / "refs" / "main").unlink()
    with pytest.raises(TeacherNotAvailable, match=rf"\(the cache holds acme/tiny at {REV[:12]}, not main\)"):
        load_teacher("hf-hub:acme/tiny", cache_dir=str(tmp_path))


def test_a_short_commit_of_a_cached_snapshot_is_told_to_be_pinned_whole(tmp_path, monkeypatch):
    """Offline, huggingface_hub finds a snapshot by its whole commit only: a 12-digit prefix (as the error
    above shows commits) is not found, and the message gives the commit to pin, not "holds X, not X"."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    put_in_hub_cache(tmp_path, "acme/tiny", tiny_timm())
    with pytest.raises(TeacherNotAvailable) as refused:
        load_teacher(f"hf-hub:acme/tiny@{REV[:12]}", cache_dir=str(tmp_path))
    assert f"(the cache holds it as commit {REV}: pin all 40 hex digits" in str(refused.value)
    assert load_teacher(f"hf-hub:acme/tiny@{REV}", cache_dir=str(tmp_path))[1].hf_commit == REV


def test_fetching_a_local_teacher_that_is_not_there_is_an_error_not_a_path(tmp_path, tiny_teacher_dir):
    assert fetch_teacher(f"local-dir:{tiny_teacher_dir}") == str(tiny_teacher_dir)  # there: nothing to fetch
    # a folder that holds no model is no teacher here either: "fetched" would be a promise the run breaks
    with pytest.raises(MissingPathError, match="no config.json there"):
        fetch_teacher(f"local-dir:{tmp_path}")
    for spec in (f"local-dir:{tmp_path / 'typo'}", str(tmp_path / "typo" / "model.pth")):
        with pytest.raises(MissingPathError, match="typo does not exist|model.pth does not exist"):
            fetch_teacher(spec)
    # nothing named (read as the current folder before), and a revision a folder cannot have
    for spec in ("", "local-dir:"):
        with pytest.raises(ValueError, match=f"teacher spec '{spec}' names nothing: give a timm name"):
            fetch_teacher(spec)
    with pytest.raises(
        ValueError, match=r"local folder: a revision \('v2'\) is a Hub repo's: drop teacher.revision"
    ):
        fetch_teacher(f"local-dir:{tmp_path}", revision="v2")
    # two revisions: the message names the key that gave the second one
    with pytest.raises(
        ValueError, match=r"revision='v2' was also given \(teacher.revision, fetch's --revision\)"
    ):
        fetch_teacher("hf-hub:acme/tiny@v1", revision="v2")


def test_a_timm_architecture_without_pretrained_weights_asks_for_a_trained_one():
    import attnxfer.models.vit  # noqa: F401  registers the micro ViTs, of which timm holds no weights

    with pytest.raises(TeacherNotAvailable, match=r"without pretrained weights \(nothing to download\)") as e:
        load_teacher("vit_micro_patch4_28")
    assert "local-dir:EXPORT_DIR" in str(e.value) and "teacher.arch=vit_micro_patch4_28" in str(e.value)


@pytest.mark.slow
def test_unreachable_hub_uses_cache_and_fails_fast_without_offline_flag(tmp_path):
    """No HF_HUB_OFFLINE, and a Hub endpoint that accepts connections but never answers (the case
    where huggingface_hub would retry for tens of seconds): cached teachers load, uncached ones fail fast."""
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "acme/tiny-vit", tiny_timm(num_classes=5))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        out = run_python(
            """
            import json, time
            from attnxfer.sources.teacher import load_teacher, TeacherNotAvailable
            res = {}
            t = time.perf_counter()
            m, rec = load_teacher("hf-hub:acme/tiny-vit")
            res["cached"] = dict(elapsed=time.perf_counter() - t, commit=rec.hf_commit)
            t = time.perf_counter()
            try:
                load_teacher("hf-hub:acme/not-cached")
                res["uncached"] = dict(raised=None)
            except TeacherNotAvailable as e:
                res["uncached"] = dict(raised=type(e).__name__, message=str(e))
            res["uncached"]["elapsed"] = time.perf_counter() - t
            print(json.dumps(res))
        """,
            env={"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"},
        )
    finally:
        silent.close()
    assert out["cached"]["commit"] == REV and out["cached"]["elapsed"] < 15
    assert out["uncached"]["raised"] == "TeacherNotAvailable" and out["uncached"]["elapsed"] < 15
    assert "cannot be reached" in out["uncached"]["message"]
    assert "hf download acme/not-cached" in out["uncached"]["message"]


def test_the_reachability_probe_reads_network_failures_as_unreachable_and_a_bad_endpoint_as_an_error(
    monkeypatch,
):
    """An endpoint that hangs up at once is unreachable (the cache is used); an HF_ENDPOINT that is no URL is
    the user's setting to fix, said in one line, not a quiet "unreachable"."""
    from huggingface_hub import constants

    from attnxfer import hub_reach as hub
    from attnxfer.errors import InputError

    rude = socket.socket()
    rude.bind(("127.0.0.1", 0))
    rude.listen(8)

    def hang_up() -> None:
        for _ in range(2):
            conn, _ = rude.accept()
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        monkeypatch.setattr(hub, "_REACHABLE", {})
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{rude.getsockname()[1]}")
        assert hub.hub_reachable(timeout=5) is False
    finally:
        rude.close()
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(constants, "ENDPOINT", "huggingface.co")
    with pytest.raises(InputError, match="endpoint 'huggingface.co' \\(HF_ENDPOINT\\) is not a URL"):
        hub.hub_reachable()


@pytest.mark.slow
def test_a_hub_that_refuses_a_repo_or_revision_says_so_in_one_line_for_fetch_and_load(tmp_path):
    """The Hub's refusals reach fetch as one error, as a load gets them, not a traceback: a missing repo, a
    missing revision, and a gated repo, which asks for access on its page (logging in alone is not enough)."""

    class Refusing(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def answer(self) -> None:
            status, code = (403, "GatedRepo") if "gated" in self.path else (404, "RepoNotFound")
            if "v9" in self.path:
                status, code = 404, "RevisionNotFound"
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = run_python(
            """
            import json
            from attnxfer.sources.teacher import TeacherLoadError, fetch_teacher, load_teacher
            res = {}
            for spec in ("hf-hub:acme/nosuch", "hf-hub:acme/gated", "hf-hub:acme/tiny@v9"):
                for name, act in (("fetch", fetch_teacher), ("load", load_teacher)):
                    try:
                        act(spec)
                        res[name + " " + spec] = None
                    except TeacherLoadError as e:
                        res[name + " " + spec] = str(e)
            print(json.dumps(res))
            """,
            env={
                "HF_HUB_CACHE": str(tmp_path / "cache"),
                "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
            },
        )
    finally:
        server.shutdown()
    for act in ("fetch", "load"):
        assert "acme/nosuch does not exist or is private" in out[f"{act} hf-hub:acme/nosuch"]
        assert "request access on https://huggingface.co/acme/gated" in out[f"{act} hf-hub:acme/gated"]
        assert "acme/tiny has no revision 'v9'" in out[f"{act} hf-hub:acme/tiny@v9"]


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def mae_checkpoint(encoder: torch.nn.Module, dec_dim: int = 32, dec_depth: int = 2, seed: int = 5) -> dict:
    """The layout of MAE's pretraining checkpoints: {"model": encoder + mask_token + decoder_*}."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(encoder.state_dict())
    dim = encoder.embed_dim
    n = encoder.patch_embed.num_patches + 1
    patch_px = encoder.patch_embed.patch_size[0] ** 2 * 3
    sd["mask_token"] = torch.randn(1, 1, dec_dim, generator=g)
    sd["decoder_embed.weight"] = torch.randn(dec_dim, dim, generator=g)
    sd["decoder_embed.bias"] = torch.zeros(dec_dim)
    sd["decoder_pos_embed"] = torch.randn(1, n, dec_dim, generator=g)
    block = timm.models.vision_transformer.Block(dec_dim, num_heads=2)
    for i in range(dec_depth):
        for k, v in block.state_dict().items():
            sd[f"decoder_blocks.{i}.{k}"] = v.clone()
    sd["decoder_norm.weight"], sd["decoder_norm.bias"] = torch.ones(dec_dim), torch.zeros(dec_dim)
    sd["decoder_pred.weight"] = torch.randn(patch_px, dec_dim, generator=g)
    sd["decoder_pred.bias"] = torch.zeros(patch_px)
    return {"model": sd}


def test_mae_checkpoint_loads_and_reports_dropped_keys(tmp_path, capsys):
    encoder = tiny_timm(num_classes=0)
    ckpt = mae_checkpoint(encoder)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save(ckpt, path)
    decoder_keys = sorted(k for k in ckpt["model"] if k.startswith("decoder_") or k == "mask_token")

    # ViT-B's registry entry (it has a .mae tag) with tiny dimensions
    model, rec = load_teacher(str(path), arch="vit_base_patch16_224", **TINY)
    warned = capsys.readouterr().err
    sd = model.state_dict()
    ref = encoder.state_dict()
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert rec.dropped_keys == decoder_keys
    assert "mask_token" in warned and "decoder_blocks" in warned
    assert rec.source == "file" and rec.checkpoint_key == "model" and rec.sha256 == sha256(path)
    assert rec.num_classes == 0 and rec.files == [str(path)]
    # an MAE-format file with an untagged arch takes the preprocessing/licence of timm's .mae tag
    assert rec.architecture == "vit_base_patch16_224.mae" and rec.license == "cc-by-nc-4.0"
    assert rec.mean == tuple(IMAGENET_DEFAULT_MEAN) and rec.std == tuple(IMAGENET_DEFAULT_STD)
    json.dumps(rec.to_dict())
    assert TeacherRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_an_untagged_files_guessed_statistics_are_said_unless_the_caller_gives_its_own(tmp_path, capsys):
    """timm's defaults stand in for an untagged architecture's mean/std: worth a warning where they are used,
    noise where a run's data.mean and data.std take their place."""
    path = tmp_path / "enc.safetensors"
    save_file(tiny_timm(num_classes=0).state_dict(), str(path))
    capsys.readouterr()
    load_teacher(str(path), arch="vit_base_patch16_224", **TINY)
    err = capsys.readouterr().err
    assert "mean/std are timm's defaults for vit_base_patch16_224 (tag" in err
    assert "vit_base_patch16_224.mae" in err  # every tag listed: it was cut at six, .mae past the cut
    load_teacher(str(path), arch="vit_base_patch16_224", stats_given=True, **TINY)
    assert "mean/std" not in capsys.readouterr().err
    # MAE's encoder-only release (no decoder keys to tell it by): the tag its file's name spells, said first
    mae = tmp_path / "mae_pretrain_vit_base.safetensors"
    path.rename(mae)
    load_teacher(str(mae), arch="vit_base_patch16_224", **TINY)
    assert "if that is wrong (its file's name says vit_base_patch16_224.mae)" in capsys.readouterr().err
    tagged = tmp_path / "vit_base_patch16_224.augreg_in21k.safetensors"  # a tag of several words, whole
    mae.rename(tagged)
    load_teacher(str(tagged), arch="vit_base_patch16_224", **TINY)
    assert "(its file's name says vit_base_patch16_224.augreg_in21k)" in capsys.readouterr().err


def test_a_grey_file_built_with_its_own_channels_loads_without_timms_channel_line(tmp_path, caplog):
    """model.init of a 1-channel file with model.kwargs.in_chans=1: timm compared the file with its RGB
    default config and logged "input_size declares 3 source channels ... Loading unchanged" on every run."""
    path = tmp_path / "grey.safetensors"
    grey = tiny_timm(num_classes=0, in_chans=1)
    save_file(grey.state_dict(), str(path))
    with caplog.at_level("WARNING", logger="timm"):
        model, _ = load_teacher(
            str(path),
            arch="vit_base_patch16_224",
            who=f"model.init={path}",
            in_chans=1,
            stats_given=True,
            **TINY,
        )
    assert not [r for r in caplog.records if "source channels" in r.getMessage()], caplog.text
    assert torch.equal(model.patch_embed.proj.weight, grey.patch_embed.proj.weight)


def test_missing_encoder_key_is_an_error_not_a_random_weight(tmp_path):
    ckpt = mae_checkpoint(tiny_timm(num_classes=0))
    del ckpt["model"]["blocks.1.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(ckpt, path)
    with pytest.raises(TeacherLoadError) as err:
        load_teacher(str(path), arch="vit_base_patch16_224", **TINY)
    assert err.value.missing_keys == ["blocks.1.attn.qkv.weight"]
    assert "blocks.1.attn.qkv.weight" in str(err.value)


def test_other_image_size_resamples_position_embeddings(tmp_path):
    encoder = tiny_timm(num_classes=0)
    path = tmp_path / "enc.safetensors"
    save_file(encoder.state_dict(), str(path))
    src = encoder.pos_embed.detach()

    same, rec_same = load_teacher(str(path), arch="vit_base_patch16_224.mae", **TINY)
    assert not rec_same.resampled_pos_embed and torch.equal(same.pos_embed, src)

    model, rec = load_teacher(str(path), arch="vit_base_patch16_224.mae", **{**TINY, "img_size": 48})
    assert rec.resampled_pos_embed and rec.input_size == (3, 48, 48)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 48)
    # the class token's embedding (and its position embedding) pass through unchanged
    assert torch.equal(model.pos_embed[:, :1], src[:, :1])
    assert torch.equal(model.cls_token, encoder.cls_token)
    # the patch grid: bicubic, antialiased 4x4 -> 6x6 resampling of the source grid
    grid = src[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 48)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)
    torch.testing.assert_close(
        model.pos_embed, resample_abs_pos_embed(src, (6, 6), (4, 4), num_prefix_tokens=1)
    )
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 37, 48) and torch.isfinite(out).all()


class _Evil:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pth_with_pickled_objects_is_refused(tmp_path, monkeypatch):
    sd = tiny_timm(num_classes=0).state_dict()
    ns = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3, epochs=800)}, ns)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_teacher(str(ns), arch="vit_base_patch16_224", **TINY)
    assert "argparse.Namespace" in str(err.value) and "safetensors" in str(err.value)
    assert "weights_only=False" in str(err.value)  # the conversion recipe, for a trusted machine
    # the recipe, run as written from another folder, writes the file the message says to give instead
    monkeypatch.chdir(tmp_path.parent)
    [line] = [x for x in str(err.value).splitlines() if x.strip().startswith("python -c")]
    exec(shlex.split(line)[2], {})
    converted = ns.with_suffix(".safetensors")
    assert f"then give {converted} where this file was (teacher.spec=" in str(err.value)
    assert load_teacher(str(converted), arch="vit_base_patch16_224", **TINY)[1].num_classes == 0

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": _Evil(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(evil)
    assert not marker.exists()


def test_a_pth_that_is_no_torch_file_is_said_to_be_none_not_unsafe_to_unpickle(tmp_path):
    """A Git LFS pointer, a download's HTML error page or safetensors named .pth: torch's weights-only reader
    fails on their first byte, which was read as "it holds pickled Python objects" with advice to unpickle it."""
    safetensors = tmp_path / "renamed.safetensors"
    save_file(tiny_timm(num_classes=0).state_dict(), str(safetensors))
    files = {
        "lfs.bin": b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n",
        "page.pth": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n",
        "renamed.pth": safetensors.read_bytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TeacherLoadError, match="is not a torch file: it begins b") as err:
            read_state_dict(tmp_path / name)
        assert repr(data[:24]) in str(err.value), str(err.value)  # what it is, in its own first bytes
        assert not isinstance(err.value, UnsafeCheckpointError) and "weights_only=False" not in str(err.value)
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format still loads
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(legacy)[0]["w"], torch.ones(2))


def test_the_conversion_told_for_an_unsafe_pth_keeps_the_weights_its_container_holds(tmp_path, monkeypatch):
    """A timm or Lightning checkpoint keeps its weights under ``state_dict`` beside pickled training args: the
    recipe the refusal gives converts those weights, not the whole container."""
    sd = tiny_timm(num_classes=0).state_dict()
    path = tmp_path / "lightning.ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3, "hparams": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path)
    monkeypatch.chdir(tmp_path)
    [line] = [x for x in str(err.value).splitlines() if x.strip().startswith("python -c")]
    exec(shlex.split(line)[2], {})
    assert_same_tensors(read_state_dict(path.with_suffix(".safetensors"))[0], sd, "converted")


def test_ddp_and_compile_prefixes_are_stripped_from_safetensors_as_from_pth(tmp_path):
    sd = tiny_timm(num_classes=0).state_dict()
    save_file({f"module._orig_mod.{k}": v for k, v in sd.items()}, str(tmp_path / "ddp.safetensors"))
    assert_same_tensors(read_state_dict(tmp_path / "ddp.safetensors")[0], sd, "stripped")


def test_flat_deit_style_checkpoint_head_rules(tmp_path, capsys):
    model = tiny_timm(num_classes=7)
    # DeiT releases: {"model": state_dict}; a DDP-trained one has "module." prefixes
    path = tmp_path / "deit_finetuned.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 299}, path)
    teacher, rec = load_teacher(str(path), arch="vit_tiny_patch16_224", **TINY)
    tags = "(one of: vit_tiny_patch16_224.augreg_in21k, vit_tiny_patch16_224.augreg_in21k_ft_in1k)"
    assert tags in capsys.readouterr().err  # the tags timm has, not one it lacks
    ref = model.state_dict()
    assert rec.num_classes == 7 and all(torch.equal(teacher.state_dict()[k], ref[k]) for k in ref)
    assert rec.license is None  # an untagged arch says nothing about a user's file

    with pytest.raises(TeacherLoadError, match="random"):
        load_teacher(str(path), arch="vit_tiny_patch16_224", num_classes=3, **TINY)
    headless, rec0 = load_teacher(str(path), arch="vit_tiny_patch16_224", num_classes=0, **TINY)
    assert rec0.num_classes == 0 and rec0.dropped_keys == ["head.bias", "head.weight"]
    assert isinstance(headless.head, torch.nn.Identity)
    headless_file = tmp_path / "encoder.pth"  # no head to keep: only dropping one is offered
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, headless_file)
    with pytest.raises(
        TeacherLoadError, match=r"has no classifier head \(a headless encoder\).*Pass num_classes=0\.$"
    ):
        load_teacher(str(headless_file), arch="vit_tiny_patch16_224", num_classes=3, **TINY)


def openclip_state_dict(clip: torch.nn.Module) -> dict:
    """A timm CLIP ViT's weights in OpenCLIP's layout (open_clip_pytorch_model.bin): the image tower under
    ``visual.`` in its own names, the head as the projection ``visual.proj`` (width x embedding), a text tower
    beside it. timm's ViT checkpoint filter maps it back."""
    swaps = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks.")]
    swaps += [
        ("norm1", "ln_1"),
        ("norm2", "ln_2"),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
    ]
    swaps += [("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    out = {"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.randn(10, 16)}
    for k, v in clip.state_dict().items():
        if k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k != "head.bias":  # timm's filter gives the head a zero bias
            k = re.sub(r"^norm\.", "ln_post.", k)
            for a, b in swaps:
                k = k.replace(a, b)
            out["visual." + k] = v
    return out


def test_an_openclip_checkpoint_file_loads_with_its_projection_as_the_head_or_without_it(tmp_path, capsys):
    """open_clip_pytorch_model.bin named with a timm CLIP architecture: the file has no head.weight, yet timm's
    filter makes its projection one; the head is counted from the projection, and dropped with it. Its text
    tower is dropped and said, as other unused entries are (timm's filter skipped it unsaid, unrecorded)."""
    torch.manual_seed(0)
    clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=16, **TINY).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openclip_state_dict(clip), path)
    x = torch.randn(2, 3, 32, 32)
    teacher, rec = load_teacher(str(path), arch="vit_base_patch16_clip_224.openai", **TINY)
    assert rec.num_classes == 16 and rec.dropped_keys == ["logit_scale", "token_embedding.weight"]
    assert (
        "dropped 2 checkpoint entries the image tower does not use (CLIP text tower): logit_scale, "
        "token_embedding.weight" in capsys.readouterr().err
    )
    torch.testing.assert_close(teacher(x), clip(x))
    headless, rec0 = load_teacher(str(path), arch="vit_base_patch16_clip_224.openai", num_classes=0, **TINY)
    assert rec0.num_classes == 0 and rec0.dropped_keys == [
        "logit_scale",
        "token_embedding.weight",
        "visual.proj",
    ]
    torch.testing.assert_close(headless(x), clip.forward_head(clip.forward_features(x), pre_logits=True))


def test_an_openclip_checkpoint_of_a_timm_trunk_says_what_it_drops_and_keeps_its_projection(tmp_path, capsys):
    """OpenCLIP's timm-backed image towers save the timm model under ``visual.trunk.`` and a linear projection
    as ``visual.head.proj.weight``, beside the text tower. timm's filter takes the trunk (and the projection as
    the head) and skipped the rest unsaid: it is dropped, said and recorded as the plain layout's is."""
    trunk = tiny_timm(num_classes=0).eval()
    proj = torch.randn(16, 48)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {
        "visual.head.proj.weight": proj,
        "logit_scale": torch.tensor(4.6),
        "text_projection": torch.ones(4, 4),
    }
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    x = torch.randn(2, 3, 32, 32)
    teacher, rec = load_teacher(str(path), arch="vit_tiny_patch16_224", **TINY)
    assert rec.num_classes == 16 and rec.dropped_keys == ["logit_scale", "text_projection"]
    assert (
        "dropped 2 checkpoint entries the image tower does not use (CLIP text tower)"
        in capsys.readouterr().err
    )
    torch.testing.assert_close(teacher(x), trunk(x) @ proj.t())
    headless, rec0 = load_teacher(str(path), arch="vit_tiny_patch16_224", num_classes=0, **TINY)
    assert rec0.dropped_keys == ["logit_scale", "text_projection", "visual.head.proj.weight"]
    torch.testing.assert_close(headless(x), trunk(x))


def test_an_openclip_timm_trunks_projection_bias_is_the_heads_bias_not_zero(tmp_path):
    """A timm-backed OpenCLIP tower whose linear projection has a bias (``proj_bias``): timm's filter makes the
    projection's weight the head and zeroes its bias, so the teacher's outputs would be shifted; the file's
    bias is loaded, and dropped with the head where the head is."""
    trunk = tiny_timm(num_classes=0).eval()
    proj, bias = torch.randn(16, 48), torch.randn(16)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {
        "visual.head.proj.weight": proj,
        "visual.head.proj.bias": bias,
        "logit_scale": torch.tensor(4.6),
    }
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    x = torch.randn(2, 3, 32, 32)
    teacher, rec = load_teacher(str(path), arch="vit_tiny_patch16_224", **TINY)
    assert rec.num_classes == 16 and rec.dropped_keys == ["logit_scale"]
    torch.testing.assert_close(teacher(x), trunk(x) @ proj.t() + bias)
    headless, rec0 = load_teacher(str(path), arch="vit_tiny_patch16_224", num_classes=0, **TINY)
    assert rec0.dropped_keys == ["logit_scale", "visual.head.proj.weight", "visual.head.proj.bias"]
    torch.testing.assert_close(headless(x), trunk(x))


def test_an_openclip_timm_trunks_mlp_projection_head_is_said_to_be_the_image_towers_not_the_text_towers(
    tmp_path, capsys
):
    """OpenCLIP's timm towers with an MLP projection (``visual.head.mlp.*``) keep it outside the trunk, where
    timm's filter does not load it: dropped, and the warning says it is the image tower's projection head, not
    (as the keys beside it) the CLIP text tower."""
    trunk = tiny_timm(num_classes=0).eval()
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {
        "visual.head.mlp.fc1.weight": torch.randn(96, 48),
        "visual.head.mlp.fc1.bias": torch.randn(96),
        "visual.head.mlp.fc2.weight": torch.randn(16, 96),
        "logit_scale": torch.tensor(4.6),
        "text_projection": torch.ones(4, 4),
    }
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    _, rec = load_teacher(str(path), arch="vit_tiny_patch16_224", **TINY)
    assert rec.num_classes == 0 and len(rec.dropped_keys) == 5
    [said] = [line for line in capsys.readouterr().err.splitlines() if "dropped 5" in line]
    assert said.endswith(
        "(CLIP text tower): logit_scale, text_projection; (the image tower's projection head beyond a linear "
        "layer, which timm's ViT does not load): visual.head.mlp.* (3)"
    ), said


def test_an_openclip_timm_trunk_with_its_own_head_loads_with_that_head_or_without_it(tmp_path):
    """A timm-backed OpenCLIP tower without a projection (SigLIP's) keeps the trunk's own head as the
    embedding: it is the teacher's head, under ``visual.trunk.head``, not a surplus key the load refuses."""
    trunk = tiny_timm(num_classes=16).eval()
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()} | {
        "logit_scale": torch.tensor(4.6)
    }
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    x = torch.randn(2, 3, 32, 32)
    teacher, rec = load_teacher(str(path), arch="vit_tiny_patch16_224", **TINY)
    assert rec.num_classes == 16
    torch.testing.assert_close(teacher(x), trunk(x))
    headless, rec0 = load_teacher(str(path), arch="vit_tiny_patch16_224", num_classes=0, **TINY)
    assert rec0.dropped_keys == ["logit_scale", "visual.trunk.head.bias", "visual.trunk.head.weight"]
    torch.testing.assert_close(headless(x), trunk.forward_head(trunk.forward_features(x), pre_logits=True))


def test_a_local_dir_teacher_loads_its_weights_and_card_and_a_truncated_file_is_named(tmp_path):
    model = tiny_timm(num_classes=4)
    save_for_hf(model, tmp_path / "exported", safe_serialization=True, model_config=HUB_CFG)
    teacher, rec = load_teacher(f"local-dir:{tmp_path / 'exported'}")
    ref = model.state_dict()
    assert all(torch.equal(teacher.state_dict()[k], ref[k]) for k in ref)
    assert rec.source == "local-dir" and rec.mean == (0.1, 0.2, 0.3) and rec.license == "cc-by-nc-4.0"
    assert rec.sha256 == sha256(tmp_path / "exported" / "model.safetensors")
    # an interrupted copy: the weights file is cut short -> one message naming the file, no raw reader error
    weights = tmp_path / "exported" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        TeacherLoadError, match=r"model\.safetensors is not a readable safetensors file.*truncated"
    ):
        load_teacher(f"local-dir:{tmp_path / 'exported'}")


def test_a_local_dir_of_sharded_safetensors_and_a_pickle_reads_the_shards_as_its_hub_id_does(tmp_path):
    """A downloaded repo may hold both (transformers' large ones): the Hub path reads the shards, and so must
    local-dir: the same weights file (and hash) either way, and no pickle read where safetensors are."""
    from attnxfer.sources.resolve import weights_digest

    model = tiny_timm(num_classes=4)
    folder = tmp_path / "both"
    save_for_hf(model, folder, safe_serialization=True)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / shard))
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save(tiny_timm(seed=1, num_classes=4).state_dict(), folder / "pytorch_model.bin")  # a stale pickle
    teacher, rec = load_teacher(f"local-dir:{folder}")
    assert rec.sha256 == weights_digest(folder / "model.safetensors.index.json")
    assert not any(f.endswith(".bin") for f in rec.files)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in model.state_dict().items())


def test_weights_that_cannot_be_a_teacher_are_one_error_naming_the_file_or_the_architecture(tmp_path):
    """Bytes that are no torch file, a cut-off .pth, a file of no tensors, and a config.json naming what timm
    lacks or cannot build as a ViT."""
    full = tmp_path / "full.pth"
    torch.save(tiny_timm().state_dict(), full)
    (tmp_path / "garbage.pth").write_bytes(b"random bytes, no torch file" * 10)
    (tmp_path / "cut.pth").write_bytes(full.read_bytes()[:5000])
    save_file({}, str(tmp_path / "empty.safetensors"))
    save_file(tiny_timm(in_chans=1).state_dict(), str(tmp_path / "gray.safetensors"))
    for name, says in (
        ("garbage.pth", "garbage.pth is not a readable torch file"),
        ("cut.pth", "cut.pth is not a readable torch file"),
        ("empty.safetensors", "empty.safetensors holds no tensors"),
    ):
        with pytest.raises(TeacherLoadError, match=re.escape(says)):
            load_teacher(str(tmp_path / name), arch="vit_tiny_patch16_224", **TINY)
    for arch, says in (
        # a newer timm's folder, or a misspelt name: both fixes said, with the timm that lacks it
        ("vit_nonesuch", f"'vit_nonesuch', which timm {timm.__version__} does not have: upgrade timm"),
        ("resnet18", "resnet18"),
    ):
        folder = tmp_path / arch
        folder.mkdir()
        shutil.copy(tmp_path / "gray.safetensors", folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 0}))
        with pytest.raises(TeacherLoadError, match=re.escape(says)):
            load_teacher(f"local-dir:{folder}")
    with pytest.raises(TeacherLoadError, match="'vit_nonesuch', which timm "):  # another size too
        load_teacher(f"local-dir:{tmp_path / 'vit_nonesuch'}", img_size=64)


def test_a_weights_file_of_grey_images_is_a_grey_teacher_of_its_rgb_architecture(tmp_path):
    """teacher.arch names an architecture alone, and a run has no key for a teacher's in_chans: a weights file
    whose stem takes one channel, given with an RGB architecture, builds with the channels its stem says (a
    run then makes grey images for it), instead of a refusal telling a config user to set in_chans."""
    grey = tiny_timm(in_chans=1)
    save_file(grey.state_dict(), str(tmp_path / "gray.safetensors"))
    teacher, rec = load_teacher(str(tmp_path / "gray.safetensors"), arch="vit_tiny_patch16_224", **TINY)
    assert rec.input_size == (1, 32, 32) and teacher.patch_embed.proj.in_channels == 1
    assert_same_tensors(teacher.state_dict(), grey.state_dict(), "the grey file's teacher")


def test_weights_of_another_model_size_say_which_tensor_differs_and_to_name_their_architecture(tmp_path):
    """A ViT-Tiny-width file named as a wider ViT (mae_pretrain_vit_large.pth given arch vit_base_...): every
    tensor's shape differs, and the message names two of them and what to change, and not torch's list of
    every mismatch after it."""
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_timm().state_dict(), str(weights))
    with pytest.raises(TeacherLoadError) as refused:
        load_teacher(str(weights), arch="vit_small_patch16_224", **{**TINY, "embed_dim": 96})
    message = str(refused.value)
    assert "tensors have other shapes than 'vit_small_patch16_224' gives them" in message, message
    assert "(cls_token: (1, 1, 48) in the file, (1, 1, 96) in the model; pos_embed: " in message, message
    assert message.endswith("in the model): name the timm architecture the weights were trained as"), message
    assert "size mismatch" not in message and "torch said" not in message and len(message.splitlines()) == 2


def test_weights_of_another_patch_size_are_refused_not_resampled_into_another_model(tmp_path):
    """timm's filter resamples a patch kernel of another size (and the position embedding with it) without a
    word: an 8-px file named as a 16-px architecture would be a teacher its weights never were."""
    weights = tmp_path / "patch8.safetensors"
    save_file(tiny_timm().state_dict(), str(weights))
    with pytest.raises(TeacherLoadError, match="their patches are 8 px, its 16 px"):
        load_teacher(str(weights), arch="vit_tiny_patch16_224", **{**TINY, "patch_size": 16})


def test_weights_of_another_naming_list_ten_keys_of_each_kind_once_and_the_error_keeps_them_all(tmp_path):
    """Every key of a model saved under another naming is both missing and unexpected: the message lists the
    first ten of each, once (not again in torch's words), and the error carries the whole lists."""
    renamed = {f"encoder.{k}": v for k, v in tiny_timm().state_dict().items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(TeacherLoadError) as refused:
        load_teacher(str(tmp_path / "renamed.safetensors"), arch="vit_tiny_patch16_224", **TINY)
    message, err = str(refused.value), refused.value
    assert len(err.unexpected_keys) == len(renamed) > 10 and len(err.missing_keys) > 10
    first, last = repr(err.unexpected_keys[0]), repr(err.unexpected_keys[-1])
    assert f"Unexpected keys ({len(renamed)}): " in message and last not in message, message
    assert message.count(first) == 1 and "torch said" not in message, message


def test_average_pooled_weights_are_told_how_to_become_a_teacher_and_the_way_told_loads_them(tmp_path):
    """MAE-style fine-tuned weights (fc_norm, no final norm) do not fit the default head; the hint's way for a
    config (a local-dir folder recording global_pool) builds the model that computes what they were."""
    finetuned = tiny_timm(global_pool="avg", num_classes=10).eval()
    save_file(finetuned.state_dict(), str(tmp_path / "ft.safetensors"))
    with pytest.raises(
        TeacherLoadError, match="a local-dir: folder that records it, as docs/teachers.md shows"
    ):
        load_teacher(str(tmp_path / "ft.safetensors"), arch="vit_tiny_patch16_224", **TINY)
    save_for_hf(finetuned, tmp_path / "ft", model_args={"global_pool": "avg", **TINY})
    teacher, _ = load_teacher(f"local-dir:{tmp_path / 'ft'}")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), finetuned(x))


def test_bad_specs_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="hf-hub:acme/thing"):
        load_teacher("acme/thing")
    with pytest.raises(ValueError, match="did you mean 'vit_base_patch16_224.mae'"):
        load_teacher("vit_bsae_patch16_224.mae")  # a misspelt architecture keeps its tag
    path = tmp_path / "w.safetensors"
    save_file(tiny_timm().state_dict(), str(path))
    with pytest.raises(ValueError, match="teacher.arch=NAME in a config, --teacher-arch / --student-arch"):
        load_teacher(str(path))
    for call in (load_teacher, fetch_teacher):  # a built model, not its str() read as a path too long to open
        with pytest.raises(TypeError, match="got VisionTransformer; a model already built needs no loading"):
            call(tiny_timm())


def test_a_timm_name_pinned_with_at_revision_is_told_the_hub_spec_that_pins_it():
    """`hf-hub:ORG/NAME@REV` pins a revision; `NAME.TAG@REV` was read as an unknown tag "TAG@REV" and answered
    with the name's tags, as if the tag were wrong."""
    for call in (load_teacher, fetch_teacher):
        with pytest.raises(
            ValueError,
            match=re.escape(
                "a timm name takes no @REVISION; pin its Hub weights as "
                "'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k@v1'"
            ),
        ):
            call("vit_tiny_patch16_224.augreg_in21k@v1")
    with pytest.raises(
        ValueError, match=r"no @REVISION; pin its Hub weights as 'hf-hub:timm/vit_tiny_patch16_224\."
    ):
        load_teacher("vit_tiny_patch16_224@v1")  # untagged: the default tag's repo


def test_a_web_address_is_told_the_hub_spec_it_names_or_to_be_downloaded_not_read_as_a_path():
    """A teacher's URL was read as the path 'https:/...' and said not to exist."""
    for url, said in (
        (
            "https://huggingface.co/facebook/dinov2-small",
            r"is a Hub address: use 'hf-hub:facebook/dinov2-small'$",
        ),
        ("https://huggingface.co/timm/vit_t/tree/v1.0", r"use 'hf-hub:timm/vit_t@v1\.0'$"),
        ("https://huggingface.co/a/b/resolve/main/model.safetensors", r"use 'hf-hub:a/b'$"),
        (
            "https://dl.fbaipublicfiles.com/mae/vit_b.pth",
            r"downloads no URL; download the file \(wget https://dl",
        ),
    ):
        for call in (load_teacher, fetch_teacher):
            with pytest.raises(ValueError, match=said):
                call(url)


def test_a_misspelt_prefix_is_named_with_the_spec_it_meant(tiny_teacher_dir):
    """`local_dir:PATH` was said not to exist (the folder does), `hfhub:ORG/NAME` told to become 'hf-hub:hfhub:...'."""
    for given, meant in (
        (f"local_dir:{tiny_teacher_dir}", f"local-dir:{tiny_teacher_dir}"),
        ("hfhub:a/b", "hf-hub:a/b"),
    ):
        with pytest.raises(ValueError, match=f"unknown prefix .*; did you mean '{meant}'"):
            load_teacher(given)
    with pytest.raises(ValueError, match="unknown teacher 'local:/x'. A teacher is"):  # no Hub repo hint
        load_teacher("local:/x")


def test_a_local_dir_spec_reads_its_folder_after_a_space_and_a_file_given_as_one_is_told_how_to_name_it(
    tiny_teacher_dir, tmp_path
):
    """`local-dir: PATH` (YAML's habit of a space after the colon) was read as the folder ' PATH', "does not
    exist" beside the name of one that does; a weights file given as a folder was told it has no config.json:
    a lone one is told to be named as it is, one inside a model's folder that folder."""
    assert load_teacher(f"local-dir: {tiny_teacher_dir}")[1].files[0] == str(tiny_teacher_dir / "config.json")
    weights = shutil.copy(tiny_teacher_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=rf"is a file: name a weights file as it is, {weights}, with teacher.arch"
    ):
        load_teacher(f"local-dir:{weights}")
    with pytest.raises(
        ValueError, match=rf"is a file of a model's folder: give the folder, local-dir:{tiny_teacher_dir}$"
    ):
        load_teacher(f"local-dir:{tiny_teacher_dir / 'model.safetensors'}")


def test_an_architecture_given_beside_a_spec_that_names_its_own_is_refused_not_ignored(tiny_teacher_dir):
    """teacher.arch is read for a weights file alone: beside a folder or a timm name, the spec's architecture
    would be built while the run's config says another."""
    for spec in (f"local-dir:{tiny_teacher_dir}", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"):
        with pytest.raises(ValueError, match=r"names its architecture itself; arch='vit_small_patch16_224'"):
            load_teacher(spec, arch="vit_small_patch16_224", pretrained=False)


# ---------------------------------------------------------------------------------------------
# Students


def test_student_has_teachers_registers_qk_norm_and_layer_scale(tmp_path):
    source = tiny_timm(num_classes=0, reg_tokens=4, qk_norm=True, init_values=1e-5, no_embed_class=True)
    save_for_hf(source, tmp_path / "teacher", safe_serialization=True, model_config=HUB_CFG)
    teacher, _ = load_teacher(f"local-dir:{tmp_path / 'teacher'}")

    student = student_like(teacher, depth=1, num_classes=10)
    assert student.reg_token is not None and student.reg_token.shape == (1, 4, 48)
    assert student.num_prefix_tokens == 5 and student.no_embed_class
    for blk in student.blocks:
        assert isinstance(blk.attn, TransferAttention)
        assert isinstance(blk.attn.q_norm, torch.nn.LayerNorm) and isinstance(
            blk.attn.k_norm, torch.nn.LayerNorm
        )
        assert isinstance(blk.ls1, LayerScale) and torch.allclose(blk.ls1.gamma, torch.full((48,), 1e-5))
    assert len(student.blocks) == 1 and student.num_classes == 10
    # fresh weights, trainable; the teacher's preprocessing and licence
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    assert all(p.requires_grad for p in student.parameters())
    assert (
        student.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
        and student.pretrained_cfg["license"] == "cc-by-nc-4.0"
    )
    t, s = vit_traits(teacher), vit_traits(student)
    assert {k for k in t if t[k] != s[k]} == {"depth", "num_classes"}
    with torch.no_grad():
        assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_student_reads_architecture_defaults_and_overrides_width():
    # registers, LayerScale and no_embed_class come from the timm entrypoint, not from create_model kwargs
    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, img_size=28)
    student = student_like(teacher, depth=1, embed_dim=96)
    assert student.reg_token.shape == (1, 4, 96) and isinstance(student.blocks[0].ls1, LayerScale)
    assert student.blocks[0].attn.num_heads == 6 and student.blocks[0].attn.head_dim == 16
    with pytest.raises(ValueError, match="not divisible"):
        student_like(teacher, embed_dim=100)
    with pytest.raises(ValueError, match=r"sizes must be positive.*\{'depth': 0\}"):
        student_like(teacher, depth=0)  # not an IndexError from timm's empty block list
    with pytest.raises(TypeError, match="create_vit takes a timm architecture name.*student_like"):
        create_vit(teacher)


@pytest.mark.parametrize(
    "size, said",
    [
        ({"embed_dim": "64"}, r"embed_dim must be an int, got '64' \(model.kwargs.embed_dim in a config\)$"),
        ({"depth": 2.0}, r"depth must be an int, got 2.0"),
        (
            {"num_heads": [1, "2"]},
            r"num_heads must be an int \(or a list of ints, one per stage\), got \[1, '2'\]",
        ),
        ({"mlp_ratio": "4"}, r"mlp_ratio must be a number, got '4'"),
        ({"num_classes": True}, r"num_classes must be an int, got True \(model.num_classes in a config\)$"),
    ],
)
def test_a_student_size_of_the_wrong_type_names_the_argument_and_the_type(size, said):
    """Python callers skip the config's checks: a str size was a TypeError from the sizes check's comparison."""
    with pytest.raises(ValueError, match=rf"^student_like: {said}"):
        student_like(tiny_timm(depth=1), **size)


def test_student_spec_round_trips_through_json():
    teacher = tiny_timm(reg_tokens=2, qk_norm=True, global_pool="avg", class_token=False, num_classes=0)
    student = student_like(teacher, depth=3, num_classes=6)
    spec = json.loads(json.dumps(student_spec(student)))
    text = json.dumps(spec)
    assert "attnxfer" not in text and "TransferAttention" not in text
    assert spec["architecture"] == "vit_tiny_patch16_224" and spec["attention"] == "softmax"
    rebuilt = student_from_spec(spec)
    assert vit_traits(rebuilt) == vit_traits(student)
    assert all(isinstance(b.attn, TransferAttention) for b in rebuilt.blocks)


def test_random_init_teacher_needs_no_weights():
    teacher, rec = load_teacher("vit_base_patch16_224.mae", pretrained=False, **TINY)
    assert rec.source == "random-init" and rec.sha256 is None and rec.files == []
    assert rec.license == "cc-by-nc-4.0" and rec.mean == tuple(
        IMAGENET_DEFAULT_MEAN
    )  # the tag's cfg still applies
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_folder_whose_card_and_config_name_other_licences_takes_the_cards_and_says_so(tmp_path, capsys):
    """save_for_hf writes the pretrained config of the architecture's default tag (apache-2.0 for a ViT), while
    the repo's card states the weights' own terms (MAE's cc-by-nc-4.0): the card is the statement an export
    passes on, and the disagreement is said."""
    folder = tmp_path / "mae-ft"
    timm.models.save_for_hf(tiny_timm(num_classes=0), str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["license"] = "apache-2.0"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# weights\n")
    capsys.readouterr()
    _, record = load_teacher(f"local-dir:{folder}", **TINY)
    assert record.license == "cc-by-nc-4.0"
    said = capsys.readouterr().err
    assert (
        "its config.json says licence 'apache-2.0' but its model card (README.md) says 'cc-by-nc-4.0'" in said
    )
    for card in ("apache-2.0", "other"):  # agreeing, or stating no terms (an export's card): config.json's
        (folder / "README.md").write_text(f"---\nlicense: {card}\n---\n")
        assert load_teacher(f"local-dir:{folder}", **TINY)[1].license == "apache-2.0"
        assert "model card" not in capsys.readouterr().err


@pytest.mark.slow  # two one-step runs
def test_a_teacher_run_at_another_size_than_its_weights_were_made_for_is_said_at_start_and_in_a_report(
    tmp_path, capsys
):
    """Its maps at a size it never saw are what a student learns: one line at start (it was in run.json only),
    and in a conversion report's summary."""
    from helpers import run_cli, tiny_run

    from attnxfer.apps.convert.report import _summary_section

    folder = tmp_path / "t32"
    save_for_hf(tiny_timm(num_classes=0), str(folder), safe_serialization=True)
    argv = [
        f"teacher.spec=local-dir:{folder}",
        *tiny_run(8, 8),
        "schedule.max_steps=1",
        "transfer.task_weight=0",
    ]
    code, out, err = run_cli(capsys, "train", *argv, "data.img_size=48", f"run_dir={tmp_path / 'at48'}")
    assert code == 0, err
    said = "teacher: made for 32x32 px, run at 48 px (position embeddings resampled"
    assert said in out
    record = json.loads((tmp_path / "at48" / "run.json").read_text())["teacher"]
    report = {"teacher": {"spec": "t", "record": record}, "student": {"attention": ["relu_linear"]}}
    report |= {"data": {"dataset": "d", "val_size": 8, "agreement_images": 8}, "stage1": {"skipped": True}}
    summary = _summary_section({**report, "stage2": {"steps": 0}})
    assert "- teacher: `t`, made for 32x32 px, run at 48 px (position embeddings resampled" in summary[2]
    code, out, _ = run_cli(capsys, "train", *argv, f"run_dir={tmp_path / 'at32'}")
    assert code == 0 and "teacher: made for" not in out


@pytest.mark.slow
def test_submit_warns_of_a_hub_teacher_missing_from_the_cache_while_the_hub_is_out_of_reach(
    tmp_path, monkeypatch, capsys
):
    """A job on nodes without internet stops at its start, after the queue's wait, for a Hub teacher no cache
    holds: submit said nothing of it, where `train` refused it at once. A cached one is not warned of."""
    import huggingface_hub.constants

    from attnxfer.launch.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    put_in_hub_cache(tmp_path / "hub", "acme/tiny", tiny_timm())
    submit = ["submit", "data.dataset=synthetic", f"run_dir={tmp_path / 'run'}", "--dry-run"]
    for repo, warned in (("acme/not-cached", True), ("acme/tiny", False)):
        spec = f"hf-hub:{repo}"
        assert main([*submit, f"teacher.spec={spec}", f"teacher.cache_dir={tmp_path / 'hub'}"]) == 0
        err = capsys.readouterr().err
        said = (
            f"warning: teacher.spec={spec}: not in this machine's Hub cache, and the Hub is out of reach here"
        )
        assert (said in err) is warned, err
