"""tensorrtllm_backend's stock `preprocessing`, `tensorrt_llm` and `postprocessing` models, emulated.

Their inputs and outputs are the stock config.pbtxt's (one table, trtllm_peft/triton_repo/tensors.py, shared
with the generated repository); what they compute mirrors the stock code at the 1.2-era release
(NVIDIA/TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/):
* preprocessing/1/model.py `execute`: QUERY → INPUT_ID (tokenizer ids, right-padded with the pad id) and
  REQUEST_INPUT_LEN; BAD_WORDS_DICT / STOP_WORDS_DICT → the [2, N] offsets format (`_to_word_list_format`);
  END_ID / PAD_ID default to the tokenizer's;
* postprocessing/1/model.py `execute`: TOKENS_BATCH[b, beam, :SEQUENCE_LENGTH[b, beam]] decoded with
  skip_special_tokens (the stock default);
* tensorrt_llm (the C++ backend): one executor request per batch item, read here into a TritonRequest.
Everything works per batch item; models.py splits and joins the batch.
"""

from __future__ import annotations

import numpy as np

from trtllm_peft.server.triton.schemas import IO, MAX_WORDS, TYPE_OF, TritonRequest, check_ranges, min_tokens
from trtllm_peft.server.triton.tensors import Tensor, TritonProtocolError, bytes_tensor
from trtllm_peft.serving.tokenizer import Tokenizer
from trtllm_peft.triton_repo import tensors as stock


def stock_io(rows: list[stock.Row], dtype: str) -> tuple[IO, ...]:
    """IO entries of a stock table: STRING is BYTES on the wire, DT the engine's dtype."""
    out = []
    for name, datatype, dims, flags in rows:
        wire = {"STRING": "BYTES", "DT": TYPE_OF[dtype]}.get(datatype, datatype)
        out.append(IO(name, wire, dims, optional="o" in flags))
    return tuple(out)


# ---- preprocessing ---------------------------------------------------------------------------------------

PRE_PRODUCED = (
    "INPUT_ID",
    "REQUEST_INPUT_LEN",
    "DECODER_INPUT_ID",
    "REQUEST_DECODER_INPUT_LEN",
    "BAD_WORDS_IDS",
    "STOP_WORDS_IDS",
    "EMBEDDING_BIAS",
    "REQUEST_OUTPUT_LEN",
    "OUT_END_ID",
    "OUT_PAD_ID",
)
_PRE_REFUSED = ("DECODER_QUERY", "PROMPT_TABLE_EXTRA_ID")


def preprocess(tok: Tokenizer, inputs: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """One batch item ([1, …] inputs) through preprocessing/1/model.py's text path."""
    for name in _PRE_REFUSED:
        if name in inputs and inputs[name].data.size:
            raise TritonProtocolError(f"{name} is not supported by this server (text-only decoder model)")
    ids = tok.encode(inputs["QUERY"].scalar())
    end_id = _scalar_or(inputs, "END_ID", tok.eos_token_id)
    pad_id = _scalar_or(inputs, "PAD_ID", tok.pad_token_id if tok.pad_token_id is not None else end_id)
    i32 = np.int32
    return {
        "INPUT_ID": Tensor("INPUT_ID", "INT32", np.array([ids], i32)),
        "REQUEST_INPUT_LEN": Tensor("REQUEST_INPUT_LEN", "INT32", np.array([[len(ids)]], i32)),
        # a decoder-only model: pad_id × [1, 1], length 1 (model.py when DECODER_QUERY is absent)
        "DECODER_INPUT_ID": Tensor("DECODER_INPUT_ID", "INT32", np.full((1, 1), pad_id, i32)),
        "REQUEST_DECODER_INPUT_LEN": Tensor("REQUEST_DECODER_INPUT_LEN", "INT32", np.ones((1, 1), i32)),
        "BAD_WORDS_IDS": word_list("BAD_WORDS_IDS", tok, _strings(inputs, "BAD_WORDS_DICT")),
        "STOP_WORDS_IDS": word_list("STOP_WORDS_IDS", tok, _strings(inputs, "STOP_WORDS_DICT")),
        "EMBEDDING_BIAS": _bias_tensor(tok, inputs, vocab_size),
        "REQUEST_OUTPUT_LEN": Tensor("REQUEST_OUTPUT_LEN", "INT32", inputs["REQUEST_OUTPUT_LEN"].data),
        "OUT_END_ID": Tensor("OUT_END_ID", "INT32", np.array([[end_id]], i32)),
        "OUT_PAD_ID": Tensor("OUT_PAD_ID", "INT32", np.array([[pad_id]], i32)),
    }


def word_list(name: str, tok: Tokenizer, words: list[str] | None) -> Tensor:
    """`_to_word_list_format` for one batch item: [1, 2, K], flat ids then cumulative ends padded with -1."""
    if words is None:
        return Tensor(name, "INT32", np.empty((1, 2, 0), np.int32))
    if len(words) > MAX_WORDS:
        raise TritonProtocolError(f"at most {MAX_WORDS} words per list, got {len(words)}")
    flat, ends = [], []
    for word in words:
        ids = tok.encode(word, add_special_tokens=False)
        if ids:
            flat += ids
            ends.append(len(flat))
    width = max(1, len(flat))
    row0 = flat + [0] * (width - len(flat))
    row1 = ends + [-1] * (width - len(ends))
    return Tensor(name, "INT32", np.array([[row0, row1]], np.int32))


def embedding_bias(
    tok: Tokenizer, words: list[str], weights: list[float], vocab_size: int
) -> np.ndarray | None:
    """`_get_embedding_bias`: each weight added at every id of its word (encoded as the model's tokenizer
    does by default); [vocab] float32, or None without words. The length is the engine's vocabulary, the
    size TensorRT-LLM checks (the stock code takes len(tokenizer.vocab), the same for unpadded models)."""
    if not words and not weights:
        return None
    if len(words) != len(weights):
        raise TritonProtocolError(
            f"embedding bias words ({len(words)}) and weights ({len(weights)}) must have the same length"
        )
    if len(words) > MAX_WORDS:
        raise TritonProtocolError(f"at most {MAX_WORDS} embedding bias words, got {len(words)}")
    bias = np.zeros(vocab_size, np.float32)
    for word, weight in zip(words, weights, strict=True):
        for token in tok.encode(word):
            if 0 <= token < vocab_size:
                bias[token] += weight
    return bias


def _bias_tensor(tok: Tokenizer, inputs: dict[str, Tensor], vocab_size: int) -> Tensor:
    words = _strings(inputs, "EMBEDDING_BIAS_WORDS", keep_empty=True) or []
    weights = (
        inputs["EMBEDDING_BIAS_WEIGHTS"].data.reshape(-1).tolist()
        if "EMBEDDING_BIAS_WEIGHTS" in inputs
        else []
    )
    bias = embedding_bias(tok, words, weights, vocab_size)
    data = np.empty((1, 0), np.float32) if bias is None else bias[None]
    return Tensor("EMBEDDING_BIAS", "FP32", data)


def parse_word_list(t: Tensor | None) -> list[list[int]]:
    """A [1, 2, K] (or [2, K]) stop/bad words tensor back into token-id sequences, checked."""
    if t is None or t.data.size == 0:
        return []
    data = t.data.reshape(2, -1) if t.data.ndim == 3 and t.data.shape[0] == 1 else t.data
    if data.ndim != 2 or data.shape[0] != 2:
        raise TritonProtocolError(f"input '{t.name}' must have shape [1, 2, K], got {t.shape}")
    flat, ends = data[0].tolist(), [e for e in data[1].tolist() if e >= 0]
    words, start = [], 0
    for end in ends:
        if not start < end <= len(flat):
            raise TritonProtocolError(f"input '{t.name}': offsets must increase within the {len(flat)} ids")
        words.append(flat[start:end])
        start = end
    if len(words) > MAX_WORDS:
        raise TritonProtocolError(f"at most {MAX_WORDS} words per list, got {len(words)}")
    return words


def _strings(inputs: dict[str, Tensor], name: str, keep_empty: bool = False) -> list[str] | None:
    if name not in inputs:
        return None
    return [w for w in inputs[name].strings() if w or keep_empty]


def _scalar_or(inputs: dict[str, Tensor], name: str, default):
    return int(inputs[name].scalar()) if name in inputs else default


# ---- postprocessing --------------------------------------------------------------------------------------


def postprocess(tok: Tokenizer, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """One batch item: OUTPUT[beam] = decode(TOKENS_BATCH[0, beam, :SEQUENCE_LENGTH[0, beam]])."""
    tokens, lengths = inputs["TOKENS_BATCH"].data, inputs["SEQUENCE_LENGTH"].data  # [1, beams, T], [1, beams]
    if lengths.shape != tokens.shape[:2]:
        raise TritonProtocolError(
            f"SEQUENCE_LENGTH has shape {list(lengths.shape)}, TOKENS_BATCH {list(tokens.shape)}: "
            "one length per beam"
        )
    texts = [
        tok.decode(tokens[0, beam, : max(0, int(lengths[0, beam]))].tolist())
        for beam in range(tokens.shape[1])
    ]
    return {"OUTPUT": bytes_tensor("OUTPUT", texts, [len(texts)])}  # flat B×beams, as np.array(req_outputs)


# ---- tensorrt_llm ----------------------------------------------------------------------------------------

_TRTLLM_REFUSED_NONEMPTY = (
    "draft_input_ids",
    "draft_logits",
    "prompt_embedding_table",
    "prompt_table_extra_ids",
    "mrope_rotary_cos_sin",
    "guided_decoding_guide_type",
    "guided_decoding_guide",
    "runtime_top_p_min",  # top-p decay (TensorRT-LLM's topPMin/topPDecay/topPResetIds): not implemented
    "runtime_top_p_decay",
    "runtime_top_p_reset_ids",
)
_TRTLLM_REFUSED_VALUES = (
    ("beam_width", 1),
    ("num_return_sequences", 1),
    ("return_context_logits", False),
    ("return_generation_logits", False),
    ("return_perf_metrics", False),
    ("stop", False),
)


def trtllm_request(inputs: dict[str, Tensor]) -> TritonRequest:
    """One batch item of `tensorrt_llm` as the C++ backend reads it (utils.cc getRequestFromTensors).

    input_ids are cut to input_lengths (the batch is right-padded); no end_id means none (the executor's
    Request has no default end id), so generation runs to request_output_len.
    """
    for name in _TRTLLM_REFUSED_NONEMPTY:
        if name in inputs and inputs[name].data.size:
            raise TritonProtocolError(f"{name} is not supported by this server")
    for name, allowed in _TRTLLM_REFUSED_VALUES:
        if name in inputs and inputs[name].scalar() != allowed:
            raise TritonProtocolError(f"{name}={inputs[name].scalar()} is not supported by this server")

    def get(name: str, default=None):
        return inputs[name].scalar() if name in inputs else default

    # required by the inflight_batcher_llm config (optional on this server only because the llmapi style
    # has none of them: llmapi.py)
    for name in ("input_ids", "input_lengths", "request_output_len"):
        if name not in inputs:
            raise TritonProtocolError(f"expected input '{name}' for model 'tensorrt_llm' (or 'text_input')")
    check_ranges(get, {"top_k": "runtime_top_k", "top_p": "runtime_top_p", "length_penalty": "len_penalty"})
    ids = inputs["input_ids"].data.reshape(-1).tolist() if "input_ids" in inputs else []
    length = int(get("input_lengths"))
    if not 1 <= length <= len(ids):
        raise TritonProtocolError(f"input_lengths {length} must be in [1, {len(ids)}] (the input_ids given)")
    max_tokens = int(get("request_output_len"))
    if max_tokens < 1:
        raise TritonProtocolError(f"request_output_len must be >= 1, got {max_tokens}")
    bias = inputs.get("embedding_bias")
    return TritonRequest(
        text="",
        prompt_ids=[int(i) for i in ids[:length]],
        max_tokens=max_tokens,
        stop_words=[],
        stop_ids=parse_word_list(inputs.get("stop_words_list")),
        bad_ids=parse_word_list(inputs.get("bad_words_list")),
        min_tokens=min_tokens(get),
        embedding_bias=bias.to_torch().reshape(-1).float() if bias is not None and bias.data.size else None,
        end_id=int(get("end_id", -1)),
        temperature=get("temperature"),
        top_k=get("runtime_top_k"),
        top_p=get("runtime_top_p"),
        repetition_penalty=get("repetition_penalty"),
        presence_penalty=get("presence_penalty"),
        frequency_penalty=get("frequency_penalty"),
        seed=None if get("seed") is None else int(get("seed")),
        return_log_probs=bool(get("return_log_probs", False)),
        exclude_input=bool(get("exclude_input_in_output", False)),
        stream=bool(get("streaming", False)),
        return_num_input_tokens=bool(get("return_num_input_tokens", False)),
        return_num_output_tokens=bool(get("return_num_output_tokens", False)),
        lora_task_id=get("lora_task_id"),
        lora_weights=inputs["lora_weights"].to_torch() if "lora_weights" in inputs else None,
        lora_config=inputs["lora_config"].to_torch() if "lora_config" in inputs else None,
    )
