"""The tool's own peak memory per pass: the process's peak resident set size, reset before each
pass where the OS allows it (Linux: /proc/self/clear_refs), else the peak since the process began."""
from __future__ import annotations

import sys

__all__ = ["reset_peak", "peak_mb", "release_free_memory"]


def reset_peak() -> bool:
    """Start a new peak-RSS window; False where the OS keeps one peak for the whole process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float | None:
    """Peak RSS in MiB since the last reset (or since the start), None where unknown. Worker
    processes (parallel sensitivity trials) are not included."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). glibc
    keeps what a freed onnxruntime session or large array leaves in its heap, in pieces the next
    allocation often cannot reuse: on the 2.27 GB model, 0.9 GB of the peak."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass
