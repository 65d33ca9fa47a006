"""Memory on 2 MiB pages for what every decode step streams: the packed weights and the KV pool.

A decode step reads all the weights (270 MB bfloat16, 540 MB float32) and its sequences' K/V. On 4 KiB pages
the hardware prefetcher stops at every page boundary and each page costs a TLB entry; on 2 MiB pages a
layer's projections are a few pages. Linux gives anonymous memory huge pages only where THP is `always`, or
`madvise` (the common default, this machine's) for ranges marked madvise(MADV_HUGEPAGE), and only for
2 MiB-aligned stretches. torch's allocator never asks (unless THP_MEM_ALLOC_ENABLE is set, and then only for
allocations of 2 MiB and more: a bfloat16 layer's q/k/v projection is 1.1 MB), so weights sat on 4 KiB pages.

Here the memory is an anonymous mapping, marked, viewed from its first 2 MiB boundary; the tensor keeps the
mapping alive. Where THP is `never` or madvise is refused, the same mapping serves on 4 KiB pages. Pages
become resident when first written, as with torch.empty.

The device tier's adapter copies come and go all day (a batch of 40 adapters over a 16-adapter tier: ~3 a
second in bench/load.py), so they take their pages from a pool (`PagePool`, `Arena(pool=...)`): a page
whose tensors are gone is reused as it is, already resident, instead of a fresh mapping that the kernel
zeroes at first touch. On a VM that hands free memory back to its host (virtio-balloon free page reporting
of 2 MiB blocks, enabled on the bench machine) that first touch can cost far more. Measured in the server (perf,
s11 ramp.md): the kernel's huge-page zeroing (clear_page_erms) under the arena's copies took 68% of the
engine thread in its first seconds, 127 ms of CPU per adapter made device-ready against 26-30 ms with
pooled pages. The executor reserves the tier's pages at start (`reserve`, from BatchLora), as TensorRT-LLM
allocates its PEFT device cache up front.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor placed in an arena starts on a cache line


def empty(shape: tuple[int, ...], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty(shape, dtype) on 2 MiB pages where the OS gives them (CPU); elsewhere torch.empty."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = dtype.itemsize * _numel(shape)
    return _mapped(n)[:n].view(dtype).view(shape)


class PagePool:
    """2 MiB pages, each its own mapping, kept once made: `take` hands out one that no tensor uses any more
    (resident already), else a new one. A page is in use while a tensor made on it lives (its storage holds
    a reference to the page's mapping object: the pool counts references, so nothing has to give pages
    back). At most `keep` unused pages stay mapped (the rest are unmapped when seen). Thread-safe."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._pages: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pages)

    def take(self) -> torch.Tensor:
        """uint8 [HUGE_PAGE] on a 2 MiB boundary, on a page no tensor uses (contents: whatever was there)."""
        with self._lock:
            free = self._unused()
            for buf in free[self.keep :]:  # more unused than kept: back to the OS
                self._pages.remove(buf)
                buf.close()
            if free[: self.keep]:
                return _view(free[0], HUGE_PAGE)
            buf = _new_mapping(HUGE_PAGE)
            self._pages.append(buf)
            return _view(buf, HUGE_PAGE)  # under the lock: a page without a view looks unused

    def reserve(self, nbytes: int) -> None:
        """Make (and write: resident now) pages until `nbytes` of them exist, and keep that many unused."""
        pages = -(-nbytes // HUGE_PAGE)
        with self._lock:
            self.keep = max(self.keep, pages)
            while len(self._pages) < pages:
                buf = _new_mapping(HUGE_PAGE)
                _view(buf, HUGE_PAGE).zero_()
                self._pages.append(buf)

    def _unused(self) -> list[mmap.mmap]:
        unused = []
        for buf in self._pages:
            if sys.getrefcount(buf) == 3:  # the list, `buf` and the argument: no tensor's storage holds it
                unused.append(buf)
        return unused


POOL = PagePool()  # the process's pages for adapter copies (lora_grouped.on_huge_pages)


class Arena:
    """Copies of CPU tensors side by side (each on a cache line) in huge-page mappings of `chunk` bytes or more:
    no 2 MiB rounding per tensor, and tensors placed as they are made, so a model's load holds one extra
    copy of one weight at a time, not of all of them. Resident waste: the unwritten part of each mapping's
    last huge page. With a `pool`, the mappings are its pages (a tensor larger than a page gets a mapping of
    its own): memory that comes back, for copies that do."""

    def __init__(self, chunk: int = 64 << 20, pool: PagePool | None = None) -> None:
        self.chunk, self.pool = chunk, pool
        self._map, self._used = torch.empty(0, dtype=torch.uint8), 0  # the current mapping, bytes taken of it

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` (same shape and dtype, contiguous) in the arena; `t` can be dropped."""
        n = t.numel() * t.element_size()
        maps, at = self.slots([n])
        return maps[0][at[1] : at[1] + n].view(t.dtype).view(t.shape).copy_(t)

    def slots(self, sizes: list[int]) -> tuple[list[torch.Tensor], list[int]]:
        """Room for tensors of `sizes` bytes side by side, in order, each on a cache line: the mappings used
        (uint8) and per size its mapping's index and byte offset (flat pairs), for a caller that writes
        them itself (csrc/lora_pack.cpp)."""
        maps, at = [], []
        for n in sizes:
            if self._map.numel() - self._used < n:
                pooled = self.pool is not None and n <= HUGE_PAGE
                self._map, self._used = self.pool.take() if pooled else _mapped(max(self.chunk, n)), 0
            if not maps or maps[-1] is not self._map:
                maps.append(self._map)
            at += [len(maps) - 1, self._used]
            self._used += -(-n // ALIGN) * ALIGN
        return maps, at


def _mapped(nbytes: int) -> torch.Tensor:
    """uint8 [≥ nbytes] starting on a 2 MiB boundary of a fresh anonymous mapping marked MADV_HUGEPAGE."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    return _view(_new_mapping(size), size)


def _new_mapping(size: int) -> mmap.mmap:
    """An anonymous mapping with `size` bytes (a multiple of HUGE_PAGE) from a 2 MiB boundary on, marked."""
    # private: shared anonymous memory is shmem, whose huge pages follow another setting (shmem_enabled)
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # a huge page more: room to align
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None:
        start = _aligned_start(buf)
        with contextlib.suppress(OSError):  # THP compiled out: 4 KiB pages
            buf.madvise(advise, start, size)
    return buf


def _view(buf: mmap.mmap, size: int) -> torch.Tensor:
    """uint8 [size] of `buf` from its first 2 MiB boundary; holds `buf` (and the mapping) while a view lives."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + size]


def _aligned_start(buf: mmap.mmap) -> int:
    probe = torch.frombuffer(buf, dtype=torch.uint8, count=1)
    return -probe.data_ptr() % HUGE_PAGE


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
