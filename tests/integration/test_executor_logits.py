"""Logits and logit controls through the executor contract, on the reference engine, against transformers + peft.

`OutputConfig.return_context_logits` / `return_generation_logits` must give the model's raw logits (PEFT's
`model(ids).logits`, adapter or base, within 1e-4) in TensorRT-LLM's shapes (executor.h `Result`), in a
batch that mixes adapters; `embedding_bias`, `bad_words` and `SamplingConfig.min_tokens` must steer
sampling without changing those raw logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_tiny_engine, make_peft_adapter
from tests.integration.test_torch_executor import collect
from trtllm_peft import formats
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.api import FinishReason, LoraConfig, OutputConfig, Request, SamplingConfig
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.lora import pack

PROMPT = [1, 5, 9, 3, 4, 22, 17]
N = 5
LOGITS = OutputConfig(
    return_context_logits=True, return_generation_logits=True, exclude_input_from_output=True
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_engine"), max_seq_len=64)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, engine):
    d = tmp_path_factory.mktemp("lora")
    model = make_peft_adapter(d, seed=4, r=8, lora_alpha=16).eval()
    return model, pack(formats.load_for_engine(d, EngineDir.open(engine).spec), torch.float32)


def oracle_logits(model, ids: list[int], with_adapter: bool) -> torch.Tensor:
    """PEFT's logits [len(ids), V] for a whole sequence in one forward."""
    with torch.no_grad():
        if with_adapter:
            return model(torch.tensor([ids])).logits[0].float()
        with model.disable_adapter():
            return model(torch.tensor([ids])).logits[0].float()


def test_context_and_generation_logits_are_pefts_in_a_mixed_batch(engine, adapter):
    model, packed = adapter
    lora = LoraConfig(3, packed.weights, packed.config)
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        ids = ex.enqueue_requests(
            [
                Request(PROMPT, N, output_config=LOGITS),
                Request(PROMPT, N, output_config=LOGITS, lora_config=lora),
                Request(PROMPT[:3], N, output_config=OutputConfig(exclude_input_from_output=True)),
            ]
        )
        finals = collect(ex, ids)
    for rid, with_adapter in zip(ids[:2], (False, True), strict=True):
        res = finals[rid].result
        toks = res.output_token_ids[0]
        ref = oracle_logits(model, PROMPT + toks, with_adapter)  # [P + T, V]
        assert res.context_logits.shape == (len(PROMPT), 64)
        assert torch.allclose(res.context_logits, ref[: len(PROMPT)], atol=1e-4)
        assert res.generation_logits.shape == (1, len(toks), 64)  # [beam, T, V] when not streaming
        assert torch.allclose(res.generation_logits[0], ref[len(PROMPT) - 1 : -1], atol=1e-4)
    plain = finals[ids[2]].result
    assert plain.context_logits is None and plain.generation_logits is None


def test_streaming_generation_logits_come_one_step_at_a_time(engine):
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        rid = ex.enqueue_request(Request(PROMPT, N, streaming=True, output_config=LOGITS))
        steps, contexts = [], 0
        while not steps or not steps[-1].is_final:
            for r in ex.await_responses(rid, timeout=30):
                steps.append(r.result)
        (whole,) = collect(ex, [ex.enqueue_request(Request(PROMPT, N, output_config=LOGITS))]).values()
    contexts = [s for s in steps if s.context_logits is not None]
    assert len(contexts) == 1 and contexts[0] is steps[0]  # sent once, with the first step
    rows = [s.generation_logits for s in steps if s.output_token_ids[0]]
    assert all(r.shape == (1, 1, 64) for r in rows)  # [T, beam, V] when streaming
    assert torch.equal(torch.cat(rows)[:, 0], whole.result.generation_logits[0])


def greedy(ex, n=N, **kw) -> list[int]:
    (r,) = collect(ex, [ex.enqueue_request(Request(PROMPT, n, output_config=LOGITS, **kw))]).values()
    return r


def test_embedding_bias_bad_words_and_min_tokens_steer_sampling_not_the_logits(engine):
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ex:
        free = greedy(ex)
        toks = free.result.output_token_ids[0]
        bias = torch.zeros(64)
        bias[42] = 100.0
        biased = greedy(ex, embedding_bias=bias)
        banned = greedy(ex, bad_words=[[toks[0]]])
        # a two-token bad word: its last token is banned only right after its first
        pair = greedy(ex, bad_words=[[toks[0], toks[1]]])
        ended = greedy(ex, end_id=toks[0])
        held = greedy(ex, end_id=toks[0], sampling_config=SamplingConfig(min_tokens=3))
    assert biased.result.output_token_ids[0] == [42] * N
    assert torch.equal(biased.result.generation_logits[0, 0], free.result.generation_logits[0, 0])  # raw
    assert banned.result.output_token_ids[0][0] != toks[0]
    assert pair.result.output_token_ids[0][0] == toks[0] and pair.result.output_token_ids[0][1] != toks[1]
    assert ended.result.output_token_ids[0] == [] and ended.result.finish_reason == FinishReason.END_ID
    held_toks = held.result.output_token_ids[0]
    assert len(held_toks) >= 3 and toks[0] not in held_toks[:3]


# ---- the same contract through TrtllmExecutor over the TensorRT-LLM stand-in --------------------------------


@pytest.fixture
def standin(engine, tmp_path, monkeypatch):
    """`standin(gather_logits)`: a TrtllmExecutor on the stand-in over the tiny engine, its build_config saying
    whether it was built with `--gather_context_logits --gather_generation_logits`."""
    from tests import trtllm_standin
    from tests.integration.conftest import standin_engine
    from trtllm_peft.executor.trtllm import TrtllmExecutor

    trtllm_standin.install(monkeypatch)
    made = []

    def make(gather_logits: bool) -> TrtllmExecutor:
        d = standin_engine(engine, tmp_path / f"gather-{gather_logits}", gather_logits=gather_logits)
        made.append(TrtllmExecutor(d, max_gpu_loras=4, max_cpu_loras=8))
        return made[-1]

    yield make
    for ex in made:
        ex.shutdown()


def test_standin_returns_the_reference_engines_logits_and_honours_the_bias(engine, adapter, standin):
    _, packed = adapter
    bias = torch.zeros(64)
    bias[42] = 100.0
    reqs = [
        Request(PROMPT, N, output_config=LOGITS, lora_config=LoraConfig(3, packed.weights, packed.config)),
        Request(PROMPT, N, output_config=LOGITS, embedding_bias=bias, bad_words=[[42, 42]]),
    ]
    with TorchExecutor(engine, memory_budget_bytes=2**30) as ref:
        want = collect(ref, ref.enqueue_requests(reqs))
    ex = standin(gather_logits=True)
    got = collect(ex, ex.enqueue_requests(reqs))
    for w, g in zip(want.values(), got.values(), strict=True):
        assert g.result.output_token_ids == w.result.output_token_ids
        assert torch.allclose(g.result.context_logits, w.result.context_logits, atol=1e-5)
        assert torch.allclose(g.result.generation_logits, w.result.generation_logits, atol=1e-5)
    steered = list(got.values())[1].result.output_token_ids[0]
    assert steered[0] == 42 and steered[1] != 42  # the bias picks 42; the bad word [42, 42] bans a second one


@pytest.mark.parametrize("flag", ["gather_context_logits", "gather_generation_logits"])
def test_standin_engine_built_without_the_flag_refuses_naming_it(standin, flag):
    from tests.trtllm_standin import executor as standin_executor

    ex = standin(gather_logits=False)
    oc = OutputConfig(**{f"return_{flag.split('_', 1)[1]}": True})
    with pytest.raises(ValueError, match=f"built without --{flag}.*trtllm-build --{flag}"):
        ex.enqueue_request(Request(PROMPT, N, output_config=oc))
    # TensorRT-LLM itself refuses too (executorImpl.cpp), should our check ever be bypassed
    raw = ex._exec
    assert isinstance(raw, standin_executor.Executor)
    tle_oc = ex._tle.OutputConfig(**{f"return_{flag.split('_', 1)[1]}": True})
    rid = raw.enqueue_request(ex._tle.Request(PROMPT, N, output_config=tle_oc))
    (r,) = raw.await_responses(rid)
    assert r.has_error() and flag in r.error_msg
