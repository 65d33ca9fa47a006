"""The generated repository against what tensorrtllm_backend's own code reads and requests.

Every list below is copied from the stock code of TensorRT-LLM's `triton_backend/` (1.2 era), read through the
source index at the commits named (the files were read whole; functions are named instead of line numbers,
which the index does not give):

* MIS = inflight_batcher_llm/src/model_instance_state.cc @0c8de69a
* MS  = inflight_batcher_llm/src/model_state.cc @5cdd6921 (`GetParameter<std::string>` throws
        "Cannot find parameter with name: …" when a key is absent; the typed variants call std::stoi/stof/…)
* TD  = all_models/inflight_batcher_llm/tensorrt_llm_bls/1/lib/triton_decoder.py @07f3e442
* PRE = all_models/inflight_batcher_llm/preprocessing/1/model.py @01259b15
* POST = all_models/inflight_batcher_llm/postprocessing/1/model.py (`initialize`)

A parameter read outside a try block (or inside one whose catch rethrows) stops the model from loading when it
is absent; a requested tensor that a config does not declare makes Triton reject every request.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import TINY_LLAMA
from trtllm_peft.engine.engine_dir import engine_config, write_configs
from trtllm_peft.settings import Settings
from trtllm_peft.triton_repo import generate_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

GIB = 1024**3

# (model, parameter, where it is read without a default)
REQUIRED_PARAMETERS = [
    ("tensorrt_llm", "gpt_model_type", "MIS getBatchingTypeFromParams: no try; other values throw"),
    ("tensorrt_llm", "tokenizer_dir", "MIS getGuidedDecodingConfigFromParams: no try"),
    ("tensorrt_llm", "xgrammar_tokenizer_info_path", "MIS getGuidedDecodingConfigFromParams: no try"),
    ("tensorrt_llm", "guided_decoding_backend", "MIS getGuidedDecodingConfigFromParams: no try"),
    (
        "tensorrt_llm",
        "gpt_model_path",
        "MIS ModelInstanceState ctor: caught, but then TLLM_CHECK 'Both encoder and decoder model paths are empty'",
    ),
    ("preprocessing", "tokenizer_dir", "PRE initialize: model_config['parameters']['tokenizer_dir']"),
    ("preprocessing", "multimodal_model_path", "PRE initialize: ['multimodal_model_path']['string_value']"),
    ("postprocessing", "tokenizer_dir", "POST initialize: model_config['parameters']['tokenizer_dir']"),
]

# tensorrt_llm parameters with the C++ type MIS reads them as (GetParameter<T>): a value std::stoi cannot read
# whole would be cut ("0.9" -> 0) or throw and silently fall back to the default.
TYPED_PARAMETERS = {
    "max_beam_width": "int",  # getExecutorConfigFromParams
    "kv_cache_free_gpu_mem_fraction": "float",  # getKvCacheConfigFromParams
    "enable_kv_cache_reuse": "bool",
    "normalize_log_probs": "bool",  # getExecutorConfigFromParams
    "exclude_input_in_output": "bool",  # ModelInstanceState ctor
    "lora_cache_optimal_adapter_size": "int",  # getPeftCacheConfigFromParams (SizeType32)
    "lora_cache_max_adapter_size": "int",
    "lora_cache_gpu_memory_fraction": "float",
    "lora_cache_host_memory_bytes": "size",  # size_t
}
GPT_MODEL_TYPES = {"V1", "v1", "inflight_batching", "inflight_fused_batching"}  # getBatchingTypeFromParams
GUIDED_BACKENDS = {"", "xgrammar"}  # getGuidedDecodingConfigFromParams: anything else throws

# TD TritonDecoder.__init__: requested_output_names of each BLS call
BLS_REQUESTS_OUTPUTS = {
    "preprocessing": [  # TD _preproc_outputs
        "INPUT_ID", "DECODER_INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_DECODER_INPUT_LEN", "BAD_WORDS_IDS",
        "STOP_WORDS_IDS", "EMBEDDING_BIAS", "OUT_PAD_ID", "OUT_END_ID", "OUT_PROMPT_TABLE_EXTRA_IDS",
        "PIXEL_VALUES", "IMAGE_SIZES", "IS_VIDEO_INPUT", "VISION_INPUT_ID", "ATTENTION_MASK", "IMAGE_GRID_THW",
    ],
    "tensorrt_llm": [  # TD _llm_outputs
        "output_ids", "sequence_length", "cum_log_probs", "output_log_probs", "context_logits",
        "generation_logits", "batch_index", "sequence_index", "kv_cache_alloc_new_blocks",
        "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns", "first_scheduled_time_ns",
        "first_token_time_ns", "last_token_time_ns", "acceptance_rate", "total_accepted_draft_tokens",
        "total_draft_tokens", "num_input_tokens", "num_output_tokens",
    ],
    "postprocessing": ["OUTPUT"],  # TD _postproc_outputs
}  # fmt: skip

# Inputs each BLS call may send (TD _get_preproc_tensors, _get_tensors_from_preproc,
# _get_llm_tensors_from_request incl. request_output_len / return_*_logits / draft_*, send_cancellation_request,
# _get_postproc_tensors); image and video inputs only flow when the BLS config declares image inputs.
BLS_SENDS_INPUTS = {
    "preprocessing": [
        "QUERY", "DECODER_QUERY", "REQUEST_OUTPUT_LEN", "BAD_WORDS_DICT", "STOP_WORDS_DICT",
        "EMBEDDING_BIAS_WORDS", "EMBEDDING_BIAS_WEIGHTS", "PAD_ID", "END_ID", "PROMPT_TABLE_EXTRA_ID",
    ],
    "tensorrt_llm": [
        "input_ids", "decoder_input_ids", "input_lengths", "bad_words_list", "stop_words_list", "embedding_bias",
        "pad_id", "end_id", "prompt_table_extra_ids", "beam_width", "runtime_top_k", "runtime_top_p",
        "temperature", "len_penalty", "repetition_penalty", "min_tokens", "presence_penalty",
        "frequency_penalty", "seed", "return_log_probs", "streaming", "prompt_embedding_table",
        "prompt_vocab_size", "lora_task_id", "lora_weights", "lora_config", "exclude_input_in_output",
        "return_perf_metrics", "guided_decoding_guide_type", "guided_decoding_guide", "return_num_input_tokens",
        "return_num_output_tokens", "request_output_len", "draft_input_ids", "draft_logits",
        "return_context_logits", "return_generation_logits", "stop", "mrope_rotary_cos_sin",
        "mrope_position_deltas",
    ],
    "postprocessing": ["TOKENS_BATCH", "SEQUENCE_LENGTH"],
}  # fmt: skip

# TD create_triton_response name_map: what the BLS model itself returns when tensorrt_llm gave it
BLS_RESPONDS = ["text_output", *BLS_REQUESTS_OUTPUTS["tensorrt_llm"][2:]]
# TD input_names: what the BLS reads; a declared input outside it would be silently ignored. The stock BLS
# config also declares num_return_sequences, which the decoder does not read (kept as the stock does).
BLS_READS = {
    "text_input", "decoder_text_input", "image_input", "image_bytes_input", "image_url_input",
    "video_bytes_input", "max_tokens", "bad_words", "stop_words", "end_id", "pad_id", "top_k", "top_p",
    "temperature", "length_penalty", "repetition_penalty", "min_tokens", "presence_penalty",
    "frequency_penalty", "seed", "return_log_probs", "return_context_logits", "return_generation_logits",
    "beam_width", "stream", "prompt_embedding_table", "prompt_vocab_size", "prompt_table_extra_id",
    "embedding_bias_words", "embedding_bias_weights", "num_draft_tokens", "use_draft_logits", "lora_task_id",
    "lora_weights", "lora_config", "exclude_input_in_output", "return_perf_metrics",
    "guided_decoding_guide_type", "guided_decoding_guide", "return_num_input_tokens", "return_num_output_tokens",
}  # fmt: skip
STOCK_BLS_EXTRA = {"num_return_sequences"}

# PRE initialize: the dtypes it looks up with get_input_config_by_name / get_output_config_by_name
PRE_LOOKS_UP = {
    "input": ["EMBEDDING_BIAS_WORDS", "EMBEDDING_BIAS_WEIGHTS"],
    "output": [
        "INPUT_ID", "DECODER_INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_DECODER_INPUT_LEN", "BAD_WORDS_IDS",
        "STOP_WORDS_IDS", "OUT_END_ID", "OUT_PAD_ID", "OUT_PROMPT_TABLE_EXTRA_IDS", "PIXEL_VALUES", "IMAGE_SIZES",
    ],
}  # fmt: skip


ENGINE_DTYPE: dict[Path, str] = {}


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def repo(request, tmp_path_factory) -> Path:
    """A repository generated for an engine of each dtype TensorRT-LLM builds with the LoRA plugin."""
    engine = tmp_path_factory.mktemp(f"engine-{request.param}")
    cfg = engine_config(
        TINY_LLAMA,
        dtype=request.param,
        max_batch_size=8,
        max_seq_len=128,
        max_num_tokens=256,
        max_lora_rank=8,
    )
    write_configs(engine, cfg, {"backend": "trtllm"})
    out = tmp_path_factory.mktemp(f"repo-{request.param}")
    settings = Settings(peft_source=None, max_gpu_loras=2, max_cpu_loras=4)
    generate_repository(engine, out, settings, gpu_free_bytes=40 * GIB)
    ENGINE_DTYPE[out] = request.param
    return out


def read(repo: Path, model: str):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def cpp_parses(kind: str, text: str) -> bool:
    """Whether the backend's GetParameter<T> reads the whole value (std::stoi & co. stop at the first bad char)."""
    if kind == "bool":
        return text in {"True", "true", "TRUE", "1", "False", "false", "FALSE", "0"}  # MS GetParameter<bool>
    if kind in ("int", "size"):
        return re.fullmatch(r"\d+" if kind == "size" else r"-?\d+", text) is not None
    return re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text) is not None


@pytest.mark.parametrize(
    "model, name, source", REQUIRED_PARAMETERS, ids=[f"{m}.{n}" for m, n, _ in REQUIRED_PARAMETERS]
)
def test_every_parameter_read_without_default_is_declared(repo, model, name, source):
    assert name in params(read(repo, model)), f"{model}: {name} missing ({source})"


def test_tensorrt_llm_parameters_read_as_the_backend_reads_them(repo):
    p = params(read(repo, "tensorrt_llm"))
    for name, kind in TYPED_PARAMETERS.items():
        assert cpp_parses(kind, p[name]), (name, p[name], kind)
    assert p["gpt_model_type"] in GPT_MODEL_TYPES
    assert p["guided_decoding_backend"] in GUIDED_BACKENDS
    # without a tokenizer-info file the backend must see guided decoding as off (both empty), not half-set
    assert (p["guided_decoding_backend"] == "") == (p["xgrammar_tokenizer_info_path"] == "")


@pytest.mark.parametrize("model", sorted(BLS_REQUESTS_OUTPUTS))
def test_every_output_the_bls_requests_is_declared(repo, model):
    declared = {o.name for o in read(repo, model).output}
    missing = [n for n in BLS_REQUESTS_OUTPUTS[model] if n not in declared]
    assert not missing, f"{model} lacks outputs the BLS requests: {missing}"


@pytest.mark.parametrize("model", sorted(BLS_SENDS_INPUTS))
def test_every_input_the_bls_sends_is_declared(repo, model):
    declared = {i.name for i in read(repo, model).input}
    missing = [n for n in BLS_SENDS_INPUTS[model] if n not in declared]
    assert not missing, f"{model} lacks inputs the BLS sends: {missing}"


def test_bls_model_declares_what_it_returns_and_only_what_it_reads(repo):
    bls = read(repo, "tensorrt_llm_bls")
    outputs = {o.name for o in bls.output}
    assert set(BLS_RESPONDS) <= outputs, set(BLS_RESPONDS) - outputs
    inputs = {i.name for i in bls.input}
    assert inputs <= BLS_READS | STOCK_BLS_EXTRA, inputs - BLS_READS - STOCK_BLS_EXTRA
    trt_out = {o.name: o.data_type for o in read(repo, "tensorrt_llm").output}
    for o in bls.output:  # what the BLS forwards has tensorrt_llm's type
        assert o.name == "text_output" or trt_out[o.name] == o.data_type, o.name


def test_preprocessing_declares_every_tensor_its_initialize_looks_up(repo):
    cfg = read(repo, "preprocessing")
    assert set(PRE_LOOKS_UP["input"]) <= {i.name for i in cfg.input}
    assert set(PRE_LOOKS_UP["output"]) <= {o.name for o in cfg.output}


def test_lora_weights_take_the_engine_dtype(repo):
    want = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}[ENGINE_DTYPE[repo]]
    for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls"):
        inputs = {i.name: i for i in read(repo, model).input}
        assert model_config_pb2.DataType.Name(inputs["lora_weights"].data_type) == want, model


def test_peft_model_forwards_only_what_the_ensemble_declares(repo):
    """peft_model.py passes its inputs (less lora_name, plus the lora_* tensors) to the ensemble and asks for
    its own outputs: each must exist there with the same datatype."""
    peft, ens = read(repo, "peft"), read(repo, "ensemble")
    ens_in = {i.name: i.data_type for i in ens.input}
    forwarded = {i.name: i.data_type for i in peft.input if i.name != "lora_name"}
    for name in ("lora_task_id", "lora_weights", "lora_config"):
        forwarded[name] = ens_in[name]
    assert {n: ens_in.get(n) for n in forwarded} == forwarded
    ens_out = {o.name: o.data_type for o in ens.output}
    assert {o.name: ens_out.get(o.name) for o in peft.output} == {o.name: o.data_type for o in peft.output}
