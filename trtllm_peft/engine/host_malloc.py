"""glibc malloc settings for the long-running server process.

glibc serves an allocation above its mmap threshold (128 KiB at start) from its own mapping, returned to the
OS on free, but each such free raises the threshold to the freed size (up to 32 MiB on 64-bit): afterwards
tensors of a few MiB, such as the adapters a server loads, packs and drops all day, come from the heaps of
the threads that allocate them, and freeing them seldom shrinks those heaps. The server's RSS then tracks the
high-water mark of every thread's arena (engine, poller, adapter loaders, event loop), not what it holds.
A fixed threshold turns the adjustment off, and two arenas bound the per-thread heaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 << 20  # bench/README.md "Paged KV cache": server peak RSS 3.67 -> 2.63 GB in bench/load.py
ARENAS = 2


def tune_for_server() -> bool:
    """Set the threshold and the arena limit (before the server's threads start); False where libc is not
    glibc or refuses (nothing changes then)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_ARENA_MAX, ARENAS) == 1
