"""The v2 models this server answers for, and one inference on them, whatever the protocol (HTTP or gRPC).

Models: tensorrtllm_backend's stock `ensemble`, `tensorrt_llm_bls`, `preprocessing`, `tensorrt_llm`,
`postprocessing`, plus the base model and every adapter by name (text in, text out, like the ensemble).
An inference takes inputs with a batch dimension B >= 1 (as Triton's max_batch_size > 0 models do), runs
the B items concurrently, and gives either one reply for the whole batch (`collect`: HTTP infer, gRPC
ModelInfer) or, for the generating models, the decoupled responses tensorrtllm_backend sends (`stream`:
gRPC ModelStreamInfer): per item, one response per engine step when streaming is asked, else one with
everything, each tagged with `batch_index`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.triton import llmapi, outputs, stock
from trtllm_peft.server.triton.generation import TritonGeneration
from trtllm_peft.server.triton.lora_tasks import ClientLoraTasks
from trtllm_peft.server.triton.schemas import (
    IO,
    MIN_LENGTH_ALIAS,
    OUTPUTS,
    VERSION,
    TritonRequest,
    check_inputs,
    model_inputs,
    parse_request,
)
from trtllm_peft.server.triton.tensors import Tensor, TritonProtocolError
from trtllm_peft.serving.orchestrator import ModelNotFoundError
from trtllm_peft.triton_repo import tensors as table

MAX_BATCH = 64  # batch items per request: each is an engine request
TEXT, PRE, TRTLLM, POST = "text", "preprocessing", "tensorrt_llm", "postprocessing"
# name -> (kind, platform/backend as Triton reports it)
STOCK = {
    "ensemble": (TEXT, "ensemble"),
    "tensorrt_llm_bls": (TEXT, "python"),
    "preprocessing": (PRE, "python"),
    "tensorrt_llm": (TRTLLM, "tensorrtllm"),
    "postprocessing": (POST, "python"),
}


@dataclass(frozen=True)
class V2Model:
    name: str
    kind: str
    platform: str
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    target: str  # the orchestrator's model: the base model behind the stock names
    with_lora: bool

    @property
    def decoupled(self) -> bool:
        """Generating models answer a request with many responses (model_transaction_policy decoupled)."""
        return self.kind in (TEXT, TRTLLM)

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata object (GET /v2/models/{name}, gRPC ModelMetadata)."""
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": self.platform,
            "inputs": [io.metadata() for io in self.inputs],
            "outputs": [io.metadata() for io in self.outputs],
        }


def resolve(rt: Runtime, name: str, version: str | None = None) -> V2Model:
    """The model called `name`; Triton's error for an unknown name or version."""
    if version not in (None, "", VERSION):
        raise TritonProtocolError(f"Request for unknown model: '{name}' version {version} is not found")
    dtype = rt.spec.dtype
    if name in STOCK:
        kind, platform = STOCK[name]
        io = {
            TEXT: (model_inputs(rt.spec, True), OUTPUTS),
            PRE: (stock.stock_io(table.PRE_INPUTS, dtype), stock.stock_io(table.PRE_OUTPUTS, dtype)),
            TRTLLM: (
                _trtllm_inputs(dtype),
                (*stock.stock_io(table.TRTLLM_OUTPUTS, dtype), *llmapi.LLMAPI_OUTPUTS),
            ),
            POST: (stock.stock_io(table.POST_INPUTS, dtype), stock.stock_io(table.POST_OUTPUTS, dtype)),
        }[kind]
        return V2Model(name, kind, platform, *io, rt.base_model_id, kind != PRE and kind != POST)
    try:
        rt.orchestrator.resolve(name)
    except ModelNotFoundError:
        raise TritonProtocolError(f"Request for unknown model: '{name}' is not found") from None
    return V2Model(name, TEXT, "ensemble", model_inputs(rt.spec, False), OUTPUTS, name, False)


def _trtllm_inputs(dtype: str) -> tuple[IO, ...]:
    """inflight_batcher_llm's inputs, all optional here, then the llmapi model's (llmapi.py): a request
    uses one style or the other, and the per-style checks name what is missing."""
    inflight = tuple(replace(io, optional=True) for io in stock.stock_io(table.TRTLLM_INPUTS, dtype))
    inflight = (*inflight, MIN_LENGTH_ALIAS)  # the older clients' name (schemas.MIN_LENGTH_ALIAS)
    known = {io.name for io in inflight}
    return (*inflight, *(io for io in llmapi.LLMAPI_INPUTS if io.name not in known))


def model_names(rt: Runtime) -> list[str]:
    return [*STOCK, rt.base_model_id, *(e.name for e in rt.catalog)]


def lora_tasks(state: Any, rt: Runtime) -> ClientLoraTasks:
    """The client LoRA task table of this server, one per runtime (HTTP and gRPC share it)."""
    tasks = getattr(state, "triton_lora_tasks", None)
    if tasks is None or tasks.host_cache is not rt.host_cache:
        tasks = state.triton_lora_tasks = ClientLoraTasks(rt.spec, rt.host_cache)
    return tasks


@dataclass
class Reply:
    """One response: every output this model computed (the protocol layer picks the requested ones)."""

    tensors: dict[str, Tensor]
    final: bool = True


class Inference:
    """One request to a v2 model. `start()` raises before anything is sent; then `collect()` or `stream()`."""

    def __init__(self, rt: Runtime, tasks: ClientLoraTasks, model: V2Model, inputs: dict[str, Tensor]):
        self.rt, self.tasks, self.model = rt, tasks, model
        self.items = split_batch(model, inputs)
        self._gens: list[TritonGeneration] = []

    async def start(self) -> None:
        if not self.model.decoupled:
            return
        try:
            for item in self.items:  # every item's first step, so that any error is a status
                req = parse_request(item) if self.model.kind == TEXT else _trtllm_request(item)
                if req.lora_task_id is None and (req.lora_weights is not None or req.lora_config is not None):
                    raise TritonProtocolError("lora_weights and lora_config need a lora_task_id")
                gen = TritonGeneration(self.rt, self.tasks, self.model.target, req)
                self._gens.append(gen)
                await gen.start()
        except BaseException:
            await self.aclose()
            raise

    @property
    def request(self) -> TritonRequest | None:
        """The first item's parsed request (its flags pick the default outputs); None for pre/post."""
        return self._gens[0].req if self._gens else None

    async def collect(self) -> Reply:
        """The whole batch as one response."""
        if not self.model.decoupled:
            tok, vocab = self.rt.tokenizer, self.rt.spec.vocab_size
            if self.model.kind == PRE:
                return Reply(join_batch([stock.preprocess(tok, item, vocab) for item in self.items]))
            return Reply(join_batch([stock.postprocess(tok, item) for item in self.items]))
        try:
            totals = await asyncio.gather(*(g.collect() for g in self._gens))
        finally:
            await self.aclose()
        replies = [
            self._tensors(i, g, t, whole=True)
            for i, (g, t) in enumerate(zip(self._gens, totals, strict=True))
        ]
        return Reply(join_batch(replies))

    async def stream(self) -> AsyncIterator[Reply]:
        """Decoupled responses: per item, per step when streaming (else one); the last one is final."""
        if not self.model.decoupled:
            yield await self.collect()
            return
        streams = [self._item_stream(i, g) for i, g in enumerate(self._gens)]
        remaining = len(streams)
        try:
            async for reply in merge(streams):
                remaining -= reply.final
                yield Reply(reply.tensors, final=remaining == 0)
        finally:
            await self.aclose()

    async def _item_stream(self, index: int, gen: TritonGeneration) -> AsyncIterator[Reply]:
        if not gen.req.stream:
            yield Reply(self._tensors(index, gen, await gen.collect(), whole=True))
            return
        text = ""
        async for chunk in gen.chunks():
            if gen.req.llmapi:  # the LLM API streams CompletionOutput.text: the text so far
                text += chunk.text
                chunk = replace(chunk, text=text)
            yield Reply(self._tensors(index, gen, chunk, whole=False), final=bool(chunk.finish_reason))

    def _tensors(self, index: int, gen: TritonGeneration, done, *, whole: bool) -> dict[str, Tensor]:
        if self.model.kind == TEXT:
            return outputs.text_outputs(index, gen, done)
        return outputs.trtllm_outputs(index, gen, done, whole=whole)

    async def aclose(self) -> None:
        for gen in self._gens:
            await gen.aclose()


def _trtllm_request(item: dict[str, Tensor]) -> TritonRequest:
    if llmapi.style(item) == "llmapi":
        return llmapi.llmapi_request(item)
    return stock.trtllm_request(item)


def split_batch(model: V2Model, inputs: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Triton's input checks, then one [1, …] input set per batch item."""
    check_inputs(model.name, inputs, model.inputs, max_batch=MAX_BATCH)
    sizes = {t.shape[0] for t in inputs.values()}
    if len(sizes) > 1:
        raise TritonProtocolError(
            f"inputs of model '{model.name}' disagree on the batch size: {sorted(sizes)}"
        )
    batch = sizes.pop() if sizes else 1
    return [{n: Tensor(n, t.datatype, t.data[i : i + 1]) for n, t in inputs.items()} for i in range(batch)]


def join_batch(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-item outputs on the batch dimension, padding ragged dims with 0 (lengths say how much)."""
    joined = {}
    for name, first in items[0].items():
        parts = [item[name].data for item in items]
        if first.datatype != "BYTES":
            shape = np.max([p.shape for p in parts], axis=0)
            parts = [np.pad(p, [(0, int(s) - d) for s, d in zip(shape, p.shape, strict=True)]) for p in parts]
        joined[name] = Tensor(name, first.datatype, np.concatenate(parts, axis=0))
    return joined


async def merge(streams: list[AsyncIterator[Reply]]) -> AsyncIterator[Reply]:
    """Interleave the items' responses as they come; an error in one stops them all."""
    if len(streams) == 1:
        async for reply in streams[0]:
            yield reply
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[Reply]) -> None:
        try:
            async for reply in stream:
                await queue.put(reply)
        except TrtllmPeftError as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for t in tasks:
            t.cancel()
