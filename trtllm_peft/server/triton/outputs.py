"""Output tensors of the generating models for one batch item, and which of them a response carries.

`ensemble` / `tensorrt_llm_bls` / models by name: text_output, log-probs, indices, token counts (the
ensemble's outputs). `tensorrt_llm`: output_ids [1, 1, T] and sequence_length [1, 1] as the C++ backend
sends them: in a streaming response the new tokens only; in a whole one the prompt too unless
exclude_input_in_output (TensorRT-LLM's OutputConfig), with sequence_length the number of ids.
"""

from __future__ import annotations

import numpy as np

from trtllm_peft.server.triton.generation import TritonGeneration
from trtllm_peft.server.triton.schemas import TritonRequest
from trtllm_peft.server.triton.tensors import Tensor, TritonProtocolError, bytes_tensor


def _i32(name: str, value: int) -> Tensor:
    return Tensor(name, "INT32", np.full((1, 1), value, np.int32))


def _common(
    index: int, gen: TritonGeneration, token_ids: list[int], logprobs: list[float]
) -> dict[str, Tensor]:
    n = len(token_ids)
    lps = np.asarray(logprobs if gen.req.return_log_probs else [0.0] * n, np.float32).reshape(1, 1, n)
    return {
        "batch_index": _i32("batch_index", index),
        "sequence_index": _i32("sequence_index", 0),
        "num_input_tokens": _i32("num_input_tokens", len(gen.prompt_ids)),
        "num_output_tokens": _i32("num_output_tokens", n),
        "output_log_probs": Tensor("output_log_probs", "FP32", lps),
        "cum_log_probs": Tensor("cum_log_probs", "FP32", lps.sum(axis=2, dtype=np.float32)),
    }


def text_outputs(index: int, gen: TritonGeneration, done) -> dict[str, Tensor]:
    """`done`: a Totals (whole sequence) or a Chunk (one streamed piece)."""
    return {
        # [1], not [1, 1]: postprocessing/1/model.py answers np.array(list of B×beams strings), and the stock
        # clients read `as_numpy("text_output")[0].decode()`
        "text_output": bytes_tensor("text_output", [done.text], [1]),
        **_common(index, gen, done.token_ids, done.logprobs),
    }


def trtllm_outputs(index: int, gen: TritonGeneration, done, *, whole: bool) -> dict[str, Tensor]:
    if gen.req.llmapi:  # llmapi/tensorrt_llm/1/model.py _create_response: text_output [B×n] (here [1])
        return text_outputs(index, gen, done)
    ids = list(done.token_ids)
    if whole and not gen.req.exclude_input:
        ids = list(gen.prompt_ids) + ids
    return {
        "output_ids": Tensor("output_ids", "INT32", np.asarray(ids, np.int32).reshape(1, 1, len(ids))),
        "sequence_length": _i32("sequence_length", len(ids)),
        **_common(index, gen, done.token_ids, done.logprobs),
    }


def default_outputs(kind: str, req: TritonRequest | None, computed: list[str]) -> list[str]:
    """What a response carries when the client names no outputs."""
    if req is None:  # preprocessing / postprocessing: all they compute
        return computed
    if req.llmapi:  # the llmapi model sends text_output alone unless asked for more
        return ["text_output"]
    first = ["text_output"] if kind == "text" else ["output_ids", "sequence_length"]
    names = [*first, "batch_index", "sequence_index"]
    names += ["cum_log_probs", "output_log_probs"] if req.return_log_probs else []
    names += ["num_input_tokens"] if req.return_num_input_tokens else []
    names += ["num_output_tokens"] if req.return_num_output_tokens else []
    return names


def select(model: str, tensors: dict[str, Tensor], names: list[str], declared: set[str]) -> list[Tensor]:
    """The named outputs; Triton's error for an undeclared one, ours for one this server does not compute."""
    for name in names:
        if name not in tensors:
            if name in declared:
                raise TritonProtocolError(
                    f"output '{name}' of model '{model}' is not supported by this server"
                )
            raise TritonProtocolError(f"unexpected inference output '{name}' for model '{model}'")
    return [tensors[n] for n in names]
