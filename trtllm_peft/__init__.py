"""trtllm-peft: NIM-compatible multi-LoRA serving on TensorRT-LLM."""

__version__ = "0.1.0"
