"""`adapter_config.json` of a Hugging Face PEFT LoRA adapter: `HfLoraConfig` and PEFT's matching rules.

Reading the file (bounded, every problem collected) is hf_peft_config_reader.py; writing it,
hf_peft_config_writer.py.

Matching rules are PEFT's own (peft 0.21), re-implemented so that PEFT is not a runtime dependency:
`targets()` is `peft.tuners.tuners_utils.check_target_module_exists`, `rank_alpha()` is the lookup in
`LoraModel._create_and_replace` through `peft.utils.other.get_pattern_key`, and `scale()` is
`LoraLayer.update_layer` (alpha/r, or alpha/sqrt(r) with rsLoRA). Module names are the full names PEFT
matches against: `model.layers.0.self_attn.q_proj` (no `base_model.model.` prefix). Every regex from the
file runs on a linear-time engine (bounded_regex.py: RE2, PEFT's match/fullmatch semantics kept), and the
reader bounds the file itself in size and nesting: nothing in it can freeze or bloat the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trtllm_peft.formats import bounded_regex

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND
DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha's default, used by PEFT when the key is absent


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
                match = bounded_regex.match(layers_regex(pattern), name)
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
        if bounded_regex.match(key_regex(key), name):
            return key
    return name


def key_regex(key: str) -> str:
    """The regex get_pattern_key builds around a rank_pattern / alpha_pattern key."""
    return rf"(.*\.)?({key})$"


def layers_regex(pattern: str) -> str:
    """The regex check_target_module_exists builds around a layers_pattern entry."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _matches_list_or_regex(spec: str | tuple[str, ...] | None, name: str) -> bool:
    """A regex string must fullmatch; a list entry must equal the name or be a dotted suffix of it."""
    if not spec:
        return False
    if isinstance(spec, str):
        return bounded_regex.fullmatch(spec, name)
    return name in spec or any(name.endswith(f".{entry}") for entry in spec)
