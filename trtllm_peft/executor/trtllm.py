"""`TrtllmExecutor`: the executor contract (api.py) over TensorRT-LLM 1.2's `tensorrt_llm.bindings.executor`.

The only module that imports TensorRT-LLM's executor bindings (lazily, when an executor is created); our
types are mapped to the binding's and back in trtllm_convert.py. TensorRT-LLM does the batching, the KV cache
and the PEFT cache. Signatures follow the nanobind bindings: cpp/tensorrt_llm/nanobind/executor/executor.cpp
(Executor(model_path, model_type, executor_config), await_responses(timeout: timedelta) / (id, timeout)).
TensorRT-LLM's own errors (not in cache, cache full, validation) come back as error Responses with its texts;
executor/errors.py classifies them.

Logits: TensorRT-LLM returns context logits only from an engine built with `trtllm-build
--gather_context_logits`, generation logits only with `ExecutorConfig(gather_generation_logits=True)` over
an engine built with `--gather_generation_logits` (executorImpl.cpp fetchNewRequests: "Return context logit
need to build engine with gather_context_logits", "To return generation logits, gather_generation_logits
must be enabled in ExecutorConfig"). The executor config follows the engine's build_config, and a request
for logits the engine cannot give is refused before it is queued, naming the build flag (a 400 upstream).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from trtllm_peft.engine.peft_cache_sizing import lora_activation_bytes, memory_plan_lines, size_peft_cache
from trtllm_peft.errors import EngineError
from trtllm_peft.executor.api import (
    GuidedDecodingConfig,
    IdType,
    IterationStats,
    KvCacheConfig,
    Request,
    Response,
)
from trtllm_peft.executor.trtllm_convert import (
    executor_config,
    from_trtllm_response,
    from_trtllm_stats,
    to_trtllm_request,
)
from trtllm_peft.lora.spec import ModelSpec, load_spec

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_FRACTION = 0.9  # KvCacheConfig.free_gpu_memory_fraction, TensorRT-LLM's default


class TrtllmImportError(EngineError):
    """`tensorrt_llm` does not import here; the message says how to install it."""

    def __init__(self, reason: str) -> None:
        from trtllm_peft.engine.backend import INSTALL_HINT

        self.reason = reason
        super().__init__(f"{reason}.\n{INSTALL_HINT}")


def import_bindings() -> Any:
    """`tensorrt_llm.bindings.executor`, or TrtllmImportError with NVIDIA's install instructions."""
    try:
        import tensorrt_llm.bindings.executor as tle
    except Exception as e:  # ImportError, or a CUDA/MPI library that fails to load
        raise TrtllmImportError(f"tensorrt_llm does not import ({type(e).__name__}: {e})") from None
    return tle


def check_logits_available(req: Request, build: dict[str, Any]) -> None:
    """ValueError naming the build flag when `req` asks for logits the engine was not built to gather."""
    oc = req.output_config
    for wanted, flag in (
        (oc.return_context_logits, "gather_context_logits"),
        (oc.return_generation_logits, "gather_generation_logits"),
    ):
        if wanted and not build.get(flag):
            raise ValueError(
                f"this TensorRT-LLM engine was built without --{flag}, so it cannot return the logits "
                f"log-probs are computed from; rebuild it with `trtllm-build --{flag}`"
            )


# ---- the executor -----------------------------------------------------------------------------------------


class TrtllmExecutor:
    """api.Executor over a TensorRT-LLM engine directory (config.json + rank0.engine, built by trtllm_build)."""

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        max_gpu_loras: int,
        max_cpu_loras: int,
        optimal_adapter_size: int | None = None,
        kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION,
        max_queue_size: int | None = None,
        kv_cache_config: KvCacheConfig | None = None,
        enable_chunked_context: bool = False,
        guided_decoding_config: GuidedDecodingConfig | None = None,
    ) -> None:
        tle = import_bindings()
        self.engine_dir = Path(engine_dir)
        self.spec: ModelSpec = load_spec(self.engine_dir)
        if not self.spec.lora_target_modules or not self.spec.max_lora_rank:
            raise EngineError(
                f"{self.engine_dir}: engine built without the LoRA plugin; rebuild it with trtllm_build"
            )
        self.dtype = self.spec.torch_dtype
        self.sizing = size_peft_cache(
            self.spec,
            max_gpu_loras=max_gpu_loras,
            max_cpu_loras=max_cpu_loras,
            optimal_adapter_size=optimal_adapter_size,
        )
        self._log_plan(kv_cache_fraction)
        self.build_config = _build_config(self.engine_dir)
        config = executor_config(
            tle,
            self.sizing,
            kv_cache_fraction=kv_cache_fraction,
            max_queue_size=max_queue_size,
            kv_cache_config=kv_cache_config,
            enable_chunked_context=enable_chunked_context,
            gather_generation_logits=bool(self.build_config.get("gather_generation_logits")),
            guided_decoding_config=guided_decoding_config,
        )
        self._tle = tle
        self._exec = tle.Executor(self.engine_dir, tle.ModelType.DECODER_ONLY, config)
        self._lock = threading.Lock()
        self._tasks: dict[IdType, int | None] = {}  # request id → LoRA task id, while in flight

    @classmethod
    def from_settings(
        cls, engine: Any, settings: Any, guided_decoding_config: GuidedDecodingConfig | None = None
    ) -> TrtllmExecutor:
        """From an EngineDir (or path) and Settings (NIM_MAX_GPU_LORAS, NIM_MAX_CPU_LORAS, NIM_KV cache ones)."""
        path = getattr(engine, "path", engine)
        kv = KvCacheConfig(
            enable_block_reuse=settings.enable_kv_cache_reuse,
            free_gpu_memory_fraction=settings.kv_cache_percent,
        )
        return cls(
            path,
            max_gpu_loras=settings.max_gpu_loras,
            max_cpu_loras=settings.max_cpu_loras,
            kv_cache_config=kv,
            enable_chunked_context=settings.enable_chunked_context,
            guided_decoding_config=guided_decoding_config,
        )

    def _log_plan(self, kv_cache_fraction: float) -> None:
        build = _build_config(self.engine_dir)
        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
        lines = self.sizing.lines() + memory_plan_lines(
            self.sizing,
            engine_bytes=sum(f.stat().st_size for f in self.engine_dir.glob("*.engine")),
            activation_bytes=lora_activation_bytes(
                self.spec, max_num_tokens=int(build.get("max_num_tokens") or 0)
            ),
            free_gpu_bytes=free,
            kv_cache_fraction=kv_cache_fraction,
        )
        log.info("%s", "\n".join(lines))

    # ---- api.Executor ---------------------------------------------------------------------------------

    def enqueue_request(self, request: Request) -> IdType:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: list[Request]) -> list[IdType]:
        for r in requests:
            check_logits_available(r, self.build_config)
        converted = [to_trtllm_request(self._tle, r, self.dtype) for r in requests]
        with self._lock:  # registered before await_responses can see (and pop) their final responses
            ids = list(self._exec.enqueue_requests(converted))
            for rid, r in zip(ids, requests, strict=True):
                self._tasks[rid] = r.lora_config.task_id if r.lora_config is not None else None
        return ids

    def await_responses(self, id: IdType | None = None, timeout: float | None = None) -> list[Response]:
        wait = None if timeout is None else timedelta(seconds=timeout)
        raw = (
            self._exec.await_responses(timeout=wait)
            if id is None
            else self._exec.await_responses(id=id, timeout=wait)
        )
        out = [from_trtllm_response(r) for r in raw]
        with self._lock:
            for r in out:
                if r.has_error() or r.result.is_final:
                    self._tasks.pop(r.request_id, None)
        return out

    def get_num_responses_ready(self, id: IdType | None = None) -> int:
        return int(self._exec.get_num_responses_ready(id))

    def cancel_request(self, id: IdType) -> None:
        self._exec.cancel_request(id)

    def can_enqueue_requests(self) -> bool:
        return bool(self._exec.can_enqueue_requests())

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        with self._lock:
            active = len({t for t in self._tasks.values() if t is not None})
        return [from_trtllm_stats(s, active) for s in self._exec.get_latest_iteration_stats()]

    def shutdown(self) -> None:
        self._exec.shutdown()

    def __enter__(self) -> TrtllmExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _build_config(engine_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((engine_dir / "config.json").read_text()).get("build_config", {})
    except (OSError, ValueError):
        return {}
