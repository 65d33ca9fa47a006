"""The OpenAI API as real clients use it: the official `openai` client against the real server, on both
executors (the reference engine and TrtllmExecutor over the TensorRT-LLM stand-in), base model and adapters.

What is sent and asserted mirrors vLLM's tests/entrypoints/openai (test_completion.py: test_zero_logprobs,
test_some_logprobs, test_echo_logprob_completion, test_batch_completions, test_completion_streaming;
test_chat.py: test_zero_logprobs_chat, test_some_logprobs_chat, test_chat_streaming,
test_chat_completion_stream_options). Log-prob values are checked against transformers + peft (the oracle)
within 1e-4. The server runs with an API key, so every call also proves the Bearer check.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch

from tests.integration.conftest import QVO, openai_client, random_adapter, smollm2_server, write_adapter
from trtllm_peft.engine.engine_dir import EngineDir, hf_checkpoint

KEY = "sk-test-key"
PROMPT = "The capital of France is"
PROMPT2 = "Write a haiku about the sea:"
TOL = 1e-4


@pytest.fixture(scope="module")
def loras(tmp_path_factory, spec):
    root = tmp_path_factory.mktemp("loras")
    ad = random_adapter(spec, rank=8, modules=QVO, seed=3, std=0.03)
    write_adapter(ad, root / "lora-hf", "hf", spec)
    return root


@pytest.fixture(scope="module")
def server(request, backend, loras):
    with smollm2_server(request, loras, backend, TRTLLM_PEFT_API_KEY=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, api_key=KEY, timeout=300)


@pytest.fixture(scope="module")
def oracle(smollm2_engine, loras, tmp_path_factory):
    """model name → a function (token ids) → PEFT's log-softmax [T, V] over the whole sequence."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    view = hf_checkpoint(EngineDir.open(smollm2_engine), tmp_path_factory.mktemp("hf_view"))
    base = AutoModelForCausalLM.from_pretrained(str(view), torch_dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(loras / "lora-hf")).eval()

    def run(model: str, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            if model == "smollm2":
                with peft.disable_adapter():
                    logits = peft(torch.tensor([ids])).logits[0]
            else:
                logits = peft(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), -1)

    run.tokenizer = AutoTokenizer.from_pretrained(str(smollm2_engine))
    return run


def greedy_kw(**kw):
    kw.setdefault("extra_body", {"ignore_eos": True})
    return {"temperature": 0, **kw}


# ---- completions: logprobs, echo, streaming --------------------------------------------------------------


# k = 1, greedy: from the engine's own log-probs (Orchestrator.greedy_logprobs_are_raw); k = 3: from its logits
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("model", ["smollm2", "lora-hf"])
def test_completion_logprobs_are_pefts_top_k(client, oracle, model, k):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=k, **greedy_kw())
    lp = r.choices[0].logprobs
    prompt_ids = oracle.tokenizer(PROMPT)["input_ids"]
    ids = list(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for i in range(6):
        ref = oracle(model, ids)[-1]  # [V]
        top = torch.topk(ref, k)
        tok = int(ref.argmax())
        assert lp.tokens[i] == oracle.tokenizer.decode([tok])
        assert abs(lp.token_logprobs[i] - float(ref[tok])) < TOL
        assert k <= len(lp.top_logprobs[i]) <= k + 1 and lp.tokens[i] in lp.top_logprobs[i]  # vLLM's bounds
        got = sorted(lp.top_logprobs[i].values(), reverse=True)[:k]
        assert all(abs(a - float(b)) < TOL for a, b in zip(got, top.values, strict=True))
        ids.append(tok)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_zero_logprobs_gives_the_sampled_token_only(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, logprobs=0, **greedy_kw())
    lp = r.choices[0].logprobs
    assert lp.token_logprobs is not None and all(len(t) == 1 for t in lp.top_logprobs)
    none = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, **greedy_kw())
    assert none.choices[0].logprobs is None


@pytest.mark.parametrize("model", ["smollm2", "lora-hf"])
def test_echo_logprobs_include_the_prompt(client, oracle, model):
    prompt_ids = oracle.tokenizer(PROMPT)["input_ids"]
    for prompt in (PROMPT, prompt_ids):  # vLLM sends both
        r = client.completions.create(
            model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=1, **greedy_kw()
        )
        text = PROMPT if isinstance(prompt, str) else oracle.tokenizer.decode(prompt_ids)
        assert re.search(r"^" + re.escape(text), r.choices[0].text)
        lp = r.choices[0].logprobs
        n = len(prompt_ids)
        assert len(lp.tokens) == n + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
        ref = oracle(model, prompt_ids)  # [n, V]
        for i in range(1, n):
            assert abs(lp.token_logprobs[i] - float(ref[i - 1, prompt_ids[i]])) < TOL


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = dict(model="lora-hf", prompt=PROMPT, max_tokens=5, logprobs=2, echo=True, **greedy_kw())
    whole = client.completions.create(**kw).choices[0]
    tokens, lps, text = [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        text += c.text
        tokens += c.logprobs.tokens
        lps += c.logprobs.token_logprobs
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert lps[0] is None and all(
        abs(a - b) < 1e-6 for a, b in zip(lps[1:], whole.logprobs.token_logprobs[1:], strict=True)
    )


# ---- completions: many prompts ----------------------------------------------------------------------------


def test_many_prompts_are_choices_prompt_by_n(client, oracle):
    singles = [
        client.completions.create(model="lora-hf", prompt=p, max_tokens=5, **greedy_kw()).choices[0].text
        for p in (PROMPT, PROMPT2)
    ]
    r = client.completions.create(model="lora-hf", prompt=[PROMPT, PROMPT2], n=2, max_tokens=5, **greedy_kw())
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [singles[0], singles[0], singles[1], singles[1]]
    n_prompt = sum(len(oracle.tokenizer(p)["input_ids"]) for p in (PROMPT, PROMPT2))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 20
    ids = [oracle.tokenizer(p)["input_ids"] for p in (PROMPT, PROMPT2)]
    r2 = client.completions.create(model="lora-hf", prompt=ids, max_tokens=5, **greedy_kw())
    assert [c.text for c in r2.choices] == singles
    texts = [""] * 2  # vLLM's test_batch_completions, streaming
    stream = client.completions.create(
        model="lora-hf",
        prompt=[PROMPT, PROMPT2],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        **greedy_kw(),
    )
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
            continue
        assert len(chunk.choices) == 1
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == singles and usage.completion_tokens == 10 and usage.prompt_tokens == n_prompt


# ---- chat: logprobs, streaming fields --------------------------------------------------------------------


def chat_prompt_ids(oracle, messages) -> list[int]:
    text = oracle.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return oracle.tokenizer(text, add_special_tokens=False)["input_ids"]


MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize("model", ["smollm2", "lora-hf"])
def test_chat_top_logprobs_are_pefts(client, oracle, model):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=5, **greedy_kw()
    )
    content = r.choices[0].logprobs.content
    ids = chat_prompt_ids(oracle, MESSAGES)
    assert r.usage.prompt_tokens == len(ids) and len(content) == r.usage.completion_tokens
    for entry in content:
        ref = oracle(model, ids)[-1]
        tok = int(ref.argmax())
        assert entry.token == oracle.tokenizer.decode([tok]) and abs(entry.logprob - float(ref[tok])) < TOL
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 5  # exactly k (vLLM's test_some_logprobs_chat)
        want = torch.topk(ref, 5).values.tolist()
        assert all(abs(t.logprob - w) < TOL for t, w in zip(entry.top_logprobs, want, strict=True))
        ids.append(tok)


def test_chat_zero_and_no_logprobs(client):
    r = client.chat.completions.create(
        model="lora-hf", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=0, **greedy_kw()
    )
    assert r.choices[0].logprobs.content and all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model="lora-hf", messages=MESSAGES, max_tokens=3, logprobs=False)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("model", ["smollm2", "lora-hf"])
def test_chat_streaming_fields_as_vllm_checks_them(client, model):
    messages = [  # vLLM's test_chat_streaming, word for word
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "what is 1+1?"},
    ]
    kw = dict(model=model, messages=messages, max_tokens=10, logprobs=True, top_logprobs=2, temperature=0)
    whole = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks, finish_count, usage, lps, last = [], 0, None, [], None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        last = chunk
        assert chunk.usage is None and chunk.model == model and chunk.id.startswith("chatcmpl-")
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].logprobs:
            lps += chunk.choices[0].logprobs.content
        if chunk.choices[0].finish_reason is not None:
            finish_count += 1
    assert finish_count == 1 and last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices[0].delta.content  # vLLM asserts the finishing chunk carries text
    assert "".join(chunks) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [e.token for e in lps] == [e.token for e in whole.choices[0].logprobs.content]


# ---- logit controls ---------------------------------------------------------------------------------------


def test_logit_bias_min_tokens_stop_token_ids_bad_words(client, oracle):
    tok = oracle.tokenizer
    r = client.completions.create(
        model="lora-hf", prompt=PROMPT, max_tokens=4, logit_bias={"42": 100}, **greedy_kw()
    )
    assert r.choices[0].text == tok.decode([42] * 4)
    free = client.completions.create(model="lora-hf", prompt=PROMPT, max_tokens=6, logprobs=0, **greedy_kw())
    out_ids = tok(free.choices[0].text, add_special_tokens=False)["input_ids"]
    stop_id = out_ids[2]
    stopped = client.completions.create(
        model="lora-hf", prompt=PROMPT, max_tokens=6, extra_body={"stop_token_ids": [stop_id]}, temperature=0
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens <= 3
    word = free.choices[0].text.split()[0]
    banned = client.completions.create(
        model="lora-hf", prompt=PROMPT, max_tokens=6, extra_body={"bad_words": [word]}, temperature=0
    )
    assert word not in banned.choices[0].text.split()
    eos = tok.eos_token_id
    held = client.completions.create(
        model="lora-hf",
        prompt=PROMPT,
        max_tokens=8,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 3},
        temperature=0,
    )
    assert held.usage.completion_tokens == 3 and held.choices[0].finish_reason == "stop"


# ---- refused: every field we cannot honour is a 400 naming it ---------------------------------------------

REFUSED = [  # (route, extra body fields, text the error must contain)
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"unknown_field": 1}, "unknown_field"),
    ("completions", {"logit_bias": {"49152": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"prompt": [1, 2, 49152]}, "out of range"),
    ("completions", {"prompt": [[1, 2], [-1]]}, "out of range"),
    ("completions", {"stop_token_ids": [49152]}, "stop_token_ids"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    (
        "completions",
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
        "continuous_usage_stats",
    ),
    ("completions", {"prompt": ["a"] * 40, "n": 2}, "choices"),
    ("completions", {"store": True}, "store"),
    ("completions", {"service_tier": "flex"}, "service_tier"),
    ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"modalities": ["audio"]}, "modalities"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"nvext": {"unknown": 1}}, "unknown"),
    ("chat", {"echo": True}, "echo"),
]


@pytest.mark.parametrize("route,extra,text", REFUSED, ids=[f"{r}-{next(iter(e))}" for r, e, _ in REFUSED])
def test_refused_fields_are_400_naming_them(server, route, extra, text):
    body = {"model": "smollm2", "max_tokens": 2}
    body |= {"prompt": PROMPT} if route == "completions" else {"messages": MESSAGES}
    body |= extra
    r = httpx.post(
        f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert text in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_fields_clients_send_by_default_are_accepted(client):
    r = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=2,
        user="u1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=True,
    )
    assert r.choices[0].message.content is not None


# ---- request id, API key, vLLM's paths --------------------------------------------------------------------


def test_request_id_is_echoed_and_prefixes_the_response_id(server):
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-Id": "abc-123"}
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"
    bad = httpx.post(f"{server.url}/v1/completions", json=body, headers={**headers, "X-Request-Id": "a b"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    assert "request abc-123" in server.log.read_text()


def test_api_key_guards_v1_and_v2_but_not_health(server):
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/v2/models/smollm2", timeout=30).status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/v1/health/live", "/v1/health/ready", "/v2/health/ready", "/health", "/version"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    assert "time_to_first_token_seconds" in httpx.get(f"{server.url}/metrics").text
    assert json.loads(httpx.get(f"{server.url}/version").text)["version"]


def test_detokenizer_flushes_an_unfinished_character_at_the_end(smollm2_engine):
    """A sequence that ends inside a multi-byte character still ends its last chunk with text (U+FFFD, as a
    whole-sequence decode renders it): vLLM's streaming test asserts the finishing chunk's `delta.content`."""
    from trtllm_peft.serving.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_engine)
    ids = tok.encode("héllo 😀", add_special_tokens=False)
    d = tok.stream()
    text = "".join(d.step(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert text + d.flush() == tok.decode(ids[:-1]) and d.flush() == ""
    d = tok.stream()
    assert "".join(d.step(i) for i in ids) == "héllo 😀" and d.flush() == ""
