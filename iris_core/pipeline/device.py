"""Device choice, thread count, mixed precision and memory checks."""

from __future__ import annotations

import contextlib
import sys

import psutil
import torch

from iris_core.errors import ResourceError
from iris_core.options import DEVICES  # the table lives with the options (torch-free, for the Slicer GUI)

# glibc's allocator switches live torch-free in pipeline.allocator (the CLI applies them before its checks
# without importing torch); imported here, where callers have found them
from iris_core.pipeline.allocator import retain_freed_memory, retained_free_bytes, trim_freed_memory  # noqa: F401


def choose_device(name: str, cuda: bool, mps: bool) -> str:
    """The device ``name`` stands for on a machine where CUDA and Apple MPS are (or are not) available:
    'auto' is CUDA, then MPS, then the CPU; a requested device that is absent, or an unknown name, is a
    ResourceError saying what to use instead. Pure (the availability is given), so every branch is tested on
    any machine; :func:`select_device` asks torch."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ResourceError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} or cuda:N")
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda") and not cuda:
        raise ResourceError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    if name == "mps" and not mps:
        raise ResourceError("device 'mps' requested but Apple MPS is not available here; use --device cpu or auto")
    return name


def select_device(name: str = "auto") -> torch.device:
    """:func:`choose_device` with what this machine has (torch's own CUDA and MPS checks)."""
    mps = getattr(torch.backends, "mps", None)
    return torch.device(choose_device(name, torch.cuda.is_available(), bool(mps and mps.is_available())))


def set_threads(threads: int | None) -> None:
    """Honour a CPU thread count (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))


def autocast(device: torch.device, enabled: bool = True):
    """bf16 (or fp16) autocast on GPUs; a no-op on the CPU, where float32 is the reference path."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def release_freed_memory() -> bool:
    """Give the memory this process freed and retains (``retain_freed_memory``) back to the system now:
    glibc's ``malloc_trim(0)`` returns every free page of every arena, whatever the trim threshold
    (malloc_trim(3)). For a process that stays alive between jobs (Slicer's warm worker), after each job: the
    next job's windows reuse the heap again, and an idle worker holds only what it keeps (torch and the
    model). Returns whether memory was handed back (only where ``retain_freed_memory`` applied); CUDA's
    cached blocks are emptied too."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return trim_freed_memory()


def available_memory(device: torch.device) -> int:
    """Bytes that may be allocated now on ``device`` (host: psutil's available memory, which is
    MemAvailable on Linux and the equivalent on Windows and macOS, plus what this process freed and
    retains for reuse, see ``retain_freed_memory``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available) + retained_free_bytes()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB, portably: the peak working set on Windows,
    VmHWM on Linux; elsewhere (macOS) psutil has no peak, so the current RSS (a lower bound)."""
    proc = psutil.Process()
    info = proc.memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows
    if peak:
        return peak / 2**20
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    return info.rss / 2**20


def check_memory(needed: int, device: torch.device, what: str) -> None:
    """Refuse, before allocating, a job estimated to need more than the available memory."""
    avail = available_memory(device)
    if needed > avail:
        raise ResourceError(
            f"{what} needs about {needed / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB is available on "
            f"{device.type}; use a coarser spacing, a smaller window or crop the image"
        )
