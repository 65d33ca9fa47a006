"""`tensorrt_llm` in the llmapi model's input style (server/triton/llmapi.py).

Inputs and defaults follow NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt and
1/helpers.py (get_sampling_params_from_request: exclude_input_from_output defaults to False).
"""

from __future__ import annotations

import numpy as np
import pytest

from trtllm_peft.server.triton import llmapi
from trtllm_peft.server.triton.tensors import NUMPY_TYPES, Tensor, TritonProtocolError, bytes_tensor


def t(name, dtype, value) -> Tensor:
    return Tensor(name, dtype, np.array([[value]], dtype=NUMPY_TYPES[dtype]))


def text(value="What is ML?") -> Tensor:
    return bytes_tensor("text_input", [value], [1, 1])


def test_documented_example_reads_as_llmapi_with_prompt_in_output():
    item = {"text_input": text(), "sampling_param_max_tokens": t("sampling_param_max_tokens", "INT32", 50)}
    assert llmapi.style(item) == "llmapi"
    req = llmapi.llmapi_request(item)
    assert (req.text, req.max_tokens, req.llmapi, req.stream) == ("What is ML?", 50, True, False)
    assert req.exclude_input is False and req.end_id is None  # helpers.py default; the tokenizer's EOS


def test_sampling_params_map_and_default_max_tokens():
    item = {
        "text_input": text(),
        "streaming": t("streaming", "BOOL", True),
        "sampling_param_temperature": t("sampling_param_temperature", "FP32", 0.5),
        "sampling_param_top_k": t("sampling_param_top_k", "INT32", 4),
        "sampling_param_top_p": t("sampling_param_top_p", "FP32", 0.9),
        "sampling_param_seed": t("sampling_param_seed", "UINT64", 7),
        "sampling_param_exclude_input_from_output": t(
            "sampling_param_exclude_input_from_output", "BOOL", True
        ),
    }
    req = llmapi.llmapi_request(item)
    assert req.max_tokens == llmapi.DEFAULT_MAX_TOKENS and req.stream and req.exclude_input
    assert (req.temperature, req.top_k, req.seed) == (0.5, 4, 7)
    assert req.top_p == pytest.approx(0.9)


def test_inflight_inputs_stay_inflight():
    item = {"input_ids": Tensor("input_ids", "INT32", np.array([[1, 2]], np.int32)),
            "streaming": t("streaming", "BOOL", True)}  # fmt: skip
    assert llmapi.style(item) == "inflight"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"input_ids": Tensor("input_ids", "INT32", np.array([[1]], np.int32)), "text_input": text()},
         "not both: got 'input_ids' with 'text_input'"),
        ({"request_output_len": t("request_output_len", "INT32", 4),
          "sampling_param_max_tokens": t("sampling_param_max_tokens", "INT32", 4)},
         "not both: got 'request_output_len' with 'sampling_param_max_tokens'"),
    ],
)  # fmt: skip
def test_mixing_styles_is_a_400_naming_both(item, message):
    with pytest.raises(TritonProtocolError, match=message) as e:
        llmapi.style(item)
    assert e.value.http_status == 400


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("text_input", bytes_tensor("text_input", ["a", "b"], [1, 2]), "text_input takes one prompt, got 2"),
        ("text_input", text(""), "text_input must not be empty"),
        ("sampling_param_max_tokens", t("sampling_param_max_tokens", "INT32", 0), "must be >= 1, got 0"),
        ("sampling_param_top_p", t("sampling_param_top_p", "FP32", 2.0), "sampling_param_top_p must be"),
        (
            "sampling_param_temperature",
            t("sampling_param_temperature", "FP32", -1.0),
            "sampling_param_temperature",
        ),
        (
            "sampling_param_best_of",
            t("sampling_param_best_of", "INT32", 2),
            "sampling_param_best_of=2 is not",
        ),
        ("return_finish_reason", t("return_finish_reason", "BOOL", True), "return_finish_reason=True is not"),
        ("stop", t("stop", "BOOL", True), "stop=True is not supported"),
        (
            "sampling_param_stop",
            bytes_tensor("sampling_param_stop", ["\n"], [1, 1]),
            "sampling_param_stop is not",
        ),
        ("lora_name", bytes_tensor("lora_name", ["x"], [1, 1]), "lora_name is not supported"),
        ("image_url", bytes_tensor("image_url", ["http://x/y.jpg"], [1, 1]), "image_url is not supported"),
    ],
)
def test_refusals(name, tensor, message):
    item = {"text_input": text(), name: tensor}
    with pytest.raises(TritonProtocolError, match=message) as e:
        llmapi.llmapi_request(item)
    assert e.value.http_status == 400
