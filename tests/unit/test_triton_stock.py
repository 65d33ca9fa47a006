"""The stock models' tensor work (preprocessing / postprocessing / tensorrt_llm inputs), batches, gRPC codec.

Expected values follow tensorrtllm_backend's code (NVIDIA/TensorRT-LLM triton_backend/all_models/
inflight_batcher_llm/preprocessing/1/model.py `_to_word_list_format`, postprocessing/1/model.py `execute`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferResult
from tritonclient.grpc import service_pb2 as pb

from trtllm_peft.server.triton import stock
from trtllm_peft.server.triton.grpc_codec import infer_response, request_inputs
from trtllm_peft.server.triton.models import STOCK, TRTLLM, V2Model, join_batch, split_batch
from trtllm_peft.server.triton.tensors import Tensor, TritonProtocolError, bytes_tensor
from trtllm_peft.triton_repo import tensors as table

ENGINE = Path(__file__).resolve().parents[2] / "engines" / "smollm2-135m"
VOCAB = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def tok():
    if not (ENGINE / "tokenizer.json").is_file():
        pytest.skip("engines/smollm2-135m not built (make engine)")
    from trtllm_peft.serving.tokenizer import Tokenizer

    return Tokenizer(ENGINE)


def i32(name, value):
    return Tensor(name, "INT32", np.asarray(value, np.int32))


def test_word_list_is_the_stock_offsets_format(tok):
    words = [" cards", " in total", ""]  # an empty word is skipped, as in _to_word_list_format
    ids = [tok.encode(w, add_special_tokens=False) for w in words[:2]]
    t = stock.word_list("STOP_WORDS_IDS", tok, words)
    flat = ids[0] + ids[1]
    assert t.data.dtype == np.int32 and t.shape == [1, 2, len(flat)]
    assert t.data[0, 0].tolist() == flat
    assert t.data[0, 1].tolist() == [len(ids[0]), len(flat)] + [-1] * (len(flat) - 2)
    assert stock.parse_word_list(t) == ids
    assert stock.word_list("BAD_WORDS_IDS", tok, None).shape == [1, 2, 0]  # no words: [1, 2, 0]
    assert stock.word_list("BAD_WORDS_IDS", tok, [""]).data.tolist() == [[[0], [-1]]]  # pad_to >= 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([[[5, 6], [3, -1]]], "offsets must increase"),
        ([[[5, 6], [2, 1]]], "offsets must increase"),
        ([[5, 6, 7]], "must have shape"),
    ],
)
def test_parse_word_list_refuses_bad_offsets(data, message):
    with pytest.raises(TritonProtocolError, match=message):
        stock.parse_word_list(i32("stop_words_list", data))


def test_preprocess_defaults_and_shapes(tok):
    query = bytes_tensor("QUERY", ["hello world"], [1, 1])
    out = stock.preprocess(
        tok,
        {
            "QUERY": query,
            "REQUEST_OUTPUT_LEN": i32("REQUEST_OUTPUT_LEN", [[7]]),
            "STOP_WORDS_DICT": bytes_tensor("STOP_WORDS_DICT", [" world"], [1, 1]),
        },
        VOCAB,
    )
    ids = tok.encode("hello world")
    assert out["INPUT_ID"].data.tolist() == [ids] and out["REQUEST_INPUT_LEN"].data.tolist() == [[len(ids)]]
    assert out["OUT_END_ID"].data.tolist() == [[tok.eos_token_id]]  # END_ID absent: the tokenizer's
    assert out["REQUEST_OUTPUT_LEN"].data.tolist() == [[7]] and out["BAD_WORDS_IDS"].shape == [1, 2, 0]
    assert stock.parse_word_list(out["STOP_WORDS_IDS"]) == [tok.encode(" world", add_special_tokens=False)]
    assert out["DECODER_INPUT_ID"].shape == [1, 1] and out["EMBEDDING_BIAS"].shape == [1, 0]
    with pytest.raises(TritonProtocolError, match="DECODER_QUERY is not supported"):
        stock.preprocess(tok, {"QUERY": query, "DECODER_QUERY": query}, VOCAB)


def test_embedding_bias_is_the_stock_sum_per_token(tok):
    """_get_embedding_bias: every id of a word (encoded with the tokenizer's defaults) gets its weight."""
    words, weights = [" cards", " in total", " cards"], [-2.0, 1.5, -1.0]
    bias = stock.embedding_bias(tok, words, weights, VOCAB)
    want = np.zeros(VOCAB, np.float32)
    for word, weight in zip(words, weights, strict=True):
        for token in tok.encode(word):
            want[token] += weight
    assert bias.dtype == np.float32 and (bias == want).all() and bias.min() == -3.0
    assert stock.embedding_bias(tok, [], [], VOCAB) is None
    with pytest.raises(TritonProtocolError, match="must have the same length"):
        stock.embedding_bias(tok, ["a"], [], VOCAB)


def test_postprocess_decodes_up_to_sequence_length(tok):
    ids = tok.encode("one two three", add_special_tokens=False)
    tokens = i32("TOKENS_BATCH", [[ids + [0, 0]]])  # [1, 1, T], padded past the length
    out = stock.postprocess(
        tok, {"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": i32("SEQUENCE_LENGTH", [[len(ids)]])}
    )
    assert out["OUTPUT"].shape == [1] and out["OUTPUT"].data[0] == b"one two three"
    with pytest.raises(TritonProtocolError, match="one length per beam"):
        stock.postprocess(tok, {"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": i32("SEQUENCE_LENGTH", [[1, 2]])})


def _trtllm(**extra):
    inputs = {
        "input_ids": i32("input_ids", [[5, 6, 7, 0]]),
        "input_lengths": i32("input_lengths", [[3]]),
        "request_output_len": i32("request_output_len", [[4]]),
    }
    return {**inputs, **extra}


def test_trtllm_request_reads_the_backend_inputs():
    req = stock.trtllm_request(_trtllm(min_tokens=i32("min_tokens", [[2]])))
    assert req.prompt_ids == [5, 6, 7]  # cut to input_lengths: the batch is right-padded
    assert req.max_tokens == 4 and req.end_id == -1 and req.min_tokens == 2 and not req.stream
    # tensorrtllm_backend v0.8.0 … v0.19.0 call it min_length (tensorrt_llm/config.pbtxt at those tags)
    assert stock.trtllm_request(_trtllm(min_length=i32("min_length", [[2]]))).min_tokens == 2
    with pytest.raises(TritonProtocolError, match="give min_tokens or min_length"):
        stock.trtllm_request(
            _trtllm(min_length=i32("min_length", [[2]]), min_tokens=i32("min_tokens", [[2]]))
        )
    words = i32("stop_words_list", [[[9, 8, 7], [1, 3, -1]]])
    assert stock.trtllm_request(_trtllm(stop_words_list=words)).stop_ids == [[9], [8, 7]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_lengths": i32("input_lengths", [[5]])}, "input_lengths 5 must be in"),
        ({"request_output_len": i32("request_output_len", [[0]])}, "request_output_len must be >= 1"),
        ({"beam_width": i32("beam_width", [[2]])}, "beam_width=2 is not supported"),
        ({"draft_input_ids": i32("draft_input_ids", [[1]])}, "draft_input_ids is not supported"),
        (
            {"runtime_top_p_decay": Tensor("runtime_top_p_decay", "FP32", np.ones((1, 1), np.float32))},
            "decay",
        ),
    ],
)
def test_trtllm_request_refuses_by_name(change, message):
    with pytest.raises(TritonProtocolError, match=message):
        stock.trtllm_request(_trtllm(**change))


def _model(kind=TRTLLM):
    rows = table.TRTLLM_INPUTS
    return V2Model(
        "tensorrt_llm", kind, STOCK["tensorrt_llm"][1], stock.stock_io(rows, "float32"), (), "m", True
    )


def test_split_and_join_batch():
    inputs = {
        "input_ids": i32("input_ids", [[1, 2, 0], [3, 4, 5]]),
        "input_lengths": i32("input_lengths", [[2], [3]]),
        "request_output_len": i32("request_output_len", [[4], [4]]),
    }
    items = split_batch(_model(), inputs)
    assert [i["input_ids"].shape for i in items] == [[1, 3], [1, 3]]
    joined = join_batch([{"ids": i32("ids", [[[1]]])}, {"ids": i32("ids", [[[2, 3]]])}])
    assert joined["ids"].data.tolist() == [[[1, 0]], [[2, 3]]]  # ragged: padded, lengths say how much
    with pytest.raises(TritonProtocolError, match="disagree on the batch size"):
        split_batch(_model(), {**inputs, "input_lengths": i32("input_lengths", [[2]])})
    with pytest.raises(TritonProtocolError, match=r"expects \[-1, 2, -1\]"):
        split_batch(
            _model(), {**inputs, "stop_words_list": i32("stop_words_list", [[[1, 2, 3]], [[1, 2, 3]]])}
        )


def test_grpc_codec_round_trip_with_tritonclient():
    """Inputs as tritonclient.grpc serializes them (raw contents) and outputs as it parses them."""
    values = {
        "text_input": np.array([["héllo"]], dtype=object),
        "input_ids": np.array([[1, 2, 3]], dtype=np.int32),
        "streaming": np.array([[True]], dtype=bool),
        "lora_task_id": np.array([[2**63 + 1]], dtype=np.uint64),
    }
    request = pb.ModelInferRequest(model_name="m", id="r1")
    for name, value in values.items():
        t = InferInput(name, list(value.shape), {"object": "BYTES", "int32": "INT32", "bool": "BOOL"}.get(
            value.dtype.name, "UINT64"))  # fmt: skip
        t.set_data_from_numpy(value)
        request.inputs.append(t._get_tensor())
        request.raw_input_contents.append(t._get_content())
    inputs = request_inputs(request)
    assert inputs["text_input"].strings() == ["héllo"] and inputs["input_ids"].data.tolist() == [[1, 2, 3]]
    assert inputs["streaming"].scalar() is True and inputs["lora_task_id"].scalar() == 2**63 + 1
    response = infer_response(
        request, [inputs["text_input"], inputs["input_ids"]], {"triton_final_response": True}
    )
    result = InferResult(response)
    assert result.as_numpy("text_output") is None and result.as_numpy("input_ids").tolist() == [[1, 2, 3]]
    assert result.as_numpy("text_input")[0][0].decode() == "héllo" and response.id == "r1"
    assert response.parameters["triton_final_response"].bool_param
    request.raw_input_contents.pop()
    with pytest.raises(TritonProtocolError, match="one per input"):
        request_inputs(request)


def test_grpc_codec_typed_contents():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1]).contents.int_contents.append(5)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(
        b"hi"
    )
    inputs = request_inputs(request)
    assert inputs["max_tokens"].scalar() == 5 and inputs["text_input"].scalar() == "hi"
    request.inputs.add(name="w", datatype="BF16", shape=[1])
    with pytest.raises(TritonProtocolError, match="needs raw_input_contents"):
        request_inputs(request)
