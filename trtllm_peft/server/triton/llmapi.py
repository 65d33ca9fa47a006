"""The `tensorrt_llm` model's second input style: TensorRT-LLM's LLM-API backend (text in, text out).

TensorRT-LLM documents `curl -X POST localhost:8000/v2/models/tensorrt_llm/generate -d '{"text_input":
"What is ML?", "sampling_param_max_tokens": 50}'` (triton_backend/all_models/llmapi/README.md, and the
tensorrtllm_backend README's LLM-API section): a `tensorrt_llm` model that is the Python `llmapi` one, not the
C++ inflight_batcher_llm one that this server's `tensorrt_llm` mirrors (token ids in and out). So our
`tensorrt_llm` takes both: the inflight_batcher_llm inputs as before, and, when `input_ids` is absent,
the llmapi model's inputs (triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt), all declared
optional, answered with `text_output` as that model does (llmapi/tensorrt_llm/1/model.py `_create_response`:
`output.text`, which in a streamed response is the text so far, LLM API CompletionOutput.text).
A request mixing the two styles (say `input_ids` with `text_input`, or `request_output_len` with
`sampling_param_max_tokens`) is refused with a 400 naming both inputs: there is no single reading of it.
"""

from __future__ import annotations

from trtllm_peft.server.triton.schemas import IO, TritonRequest, check_ranges
from trtllm_peft.server.triton.tensors import Tensor, TritonProtocolError

# llmapi/tensorrt_llm/config.pbtxt's inputs; `streaming` and `stop` are inflight_batcher_llm's names too.
LLMAPI_INPUTS = (
    IO("text_input", "BYTES", (-1,)),
    IO("image_url", "BYTES", (-1,)),
    IO("sampling_param_best_of", "INT32"),
    IO("sampling_param_temperature", "FP32"),
    IO("sampling_param_top_k", "INT32"),
    IO("sampling_param_top_p", "FP32"),
    IO("sampling_param_frequency_penalty", "FP32"),
    IO("sampling_param_presence_penalty", "FP32"),
    IO("sampling_param_max_tokens", "INT32"),
    IO("sampling_param_stop", "BYTES", (-1,)),
    IO("sampling_param_seed", "UINT64"),
    IO("sampling_param_exclude_input_from_output", "BOOL"),
    IO("sampling_param_return_perf_metrics", "BOOL"),
    IO("return_finish_reason", "BOOL"),
    IO("return_stop_reason", "BOOL"),
    IO("return_cumulative_logprob", "BOOL"),
    IO("lora_id", "UINT64"),
    IO("lora_name", "BYTES"),
    IO("lora_path", "BYTES"),
    IO("lora_ckpt_source", "BYTES"),
)
LLMAPI_OUTPUTS = (IO("text_output", "BYTES", (-1,)),)
SHARED = ("streaming", "stop")
LLMAPI_ONLY = tuple(io.name for io in LLMAPI_INPUTS)

# TensorRT-LLM's SamplingParams.max_tokens default (tensorrt_llm/sampling_params.py), used by the llmapi
# model when sampling_param_max_tokens is absent
DEFAULT_MAX_TOKENS = 32

# what this server cannot honour: refused by name when set to anything but the default
_REFUSED = (
    ("sampling_param_best_of", 1),
    ("sampling_param_return_perf_metrics", False),
    ("return_finish_reason", False),
    ("return_stop_reason", False),
    ("return_cumulative_logprob", False),
    ("stop", False),  # model.py: a stop request cancels an earlier one by request id
)
# sampling_param_stop: the LLM API cuts a matched stop string from the text; refused until matched so
_REFUSED_NONEMPTY = (
    "image_url",
    "sampling_param_stop",
    "lora_id",
    "lora_name",
    "lora_path",
    "lora_ckpt_source",
)


def style(inputs: dict[str, Tensor]) -> str:
    """'llmapi' or 'inflight' for one batch item; a 400 naming the conflict when inputs of both are given."""
    llmapi = [n for n in inputs if n in LLMAPI_ONLY]
    inflight = [n for n in inputs if n not in LLMAPI_ONLY and n not in SHARED]
    if llmapi and inflight:
        raise TritonProtocolError(
            f"model 'tensorrt_llm' takes either the inflight_batcher_llm inputs (input_ids, ...) or the llmapi "
            f"ones (text_input, sampling_param_*, ...), not both: got '{inflight[0]}' with '{llmapi[0]}'"
        )
    return "llmapi" if llmapi else "inflight"


def llmapi_request(inputs: dict[str, Tensor]) -> TritonRequest:
    """One batch item in the llmapi model's terms (llmapi/tensorrt_llm/1/helpers.py
    get_sampling_params_from_request / get_streaming_from_request: absent → SamplingParams' default;
    exclude_input_from_output defaults to False there, so the prompt leads text_output)."""
    for name, allowed in _REFUSED:
        if name in inputs and inputs[name].scalar() != allowed:
            raise TritonProtocolError(f"{name}={inputs[name].scalar()} is not supported by this server")
    for name in _REFUSED_NONEMPTY:
        if name in inputs and inputs[name].data.size:
            raise TritonProtocolError(f"{name} is not supported by this server")

    def get(name: str, default=None):
        return inputs[name].scalar() if name in inputs else default

    prompts = inputs["text_input"].strings() if "text_input" in inputs else []
    if len(prompts) != 1:  # model.py _convert_request: one prompt per request
        raise TritonProtocolError(f"text_input takes one prompt, got {len(prompts)}")
    if not prompts[0]:
        raise TritonProtocolError("text_input must not be empty")
    sp = {
        k: f"sampling_param_{k}"
        for k in ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty")
    }
    check_ranges(get, sp)
    max_tokens = int(get("sampling_param_max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens < 1:
        raise TritonProtocolError(f"sampling_param_max_tokens must be >= 1, got {max_tokens}")
    seed = get("sampling_param_seed")
    return TritonRequest(
        text=prompts[0],
        max_tokens=max_tokens,
        stop_words=[],
        end_id=None,  # the tokenizer's EOS, as the LLM API's default end id
        temperature=get(sp["temperature"]),
        top_k=get(sp["top_k"]),
        top_p=get(sp["top_p"]),
        repetition_penalty=None,
        presence_penalty=get(sp["presence_penalty"]),
        frequency_penalty=get(sp["frequency_penalty"]),
        seed=None if seed is None else int(seed),
        return_log_probs=False,
        exclude_input=bool(get("sampling_param_exclude_input_from_output", False)),
        stream=bool(get("streaming", False)),
        llmapi=True,
    )
