"""The block manager of the paged KV cache: a pure data structure (no tensors), tested alone.

TensorRT-LLM's semantics (cpp/tensorrt_llm/batch_manager/kvCacheManager.cpp, 1.2):
* the cache is `num_blocks` blocks of `tokens_per_block` tokens; a sequence holds a block table, and takes a
  block when its tokens reach it (`addToken` → `allocateBlock`), returning all of them when it ends
  (`releaseBlocks`);
* the capacity scheduler's default policy, GUARANTEED_NO_EVICT (executor.h `SchedulerConfig`,
  capacityScheduler.cpp), admits a request only when the blocks it can ever need (prompt + max new tokens)
  are free beside what running requests were promised: a running request never runs out of blocks, a new one
  waits;
* with block reuse (`KvCacheConfig.enable_block_reuse`), a full block is stored under a key of the LoRA task
  id and every token id up to and including the block (`BlockKey`: `loraTaskId` + tokens, chained through
  the parent block), matched at admission (`loadOrAllocateBlocks`), shared read-only and reference-counted;
  unreferenced stored blocks stay reusable until evicted least-recently-released first
  (evictionPolicy.cpp `LRUEvictionPolicy`), and only unreferenced blocks are ever evicted. The last prompt
  token is always recomputed (its logits are needed), so at most `(prompt_len - 1) // tokens_per_block`
  blocks match.

Keys are 16-byte BLAKE2b digests chained block to block: key_j = H(key_{j-1}, tokens of block j), key_{-1} =
H(task id). Equal keys mean equal (task id, all tokens up to and including block j) up to a 2^-64 collision.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


def _digest(parent: bytes, tokens) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def root_key(task_id: int | None) -> bytes:
    """The chain's start: the LoRA task id (None = the base model), so adapters never share blocks."""
    return _digest(b"base" if task_id is None else b"task", [-1 if task_id is None else task_id])


@dataclass
class SeqBlocks:
    """One sequence's block table and what it may still take."""

    task_id: int | None
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # keys of its first len(keys) (full) blocks
    reserved: int = 0  # blocks promised at admission and not yet taken
    stored: int = 0  # leading blocks already offered to the reuse index


@dataclass
class ReuseStats:
    """Prefix-cache counters, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits) and blocks."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    reused_blocks: int = 0
    missed_blocks: int = 0


class BlockManager:
    """Block tables, reference counts, the reuse index and its LRU; `check()` asserts the invariants."""

    def __init__(self, num_blocks: int, tokens_per_block: int, *, enable_block_reuse: bool = False) -> None:
        if num_blocks < 1 or tokens_per_block < 1:
            raise ValueError("num_blocks and tokens_per_block must be >= 1")
        self.num_blocks, self.tokens_per_block = num_blocks, tokens_per_block
        self.enable_block_reuse = enable_block_reuse
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids (and just-freed ones) first
        self._ref = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # stored block -> its key
        self._index: dict[bytes, int] = {}  # key -> stored block
        self._lru: OrderedDict[int, None] = OrderedDict()  # stored, unreferenced; oldest first
        self._reserved = 0
        self.taken_blocks = 0  # blocks handed out fresh (not reused), ever
        self.seqs: dict[int, SeqBlocks] = {}
        self.stats = ReuseStats()

    # ---- capacity ------------------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    @property
    def num_free(self) -> int:
        """Blocks neither referenced nor promised (stored-but-unreferenced ones count: they can be evicted)."""
        return len(self._free) + len(self._lru) - self._reserved

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_reusable(self) -> int:
        """Stored blocks no sequence references (reusable, evictable)."""
        return len(self._lru)

    # ---- admission -----------------------------------------------------------------------------------

    def match(self, task_id: int | None, prompt: list[int]) -> list[int]:
        """The stored blocks holding the longest reusable prefix of `prompt` (never its last token)."""
        if not self.enable_block_reuse:
            return []
        tpb, found, key = self.tokens_per_block, [], root_key(task_id)
        for j in range((len(prompt) - 1) // tpb):
            key = _digest(key, prompt[j * tpb : (j + 1) * tpb])
            block = self._index.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def can_admit(self, task_id: int | None, prompt: list[int], max_tokens: int) -> bool:
        """Whether a sequence that may reach `max_tokens` tokens fits beside the promises already made."""
        matched = self.match(task_id, prompt)
        revived = sum(1 for b in matched if b in self._lru)  # unreferenced now, referenced once admitted
        return self.blocks_for(max_tokens) - len(matched) <= self.num_free - revived

    def admit(self, seq_id: int, task_id: int | None, prompt: list[int], max_tokens: int) -> int:
        """Reference the matched prefix and promise the rest; returns how many prompt tokens are reused.

        The caller checks `can_admit` first (ValueError otherwise: admission never overcommits).
        """
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if not self.can_admit(task_id, prompt, max_tokens):
            raise ValueError(f"sequence {seq_id} does not fit: {self.num_free} blocks free")
        matched = self.match(task_id, prompt)
        for b in matched:
            self._lru.pop(b, None)
            self._ref[b] += 1
        seq = SeqBlocks(task_id, blocks=list(matched), stored=len(matched))
        seq.keys = [self._key_of[b] for b in matched]
        seq.reserved = self.blocks_for(max_tokens) - len(matched)
        self._reserved += seq.reserved
        self.seqs[seq_id] = seq
        if self.enable_block_reuse:
            full = (len(prompt) - 1) // self.tokens_per_block
            self.stats.queried_tokens += len(prompt)
            self.stats.hit_tokens += len(matched) * self.tokens_per_block
            self.stats.reused_blocks += len(matched)
            self.stats.missed_blocks += full - len(matched)
        return len(matched) * self.tokens_per_block

    # ---- running -------------------------------------------------------------------------------------

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Take blocks (from the sequence's promise) until its table covers `num_tokens`; the new blocks."""
        seq = self.seqs[seq_id]
        new = []
        while len(seq.blocks) < self.blocks_for(num_tokens):
            if seq.reserved < 1:
                raise ValueError(f"sequence {seq_id} grew past the {len(seq.blocks)} blocks it was promised")
            seq.reserved -= 1
            self._reserved -= 1
            new.append(self._take())
            seq.blocks.append(new[-1])
        return new

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently released stored block (never a referenced one)
            block, _ = self._lru.popitem(last=False)
            del self._index[self._key_of.pop(block)]
        self._ref[block] = 1
        self.taken_blocks += 1
        return block

    def store(self, seq_id: int, tokens: list[int], num_cached: int) -> None:
        """Offer the sequence's full blocks (their K/V computed: `num_cached` tokens) to the reuse index."""
        if not self.enable_block_reuse:
            return
        seq, tpb = self.seqs[seq_id], self.tokens_per_block
        full = min(num_cached // tpb, len(seq.blocks))
        key = seq.keys[-1] if seq.keys else root_key(seq.task_id)
        for j in range(len(seq.keys), full):
            key = _digest(key, tokens[j * tpb : (j + 1) * tpb])
            seq.keys.append(key)
        for j in range(seq.stored, full):
            block = seq.blocks[j]
            if seq.keys[j] not in self._index and block not in self._key_of:
                self._index[seq.keys[j]] = block
                self._key_of[block] = seq.keys[j]
        seq.stored = max(seq.stored, full)

    def release(self, seq_id: int) -> None:
        """The sequence ended: drop its references and its unused promise.

        Stored blocks become reusable (the last block first in the LRU, so a chain is evicted from its
        tail); the others are free at once.
        """
        seq = self.seqs.pop(seq_id)
        self._reserved -= seq.reserved
        for block in reversed(seq.blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._key_of:
                    self._lru[block] = None
                else:
                    self._free.append(block)

    def table(self, seq_id: int) -> list[int]:
        return self.seqs[seq_id].blocks

    # ---- invariants (tests) --------------------------------------------------------------------------

    def check(self) -> None:
        """Every block is exactly one of free / reusable / referenced; counts and index agree."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "a block is free twice"
        assert not free & lru, "a block is both free and reusable"
        refs = [0] * self.num_blocks
        for seq in self.seqs.values():
            for b in seq.blocks:
                refs[b] += 1
        assert refs == self._ref, "reference counts disagree with the block tables"
        for b in range(self.num_blocks):
            assert (b in free) + (b in lru) + (refs[b] > 0) == 1, f"block {b} is in no state or several"
        assert all(b in self._key_of for b in lru), "a reusable block without a key"
        assert {self._index[k]: k for k in self._index} == self._key_of, "index and keys disagree"
        assert self._reserved == sum(s.reserved for s in self.seqs.values()) >= 0, "promises disagree"
        assert self.num_free >= 0, "more promised than the cache holds"
