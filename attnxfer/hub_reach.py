"""Whether the Hugging Face Hub answers, asked once a minute: where it does not, teachers' weights
(`sources/hub.py`) and Hugging Face datasets (`data/timm_sources.py`) are read from the cache at once, not
after huggingface_hub's ~25 s of retries a file."""

from __future__ import annotations

import contextlib
import http.client
import importlib
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from huggingface_hub import constants

from .errors import InputError
from .speak import debug

_REACHABLE: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0, ttl: float = 60.0) -> bool:
    """Whether the Hub endpoint answers HTTP within ``timeout`` seconds (any status counts), remembered for
    ``ttl`` seconds: huggingface_hub retries an unreachable endpoint for ~25 s per file before falling back
    to the cache, so one bounded probe (DNS included, in a daemon thread) decides up front instead."""
    endpoint = constants.ENDPOINT
    now = time.monotonic()
    cached = _REACHABLE.get(endpoint)
    if cached and now - cached[0] < ttl:
        return cached[1]
    answer: list[bool] = []
    bad_endpoint: list[ValueError] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # it answered
        except urllib.error.URLError as e:
            # A TLS complaint means something answered: let huggingface_hub (its own CA settings) decide.
            answer.append(isinstance(e.reason, ssl.SSLError))
        except (OSError, http.client.HTTPException):  # timed out, reset, refused, or a garbled reply
            answer.append(False)
        except ValueError as e:  # no URL at all (urllib's "unknown url type"): the setting is wrong
            bad_endpoint.append(e)

    t = threading.Thread(target=probe, name="attnxfer-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if bad_endpoint:
        raise InputError(
            f"the Hugging Face Hub endpoint {endpoint!r} (HF_ENDPOINT) is not a URL ({bad_endpoint[0]}); "
            "unset HF_ENDPOINT or set it to e.g. https://huggingface.co"
        )
    ok = bool(answer and answer[0])
    _REACHABLE[endpoint] = (now, ok)
    if not ok:
        debug(f"Hugging Face Hub at {endpoint} is not reachable: using the local cache only")
    return ok


def offline_reason() -> str | None:
    """Why nothing is downloaded from the Hub now (offline mode set, or no answer), in words; None if it is."""
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    if not hub_reachable():
        return f"{constants.ENDPOINT} cannot be reached"
    return None


@contextlib.contextmanager
def cache_only_while_unreachable() -> Iterator[None]:
    """huggingface_hub and datasets in offline mode (what HF_HUB_OFFLINE=1 sets as they are imported) while
    the Hub cannot be reached: a cached dataset is read at once, and one not cached is refused at once, where
    each read would otherwise retry for ~25 s (a compute node without internet) and print every retry."""
    if offline_reason() is None:
        yield
        return
    configs = [constants]
    with contextlib.suppress(ImportError):  # datasets: an extra, imported by those who read its datasets
        configs.append(importlib.import_module("datasets.config"))
    before = [config.HF_HUB_OFFLINE for config in configs]
    for config in configs:
        config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for config, offline in zip(configs, before, strict=True):
            config.HF_HUB_OFFLINE = offline
