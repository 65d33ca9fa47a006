"""The reference engine's paged KV cache: block manager (pure bookkeeping) and the K/V block pool."""

from trtllm_peft.executor.torch.kv.blocks import BlockManager, ReuseStats, SeqBlocks
from trtllm_peft.executor.torch.kv.paged import PagedKVCache
from trtllm_peft.executor.torch.kv.stats import kv_cache_stats

__all__ = ["BlockManager", "PagedKVCache", "ReuseStats", "SeqBlocks", "kv_cache_stats"]
