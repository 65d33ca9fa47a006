"""TensorRT-LLM 1.2's PEFT cache, in Python: request validation, paged host/device caches, eviction.

Follows, rule by rule:
* cpp/tensorrt_llm/runtime/loraUtils.cpp — loraValidateRequestTensorDims / loraValidateRequestTensors (the
  1.2-era version: weights must have the model's dtype);
* cpp/tensorrt_llm/runtime/loraCache.cpp — LoraCache::put / bump / markTaskDone / claimPagesWithEvict /
  determineNumPages (pages, in-progress and done lists, least-recently-done eviction);
* cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp — PeftCacheManager::addRequestPeft (not-cached and
  cache-full texts), getPageManagerConfig (startup check), updateTaskState / markRequestDone.
Page geometry comes from trtllm_peft.engine.peft_cache_sizing, itself tested against hand-computed values.
"""

from __future__ import annotations

import itertools

import torch

from tests.trtllm_standin.types import TllmError, check
from trtllm_peft.engine.peft_cache_sizing import PageGeometry, module_in_out, page_geometry
from trtllm_peft.lora.modules import MODULE_NAMES
from trtllm_peft.lora.spec import ModelSpec

LORA_UTILS = "cpp/tensorrt_llm/runtime/loraUtils.cpp"
DEFAULT_HOST_CACHE_SIZE = 1 << 30  # PeftCacheManagerConfig::kDefaultHostCacheSize


class LoraExpectedError(RuntimeError):
    """runtime::LoraExpectedException: the executor answers it with an error Response of exactly what()."""


class PeftTaskNotCachedError(LoraExpectedError):
    pass


class LoraCacheFullError(LoraExpectedError):
    pass


def validate_request_tensors(
    spec: ModelSpec, task_id: int | None, weights: torch.Tensor | None, config: torch.Tensor | None
) -> None:
    """loraValidateRequestTensors on the 3-D tensors LlmRequest makes (it unsqueezes the executor's 2-D ones)."""
    check(task_id is not None, "lora_task_id must be set for LoRA inference", LORA_UTILS)
    if weights is None and config is None:
        return
    # loraValidateRequestTensorDims
    check(
        weights is not None and config is not None,
        "Request for LoRA inference must have both lora_weights and lora_keys",
        LORA_UTILS,
    )
    check(weights.ndim == 3, "Invalid shape for lora_weights tensor", LORA_UTILS)
    check(config.ndim == 3, "Invalid shape for lora_keys tensor", LORA_UTILS)
    check(weights.shape[0] == 1, "Expected batch dimension to be 1 for each lora request", LORA_UTILS)
    check(config.shape[0] == 1, "Expected batch dimension to be 1 for each lora request", LORA_UTILS)
    check(not weights.is_cuda and not config.is_cuda, "Expected lora weights to be in CPU memory", LORA_UTILS)
    check(
        config.dtype == torch.int32,
        f"Expected  lora keys to have TYPE_INT32 but was {config.dtype}",
        LORA_UTILS,
    )
    check(
        config.shape[1] == weights.shape[1],
        "Expected dim1 lora_weights and lora_keys to have the same size",
        LORA_UTILS,
    )
    check(config.shape[2] in (3, 4), "Expected dim2 of lora_keys to have a size in [3, 4]", LORA_UTILS)
    # loraValidateRequestTensors, per row
    check(
        weights.dtype == spec.torch_dtype,
        "Expected lora weights to be the same data type as base model",
        LORA_UTILS,
    )
    width = weights.shape[2]
    for row in config[0].tolist():
        module_id, layer, rank = row[0], row[1], row[2]
        is_dora = len(row) > 3 and row[3] != 0
        check(
            0 <= layer < spec.num_layers,
            "Expected layerId to be in the range [0, numModelLayers)",
            LORA_UTILS,
        )
        check(rank > 0, "Expected adapterSize to be > 0", LORA_UTILS)
        name = MODULE_NAMES.get(module_id, "INVALID")  # LoraModule::toModuleName
        check(name in spec.lora_target_modules, f"lora module {name} not enabled for this model", LORA_UTILS)
        d_in, d_out = module_in_out(spec, name)
        flattened = rank * (d_in + d_out) + (d_out if is_dora else 0)  # LoraModule::flattenedInOutSize
        check(flattened <= width, f"lora_weights has to few values for {name}", LORA_UTILS)
        check(
            rank <= spec.max_lora_rank,
            f"Invalid low_rank ({rank}). low_rank must be smaller than mMaxLowRank ({spec.max_lora_rank})",
            LORA_UTILS,
        )


_ENTRY_IDS = itertools.count(1)


class LoraCache:
    """One tier of LoraCache: fixed pages; tasks in progress (never evicted) or done (evictable, LRU)."""

    def __init__(self, geometry: PageGeometry, num_pages: int) -> None:
        self.geometry, self.num_pages = geometry, num_pages
        self._free = list(range(num_pages))
        self._pages: dict[int, list[int]] = {}  # task id → its pages
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.entry_ids: dict[int, int] = {}  # task id → a number unique to this stay in the cache
        self._in_progress: list[int] = []  # front = most recently bumped
        self._done: list[int] = []  # front = most recently done; eviction takes from the back
        self.evicted: list[int] = []

    def has(self, task_id: int) -> bool:
        return task_id in self._pages

    def pages_of(self, task_id: int) -> int:
        return len(self._pages[task_id])

    def pages_for(self, config: torch.Tensor) -> int:
        """determineNumPages(config) for a [N, 3|4] config."""
        return self.geometry.pages_for_rows((MODULE_NAMES[r[0]], r[2]) for r in config.tolist())

    def put(self, task_id: int, weights: torch.Tensor, config: torch.Tensor) -> None:
        """LoraCache::put: a held task is only bumped (its new tensors ignored); else claim pages or raise."""
        if self.has(task_id):
            self.bump(task_id)
            return
        pages = self._claim_with_evict(self.pages_for(config))
        self._pages[task_id] = pages
        self.values[task_id] = (weights, config)
        self.entry_ids[task_id] = next(_ENTRY_IDS)
        self._in_progress.insert(0, task_id)

    def bump(self, task_id: int) -> None:
        """bumpTaskInProgress: move to the front of the in-progress list."""
        if not self.has(task_id):
            return
        for lst in (self._in_progress, self._done):
            if task_id in lst:
                lst.remove(task_id)
        self._in_progress.insert(0, task_id)

    def mark_done(self, task_id: int) -> None:
        """markTaskDone: in progress → front of the done list."""
        if task_id in self._in_progress:
            self._in_progress.remove(task_id)
            self._done.insert(0, task_id)

    def pages_in_progress(self) -> int:
        return sum(len(self._pages[t]) for t in self._in_progress)

    def _claim_with_evict(self, n: int) -> list[int]:
        """claimPagesWithEvict, with its 1.2 behaviour: the 'Cache is full' exception fires only when the done
        list is empty (the loop's own `it` shadows the one tested after it); otherwise it evicts every done
        task it walks and, if that is still too little, fails TLLM_CHECK(pageIds.has_value())."""
        if n <= len(self._free):
            return self._take(n)
        if not self._done:
            raise LoraCacheFullError("Cache is full. There are no done tasks to evict")
        needed = n - len(self._free)
        while self._done and needed > 0:
            victim = self._done.pop()
            needed -= len(self._pages[victim])
            self._free = self._pages.pop(victim) + self._free  # releasePages pushes to the front
            self.values.pop(victim)
            self.entry_ids.pop(victim)
            self.evicted.append(victim)
        check(n <= len(self._free), "pageIds.has_value()", "cpp/tensorrt_llm/runtime/loraCache.cpp")
        return self._take(n)

    def _take(self, n: int) -> list[int]:
        pages, self._free = self._free[:n], self._free[n:]
        return pages


def cache_pages(spec: ModelSpec, cfg) -> tuple[PageGeometry, int, int]:
    """(geometry, host pages, device pages) as getPageManagerConfig / getMaxNumSlots compute them, with the
    startup check's text when a tier cannot hold one max-size adapter. The device tier needs
    num_device_module_layer > 0 here (device_cache_percent is a share of a GPU's free memory)."""
    geom = page_geometry(
        spec, optimal_adapter_size=cfg.optimal_adapter_size, max_adapter_size=cfg.max_adapter_size
    )
    if cfg.num_device_module_layer <= 0:
        raise TllmError(
            "stand-in: set PeftCacheConfig.num_device_module_layer (device_cache_percent needs a GPU)"
        )
    slot_bytes = geom.page_width * geom.dtype_bytes
    if cfg.num_host_module_layer > 0:
        host_slots = cfg.num_host_module_layer * geom.slots_per_module_layer
    else:  # host_cache_size bytes (default 1 GiB) when no module-layer count is given
        host_slots = (
            cfg.host_cache_size if cfg.host_cache_size is not None else DEFAULT_HOST_CACHE_SIZE
        ) // slot_bytes
    device_slots = cfg.num_device_module_layer * geom.slots_per_module_layer
    pages = []
    for tier, slots in (("host", host_slots), ("device", device_slots)):
        check(
            slots >= geom.min_total_slots,
            f"Not enough space allocated to {tier} LoRA cache to hold 1 max sized LoRA {slots} < {geom.min_total_slots}",
            "cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp",
        )
        pages.append(-(-slots // geom.slots_per_page))
    return geom, pages[0], pages[1]


class PeftCacheManager:
    """addRequestPeft and markRequestDone over a host and a device LoraCache."""

    def __init__(self, spec: ModelSpec, peft_cache_config) -> None:
        self.spec = spec
        geom, host_pages, device_pages = cache_pages(spec, peft_cache_config)
        self.host, self.device = LoraCache(geom, host_pages), LoraCache(geom, device_pages)
        self._task_reqs: dict[int, set[int]] = {}

    def is_task_cached(self, task_id: int) -> bool:
        return self.host.has(task_id)

    def add_request(
        self, request_id: int, task_id: int, weights: torch.Tensor | None, config: torch.Tensor | None
    ) -> None:
        """PeftCacheManager::addRequestPeft. Raises TllmError (validation), PeftTaskNotCachedError or
        LoraCacheFullError with TensorRT-LLM's texts."""
        w3 = None if weights is None else weights.unsqueeze(0)  # LlmRequest: mLoraWeights->unsqueeze(0)
        c3 = None if config is None else config.unsqueeze(0)
        validate_request_tensors(self.spec, task_id, w3, c3)
        if (weights is None or config is None) and not self.host.has(task_id):
            raise PeftTaskNotCachedError(
                f"LoRA task {task_id} not found in cache. Please send LoRA weights with request"
            )
        self._task_reqs.setdefault(task_id, set()).add(request_id)
        try:
            if weights is not None and config is not None:
                self.host.put(task_id, weights, config)
            else:
                self.host.bump(task_id)
        except LoraCacheFullError:
            self._release(task_id, request_id)
            raise LoraCacheFullError(f"PEFT Cache is full. Could not store taskId={task_id}") from None
        except RuntimeError as e:
            self._release(task_id, request_id)
            raise TllmError(f"Error storing task={task_id} in PEFT cache -- {e}") from None

    def device_can_hold(self, task_id: int) -> bool:
        """The capacity scheduler's PEFT check: the task's pages fit beside the device tasks in progress."""
        if self.device.has(task_id):
            return True
        need = self.host.pages_of(task_id)
        return self.device.pages_in_progress() + need <= self.device.num_pages

    def device_never_fits(self, task_id: int) -> bool:
        return self.host.pages_of(task_id) > self.device.num_pages

    def ensure_on_device(self, task_id: int) -> None:
        """copyTask host → device (evicting done device tasks), then bump it in progress."""
        w, c = self.host.values[task_id]
        self.device.put(task_id, w, c)

    def mark_request_done(self, request_id: int, task_id: int) -> None:
        """markRequestDone → updateTaskState(terminate): the task's last request done → done in both tiers."""
        self._release(task_id, request_id)

    def _release(self, task_id: int, request_id: int) -> None:
        reqs = self._task_reqs.get(task_id, set())
        reqs.discard(request_id)
        if not reqs:
            self._task_reqs.pop(task_id, None)
            self.device.mark_done(task_id)
            self.host.mark_done(task_id)
