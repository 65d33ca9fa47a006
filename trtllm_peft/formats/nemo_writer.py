"""Writing a LoraAdapter as a NeMo 1.x `.nemo`, the file NeMo, TensorRT-LLM's NeMo loader and NIM read.

Decisions (each keeps B·A·scale of every module exactly):
- Layout: mcore keys, TP=1, PP=1, a plain tar with `./` members, as NeMo's `tar.add(dir, arcname=".")`.
- Variant: fused (`lora_kqv_adapter` re-interleaved per GQA group, `lora_hto4h_adapter` [gate; up]), which
  is what TensorRT-LLM and NIM read, when in every layer the q/k/v parts and the gate/up parts share one A;
  otherwise NeMo's "canonical" variant (one adapter per part), which keeps every A. One variant per file.
  Scales need not agree for fusing: when they differ they are folded into B (below).
- NeMo has one adapter_dim and one alpha per file. A module of smaller rank is zero-padded to the largest
  (zero rows of A, zero columns of B: the same B·A). If scales differ, each is folded into its B (in float32)
  and alpha = adapter_dim, i.e. scale 1.
- NeMo puts each target module on every selected layer: a part the adapter lacks (k of a q,v adapter, a
  layer without dense) is written as zeros, which add nothing. layer_selection (1-based) lists the layers
  that have weights when that is not all of them.
"""

from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path

import torch
import yaml

from trtllm_peft.errors import AdapterError, AdapterIncompatibleError
from trtllm_peft.formats.nemo_layout import (
    DENSE,
    FC2,
    FUSED_FC1,
    FUSED_QKV,
    UNFUSED_FC1,
    UNFUSED_QKV,
    geometry_of,
    key_of,
    qkv_to_nemo,
)
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec
from trtllm_peft.lora.modules import FUSED_PARTS

# NeMo target module -> (TensorRT-LLM modules in fused row order, fused adapter, per-part adapters)
TARGETS: dict[str, tuple[tuple[str, ...], str, dict[str, str]]] = {
    "attention_qkv": (("attn_q", "attn_k", "attn_v"), FUSED_QKV, UNFUSED_QKV),
    "attention_dense": (("attn_dense",), DENSE, {"attn_dense": DENSE}),
    "mlp_fc1": (("mlp_h_to_4h", "mlp_gate"), FUSED_FC1, UNFUSED_FC1),
    "mlp_fc2": (("mlp_4h_to_h",), FC2, {"mlp_4h_to_h": FC2}),
}
MODULES = {m for parts, _, _ in TARGETS.values() for m in parts}
PRECISION = {"float32": 32, "float16": 16, "bfloat16": "bf16"}

Parts = dict[tuple[int, str], LoraWeights]


def write(adapter: LoraAdapter, out: Path, spec: ModelSpec) -> list[Path]:
    """Write `out/<out.name>.nemo`; AdapterIncompatibleError when the adapter does not fit `spec`."""
    parts = _parts(adapter, spec)
    rank = max(w.rank for w in parts.values())
    scales = {w.scale for w in parts.values()}
    fold = len(scales) > 1
    alpha = float(rank) if fold else next(iter(scales)) * rank
    fused = all(
        _shares_a(parts, layer, mods)
        for layer in {lyr for lyr, _ in parts}
        for mods, _, _ in TARGETS.values()
    )
    targets = [t for t, (mods, _, _) in TARGETS.items() if any(m in mods for _, m in parts)]
    state = _state_dict(parts, spec, targets, rank, fold, fused)
    layers = sorted({layer for layer, _ in parts})
    tuning = {
        "variant": "nemo" if fused else "canonical",
        "target_modules": targets,
        "adapter_dim": rank,
        "alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "adapter_dropout": 0.0,
        "column_init_method": "xavier",
        "row_init_method": "zero",
        "layer_selection": None if layers == list(range(spec.num_layers)) else [x + 1 for x in layers],
        "weight_tying": False,
        "position_embedding_strategy": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{out.name}.nemo"
    others = sorted(p.name for p in out.glob("*.nemo") if p != path)
    if others:
        raise AdapterError(
            out, f"already holds {', '.join(others)}: a NeMo adapter directory has one .nemo file"
        )
    buf = io.BytesIO()
    torch.save(state, buf)
    config = yaml.safe_dump(_config(spec, adapter, tuning), sort_keys=False).encode()
    _write_tar(path, {"model_config.yaml": config, "model_weights.ckpt": buf.getvalue()})
    return [path]


def _parts(adapter: LoraAdapter, spec: ModelSpec) -> Parts:
    """The adapter as the seven unfused modules NeMo can hold, checked against `spec`."""
    out: Parts = {}
    problems: list[str] = []
    for (layer, module), w in adapter:
        if module in FUSED_PARTS:
            sizes = [spec.module_dims(p)[1] for p in FUSED_PARTS[module]]
            if w.out_features != sum(sizes):
                problems.append(
                    f"layer {layer} {module}: B has {w.out_features} rows, the model {sum(sizes)}"
                )
                continue
            split = zip(FUSED_PARTS[module], torch.split(w.b, sizes), strict=True)
            items = [(p, LoraWeights(a=w.a, b=b, scale=w.scale)) for p, b in split]
        elif module in MODULES:
            items = [(module, w)]
        else:
            problems.append(f"layer {layer} {module}: a NeMo LoRA has no adapter for this module")
            continue
        for m, part in items:
            if (layer, m) in out:
                problems.append(f"layer {layer} {m}: given twice (fused and unfused)")
            elif bad := _misfit(layer, m, part, spec):
                problems.append(bad)
            else:
                out[(layer, m)] = part
    if not out and not problems:
        problems.append("adapter has no LoRA weights")
    if problems:
        raise AdapterIncompatibleError(adapter.source or "adapter", problems)
    return out


def _misfit(layer: int, module: str, w: LoraWeights, spec: ModelSpec) -> str | None:
    want_in, want_out = spec.module_dims(module)
    if not 0 <= layer < spec.num_layers:
        return f"layer {layer} {module}: layer out of range [0, {spec.num_layers})"
    if w.a.ndim != 2 or w.b.ndim != 2 or w.rank == 0 or w.a.shape[0] != w.b.shape[1]:
        return f"layer {layer} {module}: A {list(w.a.shape)} and B {list(w.b.shape)} are not a LoRA pair"
    if w.in_features != want_in or w.out_features != want_out:
        return (
            f"layer {layer} {module}: A {list(w.a.shape)} B {list(w.b.shape)} do not fit the model "
            f"(expected [r, {want_in}] and [{want_out}, r])"
        )
    return None


def _shares_a(parts: Parts, layer: int, modules: tuple[str, ...]) -> bool:
    """Whether the parts of a fused target that this layer has all have one and the same A."""
    a = [parts[(layer, m)].a for m in modules if (layer, m) in parts]
    return all(x.shape == a[0].shape and torch.equal(x, a[0]) for x in a[1:])


def _state_dict(
    parts: Parts, spec: ModelSpec, targets: list[str], rank: int, fold: bool, fused: bool
) -> dict[str, torch.Tensor]:
    dtype = functools.reduce(torch.promote_types, (t.dtype for w in parts.values() for t in (w.a, w.b)))
    geom = geometry_of(spec)
    state = {}
    for layer in sorted({lyr for lyr, _ in parts}):
        for target in targets:
            modules, fused_name, unfused = TARGETS[target]
            a = {m: _padded_a(parts.get((layer, m)), m, spec, rank, dtype) for m in modules}  # [R, in]
            b = {m: _padded_b(parts.get((layer, m)), m, spec, rank, dtype, fold) for m in modules}  # [out, R]
            if fused and len(modules) > 1:
                present = [m for m in modules if (layer, m) in parts]
                b_fused = torch.cat([b[m] for m in modules])  # canonical [Q; K; V] or [gate; up]
                if fused_name == FUSED_QKV:
                    b_fused = qkv_to_nemo(b_fused, geom)
                shared = a[present[0]] if present else a[modules[0]]
                state.update(_pair(layer, fused_name, shared, b_fused))
            else:
                for m in modules:
                    state.update(_pair(layer, unfused[m], a[m], b[m]))
    return state


def _padded_a(
    w: LoraWeights | None, module: str, spec: ModelSpec, rank: int, dtype: torch.dtype
) -> torch.Tensor:
    d_in = spec.module_dims(module)[0]
    if w is None:
        return torch.zeros(rank, d_in, dtype=dtype)
    return torch.cat([w.a.to(dtype), torch.zeros(rank - w.rank, d_in, dtype=dtype)])


def _padded_b(
    w: LoraWeights | None, module: str, spec: ModelSpec, rank: int, dtype: torch.dtype, fold: bool
) -> torch.Tensor:
    d_out = spec.module_dims(module)[1]
    if w is None:
        return torch.zeros(d_out, rank, dtype=dtype)
    b = w.scaled_b(dtype) if fold else w.b.to(dtype)
    return torch.cat([b, torch.zeros(d_out, rank - w.rank, dtype=dtype)], dim=1)


def _pair(layer: int, adapter: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    # clone: a view would make torch.save store its whole underlying storage
    return {
        key_of(layer, adapter, "linear_in"): a.contiguous().clone(),
        key_of(layer, adapter, "linear_out"): b.contiguous().clone(),
    }


def _config(spec: ModelSpec, adapter: LoraAdapter, tuning: dict) -> dict:
    """model_config.yaml: the geometry NeMo (and our reader) needs, and the peft section."""
    return {
        "mcore_gpt": True,
        "restore_from_path": adapter.base_model,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_query_groups": spec.num_kv_heads,
        "kv_channels": spec.head_dim,
        "activation": "fast-swiglu",
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "megatron_amp_O2": False,
        "precision": PRECISION[spec.dtype],
        "peft": {"peft_scheme": "lora", "restore_from_path": None, "lora_tuning": tuning},
    }


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A plain tar with a `.` entry and `./name` members; written aside and renamed, so readers never see half."""
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w:") as tar:
        root = tarfile.TarInfo(".")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(root)
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)
