"""Peak resident memory of one call, and the facts of the machine a benchmark ran on."""

from __future__ import annotations

import os
import platform
import resource

import torch

# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """Resident set size in bytes (from /proc/self/statm; psutil-free)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM of /proc/self/status (the high-water
    mark `reset_peak_rss` resets), else getrusage's ru_maxrss.

    Not ru_maxrss first: on Linux it is max(the mm's high-water mark, signal->maxrss), and exec
    stores the *parent's* high-water mark in signal->maxrss, so a child of a 4.7 GB benchmark
    process reported a 4.7 GB peak for every call (measured)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- machine


def allocator() -> str:
    """The malloc in use: LD_PRELOAD and any jemalloc/tcmalloc mapped into this process."""
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "malloc" in line}
    tuned = sorted(os.path.basename(m) for m in mapped if "jemalloc" in m or "tcmalloc" in m)
    return (
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; tuned malloc: {', '.join(tuned) or 'none (glibc)'}"
    )


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Platform, torch version, threads, allocator, CPU model, cores, load average."""
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "allocator": allocator(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
    }  # fmt: skip
