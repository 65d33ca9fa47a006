"""Shared fixtures: a tiny Llama-architecture model made in the test (no downloads) and real PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec

# GQA on purpose (4 query heads, 2 kv heads), dims all different so a transposed tensor cannot fit.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 64,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A HF model directory holding only config.json of the tiny Llama (enough for specs)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return d


@pytest.fixture(scope="session")
def tiny_spec(tiny_llama_dir) -> ModelSpec:
    from trtllm_peft.lora import load_spec

    return load_spec(tiny_llama_dir, max_lora_rank=64, dtype="float32")


def tiny_llama_model(seed: int = 0):
    """A randomly initialised transformers LlamaForCausalLM with the TINY_LLAMA geometry."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_peft_adapter(out: Path, *, seed: int = 1, safe_serialization: bool = True, **lora_kwargs):
    """Train-free real PEFT adapter: peft.get_peft_model on the tiny Llama, random non-zero A and B, saved.

    Returns the PeftModel (so tests can compare against PEFT's own merged weights).
    """
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", LLAMA_TARGETS)
    model = get_peft_model(tiny_llama_model(), LoraConfig(**lora_kwargs))
    randomize_lora(model, seed, 0.1)
    model.save_pretrained(str(out), safe_serialization=safe_serialization)
    return model


def randomize_lora(model, seed: int, std: float) -> None:
    """Random non-zero A and B (B is zero-initialised: make it count); with DoRA, random magnitudes too:
    each module's initial m = ‖W + s·B·A‖_row (what PEFT sets, for the new A and B) times 1 ± 30 %, so the
    DoRA factor m / ‖…‖ differs from 1 and changes outputs."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for key, dora in module.lora_magnitude_vector.items():
                    w = module.get_base_layer().weight
                    delta = module.lora_B[key].weight @ module.lora_A[key].weight * module.scaling[key]
                    norm = torch.linalg.norm(w + delta, dim=1)
                    dora.weight.copy_(norm * (1 + 0.3 * torch.randn(norm.shape, generator=gen)))


def build_tiny_engine(directory: Path, *, max_seq_len: int = 64) -> Path:
    """A reference engine of the tiny Llama (seed 0) in `directory`: small limits, 1 GiB memory plan."""
    from trtllm_peft.engine.build import build_engine

    tiny_llama_model(0).save_pretrained(str(directory / "hf"))
    return build_engine(
        directory / "hf",
        directory / "engine",
        max_batch_size=8,
        max_seq_len=max_seq_len,
        max_lora_rank=16,
        max_gpu_loras=4,
        max_cpu_loras=8,
        budget_bytes=2**30,
        quiet=True,
    )


def cancel_mid_stream(ex, enqueue, finals, cancelled, tries: int = 5):
    """(first responses, final response) of a streaming request cancelled after its first token arrived.

    `enqueue()` sends a new streaming request and returns its id; `finals(ex, ids)` collects final responses;
    `cancelled` is the FinishReason a cancellation ends with. await_responses(id) hands over every response
    ready for the id, so on a loaded machine the final one can come with the first (the engine ran all the
    tokens before the test thread woke), or the request can end by length between the first token and the
    cancel: neither try is a cancellation, so it is tried again with a new request."""
    for _ in range(tries):
        rid = enqueue()
        first = ex.await_responses(rid, timeout=30)
        assert first and not first[0].has_error() and len(first[0].result.output_token_ids[0]) == 1
        if any(r.result.is_final for r in first):
            continue
        ex.cancel_request(rid)
        last = finals(ex, [rid])[rid]
        if last.result.finish_reason == cancelled:
            return first, last
    pytest.fail(f"the request ended before its cancellation in each of {tries} tries")


def random_lora(spec, rank: int, seed: int = 0, layers=None, modules=None) -> LoraAdapter:
    """Random A and B (unscaled) on `layers` x `modules` (default: every layer, the spec's LoRA modules)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in layers if layers is not None else range(spec.num_layers):
        for m in modules or spec.lora_target_modules:
            d_in, d_out = spec.module_dims(m)
            weights[(layer, m)] = LoraWeights(
                torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
            )
    return LoraAdapter(weights=weights, format="hf")


def edit_peft_config(d: Path, **changes) -> None:
    """Change keys of the adapter_config.json in `d` (None writes null)."""
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def rewrite_peft_tensors(d: Path, fn) -> None:
    """Replace the tensors of adapter_model.safetensors in `d` by `fn(tensors)`."""
    save_file(
        fn(load_file(str(d / "adapter_model.safetensors"))),
        str(d / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def rekey_peft_tensors(fn):
    """A rewrite of `d` that renames every tensor key by `fn`."""
    return lambda d: rewrite_peft_tensors(d, lambda t: {fn(k): v for k, v in t.items()})
