"""The real server (uvicorn on a free port, SmolLM2 reference engine) driven by the `openai` client and HTTP.

One server for the module: adapters in all three formats, a refresh interval, and a host budget of two
max-rank adapters so that 429 can be provoked.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import (
    QVO,
    openai_client,
    random_adapter,
    smollm2_server,
    wait_for,
    write_adapter,
)

PROMPT = "John buys 10 packs of magic cards. Each pack has 20 cards, so in total he"
ALL7 = ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")


@pytest.fixture(scope="module")
def loras(tmp_path_factory, spec, backend):
    root = tmp_path_factory.mktemp("loras")
    small = random_adapter(spec, rank=8, modules=QVO, seed=1)
    for fmt in ("hf", "nemo", "trtllm"):
        write_adapter(small, root / f"small-{fmt}", fmt, spec)
    for i in range(3):  # each exactly one max-rank adapter: the host budget holds two
        write_adapter(
            random_adapter(spec, rank=spec.max_lora_rank, modules=ALL7, seed=10 + i, std=0.02),
            root / f"big-{i}",
            "hf",
            spec,
        )
    return root


@pytest.fixture(scope="module")
def server(request, backend, loras):
    with (
        smollm2_server(
            request,
            loras,
            backend,
            NIM_MAX_CPU_LORAS="2",
            NIM_MAX_GPU_LORAS="2",
            NIM_PEFT_REFRESH_INTERVAL="0.3",
            TRTLLM_PEFT_LORA_QUEUE_TIMEOUT="0",  # no waiting for host-cache room: 429 at once (test_fairness waits)
        ) as srv
    ):
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def greedy(client, model, prompt=PROMPT, n=12, **kw):
    """Greedy, and exactly n tokens (random adapters may well like the end token)."""
    kw.setdefault("extra_body", {"ignore_eos": True})
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, **kw)


def model_ids(client):
    return [m.id for m in client.models.list().data]


# ---- models, health, version, metrics --------------------------------------------------------------------


def test_models_list_has_nim_shape(server):
    body = httpx.get(f"{server.url}/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == "smollm2" and {"small-hf", "small-nemo", "small-trtllm", "big-0"} <= set(ids)
    for card in body["data"]:
        assert card["object"] == "model" and card["root"] == "smollm2" and card["parent"] is None
        assert (
            card["permission"][0]["object"] == "model_permission" and card["permission"][0]["allow_sampling"]
        )


def test_health_version_metrics(server, client):
    assert httpx.get(f"{server.url}/v1/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v1/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/v1/version").json()["release"]
    greedy(client, "small-hf", n=2)
    text = httpx.get(f"{server.url}/v1/metrics").text
    for series in (
        'prompt_tokens_total{model_name="small-hf"}',
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "e2e_request_latency_seconds_count",
        'trtllm_peft_adapter_requests_total{adapter="small-hf"}',
        'trtllm_peft_lora_cache_adapters{tier="host"}',
        "trtllm_peft_adapter_load_seconds_count",
        'vllm:lora_requests_info{max_lora="2"',
        "num_requests_running",
        'trtllm_peft_lora_cache_misses_total{tier="host"}',
        'trtllm_peft_lora_cache_hits_total{tier="engine"}',
        'model_name="small-hf"} 1.0',
        "request_success_total{finished_reason=",
    ):
        assert series in text, (series, [ln for ln in text.splitlines() if not ln.startswith("#")][:60])


# ---- completions and chat --------------------------------------------------------------------------------


def test_adapters_present_at_start_are_packed_ahead_and_mapped_back(server, client):
    """serving/packed_store.py: the first use of an adapter packed at start maps its packed file back (no read,
    validation or pack on the engine's cores). The store (twice the host budget) holds all six."""
    assert "6 adapters packed ahead of their first use" in server.log.read_text()
    assert greedy(client, "big-0", n=4).choices[0].text
    assert "adapter 'big-0' loaded (packed file" in server.log.read_text()


def test_three_formats_of_one_adapter_answer_the_same(client):
    texts = {fmt: greedy(client, f"small-{fmt}").choices[0].text for fmt in ("hf", "nemo", "trtllm")}
    assert texts["hf"] == texts["nemo"] == texts["trtllm"], texts
    assert texts["hf"] != greedy(client, "smollm2").choices[0].text  # the adapter does something


def test_completion_usage_and_finish(client):
    r = greedy(client, "smollm2", n=7)
    assert r.object == "text_completion" and r.model == "smollm2"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7 and r.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming(client):
    whole = greedy(client, "small-hf", n=10).choices[0].text
    chunks = list(
        client.completions.create(
            model="small-hf",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(client):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    r = client.chat.completions.create(model="small-nemo", messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="small-nemo", messages=msgs, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content


def test_logprobs_echo_stop_n_seed(client):
    r = greedy(client, "smollm2", n=5, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    # echo + logprobs: the prompt's tokens first (the first without a log-prob), then the 5 generated
    assert r.choices[0].text.startswith(PROMPT) and len(lp.tokens) == r.usage.prompt_tokens + 5
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    full = greedy(client, "smollm2", n=12).choices[0].text
    word = full.split()[2]
    cut = greedy(client, "smollm2", n=12, stop=[word])
    assert cut.choices[0].text == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"
    a = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    b = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    chat = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
    )
    assert len(chat.choices[0].logprobs.content) == 3


def test_nvext_is_accepted(server):
    body = {
        "model": "smollm2",
        "prompt": PROMPT,
        "max_tokens": 4,
        "nvext": {"top_k": 1, "repetition_penalty": 1.1, "ignore_eos": True},
    }
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# ---- errors ----------------------------------------------------------------------------------------------


def test_unknown_model_is_404_listing_models(client):
    with pytest.raises(openai.NotFoundError) as err:
        greedy(client, "no-such-adapter")
    assert "no-such-adapter" in str(err.value) and "small-hf" in str(err.value)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"n": 100}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": 9}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"model": None}, "model"),
    ],
)
def test_bad_parameters_are_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "smollm2", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == 400 and param in err["message"]


def test_prompt_too_long_names_the_limit(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens"):
        greedy(client, "smollm2", prompt="hello " * 3000)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        greedy(client, "smollm2", n=2040)


def test_malformed_json_is_400(server):
    r = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()


# ---- 429 when the host budget is held by active requests -------------------------------------------------


def test_429_when_host_cache_is_full_of_active_adapters(server, client):
    streams = [
        client.completions.create(
            model=f"big-{i}",
            prompt=PROMPT,
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i in (0, 1)
    ]
    try:
        for s in streams:
            next(iter(s))  # both running: both leased
        r = httpx.post(
            f"{server.url}/v1/completions", json={"model": "big-2", "prompt": PROMPT, "max_tokens": 2}
        )
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "RateLimitError" and "retry later" in r.json()["error"]["message"]
        loads = load_count(server)
        again = httpx.post(
            f"{server.url}/v1/completions", json={"model": "big-2", "prompt": PROMPT, "max_tokens": 2}
        )
        assert again.status_code == 429 and load_count(server) == loads  # a retry costs no reload
        assert greedy(client, "smollm2", n=2).choices[0].text  # the base model is unaffected
    finally:
        for s in streams:
            s.close()  # client disconnect: cancels the requests and releases the leases
    assert wait_for(
        lambda: (
            httpx.post(
                f"{server.url}/v1/completions", json={"model": "big-2", "prompt": PROMPT, "max_tokens": 2}
            ).status_code
            == 200
        )
    )


def test_disconnect_cancels_the_request(server, client):
    stream = client.completions.create(
        model="smollm2",
        prompt=PROMPT,
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()

    def generated():
        text = httpx.get(f"{server.url}/v1/metrics").text
        line = next(
            ln for ln in text.splitlines() if ln.startswith('generation_tokens_total{model_name="smollm2"}')
        )
        return float(line.split()[-1]), 'num_requests_running{model_name="smollm2"} 0.0' in text

    assert wait_for(lambda: generated()[1], timeout=10)  # no longer running
    tokens = generated()[0]
    time.sleep(1)
    assert generated()[0] == tokens  # and no longer generating: the engine request was cancelled


# ---- refresh: added, removed, modified, corrupt ----------------------------------------------------------


def test_refresh_adds_removes_and_modifies_while_requests_run(server, client, loras, spec):
    write_adapter(random_adapter(spec, rank=4, modules=("attn_q",), seed=40), loras / "late", "trtllm", spec)
    assert wait_for(lambda: "late" in model_ids(client))
    before = greedy(client, "late").choices[0].text

    running = client.completions.create(
        model="late",
        prompt=PROMPT,
        max_tokens=60,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(running))
    # replace the adapter's content (atomically) while the request runs
    write_adapter(
        random_adapter(spec, rank=4, modules=("attn_q",), seed=41, scale=8.0),
        loras / ".late-new",
        "trtllm",
        spec,
    )
    shutil.rmtree(loras / "late")
    (loras / ".late-new").rename(loras / "late")
    rest = list(running)
    assert rest[-1].choices[0].finish_reason == "length" and first.choices  # finished, on its old weights
    assert wait_for(lambda: greedy(client, "late").choices[0].text != before)

    shutil.rmtree(loras / "late")
    assert wait_for(lambda: "late" not in model_ids(client))
    with pytest.raises(openai.NotFoundError):
        greedy(client, "late")


def test_corrupt_adapter_at_runtime_affects_nothing_else(server, client, loras):
    bad = loras / ".corrupt-tmp"
    shutil.copytree(loras / "small-hf", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    bad.rename(loras / "corrupt")
    assert wait_for(lambda: "corrupt" in model_ids(client))
    ok_before = greedy(client, "small-hf").choices[0].text
    with pytest.raises(openai.UnprocessableEntityError, match="truncated"):
        greedy(client, "corrupt")
    assert "corrupt" not in model_ids(client)  # skipped until its files change
    assert greedy(client, "small-hf").choices[0].text == ok_before


def load_count(server) -> float:
    text = httpx.get(f"{server.url}/v1/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("trtllm_peft_adapter_load_seconds_count"))
    return float(line.split()[-1])


def test_concurrent_requests_for_one_cold_adapter_share_one_load(server, client, loras, spec):
    write_adapter(random_adapter(spec, rank=8, modules=ALL7, seed=77), loras / "cold", "nemo", spec)
    assert wait_for(lambda: "cold" in model_ids(client))
    loads_before = load_count(server)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(greedy(client, "cold", n=3).choices[0].text))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len(set(results)) == 1
    assert load_count(server) == loads_before + 1


def test_server_log_is_clean(server):
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
