"""NeMo 1.x `.nemo` LoRA adapters: a directory holding one `.nemo` archive.

The archive is a tar (plain since NeMo 1.7, gzip before; members `./name` or `name`) holding
`model_config.yaml` and `model_weights.ckpt` (a torch.save of `{key: tensor}`), or one checkpoint per
tensor/pipeline-parallel rank (`mp_rank_XX/`, `tp_rank_XX_pp_rank_YYY/`). Nothing is extracted to disk;
weights are unpickled with weights_only=True. Shards are merged back into full tensors, fused QKV is
de-interleaved into canonical `attn_qkv` [Q; K; V] rows, fused fc1 `[gate; up]` becomes `mlp_h_to_4h`
and `mlp_gate` sharing A, and scale = alpha / adapter_dim. Layout rules: nemo_layout.py; writing:
nemo_writer.py; sources: /work/shared/reference/formats.md §2.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from trtllm_peft.errors import AdapterFormatError, AdapterIncompatibleError
from trtllm_peft.formats import safe_io
from trtllm_peft.formats.limits import ReadLimits
from trtllm_peft.formats.nemo_config import (
    CONFIG_MEMBER,
    MAX_PARALLEL,
    LoraSettings,
    geometry,
    lora_settings,
    parallel_size,
    spec_disagreements,
)
from trtllm_peft.formats.nemo_layout import (
    FUSED_FC1,
    FUSED_QKV,
    LORA_ADAPTERS,
    Entry,
    Geometry,
    layer_offset,
    merge_tp,
    parse_key,
    qkv_from_nemo,
    vpp_chunks,
)
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec

NEMO2_MARKER = Path("weights") / "adapter_metadata.json"
WEIGHTS_MEMBER = "model_weights.ckpt"
# NeMo 1.x's LoRA checkpoints (peft_scheme lora/qlora: linear_in / linear_out per adapter) have no place for
# a magnitude vector; NeMo's DoRA is NeMo 2's nemo.collections.llm.peft.DoRA, whose checkpoints are exported to
# Hugging Face PEFT adapters (export_lora), the format that carries it here.
DORA_REFUSAL = (
    "DoRA adapters cannot be written as NeMo 1.x .nemo LoRA: that format has no DoRA magnitude "
    "(NeMo's DoRA is NeMo 2's, exported as Hugging Face PEFT); write --to hf or --to trtllm"
)
MAX_LISTED = 8  # distinct key problems listed before "… and N more" (a full-model .nemo has thousands)
MAX_CONFIG_BYTES = 4 << 20  # model_config.yaml of a real NeMo model is ~10 KB


def detect(path: Path) -> bool:
    """A directory with a `.nemo` file (or a NeMo 2 checkpoint, so that load() can say what to do with it)."""
    return path.is_dir() and (any(path.glob("*.nemo")) or (path / NEMO2_MARKER).is_file())


def load(path: Path, spec: ModelSpec | None = None) -> LoraAdapter:
    """Read the `.nemo` LoRA in directory `path` (or the `.nemo` file itself).

    Geometry comes from model_config.yaml, falling back to `spec`; when `spec` is given, every geometry
    disagreement is raised as AdapterIncompatibleError. Format problems are AdapterFormatError, all at once.
    """
    nemo_file = find_nemo_file(Path(path))
    config, shards, sizes = _read_archive(nemo_file, ReadLimits.for_spec(spec))
    problems: list[str] = []
    lora = lora_settings(config, problems)
    geom = geometry(config, spec, problems)
    if geom is None:
        raise AdapterFormatError(nemo_file, problems)
    entries = _merge_shards(shards, sizes, geom, problems)
    weights = _to_lora(entries, geom, lora, problems)
    _check_layers(weights, geom, lora, problems)
    if problems:
        raise AdapterFormatError(nemo_file, problems)
    if spec is not None and (mismatch := spec_disagreements(geom, spec)):
        raise AdapterIncompatibleError(nemo_file, mismatch)
    base = config.get("restore_from_path")
    return LoraAdapter(
        weights=weights,
        format="nemo",
        source=str(nemo_file),
        base_model=base if isinstance(base, str) else None,
        meta={"nemo": {**asdict(lora), "tensor_parallel": sizes[0], "pipeline_parallel": sizes[1]}},
    )


def save(adapter: LoraAdapter, out: Path, spec: ModelSpec) -> list[Path]:
    """Write `out/<out.name>.nemo` (see nemo_writer.write). DoRA adapters are refused: see DORA_REFUSAL."""
    from trtllm_peft.formats.nemo_writer import write

    if adapter.is_dora:
        raise AdapterFormatError(out, DORA_REFUSAL)
    return write(adapter, Path(out), spec)


# --- the archive ---------------------------------------------------------------------------------


def find_nemo_file(path: Path) -> Path:
    """The one `.nemo` file of an adapter directory; a precise error for none, several, or NeMo 2."""
    if path.is_file() and path.suffix == ".nemo":
        return path
    if (path / NEMO2_MARKER).is_file():
        hint = (
            " (its hf_adapter/ sub-directory already is one: point at that)"
            if (path / "hf_adapter" / "adapter_config.json").is_file()
            else ""
        )
        raise AdapterFormatError(
            path,
            "is a NeMo 2 PEFT checkpoint (weights/adapter_metadata.json), which cannot "
            "be served directly: export it to a Hugging Face PEFT adapter first with "
            f"nemo.collections.llm.peft.export_lora{hint}",
        )
    found = sorted(p.name for p in path.glob("*.nemo")) if path.is_dir() else []
    if not found:
        raise AdapterFormatError(path, "no .nemo file in the directory")
    if len(found) > 1:
        raise AdapterFormatError(
            path, f"{len(found)} .nemo files ({', '.join(found)}): keep one adapter per directory"
        )
    return path / found[0]


def _shard_members(tp_size: int, pp_size: int) -> list[tuple[int, int, str]]:
    """Member names NeMo gives the checkpoints of a (TP, PP) grid (nemo.utils.model_utils.inject_model_parallel_rank)."""
    if tp_size == pp_size == 1:
        return [(0, 0, WEIGHTS_MEMBER)]
    if pp_size == 1:
        return [(tp, 0, f"mp_rank_{tp:02d}/{WEIGHTS_MEMBER}") for tp in range(tp_size)]
    return [
        (tp, pp, f"tp_rank_{tp:02d}_pp_rank_{pp:03d}/{WEIGHTS_MEMBER}")
        for pp in range(pp_size)
        for tp in range(tp_size)
    ]


def _read_archive(
    nemo_file: Path, limits: ReadLimits
) -> tuple[dict, dict[tuple[int, int], dict], tuple[int, int]]:
    """(config, {(tp, pp): state dict}, (tp_size, pp_size)); every missing or unreadable member at once.

    The archive is indexed from its headers first (bounded: safe_io.tar_index); the shard grid the config
    names must be the checkpoints the archive holds, so its size is bounded by the file's own members."""
    problems: list[str] = []
    limits.check_file(nemo_file)
    with safe_io.open_tar(nemo_file) as tar:
        try:
            index = safe_io.tar_index(tar, nemo_file, limits)
            config = _read_config(tar, index, problems)
            sizes = (
                parallel_size(config, "tensor_model_parallel_size", problems),
                parallel_size(config, "pipeline_model_parallel_size", problems),
            )
            if grid := _grid_problem(index, sizes):
                raise AdapterFormatError(nemo_file, problems + [grid])
            shards, missing = {}, 0
            for tp, pp, name in _shard_members(*sizes):
                info = index.get(name)
                if info is None:
                    missing += 1
                    if missing <= MAX_LISTED:
                        problems.append(f"{name} is not in the archive{_layout_hint(index, sizes)}")
                    continue
                data = safe_io.read_member(tar, info, limits.file_bytes)
                shards[(tp, pp)] = safe_io.torch_load_bytes(data, f"{nemo_file}:{name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise AdapterFormatError(
                nemo_file, f"corrupt or truncated .nemo archive ({type(e).__name__})"
            ) from None
    if missing > MAX_LISTED:
        problems.append(f"… and {missing - MAX_LISTED} more checkpoints the grid names are missing")
    if problems:
        raise AdapterFormatError(nemo_file, problems)
    return config, shards, sizes


def _checkpoints(index: dict[str, tarfile.TarInfo]) -> list[str]:
    return sorted(name for name in index if name.endswith(WEIGHTS_MEMBER))


def _grid_problem(index: dict[str, tarfile.TarInfo], sizes: tuple[int, int]) -> str | None:
    """A TP x PP grid larger than any real model's, checked before its member names are listed."""
    if sizes[0] * sizes[1] <= MAX_PARALLEL:
        return None
    return (
        f"model_config.yaml says tensor_model_parallel_size {sizes[0]} x pipeline_model_parallel_size "
        f"{sizes[1]} = {sizes[0] * sizes[1]} shards (more than {MAX_PARALLEL}), but the archive holds "
        f"{len(_checkpoints(index))} {WEIGHTS_MEMBER} files"
    )


def _layout_hint(index: dict[str, tarfile.TarInfo], sizes: tuple[int, int]) -> str:
    ckpts = _checkpoints(index)[:MAX_LISTED]
    said = f"model_config.yaml says tensor_model_parallel_size {sizes[0]}, pipeline_model_parallel_size {sizes[1]}"
    return f" ({said}; the archive holds {ckpts or 'no checkpoint'})"


def _read_config(tar: tarfile.TarFile, index: dict[str, tarfile.TarInfo], problems: list[str]) -> dict:
    info = index.get(CONFIG_MEMBER)
    if info is None:
        problems.append(f"{CONFIG_MEMBER} is not in the archive (not a NeMo .nemo file?)")
        return {}
    try:
        config = yaml.safe_load(safe_io.read_member(tar, info, MAX_CONFIG_BYTES))
    except RecursionError:
        problems.append(f"{CONFIG_MEMBER} is nested too deeply to be a model config")
        return {}
    except yaml.YAMLError as e:
        problems.append(f"{CONFIG_MEMBER} is not valid YAML ({str(e).splitlines()[0]})")
        return {}
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_MEMBER} is not a mapping")
        return {}
    return config


# --- tensors -------------------------------------------------------------------------------------


def _merge_shards(
    shards: dict, sizes: tuple[int, int], geom: Geometry, problems: list[str]
) -> dict[Entry, torch.Tensor]:
    """Every shard's tensors under global layer numbers, TP shards joined into full tensors."""
    tp_size, pp_size = sizes
    per_rank: dict[Entry, dict[int, torch.Tensor]] = {}
    key_problems: dict[str, int] = {}
    for (tp, pp), state in sorted(shards.items()):
        chunks = vpp_chunks(state)
        if chunks is None:
            problems.append(
                f"shard tp {tp} pp {pp}: mixes virtual-pipeline chunks (model_N) with other entries"
            )
            continue
        vpp_size = len(chunks)
        if geom.num_layers % (pp_size * vpp_size) or [c for c, _ in chunks] != list(range(vpp_size)):
            problems.append(
                f"cannot place layers: {geom.num_layers} layers over {pp_size} pipeline stages x "
                f"{vpp_size} virtual chunks {[c for c, _ in chunks]}"
            )
            continue
        for chunk, state_dict in chunks:
            offset = layer_offset(geom.num_layers, pp, pp_size, chunk, vpp_size)
            for key, tensor in state_dict.items():
                parsed = parse_key(str(key))
                if isinstance(parsed, str) or not isinstance(tensor, torch.Tensor):
                    msg = (
                        parsed
                        if isinstance(parsed, str)
                        else f"{key!r} is a {type(tensor).__name__}, not a tensor"
                    )
                    key_problems[msg] = key_problems.get(msg, 0) + 1
                    continue
                layer, adapter, param = parsed
                per_rank.setdefault((layer + offset, adapter, param), {})[tp] = tensor
    problems.extend(_grouped(key_problems))
    return _join_tp(per_rank, tp_size, geom, problems)


def _grouped(counts: dict[str, int]) -> list[str]:
    out = [f"{m} ({n} tensors)" if n > 1 else m for m, n in list(counts.items())[:MAX_LISTED]]
    if len(counts) > MAX_LISTED:
        out.append(f"… and {len(counts) - MAX_LISTED} more unexpected keys")
    return out


def _join_tp(
    per_rank: dict[Entry, dict[int, torch.Tensor]], tp_size: int, geom: Geometry, problems: list[str]
) -> dict[Entry, torch.Tensor]:
    merged = {}
    for (layer, adapter, param), ranks in sorted(per_rank.items()):
        where = f"layer {layer} {adapter}.{param}"
        if sorted(ranks) != list(range(tp_size)):
            problems.append(f"{where}: present in tensor-parallel ranks {sorted(ranks)} of {tp_size}")
            continue
        parts = [ranks[t] for t in range(tp_size)]
        if any(p.ndim != 2 or not p.is_floating_point() for p in parts):
            problems.append(
                f"{where}: expected 2-D floating-point tensors, got {[tuple(p.shape) for p in parts]}"
            )
            continue
        if (
            adapter == FUSED_FC1
            and geom.gated
            and param == "linear_out"
            and any(p.shape[0] % 2 for p in parts)
        ):
            problems.append(
                f"{where}: gated fc1 rows {[p.shape[0] for p in parts]} cannot be halved into gate; up"
            )
            continue
        try:
            merged[(layer, adapter, param)] = merge_tp(adapter, param, parts, geom.gated)
        except RuntimeError:
            problems.append(
                f"{where}: tensor-parallel shards {[tuple(p.shape) for p in parts]} do not fit together"
            )
    return merged


def _to_lora(
    entries: dict[Entry, torch.Tensor], geom: Geometry, lora: LoraSettings, problems: list[str]
) -> dict[tuple[int, str], LoraWeights]:
    """(layer, TensorRT-LLM module) -> LoraWeights, fused adapters split into canonical modules."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for (layer, adapter, param), t in entries.items():
        pairs.setdefault((layer, adapter), {})[param] = t
    out: dict[tuple[int, str], LoraWeights] = {}
    for (layer, adapter), p in sorted(pairs.items()):
        where = f"layer {layer} {adapter}"
        missing = [n for n in ("linear_in", "linear_out") if n not in p]
        if missing:
            problems.append(f"{where}: {missing[0]}.weight is missing")
            continue
        a, b = p["linear_in"], p["linear_out"]  # [r, in], [out, r]
        if bad := _shape_problem(adapter, a, b, geom, lora.adapter_dim):
            problems.append(f"{where}: {bad}")
            continue
        dim = lora.adapter_dim or a.shape[0]
        scale = (lora.alpha if lora.alpha is not None else dim) / dim
        out.update(
            {(layer, m): LoraWeights(a=a, b=part, scale=scale) for m, part in _split(adapter, b, geom)}
        )
    return out


def _shape_problem(
    adapter: str, a: torch.Tensor, b: torch.Tensor, geom: Geometry, dim: int | None
) -> str | None:
    if a.shape[0] != b.shape[1]:
        return f"linear_in {list(a.shape)} and linear_out {list(b.shape)} have different ranks"
    if dim is not None and a.shape[0] != dim:
        return f"rank {a.shape[0]} but peft.lora_tuning.adapter_dim is {dim}"
    want_in, want_out = geom.dims(adapter)
    if a.shape[1] != want_in or (want_out is not None and b.shape[0] != want_out):
        return (
            f"linear_in {list(a.shape)} / linear_out {list(b.shape)} do not fit the model (expected "
            f"[r, {want_in}] / [{want_out or 'out'}, r])"
        )
    return None


def _split(adapter: str, b: torch.Tensor, geom: Geometry) -> list[tuple[str, torch.Tensor]]:
    """B of one NeMo adapter as (TensorRT-LLM module, B) pairs."""
    module = LORA_ADAPTERS[adapter][1]
    if adapter == FUSED_QKV:
        return [("attn_qkv", qkv_from_nemo(b, geom))]
    if adapter == FUSED_FC1:
        if not geom.gated:
            return [("mlp_h_to_4h", b)]
        gate, up = b.chunk(2, dim=0)  # Megatron's GLU: act(first half) * second half
        return [("mlp_h_to_4h", gate.contiguous()), ("mlp_gate", up.contiguous())]
    return [(module, b)]


def _check_layers(
    weights: dict[tuple[int, str], LoraWeights], geom: Geometry, lora: LoraSettings, problems: list[str]
) -> None:
    """Weights must sit exactly on the layers layer_selection (1-based) names, or on every layer."""
    selection = lora.layer_selection
    if selection and (bad := sorted(x for x in selection if x > geom.num_layers)):
        problems.append(
            f"peft.lora_tuning.layer_selection {selection} names layers {bad} of a {geom.num_layers}-"
            "layer model (it is 1-based)"
        )
    expected = {x - 1 for x in selection} if selection else set(range(geom.num_layers))
    per_module: dict[str, set[int]] = {}
    for layer, module in weights:
        per_module.setdefault(module, set()).add(layer)
    said = f"layer_selection {selection} (1-based)" if selection else f"all {geom.num_layers} layers"
    for module, layers in sorted(per_module.items()):
        if extra := sorted(layers - expected):
            problems.append(f"{module}: weights for layers {extra} (0-based), outside {said}")
        if missing := sorted(expected - layers):
            problems.append(f"{module}: no weights for layers {missing} (0-based), although {said}")
    if not weights and not problems:
        problems.append(f"{WEIGHTS_MEMBER} holds no LoRA weights")
