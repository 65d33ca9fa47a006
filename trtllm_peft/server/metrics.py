"""Prometheus metrics at /v1/metrics: NIM's request metrics by model, plus LoRA cache and adapter series.

NIM's names (docs "Observability"): num_requests_running/waiting, prompt_tokens_total,
generation_tokens_total, time_to_first_token_seconds, time_per_output_token_seconds,
e2e_request_latency_seconds, request_prompt_tokens, request_generation_tokens, request_success_total,
all labelled `model_name`. Ours on top: per-adapter requests, cache residency per tier, hits/misses,
adapter load time, and vLLM's `vllm:lora_requests_info` gauge that LoRA-aware routers read. The KV cache
under vLLM's names where vLLM has one (`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries`/`_hits` in
tokens: vllm/v1/metrics/loggers.py), plus its blocks by state and the block reuse hit rate (TensorRT-LLM's
KvCacheStats.cache_hit_rate).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)


class Metrics:
    """All series of one server; `render()` is the scrape body."""

    def __init__(self, max_lora: int):
        self.registry = CollectorRegistry()
        self._request_series(self.registry)
        self._lora_series(self.registry)
        self._kv_series(self.registry)
        self.max_lora = str(max_lora)
        self._lora_labels: tuple[str, str, str] | None = None
        self._counted: dict[str, int] = {}

    def _request_series(self, r: CollectorRegistry) -> None:
        """NIM's request metrics, by model name."""
        m = ["model_name"]
        self.running = Gauge("num_requests_running", "Requests running on the engine", m, registry=r)
        self.waiting = Gauge("num_requests_waiting", "Requests waiting for an adapter load", m, registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", m, registry=r)
        self.success = Counter("request_success", "Finished requests", [*m, "finished_reason"], registry=r)
        self.failure = Counter(
            "request_failure", "Failed requests by HTTP status", [*m, "status"], registry=r
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time to first token", m, buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "Time per output token after the first",
            m,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds", "Request latency", m, buckets=_LATENCY, registry=r
        )
        self.request_prompt = Histogram(
            "request_prompt_tokens", "Prompt tokens per request", m, buckets=_TOKENS, registry=r
        )
        self.request_generation = Histogram(
            "request_generation_tokens", "Generated tokens per request", m, buckets=_TOKENS, registry=r
        )

    def _lora_series(self, r: CollectorRegistry) -> None:
        """Adapters and the LoRA caches."""
        self.adapter_requests = Counter(
            "trtllm_peft_adapter_requests", "Requests per adapter", ["adapter"], registry=r
        )
        self.cache_adapters = Gauge(
            "trtllm_peft_lora_cache_adapters", "Adapters resident per cache tier", ["tier"], registry=r
        )
        self.cache_usage = Gauge(
            "trtllm_peft_lora_cache_usage_ratio",
            "Share of the tier's rank-units in use",
            ["tier"],
            registry=r,
        )
        self.cache_hits = Counter(
            "trtllm_peft_lora_cache_hits", "Adapter found in the tier", ["tier"], registry=r
        )
        self.cache_misses = Counter(
            "trtllm_peft_lora_cache_misses", "Adapter not in the tier", ["tier"], registry=r
        )
        self.load_seconds = Histogram(
            "trtllm_peft_adapter_load_seconds", "Adapter read + convert time", buckets=_LATENCY, registry=r
        )
        self.catalog_adapters = Gauge(
            "trtllm_peft_adapters", "Adapters in NIM_PEFT_SOURCE by state", ["state"], registry=r
        )
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (vLLM's gauge)",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )

    def _kv_series(self, r: CollectorRegistry) -> None:
        """The engine's KV cache (from its iteration stats)."""
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", registry=r
        )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            registry=r,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", registry=r
        )
        self.kv_blocks = Gauge(
            "trtllm_peft_kv_cache_blocks", "KV cache blocks by state", ["state"], registry=r
        )
        self.kv_hit_rate = Gauge(
            "trtllm_peft_kv_cache_hit_rate",
            "Share of looked-up prompt blocks found in the reuse cache",
            registry=r,
        )

    def set_kv(self, kv) -> None:
        """From an executor's KvCacheStats (cumulative reuse counters, current block counts)."""
        self.kv_usage.set(kv.used_num_blocks / kv.max_num_blocks if kv.max_num_blocks else 0.0)
        self.kv_blocks.labels("used").set(kv.used_num_blocks)
        self.kv_blocks.labels("free").set(kv.free_num_blocks)
        self.kv_hit_rate.set(kv.cache_hit_rate)
        tpb = kv.tokens_per_block
        self._advance(self.prefix_queries, "kv_queries", (kv.reused_blocks + kv.missed_blocks) * tpb)
        self._advance(self.prefix_hits, "kv_hits", kv.reused_blocks * tpb)

    def _advance(self, counter: Counter, key: str, total: int) -> None:
        counter.inc(max(total - self._counted.get(key, 0), 0))
        self._counted[key] = total

    def count_to(self, counter: Counter, tier: str, total: int) -> None:
        """Advance a counter to a running total kept elsewhere (a cache's own hit count), at scrape time."""
        key = f"{counter._name}/{tier}"
        counter.labels(tier).inc(max(total - self._counted.get(key, 0), 0))
        self._counted[key] = total

    def set_lora_info(self, running: list[str], waiting: list[str]) -> None:
        """vLLM's convention: one sample whose labels carry the adapter lists; its value is a timestamp."""
        labels = (self.max_lora, ",".join(sorted(running)), ",".join(sorted(waiting)))
        if self._lora_labels and self._lora_labels != labels:
            self.lora_info.remove(*self._lora_labels)
        self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
