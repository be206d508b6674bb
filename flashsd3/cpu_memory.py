"""Keep freed memory in the process for reuse (glibc malloc, Linux), instead of handing it back to the OS.

glibc serves large allocations with fresh memory-mapped pages and returns freed memory at the top of its heap
to the kernel. A transformer call at 1024 px on a CPU allocates and frees hundreds of MB of activations, so
every call paid for them again in page faults and kernel zeroing: 80,000 minor faults and 5% of a depth-2
bf16 forward on the bench machine (bench/RESULTS.md). `mallopt` with M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
raised turns both off for this process; freed blocks are then reused by the next call. The process keeps
its peak resident memory until it exits. `flashsd3-sample` calls this at start; in a script of your own, call
it once before the models are built. Elsewhere (macOS, Windows, musl) it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_ABOVE = 1 << 30  # bytes: only allocations above this get their own mapping (none in an SD3 pipeline)
NEVER_TRIM = (1 << 31) - 1  # bytes (mallopt takes an int): never give the top of the heap back


def keep_freed_memory() -> bool:
    """True if glibc accepted both settings (this process only)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_freed_memory() -> bool:
    """Give the freed memory kept so far back to the OS now (malloc_trim), e.g. before starting another large
    process; True if glibc released some."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both; musl has neither)
    except (OSError, AttributeError):
        return None
    return libc
