"""Build a TensorRT-LLM engine with the LoRA plugin (GPU) from a Hugging Face Llama-family checkpoint.

Every step that does real work is a command, logged before it runs so that anyone can rerun it by hand:
  1. a GGUF source (the default SmolLM2) is first dequantized into a Hugging Face directory (transformers);
  2. `python -m trtllm_peft.engine.trtllm_build convert --model_dir HF --output_dir CKPT --dtype D`:
     TensorRT-LLM's checkpoint conversion through its Python API, as its
     examples/models/core/llama/convert_checkpoint.py does it (`MODEL_MAP[arch].from_hugging_face(model_dir,
     dtype, mapping=Mapping(world_size=1, rank=0, tp_size=1, pp_size=1)).save_checkpoint(CKPT,
     save_config=True)`) — the examples are not in the wheel, the API is;
  3. `trtllm-build --checkpoint_dir CKPT --output_dir OUT --gemm_plugin auto --lora_plugin auto
     --lora_target_modules … --max_lora_rank R --max_batch_size … --max_input_len … --max_seq_len …
     --max_num_tokens … --kv_cache_type paged` (flags of tensorrt_llm/commands/build.py; `--lora_plugin auto`
     follows the checkpoint dtype, so adapters must come in that dtype); with `--dora`, also `--dora_plugin
     enable` (plugin.py cli_plugin_args; examples/dora/README.md), without which TensorRT-LLM silently ignores
     DoRA magnitudes. A DoRA engine keeps the base weights it was built from reachable (source_model, or the
     dequantized model.safetensors of a GGUF) for normalizing PEFT magnitudes (lora/dora.py);
  4. the tokenizer and trtllm_peft.json (backend, source, NIM_* sizing, PEFT cache plan, the commands) are
     written beside TensorRT-LLM's config.json and rank0.engine (DESIGN §4.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trtllm_peft.engine import engine_dir as ed
from trtllm_peft.engine.backend import require_trtllm
from trtllm_peft.engine.peft_cache_sizing import size_peft_cache
from trtllm_peft.errors import EngineError, TrtllmPeftError
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES
from trtllm_peft.lora.spec import dtype_name, load_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrtllmBuild:
    """Everything one build needs; the two TensorRT-LLM commands derive from it."""

    model_dir: Path  # a Hugging Face directory (config.json + safetensors)
    out: Path
    checkpoint_dir: Path
    dtype: str = "bfloat16"
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_num_tokens: int | None = None
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    max_lora_rank: int = 32
    # OpenAI log-probs are computed from the engine's logits (executor/api.py). Generation logits cost one
    # [vocab] row per generated token of a request that asks; context logits make every prefill compute
    # [tokens, vocab] logits, so they are opt-in (without them `echo` + `logprobs` is a 400 naming the flag).
    gather_generation_logits: bool = True
    gather_context_logits: bool = False
    dora: bool = False

    def convert_command(self, python: str = sys.executable) -> list[str]:
        return [
            python,
            "-m",
            "trtllm_peft.engine.trtllm_build",
            "convert",
            "--model_dir",
            str(self.model_dir),
            "--output_dir",
            str(self.checkpoint_dir),
            "--dtype",
            self.dtype,
        ]

    def build_command(self, trtllm_build: str = "trtllm-build") -> list[str]:
        return [
            trtllm_build,
            "--checkpoint_dir", str(self.checkpoint_dir),
            "--output_dir", str(self.out),
            "--gemm_plugin", "auto",
            "--lora_plugin", "auto",
            "--lora_target_modules", *self.lora_target_modules,
            "--max_lora_rank", str(self.max_lora_rank),
            "--max_batch_size", str(self.max_batch_size),
            "--max_input_len", str(self.max_seq_len - 1),
            "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.max_num_tokens or self.max_seq_len),
            # explicit, not left to the default: in-flight batching and the PEFT cache need the paged KV cache
            "--kv_cache_type", "paged",
            *(["--gather_generation_logits"] if self.gather_generation_logits else []),
            *(["--gather_context_logits"] if self.gather_context_logits else []),
            *(["--dora_plugin", "enable"] if self.dora else []),
        ]  # fmt: skip


def convert_checkpoint(model_dir: str, output_dir: str, dtype: str) -> None:
    """HF directory → TensorRT-LLM checkpoint (config.json + rank0.safetensors), single GPU."""
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import MODEL_MAP

    arch = (
        json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or ["LlamaForCausalLM"]
    )[0]
    if arch not in MODEL_MAP:
        raise EngineError(f"{model_dir}: TensorRT-LLM has no model for architecture {arch}")
    mapping = Mapping(world_size=1, rank=0, tp_size=1, pp_size=1)
    model = MODEL_MAP[arch].from_hugging_face(model_dir, dtype, mapping=mapping)
    model.save_checkpoint(output_dir, save_config=True)


def hf_model_dir(src: Path, work: Path, dtype: str) -> Path:
    """`src` if it is a Hugging Face directory; a GGUF file is dequantized into `work`/hf first."""
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise EngineError(f"{src}: not a Hugging Face model directory (no config.json)")
        return src
    if src.suffix != ".gguf" or not src.is_file():
        raise EngineError(f"{src}: not a Hugging Face model directory nor a .gguf file")
    from safetensors.torch import save_file

    from trtllm_peft.engine.source import load_source
    from trtllm_peft.lora.spec import DTYPES

    out = work / "hf"
    log.info("dequantizing %s into %s (TensorRT-LLM converts Hugging Face checkpoints)", src, out)
    source = load_source(src, DTYPES[dtype])  # transformers refuses to save_pretrained a GGUF-loaded model
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(portable_hf_config(source.hf_config, dtype), indent=2))
    save_file(source.state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    source.tokenizer.save_pretrained(str(out))
    return out


def portable_hf_config(cfg: dict, dtype: str) -> dict:
    """A config.json that transformers 4.x (TensorRT-LLM's) reads like 5.x wrote it: 5.x keeps rope_theta inside
    `rope_parameters` and the dtype as `dtype`; 4.x reads `rope_theta`, `rope_scaling` and `torch_dtype`."""
    out = {**cfg, "torch_dtype": dtype, "dtype": dtype}
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" not in out and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def _trtllm_build_executable() -> str:
    beside = Path(sys.executable).parent / "trtllm-build"
    found = str(beside) if beside.is_file() else shutil.which("trtllm-build")
    if not found:
        raise EngineError("trtllm-build is not on PATH (it comes with the tensorrt_llm package)")
    return found


def run_command(cmd: list[str], say=print) -> None:
    """Run one logged step; EngineError (with the command to rerun) when it fails."""
    line = shlex.join(cmd)
    log.info("$ %s", line)
    say(f"$ {line}")
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise EngineError(
            f"{Path(cmd[0]).name} failed with exit code {rc}; rerun it by hand to see why:\n  {line}"
        )


def write_metadata(
    job: TrtllmBuild, *, source: Path, commands: list[list[str]], max_gpu_loras: int, max_cpu_loras: int
) -> dict:
    """trtllm_peft.json beside TensorRT-LLM's config.json, after checking the engine has our LoRA setup."""
    spec = load_spec(job.out)
    missing = [m for m in job.lora_target_modules if m not in spec.lora_target_modules]
    if missing or spec.max_lora_rank != job.max_lora_rank or spec.dora_plugin != job.dora:
        raise EngineError(
            f"{job.out}: the engine's LoRA setup ({list(spec.lora_target_modules)}, rank "
            f"{spec.max_lora_rank}, dora_plugin {spec.dora_plugin}) is not the one asked for "
            f"({list(job.lora_target_modules)}, rank {job.max_lora_rank}, dora_plugin {job.dora})"
        )
    sizing = size_peft_cache(spec, max_gpu_loras=max_gpu_loras, max_cpu_loras=max_cpu_loras)
    hf_config = job.model_dir / "config.json"
    meta = {
        "format_version": ed.ENGINE_FORMAT_VERSION,
        "backend": "trtllm",
        "source_model": str(source),
        "source_name": source.stem if source.is_file() else source.name,
        "sized_from": {
            "NIM_MAX_LORA_RANK": job.max_lora_rank,
            "NIM_MAX_GPU_LORAS": max_gpu_loras,
            "NIM_MAX_CPU_LORAS": max_cpu_loras,
        },
        "peft_cache_config": asdict(sizing.config),
        "peft_cache_plan": sizing.lines(),
        "commands": [shlex.join(c) for c in commands],
        "hf_config": json.loads(hf_config.read_text()) if hf_config.is_file() else {},
    }
    (job.out / ed.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))


def build_trtllm_engine(
    model: str | Path | None,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    max_batch_size: int = 32,
    max_seq_len: int = 2048,
    max_num_tokens: int | None = None,
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    max_lora_rank: int = 32,
    max_gpu_loras: int = 8,
    max_cpu_loras: int = 16,
    dora: bool = False,
    gather_context_logits: bool = False,
    keep_checkpoint: bool = False,
    quiet: bool = False,
) -> Path:
    """Convert and build `model` into the engine directory `out`; returns `out`."""
    from trtllm_peft.engine.source import default_source

    require_trtllm()
    say = (lambda *_: None) if quiet else print
    out, src = Path(out), Path(model) if model else default_source()
    work = out.parent / f".{out.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    job = TrtllmBuild(
        model_dir=hf_model_dir(src, work, dtype_name(dtype)),
        out=out,
        checkpoint_dir=work / "checkpoint",
        dtype=dtype_name(dtype),
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        lora_target_modules=tuple(lora_target_modules),
        max_lora_rank=max_lora_rank,
        dora=dora,
        gather_context_logits=gather_context_logits,
    )
    commands = [job.convert_command(), job.build_command(_trtllm_build_executable())]
    for cmd in commands:
        run_command(cmd, say)
    _copy_tokenizer(job.model_dir, out)
    if (
        dora and job.model_dir != src
    ):  # a dequantized GGUF: keep its weights for DoRA's norms (base_weights.py)
        shutil.copy2(job.model_dir / "model.safetensors", out / "model.safetensors")
    meta = write_metadata(
        job, source=src, commands=commands, max_gpu_loras=max_gpu_loras, max_cpu_loras=max_cpu_loras
    )
    if not keep_checkpoint:
        shutil.rmtree(work, ignore_errors=True)
    say("\n".join(meta["peft_cache_plan"]))
    say(
        f"built TensorRT-LLM engine {out} ({job.dtype}, LoRA rank ≤ {max_lora_rank}) in {time.perf_counter() - t0:.0f} s"
    )
    return out


def run_trtllm_build(args: argparse.Namespace, settings) -> int:
    """`trtllm-peft build --backend trtllm`: the same flags as the reference build (engine/build.py)."""
    try:
        out = build_trtllm_engine(
            args.model,
            args.out,
            dtype=getattr(args, "dtype", None) or "bfloat16",
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            max_num_tokens=args.max_num_tokens,
            lora_target_modules=tuple(args.lora_target_modules),
            max_lora_rank=settings.max_lora_rank,
            max_gpu_loras=settings.max_gpu_loras,
            max_cpu_loras=settings.max_cpu_loras,
            dora=bool(getattr(args, "dora", False)),
            gather_context_logits=bool(getattr(args, "gather_context_logits", False)),
        )
    except TrtllmPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"engine written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trtllm_peft.engine.trtllm_build convert …`: step 2 on its own (what the build runs)."""
    parser = argparse.ArgumentParser(prog="python -m trtllm_peft.engine.trtllm_build")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "convert", help="Hugging Face directory → TensorRT-LLM checkpoint (TensorRT-LLM's Python API)"
    )
    p.add_argument("--model_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args(argv)
    try:
        require_trtllm()
        convert_checkpoint(args.model_dir, args.output_dir, args.dtype)
    except TrtllmPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
