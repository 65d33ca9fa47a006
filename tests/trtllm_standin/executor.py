"""`Executor` of the stand-in: TensorRT-LLM's request path and PEFT cache, generation by the reference engine.

What is TensorRT-LLM's here (cpp/tensorrt_llm/nanobind/executor/executor.cpp for the Python surface,
cpp/tensorrt_llm/executor/executorImpl.cpp for the behaviour):
* Executor(model_path, model_type, executor_config); the engine's config.json gives the model config;
* fetching a new request runs addRequestPeft: a LoraExpectedException (task not cached, cache full) becomes
  an error Response of exactly its text, any other exception "Encountered an error when fetching new
  request: " + its text (executorImpl.cpp, fetchNewRequests);
* the capacity scheduler holds a request back while its adapter's device pages do not fit beside the tasks
  in progress; finished requests mark their task done in both tiers (markRequestDone);
* await_responses(timeout) / (id, timeout), cancel_request, get_num_responses_ready, shutdown;
* logits are returned only when the engine can gather them (executorImpl.cpp fetchNewRequests):
  context logits need an engine built with `--gather_context_logits` (config.json
  build_config.gather_context_logits, ModelConfig::computeContextLogits), generation logits need
  `ExecutorConfig(gather_generation_logits=True)`; otherwise the request fails with TensorRT-LLM's text.
  An embedding bias is viewed as [1, vocab] (llmRequest.h: `mEmbeddingBias.value()->unsqueeze(0)`).
* guided decoding exists only with ExecutorConfig(guided_decoding_config=…), validated at construction
  (executorConfig.cpp GuidedDecodingConfig::validate); a request with GuidedDecodingParams on an executor
  without it is an error response (executorImpl.cpp fetchNewRequests: "Request is specified with
  GuidedDecodingParams, but GuidedDecoder is not setup. …").
Generation is delegated to TorchExecutor with caches too large to refuse anything: every admission decision
is the stand-in's. Each host-cache entry gets its own delegate task id, so a task id re-put after eviction can
never reach stale weights in the delegate.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from tests.trtllm_standin import configs as c
from tests.trtllm_standin import types as t
from tests.trtllm_standin.peft import LoraExpectedError, PeftCacheManager
from trtllm_peft.executor import api
from trtllm_peft.lora.spec import load_spec

FETCH_ERROR = "Encountered an error when fetching new request: "
DELEGATE_CACHE = api.PeftCacheConfig(num_host_module_layer=10**9, num_device_module_layer=10**9)


class Executor:
    def __init__(self, model_path, model_type, executor_config) -> None:
        if not isinstance(model_path, (str, Path)):
            raise TypeError("incompatible function arguments: model_path must be os.PathLike")
        if not isinstance(model_type, t.ModelType) or not isinstance(executor_config, c.ExecutorConfig):
            raise TypeError(
                "incompatible function arguments: Executor(model_path, model_type, executor_config)"
            )
        from trtllm_peft.executor.torch import TorchExecutor

        guided = executor_config.guided_decoding_config
        if guided is not None:
            guided.validate()
        self.spec = load_spec(model_path)
        build = json.loads((Path(model_path) / "config.json").read_text()).get("build_config", {})
        self.gather_context_logits = bool(build.get("gather_context_logits"))
        self.gather_generation_logits = executor_config.gather_generation_logits
        self.peft = PeftCacheManager(self.spec, executor_config.peft_cache_config)
        kv = executor_config.kv_cache_config  # the KV cache is the delegate's: reuse and sizing as configured
        self.delegate = TorchExecutor(
            model_path,
            peft_cache_config=DELEGATE_CACHE,
            device="cpu",
            kv_cache_config=api.KvCacheConfig(
                enable_block_reuse=kv.enable_block_reuse,
                max_tokens=kv.max_tokens,
                free_gpu_memory_fraction=kv.free_gpu_memory_fraction,
            ),
            enable_chunked_context=executor_config.enable_chunked_context,
            guided_decoding_config=_guided(guided),
        )
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._pending: list[tuple[int, t.Request]] = []  # admitted, waiting for device pages
        self._running: dict[int, tuple[int, int | None]] = {}  # delegate request id → (our id, task id)
        self._ready: dict[int, list[t.Response]] = {}
        self._stopped = False
        self.requests_seen: list[t.Request] = []  # every Request received, for tests to inspect

    # ---- request path -------------------------------------------------------------------------------

    def enqueue_request(self, request: t.Request) -> int:
        if not isinstance(request, t.Request):
            raise TypeError("incompatible function arguments: request must be a Request")
        with self._lock:
            check_alive(self)
            rid = next(self._ids)
            self.requests_seen.append(request)
            lc = request.lora_config
            if request.guided_decoding_params is not None and self.delegate.guides is None:
                self._answer(rid, FETCH_ERROR + api.GUIDED_NOT_SETUP_MESSAGE, request.client_id)
                return rid
            try:
                self._check_outputs(request)
                if lc is not None:
                    self.peft.add_request(rid, lc.task_id, lc.weights, lc.config)
            except LoraExpectedError as e:
                self._answer(rid, str(e), request.client_id)
                return rid
            except RuntimeError as e:
                self._answer(rid, FETCH_ERROR + str(e), request.client_id)
                return rid
            self._pending.append((rid, request))
            self._pump()
            return rid

    def _check_outputs(self, req: t.Request) -> None:
        """executorImpl.cpp fetchNewRequests' checks of the logits a request asks for, and its bias."""
        oc, where = req.output_config, "cpp/tensorrt_llm/executor/executorImpl.cpp"
        if oc.return_context_logits:
            t.check(
                self.gather_context_logits,
                "Return context logit need to build engine with gather_context_logits",
                where,
            )
        if oc.return_generation_logits:
            t.check(
                self.gather_generation_logits,
                "To return generation logits, gather_generation_logits must be enabled in ExecutorConfig",
                where,
            )
        bias = req.embedding_bias
        if bias is not None:
            t.check(
                bias.ndim == 1 and bias.shape[0] == self.spec.vocab_size,
                f"embedding bias shape {list(bias.shape)} does not match [vocabSize={self.spec.vocab_size}]",
                "cpp/include/tensorrt_llm/batch_manager/llmRequest.h",
            )

    def enqueue_requests(self, requests: list[t.Request]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def _pump(self) -> None:
        """Forward pending requests whose adapter fits on the device now, in arrival order (FCFS)."""
        for rid, req in list(self._pending):
            task = req.lora_config.task_id if req.lora_config is not None else None
            if task is not None and self.peft.device_never_fits(task):
                self._pending.remove((rid, req))
                self.peft.mark_request_done(rid, task)
                self._answer(rid, api.DEVICE_CACHE_FULL_MESSAGE, req.client_id)
                continue
            if task is not None and not self.peft.device_can_hold(task):
                continue  # waits, as the capacity scheduler does
            self._pending.remove((rid, req))
            if task is not None:
                self.peft.ensure_on_device(task)
            did = self.delegate.enqueue_request(self._delegate_request(req, task))
            self._running[did] = (rid, task)

    def _delegate_request(self, req: t.Request, task: int | None) -> api.Request:
        lora = None
        if task is not None:
            weights, config = self.peft.host.values[task]
            lora = api.LoraConfig(self.peft.host.entry_ids[task], weights, self._dora_as_built(config))
        sc, oc = req.sampling_config, req.output_config
        sampling = api.SamplingConfig(
            **{
                k: getattr(sc, k)
                for k in (
                    "top_k",
                    "top_p",
                    "seed",
                    "temperature",
                    "min_tokens",
                    "repetition_penalty",
                    "presence_penalty",
                    "frequency_penalty",
                    "min_p",
                )
            }
        )
        output = api.OutputConfig(
            return_log_probs=oc.return_log_probs,
            return_context_logits=oc.return_context_logits,
            return_generation_logits=oc.return_generation_logits,
            exclude_input_from_output=oc.exclude_input_from_output,
        )
        return api.Request(
            req.input_token_ids,
            req.max_tokens,
            streaming=req.streaming,
            sampling_config=sampling,
            output_config=output,
            end_id=req.end_id,
            pad_id=req.pad_id,
            bad_words=req.bad_words,
            stop_words=req.stop_words,
            embedding_bias=req.embedding_bias,
            lora_config=lora,
            client_id=req.client_id,
            guided_decoding_params=_guided_params(req.guided_decoding_params),
        )

    def _dora_as_built(self, config: torch.Tensor) -> torch.Tensor:
        """DoRA rows on an engine built without the DoRA plugin run as plain LoRA, as in 1.2: nothing refuses
        them (cpp/tensorrt_llm/runtime/loraUtils.cpp loraValidateRequestTensors checks only that the row holds
        flattenedInOutSize(adapterSize, isDora) values), and the network has no Dora layer to apply them
        (tensorrt_llm/layers/attention.py creates qkv_dora only under plugin_config.dora_plugin; lora.py
        Dora.forward: "Not support dora without plugin"). examples/dora/README.md: "if you omit
        --dora_plugin=enable, you will not receive any warning … the DoRA magnitudes will simply be ignored"."""
        if self.spec.dora_plugin or config.shape[-1] < 4:
            return config
        plain = config.clone()
        plain[..., 3] = 0
        return plain

    def _answer(self, rid: int, payload: str | t.Result, client_id: int | None) -> None:
        self._ready.setdefault(rid, []).append(t.Response(rid, payload, client_id))

    # ---- responses ----------------------------------------------------------------------------------

    def await_responses(self, *args: Any, **kwargs: Any) -> list[t.Response]:
        """Overloads of executor.cpp: (timeout=None), (id, timeout=None), (ids, timeout=None)."""
        ids, timeout = _overload(args, kwargs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._poll(0.0)
                out = self._take(ids)
                if out or self._stopped or (deadline is not None and time.monotonic() >= deadline):
                    return out
            self._poll_wait(0.02 if deadline is None else max(0.0, min(0.02, deadline - time.monotonic())))

    def _poll_wait(self, wait: float) -> None:
        got = self.delegate.await_responses(timeout=wait)
        with self._lock:
            self._translate(got)

    def _poll(self, wait: float) -> None:
        self._translate(self.delegate.await_responses(timeout=wait))

    def _translate(self, responses: list[api.Response]) -> None:
        for r in responses:
            rid, task = self._running.get(r.request_id, (None, None))
            if rid is None:
                continue
            final = r.has_error() or r.result.is_final
            if r.has_error():
                self._answer(rid, r.error_msg, r.client_id)
            else:
                self._answer(rid, _result(r.result), r.client_id)
            if final:
                del self._running[r.request_id]
                if task is not None:
                    self.peft.mark_request_done(rid, task)
        if responses:
            self._pump()

    def _take(self, ids: list[int] | None) -> list[t.Response]:
        keys = list(self._ready) if ids is None else [i for i in ids if i in self._ready]
        return [resp for k in keys for resp in self._ready.pop(k)]

    def get_num_responses_ready(self, id: int | None = None) -> int:
        with self._lock:
            self._poll(0.0)
            return sum(len(v) for k, v in self._ready.items() if id is None or k == id)

    def cancel_request(self, id: int | None = None) -> None:
        with self._lock:
            for rid, req in list(self._pending):
                if rid == id:  # never scheduled: a final response with CANCELLED
                    self._pending.remove((rid, req))
                    if req.lora_config is not None:
                        self.peft.mark_request_done(rid, req.lora_config.task_id)
                    self._answer(rid, _cancelled(), req.client_id)
            for did, (rid, _) in self._running.items():
                if rid == id:
                    self.delegate.cancel_request(did)

    def can_enqueue_requests(self) -> bool:
        return not self._stopped

    def get_latest_iteration_stats(self) -> list[c.IterationStats]:
        return [_stats(s) for s in self.delegate.get_latest_iteration_stats()]

    def is_task_cached(self, task_id: int) -> bool:
        """PeftCacheManager.is_task_cached (internal API of the real library; tests use it)."""
        return self.peft.is_task_cached(task_id)

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
        self.delegate.shutdown()


def check_alive(ex: Executor) -> None:
    t.check(not ex._stopped, "Shutdown called, cannot enqueue request", "executorImpl.cpp")


def _overload(args: tuple, kwargs: dict) -> tuple[list[int] | None, float | None]:
    params = dict(zip(("first", "timeout"), args, strict=False)) | kwargs
    first = params.pop("first", None)
    if first is not None and not isinstance(first, (int, list)):  # (timeout) given positionally
        params["timeout"], first = first, None
    first = params.pop("id", params.pop("ids", first))
    unknown = set(params) - {"timeout"}
    if unknown:
        raise TypeError(f"incompatible function arguments: {sorted(unknown)}")
    ids = None if first is None else ([first] if isinstance(first, int) else list(first))
    return ids, t.as_timeout("timeout", params.get("timeout"))


def _result(r: api.Result) -> t.Result:
    out = t.Result()
    out.is_final, out.output_token_ids = r.is_final, [list(b) for b in r.output_token_ids]
    out.finish_reasons = [t.FinishReason[f.name] for f in r.finish_reasons]
    out.log_probs, out.cum_log_probs = r.log_probs, r.cum_log_probs
    out.context_logits, out.generation_logits = r.context_logits, r.generation_logits
    out.sequence_index, out.is_sequence_final, out.decoding_iter = (
        r.sequence_index,
        r.is_final,
        r.decoding_iter,
    )
    return out


def _guided(c: c.GuidedDecodingConfig | None) -> api.GuidedDecodingConfig | None:
    if c is None:
        return None
    backend = api.GuidedDecodingBackend[c.backend.name]
    return api.GuidedDecodingConfig(backend, c.encoded_vocab, c.tokenizer_str, c.stop_token_ids)


def _guided_params(p: t.GuidedDecodingParams | None) -> api.GuidedDecodingParams | None:
    return None if p is None else api.GuidedDecodingParams(api.GuideType[p.guide_type.name], p.guide)


def _cancelled() -> t.Result:
    out = t.Result()
    out.is_final, out.output_token_ids, out.finish_reasons = True, [[]], [t.FinishReason.CANCELLED]
    return out


def _stats(s: api.IterationStats) -> c.IterationStats:
    out = c.IterationStats()
    for name in (
        "timestamp",
        "iter",
        "iter_latency_ms",
        "num_new_active_requests",
        "num_active_requests",
        "num_queued_requests",
        "num_completed_requests",
        "max_num_active_requests",
    ):
        setattr(out, name, getattr(s, name))
    out.inflight_batching_stats.num_ctx_tokens = s.num_context_tokens
    out.inflight_batching_stats.num_gen_requests = s.num_gen_tokens
    if s.kv_cache_stats is not None:  # kvCacheManager.cpp getKvCacheStats, filled every iteration (1.2)
        out.kv_cache_stats = c.KvCacheStats()
        for name in (
            "max_num_blocks",
            "free_num_blocks",
            "used_num_blocks",
            "tokens_per_block",
            "alloc_total_blocks",
            "alloc_new_blocks",
            "reused_blocks",
            "missed_blocks",
            "cache_hit_rate",
        ):
            setattr(out.kv_cache_stats, name, getattr(s.kv_cache_stats, name))
    return out
