"""Reading `adapter_config.json` of a Hugging Face PEFT LoRA adapter: parse, and refuse what we cannot serve.

Bounded: the file in size and nesting, pattern tables in keys, every regex compiled by bounded_regex.py
(linear time) as PEFT will use it. Every problem is collected, so that one error names them all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats import bounded_regex
from trtllm_peft.formats.bounded_regex import RegexError
from trtllm_peft.formats.hf_peft_config import (
    CONFIG_NAME,
    DEFAULT_ALPHA,
    HfLoraConfig,
    key_regex,
    layers_regex,
)

MAX_CONFIG_BYTES = 1 << 20  # a full rank_pattern of an 80-layer model is ~30 KB
MAX_PATTERN_KEYS = 2048  # rank_pattern / alpha_pattern keys (one per module of an 80-layer model: 560)

# Set keys whose value changes the forward pass or needs tensors that plain LoRA rows cannot hold.
_REFUSED_IF_SET: dict[str, str] = {
    "modules_to_save": "modules_to_save is not supported: the adapter carries full copies of {value} that "
    "would replace the base model's",
    "lora_bias": "lora_bias is not supported: lora_B has a bias vector",
    "layer_replication": "layer_replication is not supported: it changes the model's layer structure",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens) is not supported: it applies the "
    "adapter only after the invocation tokens",
    "trainable_token_indices": "trainable_token_indices is not supported: it trains embedding rows",
    "target_parameters": "target_parameters is not supported: LoRA on raw parameters (MoE experts)",
    "enable_lora": "legacy MergedLinear LoRA (enable_lora, PEFT <= 0.2) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported: it pools the input before lora_A",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported: it changes the base weights",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
# init_lora_weights values that rewrite the base model's weights; PEFT resets the key to true when it
# converts such an adapter back to one for the original base (save_pretrained(path_initial_model_…)).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_config(directory: Path) -> tuple[HfLoraConfig, list[str]]:
    """Parse and check `directory/adapter_config.json`: the config and every problem found in it.

    Raises AdapterFormatError only when there is nothing to parse (missing, not JSON, not an object); other
    problems are returned, so that the caller reports them together with the tensors' problems. The config
    is only meaningful when the list is empty.
    """
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(directory, f"missing {CONFIG_NAME} (a Hugging Face PEFT adapter needs it)")
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise AdapterFormatError(path, f"{CONFIG_NAME} must hold a JSON object, found {type(raw).__name__}")
    problems = _refusals(raw)
    parsed = {
        "r": _positive_int(raw, "r", problems, required=True),
        "lora_alpha": _number(raw.get("lora_alpha", DEFAULT_ALPHA), "lora_alpha", problems),
        "use_rslora": bool(raw.get("use_rslora") or False),
        "use_dora": bool(raw.get("use_dora") or False),
        "target_modules": _targets(raw, "target_modules", problems, required=True),
        "exclude_modules": _targets(raw, "exclude_modules", problems, required=False),
        "layers_to_transform": _layers_to_transform(raw, problems),
        "layers_pattern": _layers_pattern(raw, problems),
        "rank_pattern": _pattern(raw, "rank_pattern", problems, ints=True),
        "alpha_pattern": _pattern(raw, "alpha_pattern", problems, ints=False),
    }
    base = raw.get("base_model_name_or_path")
    config = HfLoraConfig(**parsed, base_model=base if isinstance(base, str) and base else None, raw=raw)
    return config, problems


def _read_json(path: Path) -> Any:
    """The parsed file; refused when larger than MAX_CONFIG_BYTES or nested deeper than Python recurses."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AdapterFormatError(path, f"{CONFIG_NAME} cannot be read ({e.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            path, f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes: not an adapter config"
        )
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise AdapterFormatError(
            path, f"{CONFIG_NAME} is nested too deeply to be an adapter config"
        ) from None
    except UnicodeDecodeError as e:
        raise AdapterFormatError(path, f"{CONFIG_NAME} is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError: says where, never echoes the content
        raise AdapterFormatError(path, f"{CONFIG_NAME} is not valid JSON ({e})") from None


def _refusals(raw: dict[str, Any]) -> list[str]:
    """Everything in the config that makes this more (or other) than plain LoRA on linear layers."""
    problems = []
    peft_type = raw.get("peft_type")
    if peft_type is None:
        problems.append('missing peft_type (expected "LORA")')
    elif peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r} is not supported: only LORA adapters can be served")
    for key, message in _REFUSED_IF_SET.items():
        value = raw.get(key)
        if value not in (None, False, [], {}, ""):
            problems.append(message.format(value=value))
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(f"bias={bias!r} is not supported: the adapter trains the base layers' biases")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        problems.append(
            f"init_lora_weights={init!r} is not supported: such an adapter only works on the base weights PEFT "
            "rewrote at initialisation (save it with path_initial_model_for_weight_conversion to convert it)"
        )
    if isinstance(raw.get("target_modules"), str):
        for key in ("layers_to_transform", "layers_pattern"):
            if raw.get(key) is not None:
                problems.append(f"{key} cannot be used with a regex target_modules (PEFT refuses it too)")
    if raw.get("layers_pattern") and raw.get("layers_to_transform") is None:
        problems.append("layers_pattern needs layers_to_transform (PEFT refuses it too)")
    return problems


def _positive_int(raw: dict, key: str, problems: list[str], *, required: bool) -> int:
    value = raw.get(key)
    if value is None:
        if required:
            problems.append(f"missing {key} (the LoRA rank)")
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"{key} must be a positive integer, got {value!r}")
        return 1
    return value


def _number(value: Any, what: str, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.append(f"{what} must be a number, got {value!r}")
        return 1.0
    return value


def _regex_ok(pattern: str, what: str, problems: list[str], used_as: str | None = None) -> bool:
    """Whether `used_as` (the regex PEFT builds around `pattern`; default the pattern itself) compiles."""
    try:
        bounded_regex.compile_pattern(pattern if used_as is None else used_as)
    except RegexError as e:
        problems.append(f"{what} {_shown(pattern)} is refused: {e}")
        return False
    return True


def _shown(pattern: str, limit: int = 80) -> str:
    text = ascii(pattern)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(pattern)} characters)"


def _targets(raw: dict, key: str, problems: list[str], *, required: bool) -> str | tuple[str, ...] | None:
    value = raw.get(key)
    if value is None:
        if required:
            problems.append(f'missing {key} (a list of module names, a regex, or "all-linear")')
        return None
    if isinstance(value, str):
        return value if _regex_ok(value, key, problems) else None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    problems.append(f"{key} must be a list of module names or a regex string, got {value!r}")
    return None


def _layers_to_transform(raw: dict, problems: list[str]) -> int | tuple[int, ...] | None:
    value = raw.get("layers_to_transform")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    problems.append(f"layers_to_transform must be an integer or a list of integers, got {value!r}")
    return None


def _layers_pattern(raw: dict, problems: list[str]) -> tuple[str, ...]:
    value = raw.get("layers_pattern")
    if not value:
        return ()
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
        problems.append(f"layers_pattern must be a string or a list of strings, got {value!r}")
        return ()
    return tuple(v for v in values if _regex_ok(v, "layers_pattern", problems, layers_regex(v)))


def _pattern(raw: dict, key: str, problems: list[str], *, ints: bool) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key} must be an object mapping module patterns to values, got {value!r}")
        return {}
    if len(value) > MAX_PATTERN_KEYS:
        problems.append(f"{key} has {len(value)} keys, more than {MAX_PATTERN_KEYS}: not a real adapter's")
        return {}
    out = {}
    for pattern, v in value.items():
        if not _regex_ok(pattern, f"{key} key", problems, key_regex(pattern)):
            continue
        if ints:
            what = f"{key}[{pattern!r}]"
            out[pattern] = _positive_int({what: v}, what, problems, required=True)
        else:
            out[pattern] = _number(v, f"{key}[{pattern!r}]", problems)
    return out
