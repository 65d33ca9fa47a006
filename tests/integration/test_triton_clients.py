"""tensorrtllm_backend's own clients against our server, over gRPC and HTTP, on both executors.

Each test builds its requests the way the stock clients do (tests/integration/triton_stock_clients.py:
end_to_end_grpc_client.py and inflight_batcher_llm_client.py, as written in NVIDIA/TensorRT-LLM
triton_backend/, 1.2 era), and tools/inflight_batcher_llm/end_to_end_test.py `test_functionality_ifb` runs
preprocessing → tensorrt_llm → postprocessing by hand, then the ensemble, on `--protocol` http and grpc, and
asserts the texts are equal. Every greedy answer is checked against /v1/completions for the same prompt and
length.
"""

from __future__ import annotations

import json
from functools import partial

import httpx
import numpy as np
import pytest

from tests.integration.conftest import smollm2_server, write_adapter
from tests.integration.triton_stock_clients import (  # skips the module without tritonclient
    InferenceServerException,
    UserData,
    callback,
    drain,
    e2e_inputs,
    grpcclient,
    httpclient,
    ifb_inputs,
    ifb_run,
    prepare_tensor,
    run_inference,
)
from trtllm_peft.executor.api import NOT_CACHED_MESSAGE

PROMPT = "John buys 10 packs of magic cards. Each pack has 20 cards, so in total he"
PROMPT2 = "The capital of France is"
N = 10
STOCK = ("ensemble", "tensorrt_llm_bls", "preprocessing", "tensorrt_llm", "postprocessing")


@pytest.fixture(scope="module")
def loras(tmp_path_factory, spec, adapter):
    return write_adapter(adapter, tmp_path_factory.mktemp("loras") / "sql", "hf", spec).parent


@pytest.fixture(scope="module")
def server(request, backend, loras):
    with smollm2_server(request, loras, backend, NIM_MAX_CPU_LORAS="4", NIM_MAX_GPU_LORAS="2") as srv:
        yield srv


@pytest.fixture(scope="module")
def grpc(server):
    with grpcclient.InferenceServerClient(url=server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    return httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_engine), legacy=False, padding_side="left")


def openai_text(server, model="smollm2", prompt=PROMPT, n=N, **extra) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **extra}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# ---- server, metadata, config ----------------------------------------------------------------------------


def test_grpc_health_metadata_config_index(grpc, http):
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert grpc.get_server_metadata().name == "trtllm-peft"
    for model in (*STOCK, "smollm2", "sql"):
        assert grpc.is_model_ready(model) and http.is_model_ready(model), model
    assert not grpc.is_model_ready("nope")
    meta = grpc.get_model_metadata("tensorrt_llm")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    # the stock tensorrt_llm/config.pbtxt's names, types and dims (+ the batch dimension)
    assert inputs["input_ids"] == ("INT32", [-1, -1]) and inputs["input_lengths"] == ("INT32", [-1, 1])
    assert inputs["stop_words_list"] == ("INT32", [-1, 2, -1]) and inputs["lora_weights"][0] == "FP32"
    outputs = {t.name: list(t.shape) for t in meta.outputs}
    assert outputs["output_ids"] == [-1, -1, -1] and outputs["sequence_length"] == [-1, -1]
    assert meta == grpc.get_model_metadata("tensorrt_llm", "1")
    assert http.get_model_metadata("preprocessing")["inputs"][0] == {
        "name": "QUERY",
        "datatype": "BYTES",
        "shape": [-1, 1],
    }
    config = grpc.get_model_config("tensorrt_llm").config
    assert config.backend == "tensorrtllm" and config.model_transaction_policy.decoupled
    assert not grpc.get_model_config("postprocessing").config.model_transaction_policy.decoupled
    assert http.get_model_config("ensemble")["platform"] == "ensemble"
    names = {m.name for m in grpc.get_model_repository_index().models}
    assert names == {*STOCK, "smollm2", "sql"}
    with pytest.raises(InferenceServerException) as e:
        grpc.get_model_metadata("nope")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Request for unknown model: 'nope' is not found" in e.value.message()


# ---- end_to_end_grpc_client.py: the ensemble --------------------------------------------------------------


def test_e2e_grpc_client_plain_streaming_and_batched(grpc, server):
    want = openai_text(server)
    assert run_inference(grpc, [e2e_inputs(PROMPT, N)], streaming=False) == [want]
    assert run_inference(grpc, [e2e_inputs(PROMPT, N, streaming=True)], streaming=True) == [want]
    both = [e2e_inputs(PROMPT, N, streaming=True), e2e_inputs(PROMPT2, N, streaming=True)]
    assert run_inference(grpc, both, streaming=True, batch_inputs=True) == [
        want,
        openai_text(server, prompt=PROMPT2),
    ]
    assert run_inference(grpc, [e2e_inputs(PROMPT, N)], streaming=False, model="tensorrt_llm_bls") == [want]


def test_e2e_grpc_client_stream_sends_one_response_per_step_with_final_flag(grpc, server):
    user_data, inputs = UserData(), e2e_inputs(PROMPT, N, streaming=True, end_id=-1)
    grpc.start_stream(callback=partial(callback, user_data))
    grpc.async_stream_infer(
        "ensemble", [prepare_tensor(k, v, "grpc") for k, v in inputs.items()], request_id="7"
    )
    grpc.stop_stream()
    results = drain(user_data)
    assert len(results) == N  # end_id -1: N steps, one token each, one response each
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert finals == [False] * (N - 1) + [True]
    assert {r.get_response().id for r in results} == {"7"}


def test_e2e_grpc_client_stop_words_and_lora(grpc, server, npy_dir):
    full = openai_text(server, ignore_eos=True)
    word = " " + full.split()[2]
    cut = run_inference(grpc, [e2e_inputs(PROMPT, N, stop_words=[word], end_id=-1)], streaming=False)[0]
    assert cut == full[: full.index(word) + len(word)] and len(cut) < len(full)  # the stop word stays
    by_name = openai_text(server, "sql")
    first = e2e_inputs(PROMPT, N, lora_dir=npy_dir, lora_task_id=11)
    assert run_inference(grpc, [first], streaming=False) == [by_name]  # weights, then
    assert run_inference(grpc, [e2e_inputs(PROMPT, N, lora_task_id=11)], streaming=False) == [by_name]  # id


# ---- inflight_batcher_llm_client.py: tensorrt_llm on token ids --------------------------------------------


def test_ifb_client_plain_and_streaming(grpc, server, tokenizer):
    want = openai_text(server)
    prompt_ids, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False)
    whole = ifb_run(grpc, inputs, streaming=False)
    assert whole[: len(prompt_ids)] == prompt_ids  # exclude_input_in_output unset: the prompt comes back
    assert tokenizer.decode(whole[len(prompt_ids) :], skip_special_tokens=True) == want
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=True)
    streamed = ifb_run(grpc, inputs, streaming=True)  # streaming responses carry the new tokens only
    assert streamed == whole[len(prompt_ids) :]


def test_ifb_client_lora_path_then_task_id(grpc, server, tokenizer, npy_dir):
    want = openai_text(server, "sql")
    prompt_ids, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, lora_path=npy_dir, lora_task_id=21)
    first = ifb_run(grpc, inputs, streaming=False)[len(prompt_ids) :]
    assert tokenizer.decode(first, skip_special_tokens=True) == want
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=True, lora_task_id=21)
    assert ifb_run(grpc, inputs, streaming=True) == first
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, lora_task_id=22)
    with pytest.raises(InferenceServerException) as e:
        ifb_run(grpc, inputs, streaming=False)
    assert e.value.message() == NOT_CACHED_MESSAGE.format(task_id=22)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_ifb_client_stop_words_list_and_min_tokens(grpc, server, tokenizer):
    prompt_ids, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, end_id=-1)
    full = ifb_run(grpc, inputs, streaming=False)[len(prompt_ids) :]
    # the [1, 2, K] offsets format of preprocessing's _to_word_list_format: ids, then cumulative ends
    stop = full[3:5]
    words = np.array([[[*stop, 0], [2, -1, -1]]], dtype=np.int32)
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, end_id=-1, stop_words_list=words)
    assert ifb_run(grpc, inputs, streaming=False)[len(prompt_ids) :] == full[:5]
    # end_id = the first token the model picks: it ends at once, unless min_tokens holds it back
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=True, end_id=full[0])
    assert ifb_run(grpc, inputs, streaming=True) == []
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=True, end_id=full[0], min_tokens=3)
    held = ifb_run(grpc, inputs, streaming=True)
    assert len(held) >= 3 and full[0] not in held[:3]
    # the same under min_tokens' name in tensorrtllm_backend v0.8.0 … v0.19.0 (tensorrt_llm/config.pbtxt),
    # which older inflight_batcher_llm_client.py versions send
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=True, end_id=full[0], min_length=3)
    assert ifb_run(grpc, inputs, streaming=True) == held


def test_bad_words_and_embedding_bias_in_both_forms(grpc, server, tokenizer, spec):
    """Strings to the ensemble (preprocessing tokenizes them) and tensors to tensorrt_llm agree."""
    prompt_ids, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, end_id=-1)
    full = ifb_run(grpc, inputs, streaming=False)[len(prompt_ids) :]
    word = tokenizer.decode([full[0]])
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert ids == [full[0]]  # a one-token word: the string and the id forms ban the same thing
    banned = np.array([[ids, [1]]], dtype=np.int32)  # [1, 2, K]: ids, then cumulative ends
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, end_id=-1, bad_words_list=banned)
    no_word = ifb_run(grpc, inputs, streaming=False)[len(prompt_ids) :]
    assert no_word[0] != full[0] and full[0] not in no_word
    text = run_inference(grpc, [e2e_inputs(PROMPT, N, bad_words=[word], end_id=-1)], streaming=False)[0]
    assert text == tokenizer.decode(no_word, skip_special_tokens=True)
    bias = np.zeros((1, spec.vocab_size), np.float32)
    bias[0, full[0]] = -1e4
    _, inputs = ifb_inputs(tokenizer, PROMPT, N, streaming=False, end_id=-1, embedding_bias=bias)
    biased = ifb_run(grpc, inputs, streaming=False)[len(prompt_ids) :]
    assert biased[0] != full[0]
    inputs = e2e_inputs(PROMPT, N, end_id=-1, embedding_bias_words=[word], embedding_bias_weights=[-1e4])
    assert run_inference(grpc, [inputs], streaming=False)[0] == tokenizer.decode(
        biased, skip_special_tokens=True
    )


# ---- end_to_end_test.py: preprocessing → tensorrt_llm → postprocessing, then the ensemble ------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_end_to_end_test_by_hand_equals_ensemble(protocol, grpc, http, server):
    client = grpc if protocol == "grpc" else http
    prompts = [PROMPT, PROMPT2]
    input0 = [[p] for p in prompts]  # batch 2 (the stock test sends 1; the configs take max_batch_size)
    inputs = [
        prepare_tensor("QUERY", np.array(input0).astype(object), protocol),
        prepare_tensor("BAD_WORDS_DICT", np.array([[""], [""]], dtype=object), protocol),
        prepare_tensor("STOP_WORDS_DICT", np.array([[""], [""]], dtype=object), protocol),
        prepare_tensor("REQUEST_OUTPUT_LEN", np.ones_like(input0).astype(np.int32) * N, protocol),
    ]
    result = client.infer("preprocessing", inputs, request_id="0")
    ids, lengths = result.as_numpy("INPUT_ID"), result.as_numpy("REQUEST_INPUT_LEN")
    assert ids.shape[0] == 2 and lengths.shape == (2, 1) and ids.shape[1] == lengths.max()
    inputs = [
        prepare_tensor("input_ids", ids, protocol),
        prepare_tensor("decoder_input_ids", result.as_numpy("DECODER_INPUT_ID"), protocol),
        prepare_tensor("input_lengths", lengths, protocol),
        prepare_tensor("request_output_len", result.as_numpy("REQUEST_OUTPUT_LEN"), protocol),
        prepare_tensor("end_id", result.as_numpy("OUT_END_ID"), protocol),
        prepare_tensor("pad_id", result.as_numpy("OUT_PAD_ID"), protocol),
    ]
    result = client.infer("tensorrt_llm", inputs, request_id="0")
    tokens, seq_lengths = result.as_numpy("output_ids").astype(np.int32), result.as_numpy("sequence_length")
    assert tokens.shape[:2] == (2, 1) and seq_lengths.shape == (2, 1)
    inputs = [
        prepare_tensor("TOKENS_BATCH", tokens, protocol),
        prepare_tensor("SEQUENCE_LENGTH", seq_lengths, protocol),
    ]
    by_hand = client.infer("postprocessing", inputs, request_id="0").as_numpy("OUTPUT")
    for i, prompt in enumerate(prompts):
        inputs = [
            prepare_tensor("text_input", np.array([[prompt]]).astype(object), protocol),
            prepare_tensor("max_tokens", np.array([[N]], dtype=np.int32), protocol),
            prepare_tensor("bad_words", np.array([[""]], dtype=object), protocol),
            prepare_tensor("stop_words", np.array([[""]], dtype=object), protocol),
        ]
        ensemble = client.infer("ensemble", inputs, request_id=str(i)).as_numpy("text_output")
        assert by_hand[i] == ensemble[0]  # both carry the prompt (exclude_input_in_output unset)
        assert ensemble[0].decode() == prompt + openai_text(server, prompt=prompt)


# ---- errors: the same texts on both protocols; a stream survives a bad request ------------------------------


def test_errors_match_http_and_stream_survives(grpc, http, server):
    bad = {"text_input": np.array([[PROMPT]]).astype(object), "max_tokens": np.array([[0]], dtype=np.int32)}
    messages = []
    for protocol, client in (("grpc", grpc), ("http", http)):
        with pytest.raises(InferenceServerException) as e:
            client.infer("ensemble", [prepare_tensor(k, v, protocol) for k, v in bad.items()])
        messages.append(e.value.message())
    assert messages[0] == messages[1] == "max_tokens must be >= 1, got 0"
    user_data = UserData()
    grpc.start_stream(callback=partial(callback, user_data))
    grpc.async_stream_infer(
        "ensemble", [prepare_tensor(k, v, "grpc") for k, v in bad.items()], request_id="bad"
    )
    good = e2e_inputs(PROMPT, 3)
    grpc.async_stream_infer(
        "ensemble", [prepare_tensor(k, v, "grpc") for k, v in good.items()], request_id="ok"
    )
    grpc.stop_stream()
    results = drain(user_data)
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    texts = [
        r.as_numpy("text_output")[0].decode() for r in results if not isinstance(r, InferenceServerException)
    ]
    assert [e.message() for e in errors] == ["max_tokens must be >= 1, got 0"]
    assert texts == [openai_text(server, n=3)]


def test_generate_extension_on_stock_models(server):
    """The generate extension on the three stock models, chained by hand (JSON values, batch 1)."""
    body = {"QUERY": PROMPT, "REQUEST_OUTPUT_LEN": N, "STOP_WORDS_DICT": [" cards", " pack"]}
    r = httpx.post(f"{server.url}/v2/models/preprocessing/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["REQUEST_INPUT_LEN"] == len(out["INPUT_ID"]) and out["REQUEST_OUTPUT_LEN"] == N
    ends = out["STOP_WORDS_IDS"][len(out["STOP_WORDS_IDS"]) // 2 :]  # [2, K] flattened: ids, then ends
    assert [e for e in ends if e >= 0] == [1, 2]  # " cards" and " pack" are one token each
    body = {"input_ids": out["INPUT_ID"], "input_lengths": out["REQUEST_INPUT_LEN"], "request_output_len": N,
            "end_id": -1, "exclude_input_in_output": True}  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/tensorrt_llm/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ids = r.json()["output_ids"]
    assert len(ids) == N and r.json()["sequence_length"] == N
    body = {"TOKENS_BATCH": [ids], "SEQUENCE_LENGTH": [N]}
    r = httpx.post(f"{server.url}/v2/models/postprocessing/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["OUTPUT"] == openai_text(server, ignore_eos=True)


# ---- the llmapi model's inputs on `tensorrt_llm` (server/triton/llmapi.py) ---------------------------------

# Verbatim from NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi/README.md ("Send Inference Requests"):
#   curl -X POST localhost:8000/v2/models/tensorrt_llm/generate \
#     -d '{"text_input": "What is ML?", "sampling_param_max_tokens": 50}'
# Its response there: {"model_name":"tensorrt_llm","model_version":"1","text_output":"What is ML?\nML is …"}
# (the prompt leads: helpers.py get_sampling_params_from_request defaults exclude_input_from_output to False).
DOC_BODY = '{"text_input": "What is ML?", "sampling_param_max_tokens": 50}'


def test_llmapi_documented_generate_example(server):
    # curl -d sends the bytes as given, with curl's default form content type
    r = httpx.post(f"{server.url}/v2/models/tensorrt_llm/generate", content=DOC_BODY,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"model_name", "model_version", "text_output"}
    assert out["model_name"] == "tensorrt_llm" and out["model_version"] == "1"
    assert out["text_output"] == "What is ML?" + openai_text(server, prompt="What is ML?", n=50)
    excluded = httpx.post(
        f"{server.url}/v2/models/tensorrt_llm/generate",
        json={**json.loads(DOC_BODY), "sampling_param_exclude_input_from_output": True},
        timeout=120,
    )
    assert excluded.json()["text_output"] == openai_text(server, prompt="What is ML?", n=50)


def test_llmapi_generate_stream_sends_the_text_so_far(server):
    def stream(body):
        url = f"{server.url}/v2/models/tensorrt_llm/generate_stream"
        with httpx.stream("POST", url, content=body, timeout=120) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]

    want = "What is ML?" + openai_text(server, prompt="What is ML?", n=50)
    assert [e["text_output"] for e in stream(DOC_BODY)] == [want]  # not streaming: one event
    events = stream(json.dumps({**json.loads(DOC_BODY), "streaming": True}))
    texts = [e["text_output"] for e in events]
    # LLM API CompletionOutput.text (what llmapi/tensorrt_llm/1/model.py sends) is the text so far
    assert len(texts) > 1 and texts[-1] == want
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_llmapi_inputs_over_grpc_and_mixing_styles_is_refused(grpc, server, tokenizer):
    # tools/inflight_batcher_llm/end_to_end_test.py --test-llmapi: text_input + sampling_param_max_tokens
    inputs = {"text_input": np.array([[PROMPT]]).astype(object),
              "sampling_param_max_tokens": np.array([[N]], dtype=np.int32),
              "sampling_param_exclude_input_from_output": np.array([[True]])}  # fmt: skip
    result = grpc.infer("tensorrt_llm", [prepare_tensor(k, v, "grpc") for k, v in inputs.items()])
    assert result.as_numpy("text_output")[0].decode() == openai_text(server)
    meta = {t.name: t for t in grpc.get_model_config("tensorrt_llm").config.input}
    assert meta["text_input"].optional and meta["sampling_param_max_tokens"].optional
    assert meta["input_ids"].optional  # either style: the per-style check names what is missing
    mixed = {**inputs, "input_ids": np.array([tokenizer.encode(PROMPT)], dtype=np.int32)}
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("tensorrt_llm", [prepare_tensor(k, v, "grpc") for k, v in mixed.items()])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "not both: got 'input_ids' with 'text_input'" in e.value.message()
    r = httpx.post(f"{server.url}/v2/models/tensorrt_llm/generate",
                   json={"input_lengths": 3, "text_input": "hi"}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and "not both: got 'input_lengths' with 'text_input'" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/tensorrt_llm/generate", json={"input_ids": [1, 2]}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"] == "expected input 'input_lengths' for model 'tensorrt_llm' (or 'text_input')"
