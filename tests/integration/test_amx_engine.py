"""A bfloat16 engine on AMX tiles against the same engine on the weight-streaming kernel and on plain torch ops.

A 20-request batch makes every step wide enough for AMX (prefill chunks of >= 16 tokens, decode at batch 20,
the LM head included). Context logits are compared on the same prompts; generation logits step by step up
to and including the first step where greedy tokens differ (until then both saw the same history), so a
numerical tie cannot make the test flaky while any real difference in the math still fails it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama_model
from trtllm_peft.engine.build import build_engine
from trtllm_peft.executor.api import OutputConfig, Request
from trtllm_peft.executor.torch import TorchExecutor, cpu_kernels

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason=f"CPU kernels: {cpu_kernels.why_unavailable()}")
BATCH, NEW = 20, 5
TOL = 3e-2  # bf16 through 3 layers: a few output roundings, relative to the largest logit


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bf16")
    tiny_llama_model(0).save_pretrained(str(d / "hf"))  # hidden 32: q/k/v, o and gate|up fit AMX's 32-k tiles
    return build_engine(d / "hf", d / "engine", dtype="bfloat16", max_batch_size=BATCH, max_seq_len=64,
                        budget_bytes=2**30, quiet=True)  # fmt: skip


def generate(engine: Path, kernels: bool) -> list:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 64, (16 + i % 5,), generator=g).tolist() for i in range(BATCH)]
    out = OutputConfig(
        return_context_logits=True, return_generation_logits=True, exclude_input_from_output=True
    )
    with TorchExecutor(engine, memory_budget_bytes=2**30, cpu_kernels=kernels) as ex:
        ids = ex.enqueue_requests([Request(p, NEW, output_config=out) for p in prompts])
        done = {}
        while len(done) < len(ids):
            for r in ex.await_responses(timeout=60):
                assert not r.has_error(), r.error_msg
                if r.result.is_final:
                    done[r.request_id] = r.result
    return [done[i] for i in ids]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1.0))
    assert err <= TOL, f"relative logit error {err:.2e} > {TOL:.0e}"


def same_math(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        close(x.context_logits, y.context_logits)
        tx, ty = x.output_token_ids[0], y.output_token_ids[0]
        for t in range(NEW):
            close(x.generation_logits[0, t], y.generation_logits[0, t])
            if tx[t] != ty[t]:
                break  # a tie broken differently: later steps see different histories


def test_bf16_engine_on_amx_equals_weight_streaming_and_torch_ops(engine):
    if not KERNELS.amx_available():
        pytest.skip("no AMX-BF16 on this CPU: the streaming path is what runs (test_cpu_kernels covers it)")
    try:
        KERNELS.set_amx(False)
        before = KERNELS.amx_products()
        streaming = generate(engine, True)
        assert KERNELS.amx_products() == before  # forced off: not one product on AMX
    finally:
        KERNELS.set_amx(True)
    amx = generate(engine, True)
    assert KERNELS.amx_products() > before  # the wide steps did run on AMX tiles
    torch_ops = generate(engine, False)
    same_math(amx, streaming)
    same_math(amx, torch_ops)
    agree = sum(a.output_token_ids == s.output_token_ids for a, s in zip(amx, streaming, strict=True))
    assert agree >= BATCH - 2, f"only {agree} of {BATCH} greedy continuations agree"
