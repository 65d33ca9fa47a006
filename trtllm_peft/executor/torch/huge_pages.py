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
"""

from __future__ import annotations

import contextlib
import mmap

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor placed in an arena starts on a cache line


def empty(shape: tuple[int, ...], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty(shape, dtype) on 2 MiB pages where the OS gives them (CPU); elsewhere torch.empty."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = dtype.itemsize * _numel(shape)
    return _mapped(n)[:n].view(dtype).view(shape)


class Arena:
    """Copies of CPU tensors side by side (each on a cache line) in huge-page mappings of `chunk` bytes or more:
    no 2 MiB rounding per tensor, and tensors placed as they are made, so a model's load holds one extra
    copy of one weight at a time, not of all of them. Resident waste: the unwritten part of each mapping's
    last huge page."""

    def __init__(self, chunk: int = 64 << 20) -> None:
        self.chunk = chunk
        self._free = torch.empty(0, dtype=torch.uint8)  # the current mapping's unused bytes

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` (same shape and dtype, contiguous) in the arena; `t` can be dropped."""
        n = t.numel() * t.element_size()
        if self._free.numel() < n:
            self._free = _mapped(max(self.chunk, n))
        view = self._free[:n].view(t.dtype).view(t.shape).copy_(t)
        self._free = self._free[-(-n // ALIGN) * ALIGN :]
        return view


def _mapped(nbytes: int) -> torch.Tensor:
    """uint8 [≥ nbytes] starting on a 2 MiB boundary of a fresh anonymous mapping marked MADV_HUGEPAGE."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private: shared anonymous memory is shmem, whose huge pages follow another setting (shmem_enabled)
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # a huge page more: room to align
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # holds `buf` (and the mapping) as long as a view lives
    start = -raw.data_ptr() % HUGE_PAGE
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # THP compiled out: 4 KiB pages
            buf.madvise(advise, start, size)
    return raw[start : start + size]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
