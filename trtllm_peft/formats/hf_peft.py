"""Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).

Keys look like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A `[r, in]`) and
`….lora_B.weight` (B `[out, r]`), unscaled; the scale comes from the config (hf_peft_config.py). Files
saved through the transformers integration lack the `base_model.model.` prefix; files saved from a raw
`state_dict()` carry the adapter name (`.lora_A.default.weight`). Both are read. A DoRA adapter
(`use_dora: true`) adds `….lora_magnitude_vector` `[out]` per module (PEFT's saved name; the raw state dict's
`.lora_magnitude_vector.default.weight`), the magnitude as trained (lora/dora.py normalizes it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats import safe_io
from trtllm_peft.formats.hf_peft_config import CONFIG_NAME, HfLoraConfig
from trtllm_peft.formats.hf_peft_config_reader import read_config
from trtllm_peft.formats.hf_peft_config_writer import alpha_for, write_config
from trtllm_peft.formats.limits import ReadLimits
from trtllm_peft.lora.adapter import Key, LoraAdapter, LoraWeights
from trtllm_peft.lora.modules import HF_PARENT, HF_TO_TRTLLM, TRTLLM_TO_HF
from trtllm_peft.lora.spec import ModelSpec

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order: safetensors wins
PREFIX = "base_model.model."
_LORA_SUFFIX = re.compile(r"\.(?:lora_(A|B)\.weight|lora_(magnitude)_vector(?:\.weight)?)$")
_ADAPTER_INFIX = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.default(?=\.|$)"
)
# A decoder layer's projection of a Llama-family *ForCausalLM (`model.layers…`) or bare model (`layers…`).
_MODULE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)$")
# Non-LoRA tensors, in the order they are told apart; the first matching kind names the problem.
_OTHER_KINDS: tuple[tuple[str, str], ...] = (
    (r"\.lora_[AB]\.bias$", "LoRA bias tensors (lora_bias) are not supported"),
    (r"\.lora_embedding_[AB]$", "embedding LoRA (lora_embedding_A/B) is not supported"),
    (r"weight_m_wdecomp", "NVLabs DoRA magnitude tensors (weight_m_wdecomp) are not PEFT's"),
    (r"trainable_tokens_delta|token_adapter", "trainable-token tensors are not supported"),
    (r"(^|\.)lora_", "unknown LoRA tensors"),
    (
        r"\.(weight|bias)$",
        "base model weights in the adapter file (modules_to_save, resized embeddings or "
        "bias) are not supported",
    ),
)


class _Problems:
    """Problems grouped by message, each with the first few names it concerns."""

    def __init__(self) -> None:
        self._by_message: dict[str, list[str]] = {}

    def add(self, message: str, name: str = "") -> None:
        self._by_message.setdefault(message, []).append(name)

    def render(self) -> list[str]:
        out = []
        for message, names in self._by_message.items():
            names = [n for n in names if n]
            if not names:
                out.append(message)
                continue
            shown = ", ".join(names[:3]) + (f", … ({len(names)} in all)" if len(names) > 3 else "")
            out.append(f"{message}: {shown}")
        return out


def detect(path: Path) -> bool:
    """A directory with adapter_config.json and adapter_model.safetensors or adapter_model.bin."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def load(path: Path, spec: ModelSpec | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter; every problem is reported at once in an AdapterFormatError.

    `spec` is not needed (the file is self-describing; fitting to an engine is lora.fit_to_spec's job), but
    bounds what is read: no tensor larger than the engine's largest LoRA tensor is read (limits.py).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(path, "is not a directory (a Hugging Face PEFT adapter is a directory)")
    config, config_problems = read_config(path)
    problems = _Problems()
    for problem in config_problems:
        problems.add(f"{CONFIG_NAME}: {problem}")
    weights_path = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights_path is None:
        problems.add(f"missing adapter weights: expected {' or '.join(WEIGHT_FILES)}")
        raise AdapterFormatError(path, problems.render())
    limits = ReadLimits.for_spec(spec)  # sizes checked from the headers before any tensor is read
    tensors = _read_weights(weights_path, limits)
    stale = _disagreement(path, tensors, limits) if weights_path.suffix == ".safetensors" else None
    if stale:
        problems.add(stale)
    pairs = _lora_pairs(tensors, problems)
    weights = _modules(pairs, None if config_problems else config, problems)
    if not pairs:
        problems.add(f"{weights_path.name} holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight)")
    if problems.render():
        raise AdapterFormatError(path, problems.render())
    meta = {**config.meta(), "weights_file": weights_path.name}
    return LoraAdapter(
        weights=weights, format="hf", source=str(path), base_model=config.base_model, meta=meta
    )


def _read_weights(weights_path: Path, limits: ReadLimits) -> dict:
    if weights_path.suffix == ".safetensors":
        return safe_io.read_safetensors(weights_path, limits)
    return safe_io.torch_load(weights_path, limits)


def _disagreement(path: Path, tensors: dict, limits: ReadLimits) -> str | None:
    """PEFT reads safetensors and ignores a .bin beside it; if the two differ, nobody knows which adapter
    the user meant (a half-finished re-export?), so a .bin that disagrees is a problem, not a detail."""
    bin_path = path / WEIGHT_FILES[1]
    if not bin_path.is_file():
        return None
    other = safe_io.torch_load(bin_path, limits)
    differ = sorted(
        k
        for k in set(tensors) | set(other)
        if k not in tensors
        or k not in other
        or not isinstance(other[k], torch.Tensor)
        or other[k].shape != tensors[k].shape
        or not torch.equal(other[k].to(tensors[k].dtype), tensors[k])
    )
    if not differ:
        return None
    return (
        f"{WEIGHT_FILES[0]} and {WEIGHT_FILES[1]} disagree ({len(differ)} tensors differ, e.g. "
        f"{differ[0]}); delete the stale one"
    )


def _lora_pairs(tensors: dict, problems: _Problems) -> dict[str, dict[str, torch.Tensor]]:
    """{full module name: {"A": tensor, "B": tensor}} from the file's keys; other keys become problems."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not (isinstance(key, str) and isinstance(tensor, torch.Tensor)):
            problems.add("entries that are not named tensors", repr(key)[:80])
            continue
        name = _ADAPTER_INFIX.sub(r".\1", key.removeprefix(PREFIX))
        match = _LORA_SUFFIX.search(name)
        if match is None:
            problems.add(_other_kind(name), key)
        else:
            module, which = name[: match.start()], match.group(1) or "M"
            if which in pairs.setdefault(module, {}):
                problems.add("tensors that appear twice (with and without prefix or adapter name)", key)
            pairs[module][which] = tensor
    return pairs


def _other_kind(name: str) -> str:
    """The problem a non-LoRA tensor stands for."""
    return next((msg for pattern, msg in _OTHER_KINDS if re.search(pattern, name)), "unknown tensors")


def _modules(
    pairs: dict[str, dict[str, torch.Tensor]], config: HfLoraConfig | None, problems: _Problems
) -> dict:
    """Map each module to (layer, TensorRT-LLM name) and check it against the config (None: unusable)."""
    out: dict[Key, LoraWeights] = {}
    for name, ab in pairs.items():
        key = _map_module(name)
        if key is None:
            problems.add(
                f"modules that cannot be mapped to a Llama-family decoder projection "
                f"(known: {', '.join(HF_TO_TRTLLM)})",
                name,
            )
            continue
        if not {"A", "B"} <= set(ab):
            problems.add(f"modules missing lora_{'B' if 'A' in ab else 'A'}.weight", name)
            continue
        a, b = (_empty_as_2d(ab[x]) for x in ("A", "B"))
        mag = ab.get("M")
        problem = (
            _tensor_problem(a, b)
            or (_config_problem(name, a, b, config) if config else None)
            or _magnitude_problem(mag, b, config)
        )
        if problem:
            problems.add(problem, name)
        elif config is not None:
            out[key] = LoraWeights(a=a, b=b, scale=config.scale(name), magnitude=mag)
    return out


def _magnitude_problem(mag: torch.Tensor | None, b: torch.Tensor, config: HfLoraConfig | None) -> str | None:
    """Why this module's DoRA magnitude (or its absence) disagrees with use_dora and B, or None."""
    use_dora = bool(config and config.use_dora)
    if mag is None:
        return "modules without lora_magnitude_vector (DoRA) although use_dora is true" if use_dora else None
    if config is not None and not use_dora:
        return (
            "modules with lora_magnitude_vector (DoRA) although use_dora is not set (PEFT would ignore them)"
        )
    if mag.ndim != 1 or not mag.is_floating_point() or (b.numel() and mag.shape[0] != b.shape[0]):
        return f"modules whose lora_magnitude_vector {list(mag.shape)} is not one value per output row of B"
    return None


def _map_module(name: str) -> Key | None:
    match = _MODULE.match(name)
    if match is None:
        return None
    layer, parent, hf = match.groups()
    if hf not in HF_TO_TRTLLM or HF_PARENT[hf] != parent:
        return None
    return int(layer), HF_TO_TRTLLM[hf]


def _empty_as_2d(t: torch.Tensor) -> torch.Tensor:
    """ZeRO-3 saves without gathering leave `[0]` tensors; kept as `[0, 0]` for lora.validate to report."""
    return t.reshape(0, 0) if t.numel() == 0 else t


def _tensor_problem(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why this module's A and B are not a Linear LoRA we can serve, or None."""
    if a.ndim != 2 or b.ndim != 2:
        return (
            f"modules whose LoRA tensors are not 2-D (A {list(a.shape)}, B {list(b.shape)}: conv or legacy "
            "MergedLinear LoRA); only Linear LoRA is supported"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        return f"modules with non-floating-point LoRA tensors ({a.dtype}, {b.dtype})"
    return None


def _config_problem(name: str, a: torch.Tensor, b: torch.Tensor, config: HfLoraConfig) -> str | None:
    """Why PEFT, reading this config, would not apply these tensors as they are, or None."""
    if not config.targets(name):
        return "modules that adapter_config.json's target_modules do not select (PEFT would ignore them)"
    r, _ = config.rank_alpha(name)
    if a.numel() and b.numel() and (a.shape[0] != r or b.shape[1] != r):
        shapes = f"A {list(a.shape)}, B {list(b.shape)}"
        return f"modules whose tensor rank ({shapes}) differs from the config's r={r}"
    return None


# ---------------------------------------------------------------------------------------------- writing


def save(adapter: LoraAdapter, out: Path, spec: ModelSpec | None) -> list[Path]:
    """Write adapter_config.json + adapter_model.safetensors that PeftModel.from_pretrained loads.

    Per-module ranks and scales go to rank_pattern/alpha_pattern (full module names), alpha chosen so
    that PEFT's scale equals LoraWeights.scale (exactly for any alpha/r scale; see alpha_for). Layers or
    modules the adapter lacks stay absent: layers_to_transform (always written without a spec), or an
    exact-name regex for irregular module sets, keeps PEFT from expecting them.
    """
    out = Path(out)
    tensors, ranks, alphas, problems = {}, {}, {}, []
    for (layer, module), w in adapter:
        hf = TRTLLM_TO_HF.get(module)
        if hf is None or w.rank == 0:
            problems.append(
                f"layer {layer} {module}: " + ("no Hugging Face name" if hf is None else "rank 0")
            )
            continue
        if w.is_dora and w.normalized:
            problems.append(
                f"layer {layer} {module}: DoRA magnitude is normalized (TensorRT-LLM's form), PEFT stores it "
                "as trained: convert with the base model's weights"
            )
            continue
        name = _full_name(layer, hf)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = w.a.detach().contiguous().clone()  # [r, in]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = w.b.detach().contiguous().clone()  # [out, r]
        if w.is_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = w.magnitude.detach().contiguous().clone()
        ranks[name], alphas[name] = w.rank, alpha_for(w.scale, w.rank)
    if problems or not tensors:
        raise AdapterFormatError(out, problems or ["adapter has no LoRA weights to write"])
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = out / WEIGHT_FILES[0], out / CONFIG_NAME
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    targets, layers = _target_spec(adapter, spec)
    write_config(
        config_path,
        ranks=ranks,
        alphas=alphas,
        target_modules=targets,
        layers_to_transform=layers,
        base_model=adapter.base_model,
        use_dora=adapter.is_dora,
    )
    return [config_path, weights_path]


def _full_name(layer: int, hf: str) -> str:
    return f"model.layers.{layer}.{HF_PARENT[hf]}.{hf}"


def _target_spec(adapter: LoraAdapter, spec: ModelSpec | None) -> tuple[list[str] | str, list[int] | None]:
    """(target_modules, layers_to_transform) selecting exactly the adapter's modules, no more."""
    present = {(layer, TRTLLM_TO_HF[m]) for layer, m in adapter.weights}
    hf_names = [hf for hf in HF_TO_TRTLLM if any(h == hf for _, h in present)]
    layers = sorted({layer for layer, _ in present})
    if present != {(layer, hf) for layer in layers for hf in hf_names}:
        return _exact_regex(present), None
    all_layers = list(range(spec.num_layers)) if spec is not None else None
    return hf_names, None if layers == all_layers else layers


def _exact_regex(present: Iterable[tuple[int, str]]) -> str:
    """A target_modules regex that fullmatches exactly these (layer, HF name) modules."""
    by_module: dict[str, list[int]] = {}
    for layer, hf in sorted(present):
        by_module.setdefault(hf, []).append(layer)
    parts = [
        rf"model\.layers\.(?:{'|'.join(map(str, layers))})\.{HF_PARENT[hf]}\.{hf}"
        for hf, layers in by_module.items()
    ]
    return "|".join(parts)
