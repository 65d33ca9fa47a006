"""Fairness of the host LoRA cache (issue #16, finding 8): a budget of 4 max-rank adapters, 8 adapters in
use by 40 clients. Before, the 4 adapters that got in first kept the cache leased and requests for the
other 4 got 429 on every retry; with the FIFO lease queue every request is answered, every adapter too.
(bench/fairness.py runs the same scenario for longer, both policies side by side, and reports the waits.)
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.integration.conftest import openai_client, random_adapter, smollm2_server, write_adapter

ALL7 = ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")
ADAPTERS, CLIENTS, REQUESTS_EACH = 8, 40, 2


@pytest.fixture(scope="module")
def server(request, spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i in range(ADAPTERS):  # each exactly one max-rank adapter: the budget of 4 holds 4 of them
        adapter = random_adapter(spec, rank=spec.max_lora_rank, modules=ALL7, seed=100 + i, std=0.02)
        write_adapter(adapter, root / f"a{i}", "hf", spec)
    with smollm2_server(
        request,
        root,
        NIM_MAX_CPU_LORAS="4",
        NIM_MAX_GPU_LORAS="4",
        TRTLLM_PEFT_LORA_QUEUE_TIMEOUT="900",  # a loaded test machine is slow: this is not a timing test
    ) as srv:
        yield srv


def test_every_adapter_gets_answers_under_a_full_cache(server):
    client = openai_client(server, timeout=900)
    answered: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def run(c: int) -> None:
        model = f"a{c % ADAPTERS}"
        for _ in range(REQUESTS_EACH):
            try:
                r = client.completions.create(
                    model=model,
                    prompt="The capital of France is",
                    max_tokens=4,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                assert r.usage.completion_tokens == 4
                with lock:
                    answered[model] += 1
            except Exception as e:  # noqa: BLE001 (every failure is collected and reported)
                with lock:
                    errors.append(f"{model}: {e!r}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    per_adapter = CLIENTS // ADAPTERS * REQUESTS_EACH
    assert answered == {f"a{i}": per_adapter for i in range(ADAPTERS)}
    log = server.log.read_text()
    assert sum(f"adapter 'a{i}' loaded" in log for i in range(ADAPTERS)) == ADAPTERS
