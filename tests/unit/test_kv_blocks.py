"""The paged KV cache's block manager alone: accounting, reference counts, reuse keys, LRU eviction."""

from __future__ import annotations

import random

import pytest

from trtllm_peft.executor.torch.kv import BlockManager

TPB = 4


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 131 + i * 7) % 1000 for i in range(n)]


def run(bm: BlockManager, sid: int, tokens: list[int], task=None, max_tokens=None, generate=0) -> int:
    """Admit, prefill, generate `generate` tokens (taking blocks as they come), store; the reused tokens."""
    reused = bm.admit(sid, task, tokens, max_tokens or len(tokens) + generate)
    bm.ensure(sid, len(tokens))
    bm.store(sid, tokens, len(tokens))
    for i in range(generate):
        bm.ensure(sid, len(tokens) + i + 1)
    return reused


def test_thousands_of_random_admit_finish_cancel_cycles_leak_nothing():
    rng = random.Random(0)
    bm = BlockManager(64, TPB, enable_block_reuse=True)
    live: dict[int, tuple[list[int], int, int]] = {}  # seq -> (tokens, cached, max)
    shared = [prompt(rng.randrange(1, 40), s) for s in range(6)]  # common prefixes, so reuse happens
    for sid in range(5000):
        action = rng.random()
        if action < 0.45:  # a new request (some share a prefix), maybe waiting for blocks
            base = rng.choice(shared)[: rng.randrange(1, 41)] + prompt(rng.randrange(0, 9), sid)
            task = rng.choice([None, 1, 2])
            full = len(base) + rng.randrange(1, 12)
            if bm.can_admit(task, base, full):
                cached = bm.admit(sid, task, base, full)
                assert cached % TPB == 0 and cached < len(base)
                live[sid] = (base, cached, full)
            else:
                with pytest.raises(ValueError):
                    bm.admit(sid, task, base, full)
        elif action < 0.85 and live:  # a step: prefill the rest or decode one token
            sid_ = rng.choice(list(live))
            toks, cached, full = live[sid_]
            n = len(toks) - cached if cached < len(toks) else 1
            if cached + n > full:
                continue
            bm.ensure(sid_, cached + n)
            if cached + n > len(toks):
                toks = toks + [rng.randrange(1000)]
            live[sid_] = (toks, cached + n, full)
            bm.store(sid_, toks, cached + n)
        elif live:  # finish or cancel (same release)
            gone = rng.choice(list(live))
            del live[gone]
            bm.release(gone)
        bm.check()
    for sid in list(live):
        bm.release(sid)
        del live[sid]
    bm.check()
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    assert bm.stats.reused_blocks > 100, "the random workload should have reused blocks"


def test_reuse_is_keyed_by_task_and_every_token_up_to_the_block():
    bm = BlockManager(32, TPB, enable_block_reuse=True)
    p = prompt(13)
    assert run(bm, 1, p, task=7) == 0
    bm.release(1)
    assert run(bm, 2, p, task=7) == 12  # 3 full blocks; the last token is always recomputed
    assert run(bm, 3, p, task=8) == 0  # another adapter (or a modified one: a new task id) never hits
    assert run(bm, 4, p, task=None) == 0  # nor the base model
    changed = p[:5] + [999] + p[6:]
    assert run(bm, 5, changed, task=7) == 4  # only the blocks before the first changed token
    assert run(bm, 6, p[:9], task=7) == 8  # a shorter prompt reuses the blocks it fully contains
    assert run(bm, 7, p[:8], task=7) == 4  # ... but never its own last token
    bm.check()


def test_reused_blocks_are_shared_and_reference_counted():
    bm = BlockManager(16, TPB, enable_block_reuse=True)
    p = prompt(9)
    run(bm, 1, p)
    assert run(bm, 2, p) == 8  # reused while the first still runs
    assert bm.table(1)[:2] == bm.table(2)[:2] and bm.table(1)[2] != bm.table(2)[2]
    used = bm.num_used
    bm.release(1)
    assert bm.num_used == used - 1  # the shared blocks are still referenced by 2; only 1's own one is back
    bm.release(2)
    assert bm.num_used == 0 and bm.num_reusable == 2
    bm.check()


def test_only_unreferenced_blocks_are_evicted_least_recently_released_first():
    bm = BlockManager(8, TPB, enable_block_reuse=True)
    a, b, c = prompt(9, 1), prompt(9, 2), prompt(9, 3)
    run(bm, 1, a)
    bm.release(1)  # a's 2 full blocks reusable
    run(bm, 2, b)
    bm.release(2)  # b's too, released after a's
    assert bm.num_reusable == 4
    run(bm, 3, c, max_tokens=24)
    bm.ensure(3, 24)  # 6 blocks: the 4 never stored, then a's two (released first) are evicted
    assert bm.num_reusable == 2 and bm.num_free == 2
    with pytest.raises(ValueError):  # b's blocks may be evicted, c's (referenced) never: 3 blocks won't fit
        bm.admit(4, None, prompt(9, 4), 12)
    bm.release(3)
    assert run(bm, 5, a) == 0  # a is gone
    assert run(bm, 6, b) == 8  # b, released later, is intact
    bm.check()


def test_admission_waits_for_blocks_promised_to_running_sequences():
    bm = BlockManager(8, TPB)
    bm.admit(1, None, prompt(5), 20)  # promised 5 blocks, holds none yet
    assert bm.num_used == 0 and bm.num_free == 3
    assert not bm.can_admit(None, prompt(5, 2), 16)  # 4 blocks: would overcommit
    assert bm.can_admit(None, prompt(5, 2), 12)
    bm.ensure(1, 20)
    with pytest.raises(ValueError, match="grew past"):
        bm.ensure(1, 21)
    bm.release(1)
    assert bm.can_admit(None, prompt(5, 2), 32) and bm.num_free == 8
    bm.check()


def test_without_reuse_nothing_is_stored_and_freed_blocks_are_taken_again_first():
    bm = BlockManager(8, TPB)
    p = prompt(9)
    run(bm, 1, p)
    first = list(bm.table(1))
    bm.release(1)
    assert run(bm, 2, p) == 0 and bm.num_reusable == 0
    assert sorted(bm.table(2)) == sorted(first)  # the pool's touched memory is what gets used again
    bm.check()
