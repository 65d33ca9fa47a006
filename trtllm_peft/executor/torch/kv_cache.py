"""The KV cache: one preallocated tensor per K and V, a row per running sequence.

Rows are kept compact — the running batch always occupies rows 0..B-1 — so a decode step reads
`k[layer, :B, :, :L]` as a view, never a gather. When a sequence leaves, the last row moves into its place
(`move`), once, instead of every step paying for an index.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V `[layers, rows, kv_heads, max_seq_len, head_dim]` sized by the memory plan."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ) -> None:
        shape = (num_layers, rows, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows, self.max_seq_len = rows, max_seq_len
        self._arange = torch.arange(rows, device=device)

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_prompt(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, kv, hd] at positions 0..T-1 of `row`."""
        t = k.shape[0]
        self.k[layer, row, :, :t] = k.transpose(0, 1)
        self.v[layer, row, :, :t] = v.transpose(0, 1)

    def write_step(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row 0..B-1 (k, v [B, kv, hd] at `positions` [B]); views [B, kv, length, hd]."""
        b = k.shape[0]
        rows = self._arange[:b]
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v
        return self.k[layer, :b, :, :length], self.v[layer, :b, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (compaction)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]
