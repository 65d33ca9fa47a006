"""The five stock models of a tensorrtllm_backend repository, as protobuf-text messages.

Names, datatypes, dims and parameters follow tensorrtllm_backend's templates
(triton_backend/all_models/inflight_batcher_llm/*/config.pbtxt in NVIDIA/TensorRT-LLM, 1.2 era; tensors in
tensors.py). The ensemble's own inputs and outputs are derived from the steps they map to, so the ensemble
cannot disagree with its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtllm_peft.triton_repo.pbtxt import Enum, Message, parameters
from trtllm_peft.triton_repo.tensors import (
    POST_INPUTS,
    POST_OUTPUTS,
    PRE_INPUTS,
    PRE_OUTPUTS,
    TRTLLM_INPUTS,
    TRTLLM_OUTPUTS,
    Row,
)

# ensemble step maps: model input/output name -> ensemble tensor ("_X" = internal between steps)
PRE_IN = {
    "QUERY": "text_input",
    "DECODER_QUERY": "decoder_text_input",
    "REQUEST_OUTPUT_LEN": "max_tokens",
    "BAD_WORDS_DICT": "bad_words",
    "STOP_WORDS_DICT": "stop_words",
    "EMBEDDING_BIAS_WORDS": "embedding_bias_words",
    "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights",
    "END_ID": "end_id",
    "PAD_ID": "pad_id",
}
PRE_OUT = {
    "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
    "INPUT_ID": "_INPUT_ID",
    "REQUEST_DECODER_INPUT_LEN": "_REQUEST_DECODER_INPUT_LEN",
    "DECODER_INPUT_ID": "_DECODER_INPUT_ID",
    "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
    "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
    "BAD_WORDS_IDS": "_BAD_WORDS_IDS",
    "EMBEDDING_BIAS": "_EMBEDDING_BIAS",
    "OUT_END_ID": "_PREPROCESSOR_END_ID",
    "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID",
}
_SAME = [
    "exclude_input_in_output",
    "temperature",
    "repetition_penalty",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "return_log_probs",
    "return_context_logits",
    "return_generation_logits",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "num_return_sequences",
    "beam_width",
    "prompt_embedding_table",
    "prompt_vocab_size",
    "lora_task_id",
    "lora_weights",
    "lora_config",
    "return_perf_metrics",
    "guided_decoding_guide_type",
    "guided_decoding_guide",
]
TRTLLM_IN = {
    "input_ids": "_INPUT_ID",
    "decoder_input_ids": "_DECODER_INPUT_ID",
    "input_lengths": "_REQUEST_INPUT_LEN",
    "decoder_input_lengths": "_REQUEST_DECODER_INPUT_LEN",
    "request_output_len": "_REQUEST_OUTPUT_LEN",
    "end_id": "_PREPROCESSOR_END_ID",
    "pad_id": "_PREPROCESSOR_PAD_ID",
    "embedding_bias": "_EMBEDDING_BIAS",
    "stop_words_list": "_STOP_WORDS_IDS",
    "bad_words_list": "_BAD_WORDS_IDS",
    "runtime_top_k": "top_k",
    "runtime_top_p": "top_p",
    "len_penalty": "length_penalty",
    "streaming": "stream",
    **{name: name for name in _SAME},
}
TRTLLM_OUT = {
    "output_ids": "_TOKENS_BATCH",
    "sequence_length": "_SEQUENCE_LENGTH",
    **{n: n for n in ("cum_log_probs", "output_log_probs", "context_logits", "generation_logits")},
    **{n[0]: n[0] for n in TRTLLM_OUTPUTS[6:]},  # batch/sequence index, KV-cache and timing metrics, …
}
POST_IN = {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"}
POST_OUT = {"OUTPUT": "text_output"}
REQUIRED_ENSEMBLE_INPUTS = ("text_input", "max_tokens")


@dataclass(frozen=True)
class RepoParams:
    """Everything the configs are filled with (paths as the Triton server will see them)."""

    engine_dir: str
    tokenizer_dir: str
    dtype: str  # FP16 | BF16 | FP32
    max_batch_size: int
    decoupled: bool
    lora_cache: dict[str, str]  # lora_cache_* and lora_prefetch_dir
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = False  # NIM_ENABLE_KV_CACHE_REUSE
    instance_count: int = 1
    # guided decoding (TensorRT-LLM's GuidedDecodingConfig): off unless a tokenizer-info file is given, the
    # JSON TensorRT-LLM's generate_xgrammar_tokenizer_info.py writes (encoded_vocab, tokenizer_str, stop ids)
    xgrammar_tokenizer_info_path: str = ""
    # the `peft` model (adapters by name): fallbacks for NIM_PEFT_SOURCE / NIM_PEFT_REFRESH_INTERVAL
    lora_tasks_file: str = ""
    peft_source: str = ""
    peft_refresh_interval: str = ""

    @property
    def guided_decoding_backend(self) -> str:
        return "xgrammar" if self.xgrammar_tokenizer_info_path else ""


def tensor(row: Row, dtype: str) -> Message:
    name, datatype, dims, flags = row
    msg: Message = [("name", name), ("data_type", Enum(f"TYPE_{dtype if datatype == 'DT' else datatype}"))]
    msg.append(("dims", list(dims)))
    if "s" in flags:
        msg.append(("reshape", [("shape", [])]))
    if "r" in flags:
        msg.append(("allow_ragged_batch", True))
    if "o" in flags:
        msg.append(("optional", True))
    return msg


def _io(inputs: list[Row], outputs: list[Row], dtype: str) -> Message:
    return [("input", [tensor(r, dtype) for r in inputs]), ("output", [tensor(r, dtype) for r in outputs])]


def _instances(count: int) -> Message:
    return [("instance_group", [[("count", count), ("kind", Enum("KIND_CPU"))]])]


def _batching(p: RepoParams) -> Message:
    return [
        (
            "dynamic_batching",
            [("preferred_batch_size", [p.max_batch_size]), ("max_queue_delay_microseconds", 0)],
        )
    ]


def tensorrt_llm(p: RepoParams) -> Message:
    """The C++ tensorrtllm backend over the engine: in-flight batching, PEFT cache sized from NIM_*."""
    params = {
        "max_beam_width": "1",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": p.engine_dir,
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": str(p.kv_cache_free_gpu_mem_fraction),
        "exclude_input_in_output": "True",
        "enable_kv_cache_reuse": str(p.enable_kv_cache_reuse),
        "normalize_log_probs": "True",
        # read by getGuidedDecodingConfigFromParams with GetParameter outside any try: absent = load failure
        "tokenizer_dir": p.tokenizer_dir,
        "xgrammar_tokenizer_info_path": p.xgrammar_tokenizer_info_path,
        "guided_decoding_backend": p.guided_decoding_backend,
        **p.lora_cache,
    }
    head: Message = [
        ("name", "tensorrt_llm"),
        ("backend", "tensorrtllm"),
        ("max_batch_size", p.max_batch_size),
    ]
    head.append(("model_transaction_policy", [("decoupled", p.decoupled)]))
    return (
        head + _batching(p) + _io(TRTLLM_INPUTS, TRTLLM_OUTPUTS, p.dtype) + _instances(1) + parameters(params)
    )


def preprocessing(p: RepoParams) -> Message:
    params = {
        "tokenizer_dir": p.tokenizer_dir,
        "add_special_tokens": "True",
        "multimodal_model_path": "",
        "gpt_model_path": p.engine_dir,
    }
    head: Message = [("name", "preprocessing"), ("backend", "python"), ("max_batch_size", p.max_batch_size)]
    return (
        head
        + _batching(p)
        + _io(PRE_INPUTS, PRE_OUTPUTS, p.dtype)
        + parameters(params)
        + _instances(p.instance_count)
    )


def postprocessing(p: RepoParams) -> Message:
    params = {"tokenizer_dir": p.tokenizer_dir, "skip_special_tokens": "True"}
    head: Message = [("name", "postprocessing"), ("backend", "python"), ("max_batch_size", p.max_batch_size)]
    head.append(("dynamic_batching", {}))
    return head + _io(POST_INPUTS, POST_OUTPUTS, p.dtype) + parameters(params) + _instances(p.instance_count)


def ensemble_io() -> tuple[list[Row], list[Row]]:
    """The ensemble's inputs and outputs: each is the step tensor it maps to, renamed."""
    by_name = {r[0]: r for r in PRE_INPUTS + TRTLLM_INPUTS}
    inputs: dict[str, Row] = {}
    for step_map in (PRE_IN, TRTLLM_IN):
        for model_name, ens in step_map.items():
            if not ens.startswith("_") and ens not in inputs:
                _, dt, dims, _ = by_name[model_name]
                inputs[ens] = (ens, dt, dims, "" if ens in REQUIRED_ENSEMBLE_INPUTS else "o")
    outs = {r[0]: r for r in TRTLLM_OUTPUTS + POST_OUTPUTS}
    outputs = [
        (ens, outs[m][1], outs[m][2], "")
        for m, ens in {**POST_OUT, **TRTLLM_OUT}.items()
        if not ens.startswith("_")
    ]
    return list(inputs.values()), outputs


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> Message:
    return (
        [("model_name", model), ("model_version", -1)]
        + [("input_map", [("key", k), ("value", v)]) for k, v in inputs.items()]
        + [("output_map", [("key", k), ("value", v)]) for k, v in outputs.items()]
    )


def ensemble(p: RepoParams) -> Message:
    inputs, outputs = ensemble_io()
    steps = [
        _step("preprocessing", PRE_IN, PRE_OUT),
        _step("tensorrt_llm", TRTLLM_IN, TRTLLM_OUT),
        _step("postprocessing", POST_IN, POST_OUT),
    ]
    head: Message = [("name", "ensemble"), ("platform", "ensemble"), ("max_batch_size", p.max_batch_size)]
    return head + _io(inputs, outputs, p.dtype) + [("ensemble_scheduling", [("step", steps)])]


def tensorrt_llm_bls(p: RepoParams) -> Message:
    """The Python BLS alternative to the ensemble (same inputs and outputs; calls `tensorrt_llm`)."""
    inputs, outputs = ensemble_io()
    inputs = inputs + [
        ("prompt_table_extra_id", "UINT64", (1,), "o"),
        ("num_draft_tokens", "INT32", (1,), "o"),
        ("use_draft_logits", "BOOL", (1,), "os"),
    ]
    params = {
        "accumulate_tokens": "False",
        "tensorrt_llm_model_name": "tensorrt_llm",
        "tensorrt_llm_draft_model_name": "",
        "multimodal_encoders_name": "",
    }
    head: Message = [
        ("name", "tensorrt_llm_bls"),
        ("backend", "python"),
        ("max_batch_size", p.max_batch_size),
    ]
    head.append(("model_transaction_policy", [("decoupled", p.decoupled)]))
    return head + _io(inputs, outputs, p.dtype) + parameters(params) + _instances(p.instance_count)


def peft(p: RepoParams) -> Message:
    """trtllm-peft's adapters-by-name model (peft_model.py): the ensemble's inputs, with `lora_name` instead of
    lora_task_id / lora_weights / lora_config, and its outputs; it calls the ensemble."""
    inputs, outputs = ensemble_io()
    inputs = [r for r in inputs if not r[0].startswith("lora_")] + [("lora_name", "STRING", (1,), "o")]
    params = {
        "engine_dir": p.engine_dir,
        "target_model": "ensemble",
        "lora_tasks_file": p.lora_tasks_file,
        "peft_source": p.peft_source,
        "peft_refresh_interval": p.peft_refresh_interval,
    }
    head: Message = [("name", "peft"), ("backend", "python"), ("max_batch_size", p.max_batch_size)]
    head.append(("model_transaction_policy", [("decoupled", p.decoupled)]))
    return head + _io(inputs, outputs, p.dtype) + parameters(params) + _instances(p.instance_count)


MODELS = {
    "preprocessing": preprocessing,
    "tensorrt_llm": tensorrt_llm,
    "postprocessing": postprocessing,
    "ensemble": ensemble,
    "tensorrt_llm_bls": tensorrt_llm_bls,
    "peft": peft,
}
PYTHON_MODELS = (
    "preprocessing",
    "postprocessing",
    "tensorrt_llm_bls",
)  # their model.py come from tensorrtllm_backend
