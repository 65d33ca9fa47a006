"""Writing `adapter_config.json` for a LoRA adapter so that PEFT reads back every module's rank and scale."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtllm_peft.formats.hf_peft_config import peft_scale


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
