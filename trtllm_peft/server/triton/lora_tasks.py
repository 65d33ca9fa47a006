"""Triton's in-band LoRA: client-chosen `lora_task_id`s, with or without `lora_weights` + `lora_config`.

tensorrtllm_backend clients pick task ids themselves and send the tensors with the first request of a task;
later requests carry the id alone, and an id the engine does not hold is an error (TensorRT-LLM's
"LoRA task <id> not found in cache. Please send LoRA weights with request"). Here those tasks live in the
same host cache as the catalog's adapters, under internal ids of their own:

* client ids and catalog ids never meet: a client id maps to an internal id at or above CLIENT_TASK_BASE,
  far above anything the catalog hands out (it counts up from 1);
* every (re)load of a client task gets a fresh internal id, so new weights sent after an eviction can never
  be served with the engine's copy of the old ones (DESIGN §2: same id = same content);
* weights sent for a task that is still cached are ignored, as TensorRT-LLM does;
* an evicted task is forgotten: its id alone then gets the not-in-cache error, as on Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm_peft.errors import AdapterError, TrtllmPeftError
from trtllm_peft.executor.api import NOT_CACHED_MESSAGE
from trtllm_peft.lora import ModelSpec, PackedLora, unpack, validate
from trtllm_peft.lora.pack import CONFIG_COLUMNS
from trtllm_peft.serving.host_cache import HostCache

CLIENT_TASK_BASE = 1 << 62  # internal ids of client tasks; the catalog's ids count up from 1
UINT64_MAX = (1 << 64) - 1
CLIENT_TASK_LABEL = "triton_lora_task"


class LoraTaskError(TrtllmPeftError):
    """A client task id or its tensors cannot be used (not cached, malformed, wrong dtype)."""

    http_status = 400


@dataclass(frozen=True)
class ClientTask:
    """A leased client task: what Orchestrator.generate_leased needs (`name` labels metrics)."""

    client_id: int
    task_id: int  # internal id, the one the engine sees
    packed: PackedLora

    @property
    def name(self) -> str:
        """Label in metrics and stats: one for all client tasks (client ids are unbounded)."""
        return CLIENT_TASK_LABEL


class ClientLoraTasks:
    """client task id → internal task id, with the packed tensors held (and budgeted) by `host_cache`.

    Called from the event loop only, like HostCache; `lease` returns with the task leased once, and the
    caller hands it to Orchestrator.generate_leased, which releases it when the request ends.
    """

    def __init__(self, spec: ModelSpec, host_cache: HostCache):
        self.spec, self.host_cache = spec, host_cache
        self._ids: dict[int, int] = {}  # client id -> internal id (of a load that may since be evicted)
        self._next = CLIENT_TASK_BASE

    def __len__(self) -> int:
        return sum(internal in self.host_cache for internal in self._ids.values())

    def lease(
        self, client_id: int, weights: torch.Tensor | None = None, config: torch.Tensor | None = None
    ) -> ClientTask:
        """Lease task `client_id`, loading `weights` [1,N,W]|[N,W] + `config` [1,N,3|4]|[N,3|4] if not cached.

        Raises LoraTaskError (400) for an unknown id without weights (TensorRT-LLM's text) or bad tensors,
        HostCacheFullError (429) when the host cache is full of adapters in use.
        """
        if not 0 <= client_id <= UINT64_MAX:
            raise LoraTaskError(f"lora_task_id must be a uint64, got {client_id}")
        if (weights is None) != (config is None):
            raise LoraTaskError("Request for LoRA inference must have both lora_weights and lora_keys")
        internal = self._ids.get(client_id)
        if internal is not None:
            packed = self.host_cache.acquire(internal)
            if packed is not None:  # cached: weights sent again are ignored, as TensorRT-LLM does
                return ClientTask(client_id, internal, packed)
            del self._ids[client_id]  # evicted since: forget it
        if weights is None:
            raise LoraTaskError(NOT_CACHED_MESSAGE.format(task_id=client_id))
        packed = self._pack(client_id, weights, config)
        internal = self._next
        self.host_cache.put(internal, packed)  # leased once; may raise HostCacheFullError (429)
        self._next += 1
        self._ids[client_id] = internal
        self._forget_evicted()
        return ClientTask(client_id, internal, packed)

    def _pack(self, client_id: int, weights: torch.Tensor, config: torch.Tensor) -> PackedLora:
        """Check the tensors against the engine as TensorRT-LLM would, then keep them 2-D, config 4 columns."""
        source = f"lora_task_id {client_id}"
        if weights.dtype != self.spec.torch_dtype:
            raise LoraTaskError(
                "Expected lora weights to be the same data type as base model "
                f"({weights.dtype} != {self.spec.torch_dtype})"
            )
        try:
            adapter = unpack(weights, config, self.spec, source=source)  # squeezes [1, N, …]; checks rows
        except AdapterError as e:
            raise LoraTaskError(str(e)) from None
        problems = validate(adapter, self.spec)
        if problems:
            raise LoraTaskError(str(AdapterError(source, problems)))
        w2d = weights[0] if weights.ndim == 3 else weights  # [N, W]
        c2d = config[0] if config.ndim == 3 else config  # [N, 3|4]
        if c2d.shape[1] < CONFIG_COLUMNS:  # pre-DoRA rows: is_dora = 0
            c2d = torch.cat([c2d, torch.zeros((c2d.shape[0], 1), dtype=torch.int32)], dim=1)
        return PackedLora(weights=w2d.contiguous().clone(), config=c2d.contiguous().clone())

    def _forget_evicted(self) -> None:
        """Drop ids whose load was evicted, so the map stays as small as the host cache."""
        if len(self._ids) > 2 * max(len(self.host_cache), 8):
            self._ids = {c: i for c, i in self._ids.items() if i in self.host_cache}
