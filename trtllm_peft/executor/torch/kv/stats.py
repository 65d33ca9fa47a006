"""The paged cache's figures in TensorRT-LLM's KvCacheStats (executor/types.h, 1.2), per iteration."""

from __future__ import annotations

from trtllm_peft.executor.api import KvCacheStats
from trtllm_peft.executor.torch.kv.blocks import BlockManager


def kv_cache_stats(blocks: BlockManager) -> KvCacheStats:
    """Block counts now, and the reuse counters since start (kvCacheManager.cpp getKvCacheStats: allocTotal =
    new + reused; the hit rate is reused / (reused + missed) blocks looked up at admission)."""
    st = blocks.stats
    looked_up = st.reused_blocks + st.missed_blocks
    return KvCacheStats(
        max_num_blocks=blocks.num_blocks,
        free_num_blocks=blocks.num_blocks - blocks.num_used,
        used_num_blocks=blocks.num_used,
        tokens_per_block=blocks.tokens_per_block,
        alloc_total_blocks=blocks.taken_blocks + st.reused_blocks,
        alloc_new_blocks=blocks.taken_blocks,
        reused_blocks=st.reused_blocks,
        missed_blocks=st.missed_blocks,
        cache_hit_rate=st.reused_blocks / looked_up if looked_up else 0.0,
    )
