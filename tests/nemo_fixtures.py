"""Build NeMo 1.x `.nemo` LoRA archives exactly as NeMo lays them out, without our writer.

Only torch.save + tarfile + yaml, following /work/shared/reference/formats.md §2 and NeMo's source:
members `./model_config.yaml` + `./model_weights.ckpt` (or per-rank `mp_rank_XX/`, `tp_rank_XX_pp_rank_YYY/`),
keys `model.decoder.layers.N.<block>.adapter_layer.<adapter>.linear_{in,out}.weight`. The fused layouts and
their Hugging Face equivalents are written here with explicit per-head loops, deliberately not with the
reshapes the loader uses, so that a wrong loader cannot agree with them by construction.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import torch
import yaml

from trtllm_peft.lora import LoraAdapter, LoraWeights

# The tiny Llama of conftest.TINY_LLAMA in NeMo's vocabulary: 4 heads in 2 query groups, head_dim 8.
TINY_GEOMETRY = {
    "num_layers": 3,
    "hidden_size": 32,
    "ffn_hidden_size": 48,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "kv_channels": 8,
    "activation": "fast-swiglu",
}
ALL_TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")

# NeMo target -> adapters it creates, per variant (peft_config.py LoraPEFTConfig), each with its block.
ADAPTERS = {
    ("attention_qkv", "nemo"): ["lora_kqv_adapter"],
    ("attention_qkv", "canonical"): [f"lora_unfused_kqv_adapter.{p}_adapter" for p in "qkv"],
    ("attention_dense", "nemo"): ["lora_dense_attention_adapter"],
    ("mlp_fc1", "nemo"): ["lora_hto4h_adapter"],
    ("mlp_fc1", "canonical"): [
        "lora_unfused_hto4h_adapter.gate_adapter",
        "lora_unfused_hto4h_adapter.up_adapter",
    ],
    ("mlp_fc2", "nemo"): ["lora_4htoh_adapter"],
}
KEY_PREFIX = {
    "mcore": "model.decoder.layers.",
    "legacy": "model.language_model.encoder.layers.",
    "o2": "model.module.decoder.layers.",
}

NemoWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, adapter) -> (in, out)


def adapters_for(targets, variant: str) -> list[str]:
    return [a for t in targets for a in ADAPTERS.get((t, variant), ADAPTERS[(t, "nemo")])]


def adapter_dims(adapter: str, geo: dict) -> tuple[int, int]:
    """(in, out) of one NeMo adapter (peft_config.py), for the gated Llama-style geometry."""
    h, d = geo["hidden_size"], geo["kv_channels"] or geo["hidden_size"] // geo["num_attention_heads"]
    heads, groups = geo["num_attention_heads"], geo["num_query_groups"] or geo["num_attention_heads"]
    f = geo["ffn_hidden_size"]
    gated = geo["activation"].endswith("glu")
    return {
        "lora_kqv_adapter": (h, (heads + 2 * groups) * d),
        "lora_unfused_kqv_adapter.q_adapter": (h, heads * d),
        "lora_unfused_kqv_adapter.k_adapter": (h, groups * d),
        "lora_unfused_kqv_adapter.v_adapter": (h, groups * d),
        "lora_dense_attention_adapter": (heads * d, h),
        "lora_hto4h_adapter": (h, 2 * f if gated else f),
        "lora_unfused_hto4h_adapter.gate_adapter": (h, f),
        "lora_unfused_hto4h_adapter.up_adapter": (h, f),
        "lora_4htoh_adapter": (f, h),
    }[adapter]


def random_nemo_lora(
    geo: dict = TINY_GEOMETRY,
    *,
    r: int = 4,
    layers=None,
    targets=ALL_TARGETS,
    variant: str = "nemo",
    seed: int = 0,
) -> NemoWeights:
    """Random non-zero linear_in [r, in] / linear_out [out, r] for every (layer, adapter)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(geo["num_layers"]) if layers is None else layers:
        for adapter in adapters_for(targets, variant):
            d_in, d_out = adapter_dims(adapter, geo)
            out[(layer, adapter)] = (
                torch.randn(r, d_in, generator=gen),
                torch.randn(d_out, r, generator=gen) * 0.1,
            )
    return out


def state_dict(weights: NemoWeights, style: str = "mcore") -> dict[str, torch.Tensor]:
    """NeMo state-dict keys for `weights` (mcore, legacy `language_model.encoder`, or O2 `model.module.`)."""
    out = {}
    for (layer, adapter), (a, b) in weights.items():
        block = "self_attention" if "kqv" in adapter or "dense" in adapter else "mlp"
        stem = f"{KEY_PREFIX[style]}{layer}.{block}.adapter_layer.{adapter}"
        out[f"{stem}.linear_in.weight"] = a
        out[f"{stem}.linear_out.weight"] = b
    return out


def model_config(
    geo: dict = TINY_GEOMETRY,
    *,
    r: int = 4,
    alpha=None,
    variant: str = "nemo",
    targets=ALL_TARGETS,
    layer_selection=None,
    scheme: str = "lora",
    tp: int = 1,
    pp: int = 1,
    **extra,
) -> dict:
    """model_config.yaml as NeMo's megatron_gpt_finetuning saves it (resolved: alpha is a number or absent)."""
    tuning = {
        "variant": variant,
        "target_modules": list(targets),
        "adapter_dim": r,
        "adapter_dropout": 0.0,
        "column_init_method": "xavier",
        "row_init_method": "zero",
        "layer_selection": layer_selection,
        "weight_tying": False,
        "position_embedding_strategy": None,
    }
    if alpha is not None:
        tuning["alpha"] = alpha
    cfg = {
        "mcore_gpt": True,
        "precision": "bf16",
        "megatron_amp_O2": False,
        **geo,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "restore_from_path": "/models/base.nemo",
        "peft": {"peft_scheme": scheme, "restore_from_path": None, "lora_tuning": tuning},
    }
    cfg.update(extra)
    return cfg


def write_nemo(
    directory: Path,
    config: dict | None,
    checkpoints: dict[str, object],
    *,
    name: str = "adapter.nemo",
    dot_slash: bool = True,
    gzip: bool = False,
) -> Path:
    """Write `directory/name`: a tar (gzip if asked) of model_config.yaml and torch.save()d checkpoints.

    `checkpoints` maps a member path (`model_weights.ckpt`, `mp_rank_01/model_weights.ckpt`) to what is
    torch.save()d there. With `dot_slash`, members are `./…` plus directory entries, as NeMo's
    `tar.add(dir, arcname=".")` writes them; otherwise bare names.
    """
    directory.mkdir(parents=True, exist_ok=True)
    members: dict[str, bytes] = {}
    if config is not None:
        members["model_config.yaml"] = yaml.safe_dump(config).encode()
    for member, obj in checkpoints.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        members[member] = buf.getvalue()
    path = directory / name
    prefix = "./" if dot_slash else ""
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        dirs = sorted({str(Path(m).parent) for m in members} - {"."})
        for d in (["."] if dot_slash else []) + [prefix + d for d in dirs]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for member, data in members.items():
            info = tarfile.TarInfo(prefix + member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tp_shards(state: dict[str, torch.Tensor], tp: int, gated: bool = True) -> list[dict[str, torch.Tensor]]:
    """Split a full state dict into TP ranks as NeMo's parallel layers hold it (formats.md §2.6).

    linear_in: ColumnParallelLinear splits its rows (rank), but RowParallelLinear (dense, fc2) its columns;
    linear_out: rows. Gated fc1's rows: each rank holds its slice of gate, then its slice of up.
    """
    shards = [{} for _ in range(tp)]
    for key, t in state.items():
        row_parallel = "lora_dense_attention_adapter" in key or "lora_4htoh_adapter" in key
        if key.endswith("linear_in.weight"):
            pieces = t.chunk(tp, dim=1 if row_parallel else 0)
        elif "lora_hto4h_adapter" in key and gated:
            gate, up = t[: t.shape[0] // 2], t[t.shape[0] // 2 :]
            pieces = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
        else:
            pieces = t.chunk(tp, dim=0)
        for rank in range(tp):
            shards[rank][key] = pieces[rank].clone()
    return shards


def pipeline_chunks(state: dict[str, torch.Tensor], num_layers: int, pp: int, vpp: int = 1) -> dict:
    """{(pp rank, vpp chunk): state with local layer numbers}: stage p, chunk c holds global layers
    c*(L/vpp) + p*(L/pp/vpp) … (megatron.core _get_layer_offset), numbered from 0 in each chunk."""
    per_chunk = num_layers // pp // vpp
    out: dict[tuple[int, int], dict] = {(p, c): {} for p in range(pp) for c in range(vpp)}
    for key, t in state.items():
        head, rest = key.split(".layers.", 1)
        layer, tail = rest.split(".", 1)
        global_layer = int(layer)
        chunk, within = divmod(global_layer, num_layers // vpp)
        stage, local = divmod(within, per_chunk)
        out[(stage, chunk)][f"{head}.layers.{local}.{tail}"] = t
    return out


def split_fused_qkv(b: torch.Tensor, geo: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v rows of NeMo's fused QKV linear_out, picked by hand: per group, its query heads, then one key
    head, then one value head (Megatron's mixed_qkv layout; NeMo's lora_converter.py slices)."""
    d = geo["kv_channels"] or geo["hidden_size"] // geo["num_attention_heads"]
    heads, groups = geo["num_attention_heads"], geo["num_query_groups"] or geo["num_attention_heads"]
    per_group = heads // groups
    q_rows, k_rows, v_rows = [], [], []
    for g in range(groups):
        start = g * (per_group + 2) * d
        for j in range(per_group):  # query head g*per_group + j
            q_rows += range(start + j * d, start + (j + 1) * d)
        k_rows += range(start + per_group * d, start + (per_group + 1) * d)
        v_rows += range(start + (per_group + 1) * d, start + (per_group + 2) * d)
    return b[q_rows], b[k_rows], b[v_rows]


def hf_equivalent(weights: NemoWeights, geo: dict = TINY_GEOMETRY) -> dict[tuple[int, str], tuple]:
    """The same LoRA as per-module (A, B) of a Hugging Face Llama, keyed by TensorRT-LLM module name."""
    names = {
        "lora_dense_attention_adapter": "attn_dense",
        "lora_4htoh_adapter": "mlp_4h_to_h",
        "lora_unfused_kqv_adapter.q_adapter": "attn_q",
        "lora_unfused_kqv_adapter.k_adapter": "attn_k",
        "lora_unfused_kqv_adapter.v_adapter": "attn_v",
        "lora_unfused_hto4h_adapter.gate_adapter": "mlp_h_to_4h",
        "lora_unfused_hto4h_adapter.up_adapter": "mlp_gate",
    }
    out = {}
    for (layer, adapter), (a, b) in weights.items():
        if adapter == "lora_kqv_adapter":
            for module, part in zip(("attn_q", "attn_k", "attn_v"), split_fused_qkv(b, geo), strict=True):
                out[(layer, module)] = (a, part)
        elif adapter == "lora_hto4h_adapter" and geo["activation"].endswith("glu"):
            f = geo["ffn_hidden_size"]
            out[(layer, "mlp_h_to_4h")] = (a, b[:f])  # gate_proj: the activated half
            out[(layer, "mlp_gate")] = (a, b[f:])  # up_proj
        elif adapter == "lora_hto4h_adapter":
            out[(layer, "mlp_h_to_4h")] = (a, b)
        else:
            out[(layer, names[adapter])] = (a, b)
    return out


class RunsCode:
    """Pickles into a call of os.mkdir(marker): loaded without weights_only, it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---- checking what our reader and writer give ----------------------------------------------------------

QKV_SIZES = {"attn_q": 32, "attn_k": 16, "attn_v": 16}  # tiny Llama: 4 heads, 2 kv heads, head_dim 8


def canonical_deltas(adapter: LoraAdapter, sizes=QKV_SIZES) -> dict[tuple[int, str], torch.Tensor]:
    """scale·B·A per (layer, module), the canonical attn_qkv [Q; K; V] read as its three parts."""
    out = {}
    for (layer, module), w in adapter:
        if module == "attn_qkv":
            for part, b in zip(sizes, w.b.split(list(sizes.values())), strict=True):
                out[(layer, part)] = LoraWeights(w.a, b, w.scale).delta()
        else:
            out[(layer, module)] = w.delta()
    return out


def expected_deltas(weights, scale: float, geo=TINY_GEOMETRY) -> dict[tuple[int, str], torch.Tensor]:
    return {k: (b.double() @ a.double()) * scale for k, (a, b) in hf_equivalent(weights, geo).items()}


def assert_same_deltas(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


def write_fixture(directory, weights, *, style="mcore", **config):
    return write_nemo(directory, model_config(**config), {"model_weights.ckpt": state_dict(weights, style)})
