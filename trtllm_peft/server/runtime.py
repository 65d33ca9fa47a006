"""Everything a running server holds, built once at startup from Settings and the engine directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_peft.engine.base_weights import BaseWeights
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.api import Executor
from trtllm_peft.lora import ModelSpec
from trtllm_peft.server.metrics import Metrics
from trtllm_peft.serving.catalog import Catalog
from trtllm_peft.serving.engine_client import EngineClient
from trtllm_peft.serving.host_cache import HostCache
from trtllm_peft.serving.orchestrator import Orchestrator
from trtllm_peft.serving.packed_store import PackedStore
from trtllm_peft.serving.tokenizer import Tokenizer
from trtllm_peft.settings import Settings

log = logging.getLogger(__name__)


def base_model_id(settings: Settings, engine: EngineDir) -> str:
    """NIM_SERVED_MODEL_NAME (first of a comma list), else the source model's name, else the engine's."""
    if settings.served_model_name:
        return settings.served_model_name.split(",")[0].strip()
    return engine.model_name


@dataclass
class Runtime:
    settings: Settings
    engine: EngineDir
    spec: ModelSpec
    base_model_id: str
    tokenizer: Tokenizer
    catalog: Catalog
    host_cache: HostCache
    client: EngineClient
    orchestrator: Orchestrator
    metrics: Metrics
    max_model_len: int
    vocab_size: int  # token ids a prompt may hold: 0 .. vocab_size - 1 (the engine's embedding rows)
    started: float = field(default_factory=time.time)
    _refresher: asyncio.Task | None = None

    @classmethod
    async def start(cls, settings: Settings, executor_factory) -> Runtime:
        """Open the engine, start the executor, scan the adapters; blocking steps run off the loop."""
        engine = EngineDir.open(settings.engine_dir)
        spec = engine.spec
        loop = asyncio.get_running_loop()
        tokenizer = await asyncio.to_thread(Tokenizer, engine.path)
        executor: Executor = await asyncio.to_thread(executor_factory, settings, engine)
        catalog = Catalog(
            Path(settings.peft_source) if settings.peft_source else None,
            follow_symlinks=settings.follow_symlinks,
        )
        await asyncio.to_thread(catalog.scan)
        host_cache = HostCache(spec.cache_units(settings.max_cpu_loras))  # the engine's max rank
        metrics = Metrics(max_lora=settings.max_gpu_loras)
        client = EngineClient(executor, loop)
        orch = Orchestrator(
            spec=spec,
            base_model_id=base_model_id(settings, engine),
            catalog=catalog,
            host_cache=host_cache,
            client=client,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            on_load=metrics.load_seconds.observe,
            base_weights=await asyncio.to_thread(BaseWeights.open, engine.path),
            queue_timeout=settings.lora_queue_timeout,
            queue_size=settings.lora_queue_size,
            store=packed_store(settings, spec),
            greedy_logprobs_are_raw=getattr(executor, "greedy_logprobs_are_raw", False),
        )
        await orch.leases.prepack(list(catalog))
        engine_len = int(engine.build_config.get("max_seq_len", 2048))
        rt = cls(
            settings=settings,
            engine=engine,
            spec=spec,
            base_model_id=orch.base_model_id,
            tokenizer=tokenizer,
            catalog=catalog,
            host_cache=host_cache,
            client=client,
            orchestrator=orch,
            metrics=metrics,
            max_model_len=min(settings.max_model_len or engine_len, engine_len),
            vocab_size=spec.vocab_size or tokenizer.vocab_size,
        )
        metrics.running.labels(rt.base_model_id).set(0)
        metrics.waiting.labels(rt.base_model_id).set(0)
        if settings.peft_refresh_interval:
            rt._refresher = asyncio.create_task(rt._refresh_loop(settings.peft_refresh_interval))
        log.info("serving %s with %d adapters from %s", rt.base_model_id, len(catalog), settings.peft_source)
        return rt

    async def rescan(self) -> None:
        """Pick up added, removed and changed adapters; idle cached copies of stale ones are dropped.

        In-flight requests keep their lease and finish on the weights they started with.
        """
        before = {e.name: e.task_id for e in self.catalog}
        result = await asyncio.to_thread(self.catalog.scan)
        live = {e.task_id for e in self.catalog}
        for task_id in set(before.values()) - live:
            self.host_cache.discard(task_id)
            self.orchestrator.leases.forget(task_id)
        if result.any:
            log.info("adapters: +%d -%d ~%d", len(result.added), len(result.removed), len(result.changed))

    async def _refresh_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rescan()
            except Exception:  # a failed scan must not stop future scans
                log.exception("adapter rescan failed")

    def update_gauges(self) -> None:
        """Refresh the gauges that describe state rather than events (called at scrape time)."""
        m, hc, stats = self.metrics, self.host_cache, self.orchestrator.stats
        m.cache_adapters.labels("host").set(len(hc))
        m.cache_usage.labels("host").set(hc.used_units / hc.capacity_units)
        m.count_to(m.cache_hits, "host", hc.hits)
        m.count_to(m.cache_misses, "host", hc.misses)
        m.count_to(m.cache_hits, "engine", stats.engine_hits)
        m.count_to(m.cache_misses, "engine", stats.engine_misses)
        m.catalog_adapters.labels("servable").set(len(self.catalog))
        m.catalog_adapters.labels("invalid").set(len(self.catalog.invalid()))
        for model in {*stats.running_by_adapter, *stats.waiting_by_adapter, *m_labels(m)}:
            m.running.labels(model).set(stats.running_by_adapter.get(model, 0))
            m.waiting.labels(model).set(stats.waiting_by_adapter.get(model, 0))
        adapters = {e.name for e in self.catalog}
        m.set_lora_info(
            [a for a in stats.running_by_adapter if a in adapters],
            [a for a in stats.waiting_by_adapter if a in adapters],
        )
        stats_list = self.client.executor.get_latest_iteration_stats()
        if stats_list:
            m.cache_adapters.labels("device").set(stats_list[-1].num_device_cached_lora_tasks)
            m.cache_adapters.labels("engine_host").set(stats_list[-1].num_host_cached_lora_tasks)
            kv = stats_list[-1].kv_cache_stats
            if kv is not None:
                m.set_kv(kv)

    async def close(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        self.orchestrator.close()
        await asyncio.to_thread(self.client.close)


def packed_store(settings: Settings, spec: ModelSpec) -> PackedStore | None:
    """Packed adapters on disk for host-cache misses (TRTLLM_PEFT_DISK_LORAS; default twice the host budget)."""
    n = 2 * settings.max_cpu_loras if settings.disk_loras is None else settings.disk_loras
    return PackedStore(spec.cache_units(n), settings.cache_path) if n else None


def m_labels(m: Metrics) -> set[str]:
    """Models that already have a running-gauge series (so they get reset to 0 when idle)."""
    return {s.labels["model_name"] for metric in m.running.collect() for s in metric.samples}
