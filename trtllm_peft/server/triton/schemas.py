"""The v2 models this server shows to Triton clients, and what their inputs mean.

`ensemble` and `tensorrt_llm_bls` take tensorrtllm_backend's inputs (names, datatypes and dims of
triton_backend/all_models/inflight_batcher_llm/{ensemble,tensorrt_llm_bls}/config.pbtxt); the base model
and every adapter are v2 models too, with the same inputs less the LoRA ones. Inputs are checked as
Triton checks them (unknown name, wrong datatype, batch size); features the engine lacks are refused by
name rather than ignored. Outputs follow the ensemble's: text_output, log-probs, indices, token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trtllm_peft.lora.spec import ModelSpec
from trtllm_peft.server.triton.tensors import NUMPY_TYPES, Tensor, TritonProtocolError, bytes_tensor

VERSION = "1"
MAX_WORDS = 1024  # stop / bad words per request: bounds the per-token matching work
LORA_INPUTS = ("lora_task_id", "lora_weights", "lora_config")

TYPE_OF = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32"}


@dataclass(frozen=True)
class IO:
    """One input or output of a model config: dims exclude the batch dimension (max_batch_size > 0)."""

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)
    optional: bool = True

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}


_SAMPLING_INPUTS = (
    IO("text_input", "BYTES", optional=False),
    IO("max_tokens", "INT32", optional=False),
    IO("bad_words", "BYTES", (-1,)),
    IO("stop_words", "BYTES", (-1,)),
    IO("embedding_bias_words", "BYTES", (-1,)),
    IO("embedding_bias_weights", "FP32", (-1,)),
    IO("exclude_input_in_output", "BOOL"),
    IO("end_id", "INT32"),
    IO("pad_id", "INT32"),
    IO("top_k", "INT32"),
    IO("top_p", "FP32"),
    IO("temperature", "FP32"),
    IO("length_penalty", "FP32"),
    IO("repetition_penalty", "FP32"),
    IO("presence_penalty", "FP32"),
    IO("frequency_penalty", "FP32"),
    IO("min_tokens", "INT32"),
    IO("min_length", "INT32"),  # min_tokens' name up to tensorrtllm_backend v0.19.0 (MIN_LENGTH_ALIAS)
    IO("seed", "UINT64"),
    IO("random_seed", "UINT64"),  # older tensorrtllm_backend clients
    IO("return_log_probs", "BOOL"),
    IO("return_context_logits", "BOOL"),
    IO("return_generation_logits", "BOOL"),
    IO("return_num_input_tokens", "BOOL"),
    IO("return_num_output_tokens", "BOOL"),
    IO("num_return_sequences", "INT32"),
    IO("beam_width", "INT32"),
    IO("stream", "BOOL"),
)

OUTPUTS = (
    IO("text_output", "BYTES", (-1,)),
    IO("cum_log_probs", "FP32", (-1,)),
    IO("output_log_probs", "FP32", (-1, -1)),
    IO("batch_index", "INT32"),
    IO("sequence_index", "INT32"),
    IO("num_input_tokens", "INT32"),
    IO("num_output_tokens", "INT32"),
)


def model_inputs(spec: ModelSpec, with_lora: bool) -> tuple[IO, ...]:
    """Inputs of a model; the LoRA ones carry weights in the engine dtype (TensorRT-LLM's rule).

    lora_config takes 3 columns (module, layer, rank; the stock config.pbtxt) or 4 (+ is_dora).
    """
    if not with_lora:
        return _SAMPLING_INPUTS
    return (
        *_SAMPLING_INPUTS,
        IO("lora_task_id", "UINT64"),
        IO("lora_weights", TYPE_OF[spec.dtype], (-1, -1)),
        IO("lora_config", "INT32", (-1, -1)),
    )


@dataclass(frozen=True)
class TritonRequest:
    """A request in engine terms, after the inputs were checked."""

    text: str
    max_tokens: int
    stop_words: list[str]  # strings: tokenized without special tokens, as the stock preprocessing does
    end_id: int | None  # None: the tokenizer's EOS; -1: none
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    return_log_probs: bool
    exclude_input: bool
    stream: bool
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    lora_task_id: int | None = None
    lora_weights: torch.Tensor | None = None  # [1, N, W] | [N, W]
    lora_config: torch.Tensor | None = None  # [1, N, 3|4] | [N, 3|4]
    bad_words: list[str] = field(default_factory=list)
    stop_ids: list[list[int]] = field(default_factory=list)  # stop_words_list, already token ids
    bad_ids: list[list[int]] = field(default_factory=list)
    min_tokens: int | None = None
    bias_words: list[str] = field(default_factory=list)  # embedding_bias_words / _weights (the ensemble's)
    bias_weights: list[float] = field(default_factory=list)
    embedding_bias: torch.Tensor | None = None  # [vocab] float32 (tensorrt_llm's embedding_bias)
    prompt_ids: list[int] | None = None  # `tensorrt_llm` takes token ids; `text` is then unused
    llmapi: bool = False  # `tensorrt_llm` in the llmapi model's style: text_output out (llmapi.py)


def check_inputs(model: str, inputs: dict[str, Tensor], declared: tuple[IO, ...], max_batch: int = 1) -> None:
    """Triton's checks: known names, declared datatypes and ranks, required inputs, 1 <= batch <= max_batch."""
    by_name = {io.name: io for io in declared}
    for name, t in inputs.items():
        io = by_name.get(name)
        if io is None:
            raise TritonProtocolError(f"unexpected inference input '{name}' for model '{model}'")
        if t.datatype != io.datatype:
            raise TritonProtocolError(
                f"inference input '{name}' data-type is '{t.datatype}', but model '{model}' expects "
                f"'{io.datatype}'"
            )
        fixed = all(d in (-1, s) for d, s in zip(io.dims, t.shape[1:], strict=False))
        if len(t.shape) != len(io.dims) + 1 or not 1 <= t.shape[0] <= max_batch or not fixed:
            raise TritonProtocolError(
                f"inference input '{name}' has shape {t.shape}; model '{model}' expects "
                f"{[-1, *io.dims]} (-1 = any) with a batch size from 1 to {max_batch}"
            )
    missing = [io.name for io in declared if not io.optional and io.name not in inputs]
    if missing:
        raise TritonProtocolError(f"expected input '{missing[0]}' for model '{model}'")


def parse_request(inputs: dict[str, Tensor]) -> TritonRequest:
    """TritonRequest from checked inputs; refuses (400) what the engine cannot do rather than ignore it."""
    _refuse_unsupported(inputs)

    def get(name: str, default=None):
        return inputs[name].scalar() if name in inputs else default

    max_tokens = int(get("max_tokens"))
    if max_tokens < 1:
        raise TritonProtocolError(f"max_tokens must be >= 1, got {max_tokens}")
    seed = get("seed", get("random_seed"))
    _check_values(get)
    return TritonRequest(
        text=get("text_input"),
        max_tokens=max_tokens,
        stop_words=_words(inputs, "stop_words"),
        bad_words=_words(inputs, "bad_words"),
        min_tokens=min_tokens(get),
        bias_words=_words(inputs, "embedding_bias_words", keep_empty=True),
        bias_weights=inputs["embedding_bias_weights"].data.reshape(-1).tolist()
        if "embedding_bias_weights" in inputs
        else [],
        end_id=get("end_id"),
        temperature=get("temperature"),
        top_k=get("top_k"),
        top_p=get("top_p"),
        repetition_penalty=get("repetition_penalty"),
        presence_penalty=get("presence_penalty"),
        frequency_penalty=get("frequency_penalty"),
        seed=None if seed is None else int(seed),
        return_log_probs=bool(get("return_log_probs", False)),
        exclude_input=bool(get("exclude_input_in_output", False)),
        stream=bool(get("stream", False)),
        return_num_input_tokens=bool(get("return_num_input_tokens", False)),
        return_num_output_tokens=bool(get("return_num_output_tokens", False)),
        lora_task_id=get("lora_task_id"),
        lora_weights=inputs["lora_weights"].to_torch() if "lora_weights" in inputs else None,
        lora_config=inputs["lora_config"].to_torch() if "lora_config" in inputs else None,
    )


# tensorrtllm_backend v0.8.0 … v0.19.0 declare `min_length` (INT32 [1], optional) on tensorrt_llm, ensemble
# and tensorrt_llm_bls (all_models/inflight_batcher_llm/*/config.pbtxt at those tags); the backend moved
# into TensorRT-LLM at v0.20 and the input became `min_tokens`. Older clients still send `min_length`.
MIN_LENGTH_ALIAS = IO("min_length", "INT32")


def min_tokens(get) -> int | None:
    """min_tokens, or its older name min_length; both at once is a 400 (no single reading)."""
    new, old = get("min_tokens"), get("min_length")
    if new is not None and old is not None:
        raise TritonProtocolError("give min_tokens or min_length (its older name), not both")
    value = new if new is not None else old
    return None if value is None else int(value)


def _words(inputs: dict[str, Tensor], name: str, keep_empty: bool = False) -> list[str]:
    words = [w for w in inputs[name].strings() if w or keep_empty] if name in inputs else []
    if len(words) > MAX_WORDS:
        raise TritonProtocolError(f"at most {MAX_WORDS} {name}, got {len(words)}")
    return words


# TensorRT-LLM's ranges (cpp/tensorrt_llm/executor/samplingConfig.cpp, checkTemperature / checkTopK /
# checkTopP / checkRepetitionPenalty / checkLengthPenalty), finite; top_p 0 means unset, as in
# tensorrtllm_backend. (name, lowest, lowest allowed, highest)
_RANGES = (
    ("temperature", 0.0, True, None),
    ("top_k", 0, True, None),
    ("top_p", 0.0, True, 1.0),
    ("repetition_penalty", 0.0, False, None),
    ("length_penalty", 0.0, True, None),
    ("presence_penalty", None, True, None),
    ("frequency_penalty", None, True, None),
)


def _check_values(get) -> None:
    """Every sampling value finite and in TensorRT-LLM's range; a non-empty prompt."""
    if not get("text_input"):
        raise TritonProtocolError("text_input must not be empty")
    check_ranges(get)


def check_ranges(get, names: dict[str, str] | None = None) -> None:
    """The _RANGES checks; `names` maps a range's name to the input carrying it (tensorrt_llm's
    runtime_top_k, len_penalty, …)."""
    for key, low, inclusive, high in _RANGES:
        name = (names or {}).get(key, key)
        value = get(name)
        if value is None:
            continue
        v = float(value)
        ok = math.isfinite(v) and (low is None or v > low or (inclusive and v == low))
        if not ok or (high is not None and v > high):
            low_s = "" if low is None else f"{'>=' if inclusive else '>'} {low:g}"
            high_s = "" if high is None else f" and <= {high:g}"
            raise TritonProtocolError(f"{name} must be a finite number {low_s}{high_s}, got {value}".strip())


def _refuse_unsupported(inputs: dict[str, Tensor]) -> None:
    def value(name: str, default):
        return inputs[name].scalar() if name in inputs else default

    for name, default, allowed in (
        ("beam_width", 1, 1),
        ("num_return_sequences", 1, 1),
        ("return_context_logits", False, False),
        ("return_generation_logits", False, False),
    ):
        if value(name, default) != allowed:
            raise TritonProtocolError(f"{name}={value(name, default)} is not supported by this server")


# ---- generate extension: JSON values → tensors ------------------------------------------------------------


def json_inputs(model: str, body: dict[str, Any], declared: tuple[IO, ...]) -> dict[str, Tensor]:
    """Inputs of a generate request: top-level keys (and `parameters`) named like inputs, shaped by config.

    Triton's generate extension: a scalar fills a [1] input, a list fills a [-1] input; the batch dimension
    of 1 is added. Keys that are not inputs are an error, as on Triton.
    """
    values = {**(body.get("parameters") or {}), **{k: v for k, v in body.items() if k != "parameters"}}
    by_name = {io.name: io for io in declared}
    out = {}
    for name, value in values.items():
        io = by_name.get(name)
        if io is None:
            raise TritonProtocolError(f"unexpected inference input '{name}' for model '{model}'")
        out[name] = _json_tensor(io, value)
    return out


def _json_tensor(io: IO, value: Any) -> Tensor:
    if io.datatype == "BYTES":
        items = value if isinstance(value, list) else [value]
        strings = [str(v) for v in items if v is not None]
        if io.dims == (1,) and len(strings) != 1:
            raise TritonProtocolError(f"input '{io.name}' takes one string")
        return bytes_tensor(io.name, strings, [1, len(strings)])
    try:
        if io.datatype == "BF16":
            t = torch.tensor(value, dtype=torch.bfloat16)
            data = t.view(torch.int16).numpy().view(np.uint16)
        else:
            data = np.array(value, dtype=NUMPY_TYPES[io.datatype])
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise TritonProtocolError(f"input '{io.name}': value is not {io.datatype} ({e})") from None
    if data.ndim == len(io.dims):  # no batch dimension given (the usual case): add it
        data = data[None]
    elif data.ndim < len(io.dims):
        data = data.reshape((1,) * (len(io.dims) + 1 - data.ndim) + data.shape)
    return Tensor(io.name, io.datatype, data)
