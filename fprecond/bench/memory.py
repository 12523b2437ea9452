"""Peak memory of one call, above what the process already held.

- CPU: the resident set from ``/proc/self/status``. Read ``VmRSS``, reset the
  high-water mark by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0),
  run the call, read ``VmHWM``; the peak is ``VmHWM - VmRSS``. This counts every
  byte the process touched (tensors, allocator slack, newly loaded code pages),
  so run each measurement in a fresh process and warm the call up first. Where
  ``clear_refs`` is not writable the peak is unknown (``None``).

  glibc keeps freed memory in its heap once its adaptive mmap threshold has grown
  (it does after large frees), and a call could then reuse it without raising the
  resident set, so its peak would read too low. Before reading ``VmRSS`` the
  threshold is therefore pinned low (every large tensor gets its own mapping,
  unmapped when freed) and free heap pages are given back. This slows later
  allocations, so time a call before its memory is measured, not after.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` before: tensor memory only, in this process.

The C allocator also sways timings: in a fresh process glibc's adaptive
thresholds start low and move with the history of frees, so the same CNN
forward+backward ran about a third slower (page faults on fresh mappings) until
some large buffer had been freed. :func:`steady_allocator` fixes them at the
values the adaptive rule reaches in a long-running process, so that every timing
in a worker sees the same allocator whatever ran before it.
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any, Callable

import torch

__all__ = ["peak_bytes", "cpu_peak_supported", "steady_allocator", "ProcessPeak"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

# glibc's mallopt parameters (malloc.h); the threshold pinned while measuring; and the
# ceilings of glibc's adaptive thresholds on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, and
# twice that for trimming, as the adaptive rule sets it).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 64 * 1024
_STEADY_MMAP_THRESHOLD = 32 * 1024 * 1024
_STEADY_TRIM_THRESHOLD = 2 * _STEADY_MMAP_THRESHOLD


def _mallopt(mmap_threshold: int, trim_threshold: int, trim: bool = False) -> None:
    """Set glibc's mmap and trim thresholds (and give free heap pages back if ``trim``);
    a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def steady_allocator() -> None:
    """Fix glibc's thresholds where its adaptive rule ends up in a long-running process:
    buffers under 32 MiB are recycled in the heap instead of being mapped afresh (and
    page-faulted in) on every call. Call once at the start of a timing process."""
    _mallopt(_STEADY_MMAP_THRESHOLD, _STEADY_TRIM_THRESHOLD)


def _status_kib(field: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmRSS:   1234 kB"
    raise RuntimeError(f"{_STATUS} has no {field} line")


def _reset_high_water_mark() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_peak_supported() -> bool:
    """Whether this process can reset its resident-set high-water mark."""
    return os.path.exists(_STATUS) and _reset_high_water_mark()


def _release_heap() -> None:
    """Pin glibc's mmap threshold low and give free heap pages back, so that the
    starting resident set holds no slack a measured call could reuse unseen."""
    _mallopt(_MMAP_THRESHOLD, _MMAP_THRESHOLD, trim=True)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Run ``fn()`` once; return its result and the peak memory it needed in bytes
    above what was held before (``None`` where it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu" or not os.path.exists(_STATUS):
        return fn(), None
    _release_heap()
    before = _status_kib("VmRSS")
    if not _reset_high_water_mark():
        return fn(), None
    result = fn()
    peak = _status_kib("VmHWM")
    return result, max(peak - before, 0) * 1024


class ProcessPeak:
    """The high-water mark of this process over a stretch of work (a whole training run).

    CPU: the resident set's high-water mark (``VmHWM``) after resetting it at
    :meth:`start`, and how far it rose above the resident set at that moment; the
    glibc thresholds are not touched, so timings in the stretch stay undisturbed.
    CUDA: the allocator's peak (``max_memory_allocated``) and its rise above the
    tensors held at :meth:`start`. Unknown values are ``None``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start: int | None = None
        self._resettable = False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif os.path.exists(_STATUS):
            self._start = _status_kib("VmRSS") * 1024
            self._resettable = _reset_high_water_mark()

    def stop(self) -> tuple[int | None, int | None]:
        """``(peak bytes, peak bytes above the start)``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return peak, None if self._start is None else max(peak - self._start, 0)
        if self._start is None:
            return None, None
        peak = _status_kib("VmHWM") * 1024
        return peak, max(peak - self._start, 0) if self._resettable else None
