"""trtllm-peft: NIM-compatible multi-LoRA serving on TensorRT-LLM."""
