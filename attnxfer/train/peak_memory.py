"""Peak memory of a stretch of work: on CUDA the allocator's peak; on the CPU (torch allocates through libc,
which ``tracemalloc`` misses) the growth of the resident set's high-water mark, reset at the start where
Linux allows, else of the lifetime maximum. `PeakMemory.how` says which, so a report never passes one for the other.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status in bytes, None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _max_rss_bytes() -> int:
    """The process's lifetime maximum resident set (Linux reports kB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class PeakMemory:
    """Started on a device, `peak` is the most memory the work since then held at once (bytes), `how` what
    that number is. Call `start` where the stretch begins."""

    device: torch.device
    how: str = ""
    _base: int = 0

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base, self.how = torch.cuda.memory_allocated(self.device), "CUDA allocator peak (torch)"
            return self
        try:
            _CLEAR_REFS.write_text("5")  # Linux: the resident set's high-water mark restarts here
            rss = _status_bytes("VmRSS")
            if rss is None or _status_bytes("VmHWM") is None:
                raise OSError("no VmRSS/VmHWM")
            self._base, self.how = rss, "process max RSS growth (VmHWM - RSS at start)"
        except OSError:
            self._base, self.how = _max_rss_bytes(), "process lifetime max RSS growth (getrusage)"
        return self

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.how.startswith("process max RSS"):
            return max(0, (_status_bytes("VmHWM") or 0) - self._base)
        return max(0, _max_rss_bytes() - self._base)
