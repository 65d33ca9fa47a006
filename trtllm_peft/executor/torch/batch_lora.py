"""The running batch's adapters: brought into the device tier of the PEFT cache at admission, and stacked
for the forward (ops.lora_batch) only when the set of adapters in the batch changes."""

from __future__ import annotations

import torch

from trtllm_peft.engine.memory import unit_bytes
from trtllm_peft.executor.torch.ops import TorchOps
from trtllm_peft.executor.torch.peft_cache import PeftCache
from trtllm_peft.lora.spec import ModelSpec


class BatchLora:
    """`cache`'s device tier as the batch sees it; `ops` prepares and stacks adapters for the forward."""

    def __init__(
        self,
        cache: PeftCache,
        ops: TorchOps,
        spec: ModelSpec,
        dtype: torch.dtype,
        device,
        planned_bytes: int = 0,
    ) -> None:
        self.cache, self.ops, self.spec, self.dtype, self.device = cache, ops, spec, dtype, device
        if torch.device(device).type == "cpu":  # the tier's memory resident now, as TensorRT-LLM allocates it
            # up front (huge_pages.PagePool); never past the memory plan's PEFT device bytes (`planned_bytes`; 0:
            # none, e.g. after _fail_all, whose pages the pool keeps): a tier sized "unbounded" (the TensorRT-LLM
            # stand-in's 10**9 rank-units) would reserve terabytes
            ops.reserve_adapters(min(cache.device.capacity * unit_bytes(spec), planned_bytes))
        self._key: tuple[int, ...] = ()
        self._batch = None  # ops.lora_batch of the tasks in _key

    def to_device(self, task_id: int) -> bool:
        """Bring the task's adapter to the device tier (prepared for `ops`); False: wait for room."""
        return self.cache.try_load_device(
            task_id, lambda a: self.ops.prepare_lora(a, self.spec, self.dtype, self.device)
        )

    def of(self, tasks: set[int]):
        """The stacked adapters of `tasks` and each task's index into them (absent: base); (None, {}) for
        none. Restacked only when the set changes."""
        if not tasks:
            return None, {}
        if tasks != set(self._key):
            self._key = tuple(sorted(tasks))
            adapters = [self.cache.device.get(t) for t in self._key]
            self._batch = self.ops.lora_batch(adapters, self.spec, self.dtype, self.device)
        return self._batch, {t: i for i, t in enumerate(self._key)}
