"""The TensorRT-LLM glue without TensorRT-LLM: our api types ↔ `tensorrt_llm.bindings.executor` (the stand-in
enforces the 1.2 signatures and checks), backend selection. The stand-in's PEFT-cache rules:
test_trtllm_standin_peft.py.
End to end through the reference engine: tests/integration/test_trtllm_standin.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests import trtllm_standin
from tests.conftest import random_lora
from tests.trtllm_standin import configs as tc
from tests.trtllm_standin import types as tt
from trtllm_peft.engine import backend
from trtllm_peft.errors import EngineError
from trtllm_peft.executor import trtllm, trtllm_convert
from trtllm_peft.executor.api import FinishReason, LoraConfig, OutputConfig, Request, SamplingConfig
from trtllm_peft.executor.errors import ErrorKind, classify
from trtllm_peft.lora import pack


@pytest.fixture
def tle(monkeypatch):
    """The stand-in installed as tensorrt_llm.bindings.executor."""
    return trtllm_standin.install(monkeypatch)


# ---- request mapping --------------------------------------------------------------------------------------


def test_request_maps_every_field_keyword_only(tle, tiny_spec):
    packed = pack(random_lora(tiny_spec, 4), torch.float32)
    req = Request(
        [1, 2, 3],
        7,
        streaming=True,
        end_id=2,
        pad_id=0,
        stop_words=[[5, 6]],
        bad_words=[[9]],
        sampling_config=SamplingConfig(top_k=5, top_p=0.5, temperature=0.7, seed=3, repetition_penalty=1.1),
        output_config=OutputConfig(return_log_probs=True, exclude_input_from_output=True),
        lora_config=LoraConfig(11, packed.weights, packed.config),
        client_id=4,
    )
    out = trtllm_convert.to_trtllm_request(tle, req, torch.float16)
    assert (out.input_token_ids, out.max_tokens, out.streaming, out.end_id, out.pad_id) == (
        [1, 2, 3],
        7,
        True,
        2,
        0,
    )
    assert (out.stop_words, out.bad_words, out.client_id) == ([[5, 6]], [[9]], 4)
    sc = out.sampling_config
    assert (sc.beam_width, sc.top_k, sc.top_p, sc.temperature, sc.seed, sc.repetition_penalty) == (
        1,
        5,
        0.5,
        0.7,
        3,
        1.1,
    )
    assert out.output_config.return_log_probs and out.output_config.exclude_input_from_output
    lc = out.lora_config
    assert lc.task_id == 11 and lc.weights.dtype == torch.float16 and lc.config.dtype == torch.int32
    assert lc.weights.shape == packed.weights.shape and lc.weights.is_contiguous() and not lc.weights.is_cuda
    assert torch.equal(lc.weights, packed.weights.half()) and torch.equal(lc.config, packed.config)


def test_stand_in_refuses_positional_arguments_after_max_tokens(tle):
    with pytest.raises(TypeError):
        tle.Request([1, 2], 4, True)  # streaming is keyword-only in request.cpp
    with pytest.raises(TypeError):
        tle.SamplingConfig(1, 5)  # so is everything after beam_width


@pytest.mark.parametrize(
    "cfg, sent, absent",
    [
        (SamplingConfig(), {}, ("top_k", "top_p", "temperature")),
        (
            SamplingConfig(top_k=1, temperature=0.8, repetition_penalty=1.2),
            {"repetition_penalty": 1.2},
            ("top_k", "temperature"),
        ),
        (
            SamplingConfig(temperature=0.0, top_p=0.9),
            {},
            ("top_p", "temperature"),
        ),  # api: temperature 0 is greedy
        (
            SamplingConfig(top_p=1.0, temperature=1.3, seed=7),
            {"top_p": 1.0, "temperature": 1.3, "seed": 7},
            ("top_k",),
        ),
    ],
)
def test_greedy_requests_send_no_sampling_knobs(tle, cfg, sent, absent):
    sc = trtllm_convert.to_trtllm_request(
        tle, Request([1], 1, sampling_config=cfg), torch.float32
    ).sampling_config
    assert {k: getattr(sc, k) for k in sent} == sent
    assert all(getattr(sc, k) is None for k in absent)


def test_npy_batch_dimension_is_squeezed_and_bf16_numpy_read(tle, tiny_spec):
    packed = pack(random_lora(tiny_spec, 2), torch.bfloat16)
    # what TensorRT-LLM's torch_to_numpy writes for bfloat16: numpy void 'V2' with a leading batch of 1
    weights = packed.weights.view(torch.int16).numpy().view(np.dtype("V2"))[None]  # [1, N, W]
    config = packed.config.numpy().astype(np.int64)[None]  # [1, N, 4], not int32 on disk
    out = trtllm_convert.to_trtllm_request(
        tle, Request([1], 1, lora_config=LoraConfig(3, weights, config)), torch.bfloat16
    )
    assert (
        out.lora_config.weights.shape == packed.weights.shape and out.lora_config.config.dtype == torch.int32
    )
    assert torch.equal(
        out.lora_config.weights.view(torch.int16), packed.weights.view(torch.int16)
    )  # bit-exact


def test_task_id_alone_sends_no_tensors(tle):
    out = trtllm_convert.to_trtllm_request(tle, Request([1], 1, lora_config=LoraConfig(5)), torch.float16)
    assert out.lora_config.task_id == 5 and out.lora_config.weights is None and out.lora_config.config is None


@pytest.mark.parametrize(
    "weights, config, message",
    [
        (torch.zeros(2, 8), None, "must be given together"),
        (None, torch.zeros(2, 4, dtype=torch.int32), "must be given together"),
        (torch.zeros(2, 8), torch.zeros(3, 4, dtype=torch.int32), "disagree"),
        (torch.zeros(2, 8), torch.zeros(2, 5, dtype=torch.int32), "disagree"),
        (torch.zeros(2, 8), torch.full((2, 4), 0.5), "integers"),
        (torch.zeros(2, 2, 8), torch.zeros(2, 2, 4, dtype=torch.int32), "2-D"),
        (torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32), "floating point"),
    ],
)
def test_bad_lora_tensors_are_refused_before_tensorrt_llm(tle, weights, config, message):
    with pytest.raises(ValueError, match=message):
        trtllm_convert.to_trtllm_request(
            tle, Request([1], 1, lora_config=LoraConfig(1, weights, config)), torch.float16
        )


def test_what_the_binding_refuses_becomes_a_value_error(tle):
    with pytest.raises(ValueError, match="TensorRT-LLM refused the request: .*task_id"):
        trtllm_convert.to_trtllm_request(
            tle, Request([1], 1, lora_config=LoraConfig(-1)), torch.float16
        )  # uint64


# ---- the binding's own checks (what the stand-in enforces) -------------------------------------------------


@pytest.mark.parametrize(
    "weights, config, error, message",
    [
        (
            None,
            torch.zeros(1, 2, 4, dtype=torch.int32),
            tt.TllmError,
            "Expected config tensor to have 2 dimensions",
        ),
        (None, torch.zeros(2, 4), tt.TllmError, "Expected lora config tensor to have type kINT32"),
        (torch.zeros(2, 8), None, tt.TllmError, "lora weights must also have lora config"),
        (
            torch.zeros(1, 2, 8),
            torch.zeros(2, 4, dtype=torch.int32),
            tt.TllmError,
            "weights tensor to have 2 dimensions",
        ),
        (
            torch.zeros(3, 8),
            torch.zeros(2, 4, dtype=torch.int32),
            tt.TllmError,
            "dim 0 of lora weights and lora config",
        ),
        (np.zeros((2, 8), np.float16), torch.zeros(2, 4, dtype=torch.int32), TypeError, "torch.Tensor"),
        (torch.zeros(8, 2).t(), torch.zeros(2, 4, dtype=torch.int32), tt.TllmError, "is_contiguous"),
    ],
)
def test_stand_in_lora_config_checks_of_loraconfig_cpp(weights, config, error, message):
    with pytest.raises(error, match=message):
        tt.LoraConfig(1, weights, config)


def test_responses_map_back_without_touching_the_missing_half(tle):
    res = tt.Result()
    res.is_final, res.output_token_ids, res.finish_reasons = True, [[4, 5]], [tt.FinishReason.END_ID]
    res.log_probs, res.cum_log_probs, res.decoding_iter = [[-0.1, -0.2]], [-0.3], 2
    ok = trtllm_convert.from_trtllm_response(tt.Response(7, res, 3))
    assert (ok.request_id, ok.client_id, ok.error_msg) == (7, 3, None)
    r = ok.result
    assert (
        r.is_final,
        r.output_token_ids,
        r.finish_reason,
        r.log_probs,
        r.cum_log_probs,
        r.decoding_iter,
    ) == (True, [[4, 5]], FinishReason.END_ID, [[-0.1, -0.2]], [-0.3], 2)
    bad = trtllm_convert.from_trtllm_response(
        tt.Response(8, "LoRA task 3 not found in cache. Please send LoRA weights with request")
    )
    assert bad.has_error() and bad.result is None and classify(bad.error_msg) is ErrorKind.NOT_CACHED
    with pytest.raises(tt.TllmError, match="response with an error"):
        tt.Response(8, "x").result  # noqa: B018  (the binding's getter throws; from_trtllm_response never calls it)


def test_iteration_stats_map_the_kv_cache_stats(tle):
    """IterationStats.kv_cache_stats: tle.KvCacheStats's nine fields (bindings.cpp, 1.2), or None."""
    s = tc.IterationStats()
    assert trtllm_convert.from_trtllm_stats(s, 0).kv_cache_stats is None
    kv = tc.KvCacheStats()
    values = dict(
        max_num_blocks=100,
        free_num_blocks=60,
        used_num_blocks=40,
        tokens_per_block=64,
        alloc_total_blocks=55,
        alloc_new_blocks=45,
        reused_blocks=10,
        missed_blocks=30,
        cache_hit_rate=0.25,
    )
    for name, value in values.items():
        setattr(kv, name, value)
    s.kv_cache_stats = kv
    assert dataclasses.asdict(trtllm_convert.from_trtllm_stats(s, 0).kv_cache_stats) == values


def test_executor_config_carries_the_sizing(tle, tiny_spec):
    from trtllm_peft.engine.peft_cache_sizing import size_peft_cache

    sizing = size_peft_cache(tiny_spec.with_limits(max_lora_rank=8), max_gpu_loras=2, max_cpu_loras=4)
    cfg = trtllm_convert.executor_config(tle, sizing, kv_cache_fraction=0.8)
    p = cfg.peft_cache_config
    assert (p.num_device_module_layer, p.num_host_module_layer) == (
        sizing.config.num_device_module_layer,
        sizing.config.num_host_module_layer,
    )
    assert (p.optimal_adapter_size, p.max_adapter_size, cfg.max_beam_width) == (8, 8, 1)
    assert cfg.kv_cache_config.free_gpu_memory_fraction == 0.8


# ---- backend selection ---------------------------------------------------------------------------------


def test_without_tensorrt_llm_auto_is_torch_and_trtllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt_llm", None)  # as if not installed
    assert backend.resolve_backend("auto") == "torch"
    assert backend.resolve_backend("torch") == "torch"
    with pytest.raises(EngineError) as e:
        backend.resolve_backend("trtllm")
    text = str(e.value)
    assert "does not import" in text and "pypi.nvidia.com" in text and "tensorrt_llm>=1.2,<1.3" in text
    with pytest.raises(EngineError, match="pip3 install"):
        trtllm.import_bindings()


def test_tensorrt_llm_without_a_gpu_is_not_picked(tle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.trtllm_unavailable_reason().startswith("no CUDA GPU")
    assert backend.resolve_backend("auto") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.resolve_backend("auto") == "trtllm"


def test_an_engine_without_the_lora_plugin_is_refused(tle, tmp_path):
    import json

    from tests.conftest import TINY_LLAMA
    from trtllm_peft.engine.engine_dir import engine_config

    cfg = engine_config(
        TINY_LLAMA,
        dtype="float16",
        max_batch_size=2,
        max_seq_len=32,
        max_num_tokens=32,
        max_lora_rank=0,
        lora_target_modules=(),
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="without the LoRA plugin"):
        trtllm.TrtllmExecutor(tmp_path, max_gpu_loras=1, max_cpu_loras=1)
