"""OpenAI-compatible request and response bodies (with NVIDIA's `nvext`). The only pydantic in the package."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 64  # prompts × n in one request: each is a sequence in the engine's batch
MAX_WORDS = 64  # stop_token_ids, bad_words: each one is checked at every step

INT32_MAX = 2**31 - 1  # the engine's SizeType32 (TensorRT-LLM): larger counts cannot even be passed on


class _Request(BaseModel):
    # Nothing is silently ignored: a field we do not know (or cannot honour) is a 400 naming it. The
    # fields OpenAI clients send that change nothing here are declared, and accepted, in _ClientFields.
    # No float may be inf or NaN: each one reaches the sampler (`repetition_penalty: inf` would poison it).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _ClientFields(_Request):
    """Fields OpenAI SDKs and frameworks send that we accept (explicitly; everything else unknown is a 400).

    `user`, `metadata`: caller labels for OpenAI's dashboard, nothing to do here. `store`: only false (we
    store nothing). `service_tier`: only "auto" / "default" (one tier here). `parallel_tool_calls`: only
    meaningful with `tools`.
    """

    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None


class _Guided(_Request):
    """Structured output as NIM (`nvext`) and vLLM (top level) name it (server/structured.py maps them)."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class NvExt(_Guided):
    """NVIDIA's extension object (NIM): sampling knobs OpenAI lacks."""

    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: text, any JSON object, or JSON valid against `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False  # vLLM's per-chunk usage: not served


class _Sampling(_ClientFields, _Guided):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)  # OpenAI also takes one string: see _stops
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # choice i samples with seed + i (generation.py)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)  # vLLM-style top-level extras, same as nvext's
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    nvext: NvExt | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's logit_bias: token id (a string in JSON) -> bias added to its logit; ids checked in the route
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # vLLM's extras: min_tokens holds back the end token; stop_token_ids end the sequence (the token is
    # kept, as a matched stop word is in TensorRT-LLM); bad_words are never generated (TensorRT-LLM bad_words)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_WORDS)
    bad_words: list[str] = Field(default_factory=list, max_length=MAX_WORDS)

    @field_validator("logit_bias")
    @classmethod
    def _bias_values(cls, v):
        for key, value in (v or {}).items():
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias[{key!r}] = {value}: values must be in [-100, 100]")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if isinstance(stops, list) and len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if not v or (isinstance(v, list) and any(isinstance(p, str | list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=128)  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result answers this call
    name: str | None = Field(None, max_length=256)  # passed to the chat template, which may use it

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(
                        f"content part of type {part.get('type')!r} is not supported (text only)"
                    )
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None  # server/tools.py checks them (and tool_choice) together
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (the `openai` client raises the matching exception class from the status)."""
    kinds = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        405: "MethodNotAllowedError",
        408: "RequestTimeoutError",
        413: "RequestTooLargeError",
        422: "UnprocessableEntityError",
        429: "RateLimitError",
        503: "ServiceUnavailableError",
    }
    return {
        "error": {
            "message": message,
            "type": kinds.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }
