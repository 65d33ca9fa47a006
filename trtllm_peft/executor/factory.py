"""Pick and start the executor an engine directory was built for (DESIGN §2: torch or TensorRT-LLM)."""

from __future__ import annotations

from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.errors import EngineError, SettingsError
from trtllm_peft.executor.api import Executor, GuidedDecodingConfig, KvCacheConfig
from trtllm_peft.settings import Settings


def create_executor(settings: Settings, engine: EngineDir) -> Executor:
    """The engine decides the backend; TRTLLM_PEFT_BACKEND, when not `auto`, must agree with it."""
    backend = engine.backend
    if settings.backend not in ("auto", backend):
        raise SettingsError(
            f"TRTLLM_PEFT_BACKEND={settings.backend} but {engine.path} is a {backend} engine; "
            f"rebuild it with `make engine BACKEND={settings.backend}` or unset the variable"
        )
    guided = guided_config_for(engine)
    if backend == "trtllm":
        from trtllm_peft.executor.trtllm import TrtllmExecutor

        return TrtllmExecutor.from_settings(engine, settings, guided)
    from trtllm_peft.executor.torch import TorchExecutor

    return TorchExecutor(
        engine.path,
        max_gpu_loras=settings.max_gpu_loras,
        max_cpu_loras=settings.max_cpu_loras,
        cpu_kernels=settings.cpu_kernels,
        kv_cache_config=kv_cache_config(settings),
        enable_chunked_context=settings.enable_chunked_context,
        max_num_tokens=settings.max_num_tokens,
        chunk_tokens_while_decoding=settings.chunk_tokens_while_decoding,
        guided_decoding_config=guided,
    )


def kv_cache_config(settings: Settings) -> KvCacheConfig:
    """NIM's KV cache variables as TensorRT-LLM's KvCacheConfig (reuse off unless NIM_ENABLE_KV_CACHE_REUSE)."""
    return KvCacheConfig(
        enable_block_reuse=settings.enable_kv_cache_reuse,
        free_gpu_memory_fraction=settings.kv_cache_percent,
    )


def guided_config_for(engine: EngineDir) -> GuidedDecodingConfig:
    """Guided decoding is always on: xgrammar over the engine's own tokenizer (executor/guided.py)."""
    from transformers import AutoTokenizer

    from trtllm_peft.executor.guided import guided_decoding_config

    try:
        tok = AutoTokenizer.from_pretrained(str(engine.path))
    except (OSError, ValueError) as e:
        raise EngineError(f"{engine.path}: no usable tokenizer for guided decoding ({e})") from None
    return guided_decoding_config(tok)
