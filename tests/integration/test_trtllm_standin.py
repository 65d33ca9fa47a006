"""TrtllmExecutor end to end on the TensorRT-LLM stand-in (tests/trtllm_standin), against TorchExecutor.

The stand-in holds TensorRT-LLM 1.2's request path and paged PEFT cache and lets the reference engine
generate, so these tests prove the glue: our api types in, TensorRT-LLM's types and tensors across the
boundary, our Responses out — same greedy tokens as the reference engine; not-cached → error text → one
resend with weights; host cache full of active adapters → TensorRT-LLM's text; device pages make requests wait.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import trtllm_standin
from tests.conftest import build_tiny_engine, cancel_mid_stream, make_peft_adapter
from trtllm_peft import formats
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.api import FinishReason, LoraConfig, OutputConfig, Request
from trtllm_peft.executor.errors import ErrorKind, classify
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.executor.trtllm import TrtllmExecutor
from trtllm_peft.lora import load_spec, pack
from trtllm_peft.settings import Settings

PROMPTS = [[1, 5, 9, 3, 4, 22, 17], [7, 8, 2], [3, 3, 40, 41, 12, 9, 9, 30, 31, 2, 6], [60, 1]]
ADAPTERS = {
    "all_r4": dict(seed=1, r=4, lora_alpha=8),
    "qv_r8": dict(seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp_rs16": dict(
        seed=3, r=16, lora_alpha=12, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]
    ),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("standin_engine"), max_seq_len=96)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, engine):
    """name → (adapter directory, packed tensors in the engine dtype)."""
    spec = load_spec(engine)
    out = {}
    for name, kw in ADAPTERS.items():
        d = tmp_path_factory.mktemp(name)
        make_peft_adapter(d, **kw)
        out[name] = (d, pack(formats.load_for_engine(d, spec), spec.torch_dtype))
    return out


@pytest.fixture
def trt(engine, monkeypatch):
    """A TrtllmExecutor on the stand-in; `trt(gpu, cpu)` makes one with other cache sizes."""
    trtllm_standin.install(monkeypatch)
    made = []

    def make(max_gpu_loras: int = 4, max_cpu_loras: int = 8) -> TrtllmExecutor:
        ex = TrtllmExecutor(engine, max_gpu_loras=max_gpu_loras, max_cpu_loras=max_cpu_loras)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.shutdown()


def request(prompt, packed=None, task=None, *, send=True, n=6, **kw) -> Request:
    lora = (
        None
        if task is None
        else LoraConfig(task, packed.weights, packed.config)
        if send
        else LoraConfig(task)
    )
    return Request(
        prompt, n, output_config=OutputConfig(exclude_input_from_output=True), lora_config=lora, **kw
    )


def finals(ex, ids: list[int], timeout: float = 60.0) -> dict[int, object]:
    """Final Response per id; streaming deltas concatenated into it."""
    done, acc, deadline = {}, {}, time.monotonic() + timeout
    while len(done) < len(ids) and time.monotonic() < deadline:
        for r in ex.await_responses(timeout=0.5):
            if r.has_error():
                done[r.request_id] = r
                continue
            acc.setdefault(r.request_id, []).extend(r.result.output_token_ids[0])
            if r.result.is_final:
                r.result.output_token_ids = [acc[r.request_id]]
                done[r.request_id] = r
    assert len(done) == len(ids), f"{len(done)} of {len(ids)} finished"
    return done


def run(ex, reqs: list[Request]) -> list[object]:
    ids = ex.enqueue_requests(reqs)
    got = finals(ex, ids)
    return [got[i] for i in ids]


def tokens(responses) -> list[list[int] | str]:
    return [r.error_msg if r.has_error() else r.result.output_token_ids[0] for r in responses]


def plan(adapters):
    names = [None, *ADAPTERS]
    return [(p, names[i % 4]) for i, p in enumerate(PROMPTS * 2)]


def test_same_greedy_tokens_as_the_reference_engine(trt, engine, adapters):
    tasks = {n: i + 1 for i, n in enumerate(ADAPTERS)}
    reqs = [request(p, adapters[a][1] if a else None, tasks.get(a)) for p, a in plan(adapters)]
    streamed = [
        request(p, adapters[a][1] if a else None, tasks.get(a), streaming=True) for p, a in plan(adapters)
    ]
    ex = trt()
    via_trt, via_trt_stream = tokens(run(ex, reqs)), tokens(run(ex, streamed))
    with TorchExecutor(engine, memory_budget_bytes=2**30, device="cpu") as ref:
        via_torch = tokens(run(ref, reqs))
    assert all(isinstance(t, list) and len(t) == 6 for t in via_torch), via_torch
    assert via_trt == via_torch == via_trt_stream
    assert len({tuple(t) for t in via_torch[:4]}) == 4  # the adapters change the output: a real comparison


def test_tensors_cross_the_boundary_as_tensorrt_llm_wants_them(trt, adapters):
    ex = trt()
    packed = adapters["qv_r8"][1]
    run(ex, [request(PROMPTS[0], packed, 9)])
    (seen,) = ex._exec.requests_seen
    lc = seen.lora_config
    assert lc.weights.ndim == 2 and lc.config.ndim == 2 and lc.config.dtype == torch.int32
    assert lc.weights.dtype == ex.dtype and not lc.weights.is_cuda and lc.weights.is_contiguous()
    assert torch.equal(lc.weights, packed.weights) and torch.equal(lc.config, packed.config)


def test_npy_files_go_in_as_read(trt, engine, adapters, tmp_path):
    """model.lora_*.npy ([1, N, W], [1, N, 4]) loaded with numpy and handed over as is."""
    spec = load_spec(engine)
    formats.save(formats.load_for_engine(adapters["all_r4"][0], spec), tmp_path / "npy", "trtllm", spec)
    w = np.load(tmp_path / "npy" / "model.lora_weights.npy")
    c = np.load(tmp_path / "npy" / "model.lora_config.npy")
    assert w.ndim == 3 and c.ndim == 3
    ex = trt()
    (from_npy,) = run(ex, [Request(PROMPTS[2], 6, lora_config=LoraConfig(4, w, c))])
    (from_pack,) = run(ex, [Request(PROMPTS[2], 6, lora_config=LoraConfig(5, *_packed(adapters["all_r4"])))])
    assert tokens([from_npy]) == tokens([from_pack])


def _packed(entry):
    return entry[1].weights, entry[1].config


def test_not_cached_error_then_one_resend_with_weights(trt, engine, adapters):
    ex = trt()
    packed = adapters["all_r4"][1]
    (miss,) = run(ex, [request(PROMPTS[1], task=21, send=False)])
    assert miss.error_msg == "LoRA task 21 not found in cache. Please send LoRA weights with request"
    assert classify(miss.error_msg) is ErrorKind.NOT_CACHED
    (resent,) = run(ex, [request(PROMPTS[1], packed, 21)])
    (cached,) = run(ex, [request(PROMPTS[1], task=21, send=False)])  # now held: the id alone is enough
    with TorchExecutor(engine, memory_budget_bytes=2**30, device="cpu") as ref:
        (want,) = run(ref, [request(PROMPTS[1], packed, 21)])
    assert tokens([resent]) == tokens([cached]) == tokens([want])


def test_host_cache_full_of_active_adapters(trt, adapters):
    ex = trt(max_gpu_loras=1, max_cpu_loras=1)
    busy = ex.enqueue_request(request(PROMPTS[0], adapters["all_r4"][1], 1, n=40))
    rid = ex.enqueue_request(request(PROMPTS[1], adapters["qv_r8"][1], 2))
    (full,) = ex.await_responses(rid, timeout=30)
    assert full.error_msg == "PEFT Cache is full. Could not store taskId=2"
    assert classify(full.error_msg) is ErrorKind.CACHE_FULL
    assert not finals(ex, [busy])[busy].has_error()
    (ok,) = run(ex, [request(PROMPTS[1], adapters["qv_r8"][1], 2)])  # the idle task is evicted now
    assert not ok.has_error()


def test_idle_adapters_are_evicted_least_recently_done_first(trt, adapters):
    ex = trt(max_gpu_loras=1, max_cpu_loras=2)
    a, b, c = (adapters[n][1] for n in ADAPTERS)
    run(ex, [request(PROMPTS[0], a, 1)])
    run(ex, [request(PROMPTS[0], b, 2)])
    run(ex, [request(PROMPTS[0], c, 3)])  # full: evicts task 1
    a_again, b_again = run(
        ex, [request(PROMPTS[0], task=1, send=False), request(PROMPTS[0], task=2, send=False)]
    )
    assert classify(a_again.error_msg) is ErrorKind.NOT_CACHED
    assert not b_again.has_error()


def test_device_pages_make_requests_wait_not_fail(trt, engine, adapters):
    ex = trt(max_gpu_loras=1, max_cpu_loras=4)
    reqs = [request(PROMPTS[i], adapters[n][1], i + 1) for i, n in enumerate(ADAPTERS)]
    ids = ex.enqueue_requests(reqs)
    assert [rid for rid, _ in ex._exec._pending] == ids[1:]  # one device page: the others wait their turn
    got = finals(ex, ids)
    with TorchExecutor(engine, memory_budget_bytes=2**30, device="cpu") as ref:
        want = run(ref, reqs)
    assert tokens(got[i] for i in ids) == tokens(want)


def test_streaming_cancel_and_stats(trt):
    ex = trt()
    enqueue = lambda: ex.enqueue_request(request(PROMPTS[2], n=60, streaming=True))  # noqa: E731
    cancel_mid_stream(ex, enqueue, finals, FinishReason.CANCELLED)
    stats = ex.get_latest_iteration_stats()
    assert stats and stats[-1].iter >= 1 and all(s.num_active_lora_tasks == 0 for s in stats)
    # IterationStats.kv_cache_stats (TensorRT-LLM's KvCacheStats) comes through with its block counts
    kv = [s.kv_cache_stats for s in stats]
    assert all(k is not None and k.tokens_per_block == 32 for k in kv)
    assert all(k.used_num_blocks + k.free_num_blocks == k.max_num_blocks > 0 for k in kv)
    assert max(k.used_num_blocks for k in kv) >= 1 and kv[-1].alloc_new_blocks >= 1


def test_memory_plan_is_logged_at_start(trt, engine, caplog):
    with caplog.at_level(logging.INFO, logger="trtllm_peft.executor.trtllm"):
        ex = TrtllmExecutor.from_settings(EngineDir.open(engine), Settings(max_gpu_loras=2, max_cpu_loras=3))
    text = caplog.text
    assert "PEFT device cache" in text and "TensorRT-LLM memory plan" in text
    assert ex.sizing.device.adapters == 2 and ex.sizing.host.adapters == 3
    p = ex._exec.peft
    assert (p.device.num_pages, p.host.num_pages) == (ex.sizing.device.pages, ex.sizing.host.pages)
    ex.shutdown()
