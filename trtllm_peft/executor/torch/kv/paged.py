"""The paged KV cache's tensors: K and V `[layers, num_blocks, kv_heads, tokens_per_block, head_dim]`.

Allocated on 2 MiB pages where the OS gives them (huge_pages.py: decode attention reads a step's K/V from DRAM,
and 4 KiB pages cost a page walk per few blocks), nothing zero-filled up front (pages become resident only as
blocks are first written), and a block is cleared when a sequence takes it, so attention never reads stale
memory.
Sequences address it through block tables (kv/blocks.py); `tables()` packs them into the int32
`[B, max_blocks]` tensor the decode kernel and the torch ops read.
"""

from __future__ import annotations

import torch

from trtllm_peft.executor.torch import huge_pages


class PagedKVCache:
    """The K/V pool of `num_blocks` blocks of `tokens_per_block` tokens, all layers."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        tokens_per_block: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ) -> None:
        shape = (num_layers, num_blocks, num_kv_heads, tokens_per_block, head_dim)
        self.k = huge_pages.empty(shape, dtype, device)
        self.v = huge_pages.empty(shape, dtype, device)
        self.num_blocks, self.tokens_per_block = num_blocks, tokens_per_block
        self.device = torch.device(device)

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def clear(self, blocks: list[int]) -> None:
        """Zero newly taken blocks (their positions past a sequence's length are read, masked, as zeros)."""
        if blocks:
            idx = torch.tensor(blocks, device=self.device)
            self.k.index_fill_(1, idx, 0)  # in place, no index_put_ of a broadcast zero tensor
            self.v.index_fill_(1, idx, 0)

    def tables(self, tables: list[list[int]], width: int | None = None) -> torch.Tensor:
        """Block tables as int32 `[B, width]` (rows padded with block 0, never read past a row's length).

        One tensor from one padded list: it runs every iteration for every decoding row."""
        width = max(width or max((len(t) for t in tables), default=1), 1)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.device).reshape(len(tables), width)

    def _slots(self, blocks: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows [n·kv] of a layer viewed as `[num_blocks·kv·tpb, hd]` for tokens at (block, offset) [n]."""
        kv = self.k.shape[2]
        heads = torch.arange(kv, device=self.device)
        return ((blocks[:, None] * kv + heads[None, :]) * self.tokens_per_block + offs[:, None]).reshape(-1)

    def rows(self, table: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """The rows [n·kv] of positions start..start+n-1 of the sequence whose block table is `table`, in
        every layer (see `put`): computed once per iteration, not once per layer."""
        pos = torch.arange(start, start + n, device=self.device)
        return self._slots(table.long()[pos // self.tokens_per_block], pos % self.tokens_per_block)

    def put(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v `[n, kv, hd]` into `rows` [n·kv] of the layer (from `rows` / `_slots`)."""
        # one index_copy_ into a 2-D view: advanced indexing of the 5-D pool would permute the whole layer
        hd = k.shape[-1]
        self.k[layer].view(-1, hd).index_copy_(0, rows, k.reshape(-1, hd))
        self.v[layer].view(-1, hd).index_copy_(0, rows, v.reshape(-1, hd))

    def write(self, layer: int, table: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v `[n, kv, hd]` at positions start..start+n-1 of the sequence whose block table is `table`."""
        self.put(layer, self.rows(table, start, k.shape[0]), k, v)

    def gather(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K and V at positions 0..length-1, `[kv, length, hd]` each (a copy)."""
        nb = -(-length // self.tokens_per_block)
        idx = table[:nb].long()
        k, v = self.k[layer].index_select(0, idx), self.v[layer].index_select(0, idx)  # [nb, kv, tpb, hd]
        kv, hd = k.shape[1], k.shape[3]
        k = k.transpose(0, 1).reshape(kv, nb * self.tokens_per_block, hd)[:, :length]
        v = v.transpose(0, 1).reshape(kv, nb * self.tokens_per_block, hd)[:, :length]
        return k, v

    def write_step(
        self, layer: int, tables: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """One token per row: k, v `[B, kv, hd]` at `positions` [B] through `tables` [B, W]."""
        rows = torch.arange(k.shape[0], device=self.device)
        blocks = tables.long()[rows, positions // self.tokens_per_block]
        self.put(layer, self._slots(blocks, positions % self.tokens_per_block), k, v)

    def gather_rows(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's K and V at positions 0..length-1, `[B, kv, length, hd]` (a copy; rows padded)."""
        nb = -(-length // self.tokens_per_block)
        idx = tables[:, :nb].long()
        b = idx.shape[0]
        k = self.k[layer].index_select(0, idx.reshape(-1)).unflatten(0, (b, nb))  # [B, nb, kv, tpb, hd]
        v = self.v[layer].index_select(0, idx.reshape(-1)).unflatten(0, (b, nb))
        _, _, kv, tpb, hd = k.shape
        k = k.transpose(1, 2).reshape(b, kv, nb * tpb, hd)[:, :, :length]
        v = v.transpose(1, 2).reshape(b, kv, nb * tpb, hd)[:, :, :length]
        return k, v
