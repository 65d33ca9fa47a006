"""`adapter_config.json` of a Hugging Face PEFT LoRA adapter: parse, refuse what we cannot serve, match.

Matching rules are PEFT's own (peft 0.21), re-implemented so that PEFT is not a runtime dependency:
`targets()` is `peft.tuners.tuners_utils.check_target_module_exists`, `rank_alpha()` is the lookup in
`LoraModel._create_and_replace` through `peft.utils.other.get_pattern_key`, and `scale()` is
`LoraLayer.update_layer` (alpha/r, or alpha/sqrt(r) with rsLoRA). Module names are the full names PEFT
matches against: `model.layers.0.self_attn.q_proj` (no `base_model.model.` prefix). Every regex from the
file runs on a linear-time engine (bounded_regex.py: RE2, PEFT's match/fullmatch semantics kept), and the
file itself is bounded in size and nesting: nothing in it can freeze or bloat the server.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats import bounded_regex
from trtllm_peft.formats.bounded_regex import RegexError

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND
DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha's default, used by PEFT when the key is absent
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


@dataclass(frozen=True)
class HfLoraConfig:
    """The fields of adapter_config.json that decide which modules get LoRA and with which scale."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False  # DoRA: every targeted module carries lora_magnitude_vector (hf_peft.py)
    target_modules: str | tuple[str, ...] = ()
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    base_model: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def targets(self, name: str) -> bool:
        """Whether PEFT puts LoRA on module `name` (check_target_module_exists)."""
        if _matches_list_or_regex(self.exclude_modules, name):
            return False
        if isinstance(self.target_modules, str):
            # "all-linear" selects every nn.Linear but the output head; every module we map is one.
            return self.target_modules.lower() == ALL_LINEAR or bounded_regex.fullmatch(
                self.target_modules, name
            )
        if name in self.target_modules:
            return True  # an exact full name is taken as is: PEFT skips layers_to_transform for it
        if not any(name.endswith(f".{t}") for t in self.target_modules):
            return False
        return self._in_transformed_layer(name)

    def _in_transformed_layer(self, name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == ():
            return True
        if not self.layers_pattern:
            match = bounded_regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = bounded_regex.match(_layers_regex(pattern), name)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, alpha) of module `name`: the first matching pattern key wins, else the global value."""
        r_key = _pattern_key(self.rank_pattern, name)
        a_key = _pattern_key(self.alpha_pattern, name)
        return self.rank_pattern.get(r_key, self.r), self.alpha_pattern.get(a_key, self.lora_alpha)

    def scale(self, name: str) -> float:
        """PEFT's `scaling` of module `name`, computed with the same operations in the same order."""
        r, alpha = self.rank_alpha(name)
        return peft_scale(alpha, r, self.use_rslora)

    def meta(self) -> dict[str, Any]:
        """What is worth keeping in LoraAdapter.meta."""
        keys = (
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "task_type",
            "peft_version",
        )
        return {k: self.raw.get(k) for k in keys if k in self.raw}


def peft_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """LoraLayer.update_layer: `lora_alpha / math.sqrt(r)` with rsLoRA, else `lora_alpha / r`."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str:
    """peft.utils.other.get_pattern_key: the first key `k` with re.match(rf"(.*\\.)?({k})$", name)."""
    for key in patterns:
        if bounded_regex.match(_key_regex(key), name):
            return key
    return name


def _key_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _layers_regex(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _matches_list_or_regex(spec: str | tuple[str, ...] | None, name: str) -> bool:
    """A regex string must fullmatch; a list entry must equal the name or be a dotted suffix of it."""
    if not spec:
        return False
    if isinstance(spec, str):
        return bounded_regex.fullmatch(spec, name)
    return name in spec or any(name.endswith(f".{entry}") for entry in spec)


# ---------------------------------------------------------------------------------------------- reading


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
    return tuple(v for v in values if _regex_ok(v, "layers_pattern", problems, _layers_regex(v)))


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
        if not _regex_ok(pattern, f"{key} key", problems, _key_regex(pattern)):
            continue
        if ints:
            what = f"{key}[{pattern!r}]"
            out[pattern] = _positive_int({what: v}, what, problems, required=True)
        else:
            out[pattern] = _number(v, f"{key}[{pattern!r}]", problems)
    return out


# ---------------------------------------------------------------------------------------------- writing


def alpha_for(scale: float, r: int, use_rslora: bool = False) -> float:
    """An alpha for which PEFT computes `scale` at rank `r` (alpha = r when scale is 1).

    Integral alphas are written as ints (LoraConfig.lora_alpha is annotated int). Any scale that is a ratio
    alpha/r of PEFT's (an int or a float alpha) comes back exactly; for an arbitrary float scale no alpha
    may divide back exactly (alpha/r steps by more than one ulp of scale), and the closest is used.
    """
    guess = scale * (math.sqrt(r) if use_rslora else r)
    candidates = [float(round(guess)), guess]
    up = down = guess
    for _ in range(8):  # the nearest floats around scale·r: one of them divides back exactly if any does
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    best = min(candidates, key=lambda a: abs(peft_scale(a, r, use_rslora) - scale))
    return int(best) if best.is_integer() and abs(best) < 2**53 else best


def most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the smallest, so the choice does not depend on order."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)


def write_config(
    path: Path,
    *,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    target_modules: list[str] | str,
    layers_to_transform: list[int] | None,
    base_model: str | None,
    use_dora: bool = False,
) -> None:
    """adapter_config.json that PeftModel.from_pretrained reads; per-module values go to the patterns.

    `ranks`/`alphas` map full module names (model.layers.0.self_attn.q_proj) to their values. Pattern keys
    are full names, so each matches exactly its own module under get_pattern_key's rule.
    """
    r = most_common(list(ranks.values()))
    alpha = most_common(list(alphas.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "use_dora": use_dora,
        "target_modules": target_modules,
        "rank_pattern": {name: v for name, v in ranks.items() if v != r},
        "alpha_pattern": {name: v for name, v in alphas.items() if v != alpha},
        "layers_to_transform": layers_to_transform,
        "layers_pattern": "layers" if layers_to_transform is not None else None,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
