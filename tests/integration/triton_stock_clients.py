"""tensorrtllm_backend's stock clients (NVIDIA/TensorRT-LLM triton_backend/, 1.2 era), their request building
and stream handling as they are written there, for the tests that drive our server with them:
* inflight_batcher_llm/client/end_to_end_grpc_client.py: `prepare_inputs` (ensemble, text in; stop/bad
  words as `np.array([words], dtype=object)`, LoRA from model.lora_*.npy), `run_inference` (start_stream,
  async_stream_infer, stop_stream; `--batch-inputs` concatenates the batch-1 inputs);
* inflight_batcher_llm/client/inflight_batcher_llm_client.py: `prepare_inputs` (tensorrt_llm, token ids from
  the model's tokenizer, end_id/pad_id from it, top_k=1, top_p=0, temperature=1, LoRA by `--lora-path` +
  `--lora-task-id`, then `--lora-task-id` alone), streaming (async_stream_infer) and not (async_infer with
  parameters={'Streaming': False});
* tools/inflight_batcher_llm/end_to_end_test.py: utils.prepare_tensor.
"""

from __future__ import annotations

import os
import queue
from functools import partial

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402


def prepare_tensor(name, value, protocol):
    """end_to_end_test.py's utils.prepare_tensor: the client module of the protocol."""
    client = grpcclient if protocol == "grpc" else httpclient
    t = client.InferInput(name, value.shape, np_to_triton_dtype(value.dtype))
    t.set_data_from_numpy(value)
    return t


class UserData:
    def __init__(self):
        self._completed_requests = queue.Queue()


def callback(user_data, result, error):
    user_data._completed_requests.put(error if error else result)


def drain(user_data) -> list:
    out = []
    while True:
        try:
            out.append(user_data._completed_requests.get(block=False))
        except queue.Empty:
            return out


def e2e_inputs(prompt, output_len, *, streaming=False, stop_words=None, bad_words=None, end_id=None,
               lora_dir=None, lora_task_id=None, exclude_input_in_output=True, embedding_bias_words=None,
               embedding_bias_weights=None):  # fmt: skip
    """end_to_end_grpc_client.prepare_inputs (temperature 1.0, beam 1, num_return_sequences 1: its defaults)."""
    input0 = [[prompt]]
    inputs = {
        "text_input": np.array(input0).astype(object),
        "max_tokens": np.ones_like(input0).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
        "num_return_sequences": np.array([[1]], dtype=np.int32),
    }
    if bad_words:
        inputs["bad_words"] = np.array([bad_words], dtype=object)
    if stop_words:
        inputs["stop_words"] = np.array([stop_words], dtype=object)
    if embedding_bias_words is not None:
        inputs["embedding_bias_words"] = np.array([embedding_bias_words], dtype=object)
        inputs["embedding_bias_weights"] = np.array([embedding_bias_weights], dtype=np.float32)
    if end_id is not None:
        inputs["end_id"] = np.array([[end_id]], dtype=np.int32)
    inputs["exclude_input_in_output"] = np.array([[exclude_input_in_output]], dtype=bool)
    if lora_dir:
        inputs["lora_weights"] = np.load(os.path.join(lora_dir, "model.lora_weights.npy"))
        inputs["lora_config"] = np.load(os.path.join(lora_dir, "model.lora_config.npy"))
    if lora_task_id:
        inputs["lora_task_id"] = np.array([[lora_task_id]], dtype=np.uint64)
    return inputs


def run_inference(grpc, bs1_inputs, *, streaming, batch_inputs=False, model="ensemble"):
    """end_to_end_grpc_client.run_inference: one stream per request, texts per batch index."""
    if batch_inputs:
        multiple = [
            [prepare_tensor(k, np.concatenate([b[k] for b in bs1_inputs]), "grpc") for k in bs1_inputs[0]]
        ]
    else:
        multiple = [[prepare_tensor(k, v, "grpc") for k, v in b.items()] for b in bs1_inputs]
    outputs = [grpcclient.InferRequestedOutput("text_output")]
    if batch_inputs:
        outputs.append(grpcclient.InferRequestedOutput("batch_index"))
    texts, user_data = [], UserData()
    for inputs in multiple:
        grpc.start_stream(callback=partial(callback, user_data))
        batch_size = inputs[0].shape()[0]
        grpc.async_stream_infer(model, inputs, outputs=outputs, request_id="1")
        grpc.stop_stream()
        batch_text = [""] * batch_size
        for result in drain(user_data):
            if isinstance(result, InferenceServerException):
                raise result
            index = result.as_numpy("batch_index")
            index = 0 if index is None else index[0][0]
            piece = result.as_numpy("text_output")[0].decode("utf-8")
            batch_text[index] = batch_text[index] + piece if streaming else piece
        texts += batch_text
    return texts


def ifb_inputs(tokenizer, text, output_len, *, streaming, lora_path=None, lora_task_id=None,
               stop_words_list=None, bad_words_list=None, min_tokens=None, end_id=None, embedding_bias=None, min_length=None):  # fmt: skip
    """inflight_batcher_llm_client's __main__ + prepare_inputs with its default flags."""
    pad_id = tokenizer.encode(tokenizer.pad_token or tokenizer.eos_token, add_special_tokens=False)[0]
    if end_id is None:
        end_id = tokenizer.encode(tokenizer.eos_token, add_special_tokens=False)[0]
    input_ids = [tokenizer.encode(text)]
    inputs = {
        "input_ids": np.array(input_ids, dtype=np.int32),
        "input_lengths": np.array([[len(ii)] for ii in input_ids], dtype=np.int32),
        "request_output_len": np.array([[output_len]], dtype=np.int32),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
        "streaming": np.array([[streaming]], dtype=bool),
        "end_id": np.array([[end_id]], dtype=np.int32),
        "pad_id": np.array([[pad_id]], dtype=np.int32),
        "runtime_top_k": np.array([[1]], dtype=np.int32),
        "runtime_top_p": np.array([[0.0]], dtype=np.float32),
    }
    if lora_task_id is not None:
        inputs["lora_task_id"] = np.array([[lora_task_id]], dtype=np.uint64)
    if lora_path:
        inputs["lora_weights"] = np.load(os.path.join(lora_path, "model.lora_weights.npy"))
        inputs["lora_config"] = np.load(os.path.join(lora_path, "model.lora_config.npy"))
    if stop_words_list is not None:
        inputs["stop_words_list"] = stop_words_list
    if bad_words_list is not None:
        inputs["bad_words_list"] = bad_words_list
    if min_tokens is not None:
        inputs["min_tokens"] = np.array([[min_tokens]], dtype=np.int32)
    if min_length is not None:
        inputs["min_length"] = np.array([[min_length]], dtype=np.int32)
    if embedding_bias is not None:
        inputs["embedding_bias"] = embedding_bias
    return input_ids[0], [prepare_tensor(k, v, "grpc") for k, v in inputs.items()]


def ifb_run(grpc, inputs, *, streaming) -> list[int]:
    """The client's two paths: a stream (tokens appended), or async_infer (one response, prompt included)."""
    user_data = UserData()
    if streaming:
        grpc.start_stream(callback=partial(callback, user_data))
        grpc.async_stream_infer("tensorrt_llm", inputs, request_id="")
        grpc.stop_stream()
        results = drain(user_data)
    else:
        grpc.async_infer(
            "tensorrt_llm",
            inputs,
            request_id="",
            callback=partial(callback, user_data),
            parameters={"Streaming": False},
        )
        results = [user_data._completed_requests.get(timeout=120)]
    tokens = []
    for result in results:
        if isinstance(result, InferenceServerException):
            raise result
        output_ids, seq_len = result.as_numpy("output_ids"), result.as_numpy("sequence_length")[0][0]
        tokens += list(output_ids[0][0]) if streaming else list(output_ids[0][0][:seq_len])
    return tokens
