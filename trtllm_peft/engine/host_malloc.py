"""glibc malloc settings for the long-running server process.

glibc serves an allocation above its mmap threshold (128 KiB at start) from its own mapping, returned to the
OS on free, but each such free raises the threshold to the freed size (up to 32 MiB on 64-bit): afterwards
tensors of a few MiB, such as the adapters a server loads, packs and drops all day, come from the heaps of
the threads that allocate them, and freeing them seldom shrinks those heaps. The server's RSS then tracks the
high-water mark of every thread's arena (engine, poller, adapter loaders, event loop), not what it holds.
A fixed threshold turns the adjustment off, and two arenas bound the per-thread heaps.

The threshold sits between what recurs every engine step and what an adapter load allocates: a step's logits
[B, V] (float32, V = 49,152: 6 MiB at batch 32, 12 MiB at 64) and the log-prob temporaries the server
computes from them must come from the heap, where the next step reuses them. Above the threshold each step
mapped, faulted in (zeroed) and unmapped them again: 3-4x the CPU of the same step's scoring with heap memory
(bench/README.md "The server's own cost per token"), a large part of the server's 12% fewer tokens/s than
the bare executor with a 4 MiB threshold. A rank-16 adapter's packed rows (27 MiB, one tensor) and its
device copy (18.6 MiB) stay above it, mapped and returned to the OS when dropped. A fixed threshold also
fixes the trim threshold (free memory at a heap's top given back) at its 128 KiB default: freeing a step's
logits then gave their pages back and the next step faulted them in again, so it is set to twice the
threshold, as glibc's own adjustment does (at most 3 x 32 MiB kept free: the main heap and two arenas).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc malloc.h
M_ARENA_MAX = -8
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD = 16 << 20  # above a step's logits, below an adapter (module docstring)
ARENAS = 2


def tune_for_server() -> bool:
    """Set the thresholds and the arena limit (before the server's threads start); False where libc is not
    glibc or refuses."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD),
        (M_ARENA_MAX, ARENAS),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
