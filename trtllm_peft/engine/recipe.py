"""Build recipes: engines/recipes/<name>.yaml, one per base model (the build flags a model needs).

A recipe fills the `trtllm-peft build` flags the user did not give; flags always win. The LoRA limits are
not in a recipe: max_lora_rank is NIM_MAX_LORA_RANK and the PEFT caches are sized from NIM_MAX_*_LORAS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trtllm_peft.errors import EngineError
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES, MODULE_IDS
from trtllm_peft.lora.spec import dtype_name

RECIPES_DIR = Path(__file__).resolve().parents[2] / "engines" / "recipes"
DEFAULT_DTYPES = {"torch": "float32", "trtllm": "bfloat16"}
_KEYS = {
    "name",
    "hf_id",
    "model",
    "out",
    "dtype",
    "max_batch_size",
    "max_seq_len",
    "max_num_tokens",
    "lora_target_modules",
    "dora",
}


@dataclass(frozen=True)
class Recipe:
    name: str
    out: Path
    model: str | None = None
    hf_id: str | None = None
    dtype: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DTYPES))
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_num_tokens: int | None = None
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    dora: bool = False  # TensorRT-LLM engines: build with the DoRA plugin (trtllm-build --dora_plugin enable)

    def dtype_for(self, backend: str) -> str:
        return self.dtype.get(backend) or self.dtype.get("torch", "float32")


def recipe_path(name_or_path: str | Path) -> Path:
    """A file path as given, or engines/recipes/<name>.yaml."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p
    return RECIPES_DIR / f"{name_or_path}.yaml"


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and check a recipe; EngineError lists every problem."""
    path = recipe_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) or "none"
        raise EngineError(f"no recipe {name_or_path!r} ({path} does not exist); known recipes: {known}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EngineError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise EngineError(f"{path}: a recipe is a mapping of build settings")
    problems = _problems(raw)
    if problems:
        raise EngineError(f"{path}: " + "; ".join(problems))
    dtype = raw.get("dtype") or {}
    dtype = {"torch": dtype, "trtllm": dtype} if isinstance(dtype, str) else dict(dtype)
    return Recipe(
        name=str(raw.get("name") or path.stem),
        out=Path(raw.get("out") or f"engines/{path.stem}"),
        model=raw.get("model"),
        hf_id=raw.get("hf_id"),
        dtype={k: dtype_name(v) for k, v in dtype.items()} or dict(DEFAULT_DTYPES),
        max_batch_size=int(raw.get("max_batch_size", 32)),
        max_seq_len=int(raw.get("max_seq_len", 2048)),
        max_num_tokens=int(raw["max_num_tokens"]) if raw.get("max_num_tokens") else None,
        lora_target_modules=tuple(raw.get("lora_target_modules") or DEFAULT_TARGET_MODULES),
        dora=bool(raw.get("dora", False)),
    )


def _problems(raw: dict[str, Any]) -> list[str]:
    out = [f"unknown key {k!r}" for k in raw if k not in _KEYS]
    for k in ("max_batch_size", "max_seq_len", "max_num_tokens"):
        v = raw.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            out.append(f"{k} must be a positive integer, got {v!r}")
    bad = [m for m in raw.get("lora_target_modules") or () if m not in MODULE_IDS]
    if bad:
        out.append(
            f"unknown lora_target_modules {bad}; use TensorRT-LLM names ({', '.join(DEFAULT_TARGET_MODULES)})"
        )
    if not isinstance(raw.get("dora", False), bool):
        out.append(f"dora must be true or false, got {raw['dora']!r}")
    dtype = raw.get("dtype")
    if dtype is not None and not isinstance(dtype, (str, dict)):
        out.append("dtype must be a name or a mapping {torch: …, trtllm: …}")
    for v in [dtype] if isinstance(dtype, str) else list(dtype.values()) if isinstance(dtype, dict) else []:
        try:
            dtype_name(v)
        except ValueError as e:
            out.append(str(e))
    return out


def apply_recipe(args: Any, recipe: Recipe, backend: str) -> None:
    """Fill the build flags left unset (None) in `args` from `recipe`, for `backend` (torch | trtllm)."""
    defaults = {
        "model": recipe.model,
        "out": recipe.out,
        "dtype": recipe.dtype_for(backend),
        "max_batch_size": recipe.max_batch_size,
        "max_seq_len": recipe.max_seq_len,
        "max_num_tokens": recipe.max_num_tokens,
        "lora_target_modules": list(recipe.lora_target_modules),
        "dora": recipe.dora,
    }
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
