"""Request → executor → stream. Owns the per-request LoRA: lease from the host cache, task id, resends.

The engine's PEFT cache is a belief here, never a fact: weights go with a request only when the engine is
believed not to hold the task, and the engine's "not found in cache" is answered by one resend with
weights. Leases (a host-cache hit, or one shared load of a cold adapter) are serving/adapter_leases.py's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import torch

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.executor.api import (
    FinishReason,
    GuidedDecodingParams,
    LoraConfig,
    OutputConfig,
    Request,
    SamplingConfig,
)
from trtllm_peft.executor.errors import ErrorKind, classify
from trtllm_peft.lora import ModelSpec, PackedLora
from trtllm_peft.serving.adapter_leases import AdapterLeases, AdapterUnavailableError
from trtllm_peft.serving.catalog import AdapterEntry, Catalog
from trtllm_peft.serving.engine_client import EngineClient, Scores, ScoreSpec
from trtllm_peft.serving.host_cache import HostCache
from trtllm_peft.serving.logprobs import TokenLogprob, prompt_logprobs
from trtllm_peft.serving.packed_store import PackedStore

log = logging.getLogger(__name__)


class ModelNotFoundError(TrtllmPeftError):
    http_status = 404


class EngineRequestError(TrtllmPeftError):
    """The engine refused or failed the request."""

    def __init__(self, message: str, kind: ErrorKind):
        super().__init__(message)
        self.kind = kind
        self.http_status = {ErrorKind.CACHE_FULL: 429, ErrorKind.INVALID: 400}.get(kind, 500)


@dataclass(frozen=True)
class GenerationParams:
    """What a client asked for, in engine terms (after the HTTP layer validated it)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    logprobs: bool = False  # the engine's own log-probs of the sampled tokens (Result.log_probs: Triton)
    # OpenAI log-probs, from the engine's raw logits (serving/logprobs.py): None = not asked; k alternatives
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None  # the prompt's too (`echo`): needs the context logits
    # Triton's stock inputs, in TensorRT-LLM's terms (executor.h Request): an explicit end id (None: the
    # tokenizer's EOS unless ignore_eos), stop / bad words as token-id sequences, minLength.
    end_id: int | None = None
    stop_words: list[list[int]] | None = None
    bad_words: list[list[int]] | None = None
    min_tokens: int | None = None
    embedding_bias: torch.Tensor | None = None  # [vocab] float32, added to the logits
    guided: GuidedDecodingParams | None = None  # structured output / forced tool calls (executor/guided.py)

    def output_config(self, engine_scores: bool = False) -> OutputConfig:
        """`engine_scores`: the OpenAI log-probs come from the engine's log-probs (`engine_scorable`), not
        from its generation logits."""
        return OutputConfig(
            return_log_probs=self.logprobs or engine_scores,
            return_context_logits=self.prompt_logprobs is not None,
            return_generation_logits=self.top_logprobs is not None and not engine_scores,
            exclude_input_from_output=True,
        )

    def engine_scorable(self) -> bool:
        """Whether OpenAI's log-probs of this request equal the engine's log-probs of its sampled tokens
        (on an engine whose greedy log-probs are of the raw logits): greedy, nothing that changes the logits
        before the argmax, at most the top 1 alternative (which then is the sampled token itself, the
        first maximum, as serving/logprobs.py breaks ties)."""
        return (
            self.top_logprobs is not None
            and self.top_logprobs <= 1
            and self.temperature == 0.0
            and self.repetition_penalty in (None, 1.0)
            and not self.presence_penalty
            and not self.frequency_penalty
            and not self.min_tokens
            and self.embedding_bias is None
            and not self.bad_words
            and self.guided is None
        )

    def sampling_config(self) -> SamplingConfig:
        # TensorRT-LLM samples only when top_k or top_p is set: OpenAI's default is sampling with
        # temperature 1 and top_p 1, so an unset top_p becomes 1.0 unless the request is greedy.
        greedy = self.temperature == 0.0
        return SamplingConfig(
            top_k=1 if greedy else self.top_k,
            top_p=None if greedy else (1.0 if self.top_p is None else self.top_p),
            temperature=self.temperature,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
        )


@dataclass
class Step:
    """New tokens of one sequence from one engine step."""

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None  # "stop" | "length" | None while running
    first: bool = False
    top: list[TokenLogprob] | None = None  # OpenAI log-probs of token_ids (params.top_logprobs)
    prompt: list[TokenLogprob | None] | None = (
        None  # of the prompt, on the first step (params.prompt_logprobs)
    )


_FINISH = {
    FinishReason.END_ID: "stop",
    FinishReason.STOP_WORDS: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
    FinishReason.TIMED_OUT: "abort",
}


@dataclass
class OrchestratorStats:
    running_by_adapter: dict[str, int] = field(default_factory=dict)
    waiting_by_adapter: dict[str, int] = field(default_factory=dict)
    engine_hits: int = 0  # sent by task id alone, and the engine had it
    engine_misses: int = 0  # weights sent (believed absent) or resent after "not found in cache"


def _engine_scored(token_ids: list[int], log_probs: list[list[float]] | None, k: int) -> Scores:
    """OpenAI log-probs of greedy tokens from the engine's log-probs (`GenerationParams.engine_scorable`): the
    only alternative asked for (k <= 1) is the sampled token itself."""
    if log_probs is None or len(log_probs[0]) != len(token_ids):
        return ValueError(f"the engine returned no log-probs for {len(token_ids)} tokens")
    return [TokenLogprob(t, lp, [(t, lp)][:k]) for t, lp in zip(token_ids, log_probs[0], strict=True)]


class Orchestrator:
    """Turns (model, prompt ids, params) into a stream of Steps from the engine."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        base_model_id: str,
        catalog: Catalog,
        host_cache: HostCache,
        client: EngineClient,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        on_load: Callable[[float], None] | None = None,
        loaders: int = 2,
        base_weights: Callable[[int, str], torch.Tensor] | None = None,
        queue_timeout: float = 0.0,
        queue_size: int = 0,
        store: PackedStore | None = None,
        greedy_logprobs_are_raw: bool = False,
    ):
        self.spec, self.base_model_id, self.catalog = spec, base_model_id, catalog
        # The executor's log-prob of a plain greedy token is log-softmax of the raw logits (TorchExecutor,
        # executor/torch/sampler.py): then OpenAI's log-probs with <= 1 alternative come from the engine's
        # sampling step, which has the logits at hand, instead of a copy of every [V] row scored here.
        self.greedy_logprobs_are_raw = greedy_logprobs_are_raw
        self.host_cache, self.client = host_cache, client
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.leases = AdapterLeases(
            spec=spec,
            catalog=catalog,
            host_cache=host_cache,
            on_load=on_load,
            loaders=loaders,
            base_weights=base_weights,
            queue_timeout=queue_timeout,
            queue_size=queue_size,
            store=store,
        )
        self.lease_queue = self.leases.queue
        self._engine_has: OrderedDict[int, None] = OrderedDict()  # belief: task ids the engine holds
        self.stats = OrchestratorStats()

    def model_ids(self) -> list[str]:
        return [self.base_model_id, *(e.name for e in self.catalog)]

    def resolve(self, model: str) -> AdapterEntry | None:
        """None for the base model, the catalog entry for an adapter; 404 for anything else."""
        if model == self.base_model_id:
            return None
        entry = self.catalog.get(model)
        if entry is None:
            reason = self.catalog.invalid().get(model)
            if reason:
                raise AdapterUnavailableError(f"adapter '{model}' cannot be served: {reason}")
            raise ModelNotFoundError(
                f"The model '{model}' does not exist. Available models: {', '.join(self.model_ids())}"
            )
        return entry

    async def generate(
        self, model: str, prompt_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[Step]:
        """Stream the Steps of one sequence. Raises before the first Step for 404 / 422 / 429."""
        entry = self.resolve(model)
        label = entry.name if entry else self.base_model_id
        self._count(self.stats.waiting_by_adapter, label, +1)
        try:
            packed = await self.leases.lease(entry) if entry else None
        finally:
            self._count(self.stats.waiting_by_adapter, label, -1)
        self._count(self.stats.running_by_adapter, label, +1)
        try:
            async with aclosing(self._run(entry, packed, prompt_ids, params)) as steps:
                async for step in steps:
                    yield step
        finally:
            self._count(self.stats.running_by_adapter, label, -1)
            if entry:
                self.host_cache.release(entry.task_id)

    async def generate_leased(
        self, task, packed: PackedLora, prompt_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[Step]:
        """Like `generate`, for a task the caller has already leased in the host cache (`task.name`,
        `task.task_id`: Triton's client task ids, server/triton/lora_tasks.py). Released when the stream ends."""
        self._count(self.stats.running_by_adapter, task.name, +1)
        try:
            async with aclosing(self._run(task, packed, prompt_ids, params)) as steps:
                async for step in steps:
                    yield step
        finally:
            self._count(self.stats.running_by_adapter, task.name, -1)
            self.host_cache.release(task.task_id)

    async def _run(self, entry, packed, prompt_ids, params) -> AsyncIterator[Step]:
        engine_scores = self.greedy_logprobs_are_raw and params.engine_scorable()
        request = Request(
            list(prompt_ids),
            params.max_tokens,
            streaming=True,
            sampling_config=params.sampling_config(),
            output_config=params.output_config(engine_scores),
            end_id=self._end_id(params),
            pad_id=self.pad_token_id,
            stop_words=params.stop_words or None,
            bad_words=params.bad_words or None,
            embedding_bias=params.embedding_bias,
            lora_config=self._lora_config(entry, packed, with_weights=False) if entry else None,
            guided_decoding_params=params.guided,
        )
        resent, first = False, True
        k = params.top_logprobs
        scores = ScoreSpec(k, self.spec.vocab_size) if k is not None and not engine_scores else None
        while True:
            retry = False
            async with aclosing(self.client.generate_scored(request, scores)) as responses:
                async for response, scored in responses:
                    if response.has_error():
                        kind = classify(response.error_msg)
                        if kind is ErrorKind.NOT_CACHED and entry and not resent:
                            self._engine_has.pop(entry.task_id, None)
                            request = replace(
                                request, lora_config=self._lora_config(entry, packed, with_weights=True)
                            )
                            resent = retry = True
                            break
                        raise EngineRequestError(response.error_msg, kind)
                    result = response.result
                    if entry and first:
                        self._believe(entry.task_id)
                        if request.lora_config.weights is None:
                            self.stats.engine_hits += 1
                        else:
                            self.stats.engine_misses += 1
                    finish = _FINISH.get(result.finish_reason) if result.is_final else None
                    step = Step(
                        token_ids=list(result.output_token_ids[0]),
                        logprobs=list(result.log_probs[0]) if result.log_probs and params.logprobs else None,
                        finish_reason=finish or ("stop" if result.is_final else None),
                        first=first,
                    )
                    if engine_scores:
                        scored = _engine_scored(step.token_ids, result.log_probs, params.top_logprobs)
                    self._add_logprobs(step, scored, result, prompt_ids, params)
                    yield step
                    first = False
            if not retry:
                return

    def _add_logprobs(
        self, step: Step, scored: Scores, result, prompt_ids: list[int], params: GenerationParams
    ) -> None:
        """OpenAI log-probs of the step's tokens (scored by the engine client from the result's raw
        logits, or from the engine's log-probs where they are the same: `engine_scorable`), and of the
        prompt once, from its context logits."""
        if params.top_logprobs is not None:
            if isinstance(scored, ValueError):
                raise EngineRequestError(str(scored), ErrorKind.FAILED)
            step.top = scored or []
        if params.prompt_logprobs is not None and step.first:
            if result.context_logits is None:
                raise EngineRequestError("the engine returned no context logits", ErrorKind.FAILED)
            vocab = self.spec.vocab_size
            step.prompt = prompt_logprobs(result.context_logits, prompt_ids, params.prompt_logprobs, vocab)

    def _end_id(self, params: GenerationParams) -> int | None:
        if params.end_id is not None:
            return params.end_id
        return None if params.ignore_eos else self.eos_token_id

    def _lora_config(self, entry: AdapterEntry, packed: PackedLora, *, with_weights: bool) -> LoraConfig:
        if with_weights or entry.task_id not in self._engine_has:
            return LoraConfig(task_id=entry.task_id, weights=packed.weights, config=packed.config)
        return LoraConfig(task_id=entry.task_id)

    def _believe(self, task_id: int) -> None:
        self._engine_has[task_id] = None
        self._engine_has.move_to_end(task_id)
        while len(self._engine_has) > 4 * max(len(self.host_cache), 64):
            self._engine_has.popitem(last=False)

    @staticmethod
    def _count(table: dict[str, int], key: str, delta: int) -> None:
        table[key] = table.get(key, 0) + delta
        if table[key] <= 0:
            del table[key]

    def close(self) -> None:
        self.leases.close()
