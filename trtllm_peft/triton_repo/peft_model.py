"""The `peft` model of the generated repository: NIM's adapters by name, as a Triton Python-backend model.

A request is the ensemble's (`text_input`, `max_tokens`, …) plus `lora_name`, the adapter's directory name under
NIM_PEFT_SOURCE (absent or empty: the base model). The model resolves the name (adapter_router.py), forwards
the request to the `ensemble` through BLS (`InferenceRequest.exec`) with `lora_task_id`, adds `lora_weights`
(engine dtype, bf16 through DLPack since numpy has no bf16) and `lora_config` when the engine is believed not to
hold the task, and resends them once on TensorRT-LLM's "not found in cache". Decoupled repositories stream:
every response of the ensemble is passed on as it comes.

The Python backend calls used (`triton_python_backend_utils`, python_backend src/pb_stub.cc and
src/resources/triton_python_backend_utils.py) are the ones tests/triton_python_standin/ stands in for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.lora import load_spec
from trtllm_peft.serving.catalog import Catalog
from trtllm_peft.settings import Settings
from trtllm_peft.triton_repo.adapter_router import (
    ROUTER_TASK_BASE,
    AdapterRouter,
    LoraTask,
    PrefetchedIds,
    UnknownAdapterError,
)

NAME_INPUT = "lora_name"
MODEL_PY = '''"""trtllm-peft's `peft` model (adapters by name): written by `trtllm-peft triton-repo`."""

import triton_python_backend_utils as pb_utils

from trtllm_peft.triton_repo.peft_model import PeftModel


class TritonPythonModel(PeftModel):
    def initialize(self, args):
        self.setup(pb_utils, args)
'''


class PeftModel:
    """Subclassed by the repository's model.py as `TritonPythonModel` (Triton calls initialize/execute)."""

    pb: Any  # the triton_python_backend_utils module
    router: AdapterRouter

    def setup(
        self,
        pb: Any,
        args: Mapping[str, str],
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Read the model config's parameters; NIM_* from the environment win over those written at generation."""
        self.pb = pb
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        settings = Settings.from_env(env)
        source = settings.peft_source or (Path(params["peft_source"]) if params.get("peft_source") else None)
        interval = settings.peft_refresh_interval
        if interval is None and params.get("peft_refresh_interval"):
            interval = float(params["peft_refresh_interval"])
        tasks_file = params.get("lora_tasks_file")
        self.router = AdapterRouter(
            load_spec(Path(params["engine_dir"])),
            Catalog(source, first_task_id=ROUTER_TASK_BASE),
            PrefetchedIds.read(Path(tasks_file) if tasks_file else None),
            refresh_interval=interval,
            max_cached=settings.max_cpu_loras,
            clock=clock,
        )
        self.target = params.get("target_model") or "ensemble"
        self.decoupled = pb.using_decoupled_model_transaction_policy(config)
        self.outputs = [o["name"] for o in config.get("output", [])]

    def execute(self, requests: list) -> list | None:
        self.router.refresh_if_due()
        if not self.decoupled:
            return [self._answer(r) for r in requests]
        for request in requests:
            self._stream(request)
        return None

    # ---- one request ----------------------------------------------------------------------------------

    def _answer(self, request):
        try:
            responses = list(self._run(request, decoupled=False))
        except TrtllmPeftError as e:
            return self._error(e)
        (response,) = responses
        if response.has_error():
            return self.pb.InferenceResponse(output_tensors=[], error=response.error())
        return self.pb.InferenceResponse(output_tensors=response.output_tensors())

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            for response in self._run(request, decoupled=True):
                if response.has_error():
                    sender.send(
                        self.pb.InferenceResponse(output_tensors=[], error=response.error()), flags=final
                    )
                    return
                if response.output_tensors():  # the ensemble's last response may carry only the final flag
                    sender.send(self.pb.InferenceResponse(output_tensors=response.output_tensors()))
        except TrtllmPeftError as e:
            sender.send(self._error(e), flags=final)
            return
        sender.send(flags=final)

    def _run(self, request, *, decoupled: bool) -> Iterator:
        """The ensemble's responses; a not-cached answer to an id-only request is resent once with weights."""
        task = self._task(request)
        send = task is not None and self.router.needs_weights(task)
        while True:
            bls = self.pb.InferenceRequest(
                model_name=self.target,
                inputs=self._inputs(request, task, send),
                requested_output_names=list(request.requested_output_names()) or self.outputs,
                request_id=request.request_id(),
            )
            responses = bls.exec(decoupled=True) if decoupled else iter([bls.exec()])
            first = next(iter(responses), None)
            if first is None:
                return
            if task is not None and first.has_error():
                if not send and self.router.not_cached(first.error().message()):
                    self.router.engine_lacks(task.task_id)
                    send = True
                    continue
            elif task is not None:
                self.router.engine_has(task.task_id)
            yield first
            yield from responses
            return

    def _task(self, request) -> LoraTask | None:
        tensor = self.pb.get_input_tensor_by_name(request, NAME_INPUT)
        names = {_text(v) for v in tensor.as_numpy().reshape(-1)} if tensor is not None else {""}
        if len(names) != 1:
            raise UnknownAdapterError(f"one {NAME_INPUT} per request, got {sorted(names)}")
        name = names.pop()
        return self.router.resolve(name) if name else None

    def _inputs(self, request, task: LoraTask | None, send: bool) -> list:
        tensors = [t for t in request.inputs() if t.name() != NAME_INPUT]
        if task is None:
            return tensors
        batch = self.pb.get_input_tensor_by_name(request, "text_input").as_numpy().shape[0]
        tensors.append(self.pb.Tensor("lora_task_id", np.full((batch, 1), task.task_id, dtype=np.uint64)))
        if send:
            packed = self.router.packed(task)
            weights = packed.weights.unsqueeze(0).expand(batch, -1, -1).contiguous()  # [B, N, W] engine dtype
            config = packed.config.unsqueeze(0).expand(batch, -1, -1).contiguous()  # [B, N, 4] int32
            tensors.append(self.pb.Tensor.from_dlpack("lora_weights", weights))  # bf16: no numpy dtype
            tensors.append(self.pb.Tensor("lora_config", config.numpy()))
        return tensors

    def _error(self, e: TrtllmPeftError):
        err = self.pb.TritonError
        code = err.NOT_FOUND if isinstance(e, UnknownAdapterError) else err.INVALID_ARG
        return self.pb.InferenceResponse(output_tensors=[], error=err(str(e), code))


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
