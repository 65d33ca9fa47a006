"""A stand-in for `tensorrt_llm.bindings.executor` (TensorRT-LLM 1.2) that runs without TensorRT-LLM or a GPU.

It enforces the library's contract as its source defines it — constructor signatures and keyword-only
arguments (types.py), LoRA tensor ranks, dtypes and shapes with the validation texts of loraConfig.cpp and
loraUtils.cpp, the paged PEFT cache with its not-cached / cache-full behaviour (peft.py) — and delegates
generation to the reference engine, TorchExecutor (executor.py). Each rule cites the TensorRT-LLM file it
comes from. `install(monkeypatch)` puts it in sys.modules as `tensorrt_llm.bindings.executor`, so code that
imports TensorRT-LLM lazily (trtllm_peft.executor.trtllm) runs against it unchanged.
"""

from __future__ import annotations

import types as _types

import pytest

from tests.trtllm_standin import configs as _c
from tests.trtllm_standin import types as _t
from tests.trtllm_standin.executor import Executor

EXPORTS = (
    "ModelType",
    "FinishReason",
    "SamplingConfig",
    "OutputConfig",
    "LoraConfig",
    "GuidedDecodingParams",
    "Request",
    "Result",
    "Response",
)
CONFIG_EXPORTS = (
    "KvCacheConfig",
    "PeftCacheConfig",
    "GuidedDecodingConfig",
    "ExecutorConfig",
    "IterationStats",
    "InflightBatchingStats",
    "KvCacheStats",
)


def module() -> _types.ModuleType:
    """A fresh module object with the binding's names."""
    m = _types.ModuleType("tensorrt_llm.bindings.executor")
    for name in EXPORTS:
        setattr(m, name, getattr(_t, name))
    for name in CONFIG_EXPORTS:
        setattr(m, name, getattr(_c, name))
    m.Executor = Executor
    return m


def _modules() -> dict[str, _types.ModuleType]:
    executor = module()
    bindings = _types.ModuleType("tensorrt_llm.bindings")
    bindings.executor = executor
    root = _types.ModuleType("tensorrt_llm")
    root.bindings = bindings
    root.__version__ = "1.2.0+standin"
    return {
        "tensorrt_llm": root,
        "tensorrt_llm.bindings": bindings,
        "tensorrt_llm.bindings.executor": executor,
    }


def install(monkeypatch: pytest.MonkeyPatch) -> _types.ModuleType:
    """Register the stand-in as tensorrt_llm, tensorrt_llm.bindings and tensorrt_llm.bindings.executor."""
    mods = _modules()
    for name, mod in mods.items():
        monkeypatch.setitem(__import__("sys").modules, name, mod)
    return mods["tensorrt_llm.bindings.executor"]


def install_for_process() -> None:
    """The same, for a whole process (tests/trtllm_standin/serve.py: a server on the stand-in)."""
    __import__("sys").modules.update(_modules())


@pytest.fixture
def trtllm_standin(monkeypatch: pytest.MonkeyPatch) -> _types.ModuleType:
    """The stand-in installed for one test; yields the `tensorrt_llm.bindings.executor` module object."""
    return install(monkeypatch)
