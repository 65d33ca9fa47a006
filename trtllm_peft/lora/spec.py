"""Model geometry and LoRA limits: what an adapter is validated and packed against.

A `ModelSpec` comes from a base model's Hugging Face `config.json` or from an engine directory's
`config.json` (TensorRT-LLM's engine schema: `pretrained_config` + `build_config`). The server reads the
engine's spec and never guesses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trtllm_peft.errors import EngineError
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES, MODULE_IDS

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
}

DEFAULT_MAX_LORA_RANK = 64
REFERENCE_VERSION = "trtllm-peft-reference"  # config.json "version" of a reference (PyTorch) engine


def dtype_name(value: str | torch.dtype) -> str:
    """Normalise 'bf16', torch.bfloat16, 'bfloat16' … to one of DTYPES' keys."""
    if isinstance(value, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == value:
                return name
        raise ValueError(f"unsupported dtype {value}; use one of {', '.join(DTYPES)}")
    name = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use one of {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of a decoder-only Llama-family model plus the engine's LoRA limits."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 0
    dtype: str = "float16"
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    architecture: str = "LlamaForCausalLM"
    source: str = ""
    dora_plugin: bool = False  # build_config.plugin_config.dora_plugin: the engine applies DoRA magnitudes
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a module, as LoraModule::createLoraModules computes them."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        dims = {
            "attn_qkv": (h, q + 2 * kv),
            "attn_q": (h, q),
            "attn_k": (h, kv),
            "attn_v": (h, kv),
            "attn_dense": (q, h),
            "mlp_h_to_4h": (h, i),
            "mlp_4h_to_h": (i, h),
            "mlp_gate": (h, i),
            "mlp_gate_up": (h, 2 * i),
        }
        if module not in dims:
            raise KeyError(f"module {module!r} does not exist in a {self.architecture}")
        return dims[module]

    def cache_units(self, num_adapters: int) -> int:
        """Rank-units that hold `num_adapters` adapters of max rank on every target module and layer
        (NIM: "the cache is pre-allocated assuming all LoRA adapters have rank equal to NIM_MAX_LORA_RANK";
        adapters of lower rank or fewer modules take less, so more of them fit)."""
        return num_adapters * self.max_lora_rank * len(self.lora_target_modules) * self.num_layers

    def with_limits(
        self,
        *,
        max_lora_rank: int | None = None,
        dtype: str | None = None,
        lora_target_modules: tuple[str, ...] | None = None,
    ) -> ModelSpec:
        """A copy with other LoRA limits or dtype (for building, or for converting to another dtype)."""
        return replace(
            self,
            max_lora_rank=self.max_lora_rank if max_lora_rank is None else max_lora_rank,
            dtype=self.dtype if dtype is None else dtype_name(dtype),
            lora_target_modules=self.lora_target_modules
            if lora_target_modules is None
            else tuple(lora_target_modules),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, source: str = "") -> ModelSpec:
        """From a Hugging Face `config.json` dict (Llama, Mistral, Qwen2, SmolLM2 …)."""
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg.get("vocab_size", 0)),
                dtype=dtype_name(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
                architecture=(cfg.get("architectures") or ["LlamaForCausalLM"])[0],
                source=source,
                dora_plugin=True,  # a model, not an engine: nothing is built yet that could lack the plugin
            )
        except KeyError as e:
            raise EngineError(
                f"{source or 'config.json'}: missing {e.args[0]!r}; not a Llama-family config"
            ) from None

    @classmethod
    def from_engine_config(cls, cfg: dict[str, Any], *, source: str = "") -> ModelSpec:
        """From an engine `config.json` in TensorRT-LLM's schema (DESIGN §4.2)."""
        pre, build = cfg.get("pretrained_config", {}), cfg.get("build_config", {})
        lora = build.get("lora_config", {}) or {}
        plugins = build.get("plugin_config", {}) or {}
        try:
            heads = int(pre["num_attention_heads"])
            hidden = int(pre["hidden_size"])
            modules = tuple(lora.get("lora_target_modules") or ())
            unknown = [m for m in modules if m not in MODULE_IDS]
            if unknown:
                raise EngineError(f"{source}: unknown lora_target_modules {unknown}")
            return cls(
                num_layers=int(pre["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(pre.get("num_key_value_heads") or heads),
                head_dim=int(pre.get("head_size") or hidden // heads),
                intermediate_size=int(pre["intermediate_size"]),
                vocab_size=int(pre.get("vocab_size", 0)),
                dtype=dtype_name(pre.get("dtype", "float16")),
                max_lora_rank=int(lora.get("max_lora_rank", 0)),
                lora_target_modules=modules,
                architecture=pre.get("architecture", "LlamaForCausalLM"),
                source=source,
                # reference engines built before DoRA wrote dora_plugin false, yet run DoRA like every other
                dora_plugin=bool(plugins.get("dora_plugin")) or cfg.get("version") == REFERENCE_VERSION,
            )
        except KeyError as e:
            raise EngineError(f"{source}: engine config lacks pretrained_config.{e.args[0]}") from None


def load_spec(path: str | Path, *, max_lora_rank: int | None = None, dtype: str | None = None) -> ModelSpec:
    """Read the spec from an engine directory, a HF model directory, or a config.json file itself.

    An engine directory carries its own LoRA limits; a HF directory gets the defaults unless given here.
    """
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise EngineError(
            f"{p}: no config.json (expected an engine directory or a Hugging Face model directory)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{cfg_path}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise EngineError(f"{cfg_path}: config.json is not a JSON object")
    if "pretrained_config" in cfg:
        spec = ModelSpec.from_engine_config(cfg, source=str(p))
    else:
        spec = ModelSpec.from_hf_config(cfg, source=str(p))
    return spec.with_limits(max_lora_rank=max_lora_rank, dtype=dtype)


def spec_for_base(
    base: str | Path,
    *,
    default_max_lora_rank: int,
    max_lora_rank: int | None = None,
    dtype: str | None = None,
) -> ModelSpec:
    """The spec adapters are checked against: an engine directory keeps its own max rank; a Hugging Face
    model directory gets `default_max_lora_rank` (NIM_MAX_LORA_RANK); `max_lora_rank` overrides both."""
    spec = load_spec(base, dtype=dtype)
    is_engine = bool(spec.max_lora_rank) and (Path(base) / "trtllm_peft.json").exists()
    rank = max_lora_rank or (spec.max_lora_rank if is_engine else default_max_lora_rank)
    return spec.with_limits(max_lora_rank=rank)
