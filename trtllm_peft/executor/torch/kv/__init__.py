"""The reference engine's paged KV cache: block manager (pure bookkeeping) and the K/V block pool."""

from trtllm_peft.executor.torch.kv.blocks import BlockManager, ReuseStats, SeqBlocks
from trtllm_peft.executor.torch.kv.paged import PagedKVCache

__all__ = ["BlockManager", "PagedKVCache", "ReuseStats", "SeqBlocks"]
