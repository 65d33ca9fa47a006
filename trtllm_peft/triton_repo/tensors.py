"""Input and output tensors of the stock models, as tensorrtllm_backend's templates declare them.

Source: NVIDIA/TensorRT-LLM `triton_backend/all_models/inflight_batcher_llm/*/config.pbtxt` (1.2 era). Every
tensor that the stock Python code requests or sends is declared, multimodal and draft-model ones included,
because Triton refuses a request that names an undeclared tensor ("unexpected inference output"): the BLS
model (`tensorrt_llm_bls/1/lib/triton_decoder.py`) asks `tensorrt_llm` for `kv_cache_*`, `*_time_ns`,
`acceptance_rate`, … and `preprocessing` for `IS_VIDEO_INPUT`, `VISION_INPUT_ID`, … on every request.
tests/unit/test_triton_repo_contract.py checks the lists against the stock code, citing it.
"""

from __future__ import annotations

# (name, datatype, dims, flags): flags "o" optional, "r" allow_ragged_batch, "s" reshape to a scalar.
# "DT" stands for the engine's dtype (LoRA weights and prompt tables must match it: TensorRT-LLM's rule).
Row = tuple[str, str, tuple[int, ...], str]

TRTLLM_INPUTS: list[Row] = [
    ("input_ids", "INT32", (-1,), "or"),
    ("input_lengths", "INT32", (1,), "s"),
    ("request_output_len", "INT32", (1,), "s"),
    ("num_return_sequences", "INT32", (1,), "os"),
    ("draft_input_ids", "INT32", (-1,), "or"),
    ("decoder_input_ids", "INT32", (-1,), "or"),
    ("decoder_input_lengths", "INT32", (1,), "os"),
    ("draft_logits", "FP32", (-1, -1), "or"),
    ("draft_acceptance_threshold", "FP32", (1,), "os"),
    ("end_id", "INT32", (1,), "os"),
    ("pad_id", "INT32", (1,), "os"),
    ("stop_words_list", "INT32", (2, -1), "or"),
    ("bad_words_list", "INT32", (2, -1), "or"),
    ("embedding_bias", "FP32", (-1,), "or"),
    ("beam_width", "INT32", (1,), "os"),
    ("temperature", "FP32", (1,), "os"),
    ("runtime_top_k", "INT32", (1,), "os"),
    ("runtime_top_p", "FP32", (1,), "os"),
    ("runtime_top_p_min", "FP32", (1,), "os"),
    ("runtime_top_p_decay", "FP32", (1,), "os"),
    ("runtime_top_p_reset_ids", "INT32", (1,), "os"),
    ("len_penalty", "FP32", (1,), "os"),
    ("early_stopping", "BOOL", (1,), "os"),
    ("repetition_penalty", "FP32", (1,), "os"),
    ("min_tokens", "INT32", (1,), "os"),
    ("beam_search_diversity_rate", "FP32", (1,), "os"),
    ("presence_penalty", "FP32", (1,), "os"),
    ("frequency_penalty", "FP32", (1,), "os"),
    ("seed", "UINT64", (1,), "os"),
    ("return_log_probs", "BOOL", (1,), "os"),
    ("return_context_logits", "BOOL", (1,), "os"),
    ("return_generation_logits", "BOOL", (1,), "os"),
    ("return_perf_metrics", "BOOL", (1,), "os"),
    ("return_num_input_tokens", "BOOL", (1,), "os"),
    ("return_num_output_tokens", "BOOL", (1,), "os"),
    ("exclude_input_in_output", "BOOL", (1,), "os"),
    ("stop", "BOOL", (1,), "os"),
    ("streaming", "BOOL", (1,), "os"),
    ("prompt_embedding_table", "DT", (-1, -1), "or"),
    ("prompt_table_extra_ids", "UINT64", (-1,), "or"),
    ("prompt_vocab_size", "INT32", (1,), "os"),
    ("mrope_rotary_cos_sin", "FP32", (-1,), "o"),
    ("mrope_position_deltas", "INT64", (1,), "o"),
    # LoRA: task id, weights [N, D×Hi + Ho×D] in the engine dtype, config [N, 3] (module, layer, rank)
    # or [N, 4] (+ is_dora): the stock config fixes 3 columns; TensorRT-LLM reads both.
    ("lora_task_id", "UINT64", (1,), "os"),
    ("lora_weights", "DT", (-1, -1), "or"),
    ("lora_config", "INT32", (-1, -1), "or"),
    # guided decoding, as TensorRT-LLM names it (GuidedDecodingParams: guide type + guide)
    ("guided_decoding_guide_type", "STRING", (1,), "or"),
    ("guided_decoding_guide", "STRING", (1,), "or"),
]
TRTLLM_OUTPUTS: list[Row] = [
    ("output_ids", "INT32", (-1, -1), ""),
    ("sequence_length", "INT32", (-1,), ""),
    ("cum_log_probs", "FP32", (-1,), ""),
    ("output_log_probs", "FP32", (-1, -1), ""),
    ("context_logits", "FP32", (-1, -1), ""),
    ("generation_logits", "FP32", (-1, -1, -1), ""),
    ("batch_index", "INT32", (1,), ""),
    ("sequence_index", "INT32", (1,), ""),
    ("kv_cache_alloc_new_blocks", "INT32", (1,), ""),
    ("kv_cache_reused_blocks", "INT32", (1,), ""),
    ("kv_cache_alloc_total_blocks", "INT32", (1,), ""),
    ("arrival_time_ns", "INT64", (1,), ""),
    ("first_scheduled_time_ns", "INT64", (1,), ""),
    ("first_token_time_ns", "INT64", (1,), ""),
    ("last_token_time_ns", "INT64", (1,), ""),
    ("acceptance_rate", "FP32", (1,), ""),
    ("total_accepted_draft_tokens", "INT32", (1,), ""),
    ("total_draft_tokens", "INT32", (1,), ""),
    ("num_input_tokens", "INT32", (1,), ""),
    ("num_output_tokens", "INT32", (1,), ""),
]
PRE_INPUTS: list[Row] = [
    ("QUERY", "STRING", (1,), ""),
    ("DECODER_QUERY", "STRING", (1,), "o"),
    ("REQUEST_OUTPUT_LEN", "INT32", (1,), ""),
    ("BAD_WORDS_DICT", "STRING", (-1,), "o"),
    ("STOP_WORDS_DICT", "STRING", (-1,), "o"),
    ("EMBEDDING_BIAS_WORDS", "STRING", (-1,), "o"),
    ("EMBEDDING_BIAS_WEIGHTS", "FP32", (-1,), "o"),
    ("END_ID", "INT32", (1,), "o"),
    ("PAD_ID", "INT32", (1,), "o"),
    ("PROMPT_TABLE_EXTRA_ID", "UINT64", (1,), "o"),
]
# preprocessing/1/model.py looks up the dtype of the first eleven at start; the BLS requests all of them
PRE_OUTPUTS: list[Row] = [
    ("INPUT_ID", "INT32", (-1,), ""),
    ("REQUEST_INPUT_LEN", "INT32", (1,), ""),
    ("DECODER_INPUT_ID", "INT32", (-1,), ""),
    ("REQUEST_DECODER_INPUT_LEN", "INT32", (1,), ""),
    ("BAD_WORDS_IDS", "INT32", (2, -1), ""),
    ("STOP_WORDS_IDS", "INT32", (2, -1), ""),
    ("EMBEDDING_BIAS", "FP32", (-1,), ""),
    ("REQUEST_OUTPUT_LEN", "INT32", (-1,), ""),
    ("OUT_END_ID", "INT32", (1,), ""),
    ("OUT_PAD_ID", "INT32", (1,), ""),
    ("OUT_PROMPT_TABLE_EXTRA_IDS", "UINT64", (-1,), ""),
    ("PIXEL_VALUES", "FP16", (-1, -1, -1, -1), ""),
    ("IMAGE_SIZES", "INT64", (-1, 2), ""),
    ("IS_VIDEO_INPUT", "BOOL", (1,), ""),
    ("ATTENTION_MASK", "INT64", (-1,), ""),
    ("IMAGE_GRID_THW", "INT64", (3,), ""),
    ("VISION_INPUT_ID", "INT32", (-1,), ""),
]
POST_INPUTS: list[Row] = [("TOKENS_BATCH", "INT32", (-1, -1), ""), ("SEQUENCE_LENGTH", "INT32", (-1,), "")]
POST_OUTPUTS: list[Row] = [("OUTPUT", "STRING", (-1,), "")]
