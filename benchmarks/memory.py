"""Peak memory of a benchmark child process, measured by the child itself.

Why not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: on Linux a process started by fork/vfork + exec
keeps its parent's high-water mark in ru_maxrss (the kernel carries the old image's peak across exec),
so a child started from a pytest process that has already used 4 GB reports at least 4 GB, and a
"peak increase" measured as a difference of ru_maxrss is 0. `VmHWM` in /proc/self/status is the
high-water mark of the process's own address space: a new one at exec, so it starts at the child's
own footprint; writing "5" to /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0), which
lets a child measure the peak of one region of its own work.

- `peak_mib()`: VmHWM of this process, MiB (ru_maxrss when /proc is absent: then `METHOD` says so);
- `rss_mib()`: VmRSS, MiB;
- `reset_peak()`: reset VmHWM to the current RSS; returns that RSS (MiB), the baseline of the region.
  When the reset is not possible the baseline is the current VmHWM and `METHOD` says the figure is
  a lower bound.
"""
from __future__ import annotations

import resource

METHOD = "VmHWM (fresh process image)"


def _status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return None


def peak_mib() -> float:
    global METHOD
    v = _status("VmHWM")
    if v is None:
        METHOD = "ru_maxrss (no /proc: may include the parent's peak)"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return v


def rss_mib() -> float:
    v = _status("VmRSS")
    return peak_mib() if v is None else v


def reset_peak() -> float:
    """Reset the high-water mark to the current RSS and return it (MiB)."""
    global METHOD
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_mib()
    except OSError:
        METHOD = "VmHWM difference (clear_refs unavailable: a lower bound)"
        return peak_mib()
