"""Which engine backend runs: the reference engine (`torch`) or TensorRT-LLM (`trtllm`).

`auto` picks TensorRT-LLM when `tensorrt_llm` imports and a CUDA GPU is present, the reference engine
otherwise. Asking for `trtllm` where it cannot run stops with one message that says how to install it.
"""

from __future__ import annotations

import logging

from trtllm_peft.errors import EngineError

log = logging.getLogger(__name__)

TRTLLM_VERSIONS = ">=1.2,<1.3"

# NVIDIA's documented pip install (https://nvidia.github.io/TensorRT-LLM/installation/linux.html, 1.2 era:
# CUDA 13, PyTorch 2.9.1 cu130); PyPI's tensorrt_llm is a stub that fetches the wheel from pypi.nvidia.com.
INSTALL_HINT = f"""\
TensorRT-LLM 1.2 is needed for --backend trtllm (Linux, NVIDIA GPU, CUDA 13 driver). Install it with
NVIDIA's documented commands, in an environment of its own (it brings its own CUDA build of PyTorch):
    sudo apt-get -y install libopenmpi-dev
    pip3 install torch==2.9.1 torchvision --index-url https://download.pytorch.org/whl/cu130
    pip3 install --ignore-installed pip setuptools wheel
    pip3 install "tensorrt_llm{TRTLLM_VERSIONS}" --extra-index-url https://pypi.nvidia.com
    pip3 install --no-deps -e .        # trtllm-peft itself, keeping TensorRT-LLM's torch
or run inside NVIDIA's container nvcr.io/nvidia/tensorrt-llm/release:1.2.<x>.
See https://nvidia.github.io/TensorRT-LLM/installation/linux.html; or use --backend torch (the reference
engine, any machine)."""


def trtllm_unavailable_reason() -> str | None:
    """None when TensorRT-LLM can run here, else why not (import error, or no CUDA device)."""
    import torch

    from trtllm_peft.executor.trtllm import TrtllmImportError, import_bindings

    try:
        import_bindings()
    except TrtllmImportError as e:
        return e.reason

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def require_trtllm() -> None:
    """Raise EngineError with the install instructions when TensorRT-LLM cannot run here."""
    reason = trtllm_unavailable_reason()
    if reason is not None:
        raise EngineError(f"--backend trtllm: {reason}.\n{INSTALL_HINT}")


def resolve_backend(requested: str) -> str:
    """`torch` or `trtllm` for a requested `auto | torch | trtllm` (TRTLLM_PEFT_BACKEND / --backend)."""
    if requested == "torch":
        return "torch"
    if requested == "trtllm":
        require_trtllm()
        return "trtllm"
    if requested != "auto":
        raise EngineError(f"unknown backend {requested!r}; use auto, torch or trtllm")
    reason = trtllm_unavailable_reason()
    if reason is None:
        return "trtllm"
    log.info("backend auto: using the reference engine (torch): %s", reason)
    return "torch"
