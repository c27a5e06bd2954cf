"""Measuring helpers shared by the benchmark scripts (peak memory, machine facts, tables).

Principles (docs/benchmarks.md): compare configurations *inside one run*
(interleaved repeats, medians, ratios to a baseline), never absolute numbers
across runs; say exactly what a memory figure counts. Timing is the package's own
(`attnxfer.train.timing.interleaved_timings`), the clock the conversion reports use too.

Memory, as measured here:

* ``static_bytes``: bytes of the distinct tensor storages a configuration keeps
  between steps (weights, buffers, optimiser state, the input batch).
* ``step_peak_growth``: the most bytes that were live at once during one step,
  above what was live when the step started. On CUDA this is
  ``torch.cuda.max_memory_allocated`` after a reset; on CPU (torch has no CPU
  allocator statistics) the same quantity is read from the allocator events that
  ``torch.profiler`` records with ``profile_memory=True`` (every tensor
  allocation and free through torch's CPU allocator, with a running total).
  Neither counts library scratch space outside torch's allocator.
* ``isolated_rss_growth`` (CPU cross-check): a fresh process builds and runs one
  configuration; the figure is the process's resident-set high-water mark
  (``VmHWM``) minus its resident size just before building. It includes what the
  tensor count misses (library workspaces, one-off kernel set-up, and, unless
  glibc's mmap threshold is fixed with `FIXED_MMAP_THRESHOLD`, freed heap pages
  that malloc keeps), so it runs above the tensor figure.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def bench_device(name: str | None) -> torch.device:
    """``--device`` (default: CUDA where there is one); CUDA asked for on a machine without one is refused
    with what to pass instead, not torch's driver traceback."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} needs a CUDA GPU and this machine has none: use --device cpu")
    return device


def refuse_triton_off_cuda(ce_paths: Sequence[str], device: torch.device) -> None:
    """``--ce-paths triton`` where its kernels cannot run (not CUDA, no ``TRITON_INTERPRET=1``) is refused
    before any work, with what to pass instead, not the loss's traceback from the first timed call."""
    from attnxfer.transfer.triton_ce import CEPathUnavailable, triton_backend

    if "triton" not in ce_paths:
        return
    try:
        triton_backend(device)
    except CEPathUnavailable:
        raise SystemExit(
            f"--ce-paths triton needs a CUDA GPU and this run is on {device}: leave triton out, or set "
            "TRITON_INTERPRET=1 to run its kernels through Triton's interpreter (slow)"
        ) from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory ----------------------------------------------------------------------------------


def static_bytes(*objects: Any) -> int:
    """Bytes of the distinct storages held by modules, optimisers and tensors (shared storages once)."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for t in obj.parameters():
                add(t)
                add(t.grad)
            for t in obj.buffers():
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        elif isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, (list, tuple)):
            for t in obj:
                add(t)
        else:
            raise TypeError(f"static_bytes: cannot count {type(obj).__name__}")
    seen.pop(0, None)
    return sum(seen.values())


def _cpu_step_peak_growth(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor bytes during ``fn`` above the level at its start (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    if not mem:
        raise RuntimeError("torch.profiler recorded no CPU memory events; cannot measure CPU peak memory")
    # The allocator's running total persists across profiler sessions: measure from this one's start.
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - base)


def step_peak_growth(fn: Callable[[], Any], device: torch.device) -> int:
    """Most tensor bytes live at once during ``fn()`` above those live when it started."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type == "cpu":
        return _cpu_step_peak_growth(fn)
    raise ValueError(
        f"step_peak_growth: no memory accounting for device type {device.type!r}; use cpu or cuda"
    )


def rss_kib(field_name: str = "VmRSS") -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status (Linux only)")


# glibc raises its mmap threshold after each large free (up to 32 MiB), after which big
# temporaries come from the heap and their pages stay resident once freed: the high-water
# mark then tracks the allocator's history more than the program's memory. A fixed
# threshold keeps every block above it in its own mapping, returned to the OS on free.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _isolated_worker(conn, fn, args, kwargs):
    try:
        torch.ones(8, 8) @ torch.ones(8, 8)  # load the math libraries before the baseline
        gc.collect()
        before = rss_kib("VmRSS")
        result = fn(*args, **kwargs)
        conn.send(("ok", (rss_kib("VmHWM") - before) * 1024, result))
    except BaseException as e:  # report, don't hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}", None))
    finally:
        conn.close()


def isolated_rss_growth(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
):
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) process; return (peak RSS growth in bytes, its result).

    Growth = the process's VmHWM at the end minus its VmRSS just before ``fn``
    (after imports). ``fn`` must be importable (a module-level function); ``env``
    adds environment variables for the child only (e.g. `FIXED_MMAP_THRESHOLD`). Linux only.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_worker, args=(child, fn, args, kwargs), daemon=True)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"isolated run of {fn.__name__} gave no answer in {timeout:.0f} s")
        status, value, result = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"isolated run of {fn.__name__} failed: {value}")
    return value, result


# -- reporting -------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded (None where the OS has none): printed beside timings, since
    on a shared machine they say how much to trust them."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    if (load := load_average()) is not None:
        info["loadavg_start"] = load
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if fmt else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple], markdown: bool = False) -> str:
    """Rows of dicts as an aligned text (or markdown) table; columns are (key, header, format)."""
    header = [h for _, h, _ in columns]
    body = [[_cell(row.get(k), f) for k, _, f in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt_row = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in body])


def _jsonable(obj: Any) -> Any:
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else str(obj)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
