"""The reference engine against transformers + peft, the oracle, on the same weights.

Correctness runs through both op implementations (the CPU kernels, where this CPU has them, and plain torch).

Mixed batches of base and adapter requests (different ranks, module subsets, rsLoRA) arriving at different
steps must give PEFT's one-request-at-a-time greedy tokens (a divergence is accepted only at a numerical
tie: top-2 log-prob gap < 1e-3) and per-token log-probs within 1e-3. Plus the PEFT cache semantics seen
through the executor: not-in-cache error, same id keeps its weights, device budget makes requests wait,
an adapter larger than the device budget fails, churn through a small cache stays correct.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_engine, cancel_mid_stream, make_peft_adapter
from trtllm_peft import formats
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.api import (
    DEVICE_CACHE_FULL_MESSAGE,
    FinishReason,
    LoraConfig,
    OutputConfig,
    PeftCacheConfig,
    Request,
    SamplingConfig,
)
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.lora import LoraAdapter, LoraWeights, pack

TIE = 1e-3
N_NEW = 6
PROMPTS = [[1, 5, 9, 3, 4, 22, 17], [7, 8, 2], [3, 3, 40, 41, 12, 9, 9, 30, 31, 2, 6], [60, 1]]
ADAPTERS = {  # name -> make_peft_adapter kwargs: different ranks, module subsets, rsLoRA
    "all_r4": dict(seed=1, r=4, lora_alpha=8),
    "qv_r8": dict(seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp_o_rs6": dict(
        seed=3, r=6, lora_alpha=12, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]
    ),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_engine"), max_seq_len=64)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, engine):
    """name -> (PeftModel oracle, packed TensorRT-LLM tensors read back by our loader)."""
    spec = EngineDir.open(engine).spec
    out = {}
    for name, kw in ADAPTERS.items():
        d = tmp_path_factory.mktemp(name)
        model = make_peft_adapter(d, **kw).eval()
        out[name] = (model, pack(formats.load_for_engine(d, spec), torch.float32))
    return out


def reference(model, prompt: list[int], n: int, adapter: bool = True):
    """Greedy tokens, their log-probs and top-2 gaps, one request at a time through transformers + peft."""
    ids, toks, lps, gaps = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(n):
            if adapter:
                logits = model(torch.tensor([ids])).logits[0, -1]
            else:
                with model.disable_adapter():
                    logits = model(torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(lp, 2).values
            tok = int(lp.argmax())
            toks.append(tok), lps.append(float(lp[tok])), gaps.append(float(top[0] - top[1]))
            ids.append(tok)
    return toks, lps, gaps


def assert_matches(tokens, log_probs, ref) -> None:
    ref_toks, ref_lps, gaps = ref
    for i, (t, r) in enumerate(zip(tokens, ref_toks, strict=False)):
        if t != r:
            assert gaps[i] < TIE, f"token {i}: {t} != {r} with a top-2 gap of {gaps[i]:.2e}"
            return  # after a tie the continuations legitimately differ
        assert abs(log_probs[i] - ref_lps[i]) < 1e-3, f"log-prob {i}: {log_probs[i]} vs {ref_lps[i]}"
    assert len(tokens) == len(ref_toks)


def collect(ex, ids: list[int], timeout: float = 60.0) -> dict[int, object]:
    """Final responses by request id (streaming deltas are concatenated)."""
    finals, streamed, deadline = {}, {}, time.monotonic() + timeout
    while len(finals) < len(ids) and time.monotonic() < deadline:
        for r in ex.await_responses(timeout=1.0):
            if r.request_id not in ids:
                continue
            if r.has_error():
                finals[r.request_id] = r
                continue
            acc = streamed.setdefault(r.request_id, ([], []))
            acc[0].extend(r.result.output_token_ids[0])
            acc[1].extend((r.result.log_probs or [[]])[0])
            if r.result.is_final:
                r.result.output_token_ids, r.result.log_probs = [acc[0]], [acc[1]]
                finals[r.request_id] = r
    assert len(finals) == len(ids), f"only {len(finals)} of {len(ids)} requests finished"
    return finals


def req(prompt, packed=None, task=None, send=True, n=N_NEW, **kw) -> Request:
    lora = None
    if task is not None:
        lora = LoraConfig(task, packed.weights, packed.config) if send else LoraConfig(task)
    return Request(
        prompt,
        n,
        output_config=OutputConfig(return_log_probs=True, exclude_input_from_output=True),
        lora_config=lora,
        **kw,
    )


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_mixed_batches_match_peft_with_staggered_arrivals(engine, adapters, cpu_kernels):
    names = list(ADAPTERS)
    plan = [(p, names[i % 3] if i % 4 else None) for i, p in enumerate(PROMPTS * 2)]  # base + every adapter
    tasks = {n: i + 1 for i, n in enumerate(names)}
    with TorchExecutor(engine, memory_budget_bytes=2**30, cpu_kernels=cpu_kernels) as ex:
        first = [
            ex.enqueue_request(req(p, adapters[a][1] if a else None, tasks.get(a), streaming=True))
            for p, a in plan[:3]
        ]
        ex.await_responses(first[0], timeout=30)  # the first batch is decoding; the rest arrive mid-flight
        later = ex.enqueue_requests(
            [req(p, adapters[a][1] if a else None, tasks.get(a)) for p, a in plan[3:]]
        )
        finals = collect(ex, first[1:] + later)
    for rid, (prompt, a) in zip(first[1:] + later, plan[1:], strict=True):
        r = finals[rid]
        assert not r.has_error(), r.error_msg
        model = adapters[a][0] if a else adapters[names[0]][0]
        assert_matches(
            r.result.output_token_ids[0],
            r.result.log_probs[0],
            reference(model, prompt, N_NEW, a is not None),
        )


def test_unknown_task_without_weights_is_tensorrt_llms_error(engine):
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        rid = ex.enqueue_request(Request([1, 2, 3], 2, lora_config=LoraConfig(task_id=99)))
        (r,) = ex.await_responses(rid, timeout=30)
    assert r.error_msg == "LoRA task 99 not found in cache. Please send LoRA weights with request"


def test_weights_for_a_held_task_id_are_ignored(engine, adapters):
    a, b = adapters["all_r4"], adapters["qv_r8"]
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        (r1,) = collect(ex, [ex.enqueue_request(req(PROMPTS[0], a[1], 7))]).values()
        (r2,) = collect(ex, [ex.enqueue_request(req(PROMPTS[0], b[1], 7))]).values()  # same id, other weights
        (r3,) = collect(ex, [ex.enqueue_request(req(PROMPTS[0], task=7, send=False, packed=None))]).values()
    assert r1.result.output_token_ids == r2.result.output_token_ids == r3.result.output_token_ids
    assert_matches(r2.result.output_token_ids[0], r2.result.log_probs[0], reference(a[0], PROMPTS[0], N_NEW))


def test_device_budget_makes_requests_wait_not_fail(engine, adapters):
    names = list(ADAPTERS)
    units = [int(adapters[n][1].config[:, 2].sum()) for n in names]  # rank-units: Σ rank over rows
    assert all(a + b > max(units) for a in units for b in units)  # so the device holds one task at a time
    cfg = PeftCacheConfig(num_host_module_layer=8 * max(units), num_device_module_layer=max(units))
    with TorchExecutor(engine, peft_cache_config=cfg, memory_budget_bytes=2**30) as ex:
        ids = ex.enqueue_requests(
            [req(PROMPTS[i % 4], adapters[n][1], i + 1) for i, n in enumerate(names * 2)]
        )
        finals = collect(ex, ids)
        stats = ex.get_latest_iteration_stats()
    assert max(s.num_active_lora_tasks for s in stats) == 1
    for i, rid in enumerate(ids):
        model = adapters[(names * 2)[i]][0]
        assert_matches(
            finals[rid].result.output_token_ids[0],
            finals[rid].result.log_probs[0],
            reference(model, PROMPTS[i % 4], N_NEW),
        )


def test_adapter_larger_than_the_device_budget_is_an_error_not_a_hang(engine, adapters):
    cfg = PeftCacheConfig(num_host_module_layer=10**6, num_device_module_layer=10)
    with TorchExecutor(engine, peft_cache_config=cfg, memory_budget_bytes=2**30) as ex:
        rid = ex.enqueue_request(req(PROMPTS[0], adapters["all_r4"][1], 1))
        (r,) = ex.await_responses(rid, timeout=30)
        ok = collect(ex, [ex.enqueue_request(req(PROMPTS[1]))])  # the engine still serves
    assert r.error_msg == DEVICE_CACHE_FULL_MESSAGE
    assert not next(iter(ok.values())).has_error()


def test_many_adapters_churn_through_a_small_cache(engine, adapters):
    names = list(ADAPTERS)
    big = max(int(adapters[n][1].config[:, 2].sum()) for n in names)
    cfg = PeftCacheConfig(num_host_module_layer=big + 10, num_device_module_layer=big)
    with TorchExecutor(engine, peft_cache_config=cfg, memory_budget_bytes=2**30) as ex:
        for round_ in range(3):
            for i, n in enumerate(names):
                task = 100 + round_ * 10 + i  # a new task id each time: the cache must evict idle ones
                (r,) = collect(ex, [ex.enqueue_request(req(PROMPTS[i], adapters[n][1], task, n=3))]).values()
                assert not r.has_error(), r.error_msg
                assert_matches(
                    r.result.output_token_ids[0],
                    r.result.log_probs[0],
                    reference(adapters[n][0], PROMPTS[i], 3),
                )
        assert len(ex.cache.host) <= 2 and len(ex.cache.host.evictions) >= 7


def test_host_cache_full_of_active_tasks_is_tensorrt_llms_error(engine, adapters):
    unit = int(adapters["all_r4"][1].config[:, 2].sum())
    cfg = PeftCacheConfig(num_host_module_layer=unit, num_device_module_layer=unit)
    with TorchExecutor(engine, peft_cache_config=cfg, memory_budget_bytes=2**30) as ex:
        busy = ex.enqueue_request(req(PROMPTS[0], adapters["all_r4"][1], 1, n=40))
        rid = ex.enqueue_request(req(PROMPTS[1], adapters["qv_r8"][1], 2))
        (r,) = ex.await_responses(rid, timeout=30)
        ex.cancel_request(busy)
    assert r.error_msg == "PEFT Cache is full. Could not store taskId=2"


def test_streaming_cancel_stop_words_and_end_id(engine):
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        (base,) = collect(ex, [ex.enqueue_request(req(PROMPTS[2], n=8))]).values()
        toks = base.result.output_token_ids[0]
        enqueue = lambda: ex.enqueue_request(req(PROMPTS[2], n=50, streaming=True))  # noqa: E731
        first, cancelled = cancel_mid_stream(ex, enqueue, collect, FinishReason.CANCELLED)
        stop = collect(ex, [s := ex.enqueue_request(req(PROMPTS[2], n=8, stop_words=[toks[2:4]]))])[s]
        end = collect(ex, [e := ex.enqueue_request(req(PROMPTS[2], n=8, end_id=toks[3]))])[e]
    assert cancelled.result.finish_reason == FinishReason.CANCELLED
    assert len(first) + len(cancelled.result.output_token_ids[0]) < 50  # one token a streamed response
    word = toks[2:4]
    stop_at = next(i + 2 for i in range(len(toks)) if toks[i : i + 2] == word)  # first place the word ends
    assert (
        stop.result.output_token_ids[0] == toks[:stop_at]
        and stop.result.finish_reason == FinishReason.STOP_WORDS
    )
    first_end = toks.index(toks[3])
    assert (
        end.result.output_token_ids[0] == toks[:first_end] and end.result.finish_reason == FinishReason.END_ID
    )


def test_seeded_sampling_is_reproducible_and_non_streaming_includes_the_prompt(engine):
    sc = SamplingConfig(top_k=20, top_p=0.9, temperature=1.5, seed=123)
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        rs = collect(ex, ex.enqueue_requests([Request(PROMPTS[0], 8, sampling_config=sc) for _ in range(2)]))
    a, b = (r.result.output_token_ids[0] for r in rs.values())
    assert a == b and a[: len(PROMPTS[0])] == PROMPTS[0] and len(a) == len(PROMPTS[0]) + 8


BAD_REQUESTS = {  # name -> (request factory given packed adapters, expected substring of the error)
    "empty prompt": (lambda a: Request([], 4), "input_token_ids must not be empty"),
    "prompt too long": (
        lambda a: Request([1] * 64, 4),
        "Prompt length (64) exceeds maximum input length (63).",
    ),
    "token out of vocab": (lambda a: Request([1, 64], 4), "input token ids must be in [0, 64)"),
    "bad word out of vocab": (
        lambda a: Request([1, 2], 4, bad_words=[[3], [5, 64]]),
        "bad_words token ids must be in [0, 64)",
    ),
    "embedding_bias of the wrong size": (
        lambda a: Request([1, 2], 4, embedding_bias=torch.zeros(63)),
        "embedding_bias must have shape [64], got [63]",
    ),
    "wrong dtype": (
        lambda a: Request([1], 2, lora_config=LoraConfig(5, a.weights.bfloat16(), a.config)),
        "Expected lora weights to be the same data type as base model",
    ),
    "weights without config": (
        lambda a: Request([1], 2, lora_config=LoraConfig(6, a.weights, None)),
        "must have both lora_weights and lora_keys",
    ),
    "rank above max_lora_rank": (
        lambda a: Request([1], 2, lora_config=_rank_20()),
        "rank 20 exceeds max_lora_rank 16",
    ),
    "row too short for its rank": (
        lambda a: Request([1], 2, lora_config=LoraConfig(8, a.weights, _with_rank(a.config, 17))),
        "row 0: attn_q rank 17 needs 1088 values, row has 512",
    ),
}


def _rank_20() -> LoraConfig:
    w = LoraWeights(torch.randn(20, 32), torch.randn(32, 20))
    p = pack(LoraAdapter(weights={(0, "attn_q"): w}, format="hf"), torch.float32)
    return LoraConfig(7, p.weights, p.config)


def _with_rank(config: torch.Tensor, rank: int) -> torch.Tensor:
    out = config.clone()
    out[0, 2] = rank
    return out


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_error_response_naming_the_problem(engine, adapters, case):
    make, text = BAD_REQUESTS[case]
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        rid = ex.enqueue_request(make(adapters["qv_r8"][1]))
        (r,) = ex.await_responses(rid, timeout=30)
    assert r.has_error() and r.error_msg.startswith("Encountered an error when fetching new request: ")
    assert text in r.error_msg
