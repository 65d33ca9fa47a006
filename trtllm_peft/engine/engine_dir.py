"""The engine directory (DESIGN §4.2): what `trtllm-peft build` writes and every executor reads.

config.json        TensorRT-LLM's engine schema: pretrained_config + build_config (lora_config,
                   plugin_config.lora_plugin) — lora.load_spec() reads it
trtllm_peft.json   backend, source model, the NIM_* values it was sized from, memory plan, HF config
model.safetensors  the reference engine's weights, Hugging Face names, engine dtype (no re-dequantizing)
tokenizer.json, tokenizer_config.json, chat_template.jinja …   the tokenizer and chat template
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trtllm_peft.engine.memory import DEFAULT_TOKENS_PER_BLOCK
from trtllm_peft.errors import EngineError
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES, TRTLLM_TO_HF
from trtllm_peft.lora.spec import DTYPES, ModelSpec, dtype_name

CONFIG_FILE = "config.json"
META_FILE = "trtllm_peft.json"
WEIGHTS_FILE = "model.safetensors"
ENGINE_FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ArchConfig:
    """What the forward pass needs beyond `ModelSpec`: norms, rope, biases, tying."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # TensorRT-LLM's `rotary_scaling`: {"type": "llama3", …}
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_engine_config(cls, cfg: dict[str, Any]) -> ArchConfig:
        p = cfg["pretrained_config"]
        return cls(
            num_layers=p["num_hidden_layers"],
            hidden_size=p["hidden_size"],
            num_heads=p["num_attention_heads"],
            num_kv_heads=p["num_key_value_heads"],
            head_dim=p["head_size"],
            intermediate_size=p["intermediate_size"],
            vocab_size=p["vocab_size"],
            rms_norm_eps=p.get("norm_epsilon", 1e-5),
            rope_theta=p.get("rotary_base", 10000.0),
            rope_scaling=p.get("rotary_scaling"),
            max_position_embeddings=p.get("max_position_embeddings", 4096),
            qkv_bias=bool(p.get("attn_bias", False)),
            tie_word_embeddings=bool(p.get("share_embedding_table", False)),
            architecture=p.get("architecture", "LlamaForCausalLM"),
        )


def _hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from a HF config, transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) spelling; scaling in TensorRT-LLM's `rotary_scaling` form or None."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise EngineError(f"rope scaling {kind!r} is not supported by the reference engine (default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"type": "llama3", **{k: scaling[k] for k in keys}}


def engine_config(
    hf: dict[str, Any],
    *,
    dtype: str,
    max_batch_size: int,
    max_seq_len: int,
    max_num_tokens: int,
    max_lora_rank: int,
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
) -> dict[str, Any]:
    """config.json in TensorRT-LLM's engine schema, from a Hugging Face config dict."""
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise EngineError(
            f"architecture {arch} is not supported; use one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    pretrained = _pretrained_config(hf, arch, dtype_name(dtype))
    build = _build_config(
        dtype_name(dtype),
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        max_lora_rank=max_lora_rank,
        lora_target_modules=lora_target_modules,
    )
    return {"version": "trtllm-peft-reference", "pretrained_config": pretrained, "build_config": build}


def _pretrained_config(hf: dict[str, Any], arch: str, dtype: str) -> dict[str, Any]:
    """TensorRT-LLM's `pretrained_config` (the model) from a Hugging Face config dict."""
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    theta, scaling = _hf_rope(hf)
    return {
        "architecture": arch,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": int(hf["vocab_size"]),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "hidden_size": hidden,
        "num_hidden_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
        "head_size": int(hf.get("head_dim") or hidden // heads),
        "hidden_act": hf.get("hidden_act", "silu"),
        "intermediate_size": int(hf["intermediate_size"]),
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "attn_bias": arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        "share_embedding_table": bool(hf.get("tie_word_embeddings", False)),
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def _build_config(
    dtype: str,
    *,
    max_batch_size: int,
    max_seq_len: int,
    max_num_tokens: int,
    max_lora_rank: int,
    lora_target_modules: tuple[str, ...],
) -> dict[str, Any]:
    """TensorRT-LLM's `build_config` (limits, LoRA, plugins) as trtllm-build writes it."""
    return {
        "max_batch_size": max_batch_size,
        "max_beam_width": 1,
        "max_input_len": max_seq_len - 1,
        "max_seq_len": max_seq_len,
        "max_num_tokens": max_num_tokens,
        "lora_config": {
            "lora_dir": [],
            "lora_ckpt_source": "hf",
            "max_lora_rank": max_lora_rank,
            "lora_target_modules": list(lora_target_modules),
            "trtllm_modules_to_hf_modules": {m: TRTLLM_TO_HF[m] for m in lora_target_modules},
        },
        # tokens_per_block: the paged KV cache's block size, fixed at build as in TensorRT-LLM's PluginConfig.
        # The reference engine applies DoRA magnitudes in every build (executor/torch/lora_ops.py).
        "plugin_config": {
            "lora_plugin": dtype,
            "dora_plugin": True,
            "gemm_plugin": None,
            "tokens_per_block": DEFAULT_TOKENS_PER_BLOCK,
        },
    }


@dataclass
class EngineDir:
    """A read engine directory: its configs and, on demand, its weights."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> EngineDir:
        p = Path(path)
        missing = [f for f in (CONFIG_FILE, META_FILE) if not (p / f).is_file()]
        if missing:
            raise EngineError(
                f"{p}: not an engine directory (missing {', '.join(missing)}); run `make engine`"
            )
        try:
            config = json.loads((p / CONFIG_FILE).read_text())
            meta = json.loads((p / META_FILE).read_text())
        except ValueError as e:
            raise EngineError(f"{p}: unreadable engine config ({e})") from None
        return cls(path=p, config=config, meta=meta)

    @property
    def model_name(self) -> str:
        """The base model's name for users: the source's name without a GGUF quantization suffix
        ("SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"), else the directory's name."""
        name = self.meta.get("model_name") or self.meta.get("source_name") or self.path.name
        return re.sub(r"[.-](I?Q\d[\w]*|F16|F32|BF16)$", "", name, flags=re.IGNORECASE)

    @property
    def backend(self) -> str:
        return self.meta.get("backend", "torch")

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_engine_config(self.config, source=str(self.path))

    @property
    def arch(self) -> ArchConfig:
        return ArchConfig.from_engine_config(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config["pretrained_config"]["dtype"]]

    @property
    def build_config(self) -> dict[str, Any]:
        return self.config["build_config"]

    @property
    def hf_config(self) -> dict[str, Any]:
        """The source model's Hugging Face config (for building the transformers reference in tests/bench)."""
        return dict(self.meta["hf_config"])

    def load_weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The weights by Hugging Face name, memory-mapped from safetensors (no conversion)."""
        from safetensors.torch import load_file

        f = self.path / WEIGHTS_FILE
        if not f.is_file():
            raise EngineError(f"{self.path}: no {WEIGHTS_FILE}; this engine has no reference-engine weights")
        return load_file(str(f), device=str(device))


def hf_checkpoint(engine: EngineDir, out: str | Path) -> Path:
    """A Hugging Face checkpoint view of the engine in `out` (config.json + a link to the weights), so
    transformers' `from_pretrained` loads exactly the engine's weights without re-initialising a model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(engine.hf_config, indent=2))
    link = out / WEIGHTS_FILE
    if not link.exists():
        link.symlink_to((engine.path / WEIGHTS_FILE).resolve())
    return out


def write_configs(out: Path, config: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write config.json and trtllm_peft.json (pretty, stable key order)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
