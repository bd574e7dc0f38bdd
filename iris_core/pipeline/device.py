"""Device choice, thread count, mixed precision and memory checks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import psutil
import torch

from iris_core.errors import ResourceError
from iris_core.options import DEVICES  # the table lives with the options (torch-free, for the Slicer GUI)


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


#: glibc's mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_glibc = None  # the C library once retain_freed_memory applied


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def retain_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the system (glibc).

    glibc serves every block over 32 MB (a 3-D network's activations are hundreds of MB each) with an
    mmap of its own and unmaps it when freed, so every window of a sliding-window pass faults all of its
    memory in again, zero-filled by the kernel: MASS-base's 128^3 windows on a 2-core EPYC spent 54 s of
    kernel time per target that way, and took 19.5 s each instead of 14.9 s. ``mallopt(M_MMAP_MAX, 0)``
    serves such blocks from the heap and ``mallopt(M_TRIM_THRESHOLD, -1)`` keeps the heap's freed top
    (both documented in mallopt(3)), so later windows and targets reuse it. The cost: resident memory
    stays near its high-water mark until the process exits (the peak itself rose 13 % there, from heap
    fragmentation); ``available_memory`` counts the retained free memory as available to this process.

    The CLI and Slicer's worker (processes of their own) call this; the Python API leaves the
    allocator alone unless its caller does. Returns whether it applied: not on Windows or macOS (their
    allocators have no such switch), not on other C libraries, not with IRIS_SEGMENT_RETAIN_MEMORY=0.
    """
    global _glibc
    if _glibc is not None:
        return True
    if os.environ.get("IRIS_SEGMENT_RETAIN_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return False  # not glibc (musl's mallopt does nothing)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        return False
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    _glibc = libc
    return True


def release_freed_memory() -> bool:
    """Give the memory this process freed and retains (``retain_freed_memory``) back to the system now:
    glibc's ``malloc_trim(0)`` returns every free page of every arena, whatever the trim threshold
    (malloc_trim(3)). For a process that stays alive between jobs (Slicer's warm worker), after each job: the
    next job's windows reuse the heap again, and an idle worker holds only what it keeps (torch and the
    model). Returns whether memory was handed back (only where ``retain_freed_memory`` applied); CUDA's
    cached blocks are emptied too."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _glibc is None or not hasattr(_glibc, "malloc_trim"):
        return False
    return bool(_glibc.malloc_trim(0))


def retained_free_bytes() -> int:
    """Memory this process freed and keeps for reuse (0 unless ``retain_freed_memory`` applied)."""
    if _glibc is None or not hasattr(_glibc, "mallinfo2"):
        return 0
    return int(_glibc.mallinfo2().fordblks)


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
