"""The reference engine's paged KV cache seen through the executor: block reuse, chunked prefill, admission.

Reuse must be invisible in the outputs: a prompt whose prefix blocks come from the cache gives the same
greedy tokens, and log-probs within 1e-5, as the same prompt computed from scratch — base and adapters in one
mixed batch, through both op implementations. Blocks are never shared across LoRA tasks (a modified adapter
is a new task id). Chunked prefill (`enable_chunked_context`, chunks interleaved with running decodes) gives
the same tokens as whole prefill. A KV cache too small for every request makes requests wait, not fail.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_engine, make_peft_adapter
from trtllm_peft import formats
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.api import KvCacheConfig, LoraConfig, OutputConfig, Request
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.lora import pack

N_NEW = 8
PREFIX = [(i * 37 + 11) % 59 + 3 for i in range(100)]  # a shared "system prompt" (3 blocks), vocab 64
SUFFIXES = [[5, 9, 3], [7, 8, 2, 40, 41], [60, 1], [12, 9, 9, 30]]
REUSE_OFF = KvCacheConfig(enable_block_reuse=False)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_engine"), max_seq_len=256)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, engine):
    """Two adapters' TensorRT-LLM tensors, and a modified copy of the first (other weights)."""
    spec = EngineDir.open(engine).spec
    out = {}
    for name, seed in (("a", 1), ("b", 2), ("a_modified", 3)):
        d = tmp_path_factory.mktemp(name)
        make_peft_adapter(d, seed=seed, r=4, lora_alpha=8)
        out[name] = pack(formats.load_for_engine(d, spec), torch.float32)
    return out


def request(prompt, packed=None, task=None, n=N_NEW, **kw) -> Request:
    lora = LoraConfig(task, packed.weights, packed.config) if task is not None else None
    out = OutputConfig(return_log_probs=True, exclude_input_from_output=True)
    return Request(list(prompt), n, output_config=out, lora_config=lora, **kw)


def run(
    ex: TorchExecutor, reqs: list[Request], timeout: float = 300.0
) -> list[tuple[list[int], list[float]]]:
    """Each request's generated tokens and log-probs (streams concatenated), in request order."""
    ids = ex.enqueue_requests(reqs)
    got: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in ids}
    done, deadline = set(), time.monotonic() + timeout
    while len(done) < len(ids) and time.monotonic() < deadline:
        for r in ex.await_responses(timeout=1.0):
            assert not r.has_error(), r.error_msg
            got[r.request_id][0].extend(r.result.output_token_ids[0])
            got[r.request_id][1].extend(r.result.log_probs[0])
            if r.result.is_final:
                done.add(r.request_id)
    assert len(done) == len(ids), f"only {len(done)} of {len(ids)} requests finished"
    return [got[i] for i in ids]


def kv_stats(ex: TorchExecutor):
    stats = [s for s in ex.get_latest_iteration_stats() if s.kv_cache_stats is not None]
    return stats[-1].kv_cache_stats if stats else None


def mixed_batch(packed) -> list[Request]:
    """Base and both adapters, each prompt = the shared prefix + its own suffix."""
    plan = [(None, None), ("a", 1), ("b", 2), ("a", 1)]
    return [
        request(PREFIX + s, packed[name] if name else None, task, streaming=i % 2 == 0)
        for i, ((name, task), s) in enumerate(zip(plan, SUFFIXES, strict=True))
    ]


def assert_same(got, want, tol: float = 1e-5) -> None:
    for (toks, lps), (ref_toks, ref_lps) in zip(got, want, strict=True):
        assert toks == ref_toks
        assert max(abs(x - y) for x, y in zip(lps, ref_lps, strict=True)) <= tol


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_reused_prefix_gives_the_same_tokens_and_log_probs_in_mixed_batches(engine, packed, cpu_kernels):
    kw = dict(memory_budget_bytes=2**30, cpu_kernels=cpu_kernels)
    with TorchExecutor(engine, kv_cache_config=REUSE_OFF, **kw) as ex:
        want = run(ex, mixed_batch(packed))
        assert kv_stats(ex).reused_blocks == 0
    with TorchExecutor(engine, kv_cache_config=KvCacheConfig(enable_block_reuse=True), **kw) as ex:
        # warm the cache: the prefix for the base model and for each adapter, computed once
        run(
            ex,
            [
                request(PREFIX + [1], packed[n] if n else None, t)
                for n, t in ((None, None), ("a", 1), ("b", 2))
            ],
        )
        before = kv_stats(ex)
        got = run(ex, mixed_batch(packed))
        after = kv_stats(ex)
    assert after.reused_blocks - before.reused_blocks == 4 * 3  # every request reused the 3 prefix blocks
    assert_same(got, want)


def test_no_reuse_across_adapters_nor_across_a_modified_adapter(engine, packed):
    with TorchExecutor(engine, kv_cache_config=REUSE_OFF, memory_budget_bytes=2**30) as ex:
        want = run(
            ex, [request(PREFIX + [4], packed["b"], 2), request(PREFIX + [4], packed["a_modified"], 3)]
        )
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:  # KvCacheConfig's default: reuse on
        run(ex, [request(PREFIX + [4], packed["a"], 1), request(PREFIX + [4])])  # adapter a and base warm
        stats = kv_stats(ex)
        assert stats.reused_blocks == 0 and stats.missed_blocks == 6
        got = run(ex, [request(PREFIX + [4], packed["b"], 2)])  # another adapter
        got += run(ex, [request(PREFIX + [4], packed["a_modified"], 3)])  # adapter a modified: a new task id
        assert kv_stats(ex).reused_blocks == 0
        run(ex, [request(PREFIX + [4], packed["a"], 1)])  # ... while the same adapter does hit
        assert kv_stats(ex).reused_blocks == 3
    assert_same(got, want)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_chunked_prefill_gives_the_same_tokens_as_whole_prefill(engine, packed, cpu_kernels):
    kw = dict(memory_budget_bytes=2**30, cpu_kernels=cpu_kernels, kv_cache_config=REUSE_OFF)
    reqs = lambda: [request(PREFIX[:40], n=30)] + mixed_batch(packed)  # noqa: E731
    with TorchExecutor(engine, **kw) as ex:
        want = run(ex, reqs())
    with TorchExecutor(engine, enable_chunked_context=True, max_num_tokens=40, **kw) as ex:
        got = run(ex, reqs())
        stats = [s for s in ex.get_latest_iteration_stats() if s.num_context_tokens]
    # prompts went in pieces of at most 40 tokens per iteration (decodes included), alongside decodes
    assert all(s.num_context_tokens + s.num_gen_tokens <= 40 for s in stats)
    assert any(s.num_context_tokens and s.num_gen_tokens for s in stats)
    assert sum(s.num_context_tokens for s in stats) == 40 + sum(len(PREFIX) + len(s) for s in SUFFIXES)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert_same(got, want, tol=1e-4)


def test_out_of_blocks_admission_waits_instead_of_failing(engine, packed):
    reqs = lambda: [request(PREFIX[: 60 + i], n=40) for i in range(5)]  # noqa: E731  ≤ 104 tokens: 4 blocks
    with TorchExecutor(engine, memory_budget_bytes=2**30, kv_cache_config=REUSE_OFF) as ex:
        want = run(ex, reqs())
    small = KvCacheConfig(enable_block_reuse=False, max_tokens=256)  # 8 blocks: two such requests at a time
    with TorchExecutor(engine, memory_budget_bytes=2**30, kv_cache_config=small) as ex:
        assert ex.blocks.num_blocks == 8
        got = run(ex, reqs())
        stats = ex.get_latest_iteration_stats()
    assert max(s.num_active_requests for s in stats) == 2
    assert max(s.num_queued_requests for s in stats) >= 3
    assert all(s.kv_cache_stats.used_num_blocks <= 8 for s in stats)
    assert stats[-1].kv_cache_stats.used_num_blocks == 0  # every block came back
    assert_same(got, want)
