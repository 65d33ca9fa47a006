"""The reference engine: our own Llama forward, KV cache, mixed-adapter LoRA ops, PEFT cache, executor."""

from trtllm_peft.executor.torch.executor import TorchExecutor, pick_device

__all__ = ["TorchExecutor", "pick_device"]
