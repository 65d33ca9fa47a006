"""Triton's protocol on our server, driven by the real `tritonclient` (http) as tensorrtllm_backend clients drive it.

One server for the module (SmolLM2 reference engine, float32). `prepare_inputs` below builds the inputs exactly
as tensorrtllm_backend's inflight_batcher_llm/client/end_to_end_grpc_client.py does (same names, numpy dtypes
and shapes, LoRA tensors from `model.lora_*.npy`), only with the http client instead of the grpc one.
"""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import pytest

from tests.integration.conftest import smollm2_server, write_adapter
from trtllm_peft.executor.api import NOT_CACHED_MESSAGE

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

PROMPT = "John buys 10 packs of magic cards. Each pack has 20 cards, so in total he"
N = 10


@pytest.fixture(scope="module")
def loras(tmp_path_factory, spec, adapter):
    return write_adapter(adapter, tmp_path_factory.mktemp("loras") / "sql", "hf", spec).parent


@pytest.fixture(scope="module")
def server(request, loras):
    with smollm2_server(request, loras, NIM_MAX_CPU_LORAS="4", NIM_MAX_GPU_LORAS="2") as srv:
        yield srv


@pytest.fixture(scope="module")
def triton(server):
    return httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)


def prepare_inputs(
    prompt,
    output_len,
    *,
    temperature=0.0,
    stop_words=None,
    end_id=None,
    lora_dir=None,
    lora_task_id=None,
    exclude_input_in_output=False,
    streaming=False,
    return_log_probs=None,
):
    """tensorrtllm_backend's client: numpy inputs by name (batch dimension 1)."""
    inputs = {
        "text_input": np.array([[prompt]]).astype(object),
        "max_tokens": np.ones_like([[prompt]]).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[temperature]], dtype=np.float32),
        "num_return_sequences": np.array([[1]], dtype=np.int32),
    }
    if stop_words:
        inputs["stop_words"] = np.array([stop_words], dtype=object)
    if return_log_probs is not None:
        inputs["return_log_probs"] = np.array([[return_log_probs]], dtype=bool)
    if end_id is not None:
        inputs["end_id"] = np.array([[end_id]], dtype=np.int32)
    inputs["exclude_input_in_output"] = np.array([[exclude_input_in_output]], dtype=bool)
    if lora_dir:
        inputs["lora_weights"] = np.load(os.path.join(lora_dir, "model.lora_weights.npy"))
        try:
            inputs["lora_config"] = np.load(os.path.join(lora_dir, "model.lora_config.npy"))
        except Exception:
            inputs["lora_config"] = np.load(os.path.join(lora_dir, "model.lora_keys.npy"))
    if lora_task_id:
        inputs["lora_task_id"] = np.array([[lora_task_id]], dtype=np.uint64)
    return inputs


def infer(triton, model, inputs, outputs=("text_output",), binary=True):
    tensors = []
    for name, value in inputs.items():
        t = httpclient.InferInput(name, value.shape, np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value, binary_data=binary)
        tensors.append(t)
    wanted = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return triton.infer(model, tensors, outputs=wanted)


def text(result) -> str:
    value = result.as_numpy("text_output")[0]  # shape [1], as the stock postprocessing answers
    return value.decode() if isinstance(value, bytes) else value  # binary BYTES vs JSON strings


def openai_text(server, model, n=N) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# ---- health and metadata ---------------------------------------------------------------------------------


def test_health_metadata_and_repository(triton, server):
    assert triton.is_server_live() and triton.is_server_ready()
    for model in ("ensemble", "tensorrt_llm_bls", "smollm2", "sql"):
        assert triton.is_model_ready(model), model
    assert not triton.is_model_ready("no-such-model")
    meta = triton.get_model_metadata("ensemble")
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert meta["platform"] == "ensemble" and meta["versions"] == ["1"]
    assert inputs["text_input"] == {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]}
    assert inputs["lora_weights"]["datatype"] == "FP32"  # the engine's dtype: TensorRT-LLM's rule
    assert inputs["lora_task_id"]["datatype"] == "UINT64"
    assert "lora_task_id" not in {i["name"] for i in triton.get_model_metadata("sql")["inputs"]}
    index = {m["name"]: m["state"] for m in triton.get_model_repository_index()}
    stock = ("ensemble", "tensorrt_llm_bls", "preprocessing", "tensorrt_llm", "postprocessing")
    assert index == {name: "READY" for name in (*stock, "smollm2", "sql")}
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found"):
        triton.get_model_metadata("nope")
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


# ---- the ensemble, as tensorrtllm_backend's client uses it -----------------------------------------------


def test_ensemble_greedy_matches_openai_route(triton, server):
    want = openai_text(server, "smollm2")
    r = infer(triton, "ensemble", prepare_inputs(PROMPT, N, end_id=-1, exclude_input_in_output=True))
    assert text(r) == want
    with_prompt = text(infer(triton, "ensemble", prepare_inputs(PROMPT, N, end_id=-1)))
    assert with_prompt == PROMPT + want  # exclude_input_in_output false: the prompt comes back too
    bls = infer(
        triton, "tensorrt_llm_bls", prepare_inputs(PROMPT, N, end_id=-1, exclude_input_in_output=True)
    )
    assert text(bls) == want


def test_json_tensors_and_log_probs(triton, server):
    inputs = prepare_inputs(PROMPT, 4, end_id=-1, exclude_input_in_output=True, return_log_probs=True)
    r = infer(
        triton, "ensemble", inputs, outputs=("text_output", "output_log_probs", "cum_log_probs"), binary=False
    )
    lps = r.as_numpy("output_log_probs")
    assert lps.shape == (1, 1, 4) and (lps <= 0).all() and (lps < 0).any()
    assert r.as_numpy("cum_log_probs")[0][0] == pytest.approx(lps.sum(), rel=1e-5)
    assert text(r) == openai_text(server, "smollm2", n=4)
    with pytest.raises(InferenceServerException, match="unexpected inference output 'context_logits'"):
        infer(triton, "ensemble", inputs, outputs=("text_output", "context_logits"))


def test_stop_words_end_inclusive(triton):
    full = text(infer(triton, "ensemble", prepare_inputs(PROMPT, N, end_id=-1, exclude_input_in_output=True)))
    word = " " + full.split()[2]
    cut = text(
        infer(
            triton,
            "ensemble",
            prepare_inputs(PROMPT, N, end_id=-1, stop_words=[word], exclude_input_in_output=True),
        )
    )
    # TensorRT-LLM keeps the matched stop word in the output
    assert cut == full[: full.index(word) + len(word)] and len(cut) < len(full)


# ---- LoRA: in-band tensors, task ids, adapters by name ---------------------------------------------------


def test_in_band_lora_then_task_id_alone(triton, server, npy_dir):
    by_name = openai_text(server, "sql")
    assert by_name != openai_text(server, "smollm2")
    first = infer(
        triton,
        "ensemble",
        prepare_inputs(PROMPT, N, end_id=-1, lora_dir=npy_dir, lora_task_id=7, exclude_input_in_output=True),
    )
    assert text(first) == by_name  # weights from model.lora_*.npy == the same adapter served by name
    again = infer(
        triton, "ensemble", prepare_inputs(PROMPT, N, end_id=-1, lora_task_id=7, exclude_input_in_output=True)
    )
    assert text(again) == by_name  # cached: the id alone is enough
    v2_name = text(infer(triton, "sql", prepare_inputs(PROMPT, N, end_id=-1, exclude_input_in_output=True)))
    assert v2_name == by_name  # every adapter is a v2 model: no task id at all


def test_unknown_task_id_gets_trtllm_not_cached_error(triton):
    with pytest.raises(InferenceServerException) as e:
        infer(triton, "ensemble", prepare_inputs(PROMPT, 2, lora_task_id=123456))
    assert e.value.message() == NOT_CACHED_MESSAGE.format(task_id=123456)
    assert e.value.status() == "400"


def test_three_column_config_and_bad_tensors(triton, server, npy_dir):
    inputs = prepare_inputs(
        PROMPT, N, end_id=-1, lora_dir=npy_dir, lora_task_id=8, exclude_input_in_output=True
    )
    inputs["lora_config"] = np.ascontiguousarray(inputs["lora_config"][:, :, :3])  # the stock [-1, 3] layout
    assert text(infer(triton, "ensemble", inputs)) == openai_text(server, "sql")
    cases = [
        (
            {"lora_weights": inputs["lora_weights"].astype(np.float16)},
            "data-type is 'FP16', but model 'ensemble' expects 'FP32'",
        ),
        ({"lora_config": None}, "must have both lora_weights and lora_keys"),
        ({"lora_weights": inputs["lora_weights"][:, :, :10]}, "needs"),
        ({"lora_task_id": None}, "need a lora_task_id"),
    ]
    for change, message in cases:
        bad = {**inputs, "lora_task_id": np.array([[99]], dtype=np.uint64), **change}
        bad = {k: v for k, v in bad.items() if v is not None}
        with pytest.raises(InferenceServerException, match=message):
            infer(triton, "ensemble", bad)
    with pytest.raises(
        InferenceServerException, match="unexpected inference input 'lora_task_id' for model 'sql'"
    ):
        infer(triton, "sql", prepare_inputs(PROMPT, 2, lora_task_id=7))


# ---- generate extension ----------------------------------------------------------------------------------


def test_generate_and_generate_stream(server):
    body = {
        "text_input": PROMPT,
        "max_tokens": N,
        "bad_words": "",
        "stop_words": "",
        "end_id": -1,
        "exclude_input_in_output": True,
    }
    r = httpx.post(f"{server.url}/v2/models/ensemble/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "ensemble" and out["model_version"] == "1"
    assert out["text_output"] == openai_text(server, "smollm2")

    def stream(streaming: bool) -> list[dict]:
        url = f"{server.url}/v2/models/sql/generate_stream"
        with httpx.stream("POST", url, json={**body, "stream": streaming}, timeout=120) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]

    # the documented `"stream": true` gives one event per step (the decoupled model's responses), else one
    events = stream(True)
    assert len(events) == N and "".join(e["text_output"] for e in events) == openai_text(server, "sql")
    assert [e["text_output"] for e in stream(False)] == [openai_text(server, "sql")]
    # min_length: min_tokens' name in tensorrtllm_backend v0.8.0 … v0.19.0 (ensemble/config.pbtxt); same answer
    # here, as EOS is off (end_id -1)
    old = httpx.post(f"{server.url}/v2/models/ensemble/generate", json={**body, "min_length": 3}, timeout=120)
    assert old.status_code == 200 and old.json()["text_output"] == out["text_output"]
    both = {**body, "min_length": 3, "min_tokens": 3}
    both = httpx.post(f"{server.url}/v2/models/ensemble/generate", json=both, timeout=30)
    assert both.status_code == 400 and both.json() == {
        "error": "give min_tokens or min_length (its older name), not both"
    }
    bad = httpx.post(
        f"{server.url}/v2/models/ensemble/generate", json={**body, "min_new_tokens": 3}, timeout=30
    )
    assert bad.status_code == 400 and bad.json() == {
        "error": "unexpected inference input 'min_new_tokens' for model 'ensemble'"
    }
    gone = httpx.post(f"{server.url}/v2/models/nope/generate", json=body, timeout=30)
    assert gone.status_code == 400 and "Request for unknown model" in gone.json()["error"]
