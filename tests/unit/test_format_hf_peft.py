"""Hugging Face PEFT adapters. PEFT is the oracle: it makes the files, its merged weights are the math we must
reproduce, and its `PeftModel.from_pretrained` is the judge of what we write.

Every case is a real adapter made by peft on the tiny Llama of conftest (no downloads), sometimes rewritten
the way other tools write them (no key prefix, `.default.` infix, hand-written configs).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    edit_peft_config,
    make_peft_adapter,
    rekey_peft_tensors,
    rewrite_peft_tensors,
    tiny_llama_model,
)
from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats import hf_peft
from trtllm_peft.lora import LoraAdapter, LoraWeights, pack, unpack, validate
from trtllm_peft.lora.modules import HF_TO_TRTLLM

SAFE = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _peft_oracle(model) -> tuple[dict, dict]:
    """PEFT's own view of its model: {key: (A, B, scaling)} and {key: W_merged - W_base} (float64)."""
    from peft.tuners.lora import LoraLayer

    parts = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            short = name.removeprefix("base_model.model.")  # model.layers.0.self_attn.q_proj
            key = (int(short.split(".")[2]), HF_TO_TRTLLM[short.rsplit(".", 1)[1]])
            parts[key] = (
                short,
                mod.lora_A["default"].weight,
                mod.lora_B["default"].weight,
                mod.scaling["default"],
            )
    dtype = model.base_model.model.lm_head.weight.dtype
    base = dict(tiny_llama_model().to(dtype).named_parameters())  # the same seed make_peft_adapter used
    merged = model.merge_and_unload()
    deltas = {
        key: merged.get_submodule(short).weight.detach().double() - base[f"{short}.weight"].detach().double()
        for key, (short, *_) in parts.items()
    }
    return {k: tuple(v[1:]) for k, v in parts.items()}, deltas


def _our_deltas(adapter: LoraAdapter, spec) -> dict:
    """Deltas after the trip through TensorRT-LLM's rows: pack in float32, unpack, B·A in float64."""
    packed = pack(adapter, torch.float32)
    return {key: w.delta() for key, w in unpack(packed.weights, packed.config, spec)}


def _assert_same_math(ours: dict, theirs: dict, tol: float) -> None:
    assert set(ours) == set(theirs), (
        f"modules differ: ours only {set(ours) - set(theirs)}, PEFT only {set(theirs) - set(ours)}"
    )
    gen = torch.Generator().manual_seed(0)
    for key, delta in theirs.items():
        x = torch.randn(5, delta.shape[1], generator=gen, dtype=torch.float64)  # [batch, in]
        want, got = x @ delta.T, x @ ours[key].T  # [batch, out]
        assert want.abs().max() > 0, key
        torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()), msg=str(key))


# --------------------------------------------------------------------------------- the math, PEFT as oracle


def _to_dtype(dtype):
    def post(d: Path, model):
        model.to(dtype)
        shutil.rmtree(d)
        model.save_pretrained(str(d))

    return post


def _config_post(**changes):
    return lambda d, model: edit_peft_config(d, **changes)


def _keys_post(fn):
    return lambda d, model: rekey_peft_tensors(fn)(d)


def _legacy_post(d: Path, model) -> None:
    """A raw state_dict() save (`.default.` infix) with a config from old PEFT and a future one."""
    rekey_peft_tensors(
        lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    )(d)
    edit_peft_config(d, enable_lora=None, merge_weights=False, some_future_key={"x": 1}, runtime_config={})


MATH_CASES = [
    # (id, LoraConfig kwargs, post-processing of the saved dir, tolerance relative to the output)
    ("defaults", {}, None, 1e-6),
    ("rslora", {"use_rslora": True, "r": 8, "lora_alpha": 4}, None, 1e-6),
    (
        "rank-and-alpha-patterns",
        {
            "r": 4,
            # keys in sorted order (PEFT writes them sorted); overlapping keys: the first match wins
            "rank_pattern": {
                r"layers\.0\.self_attn\.q_proj": 2,
                "model.layers.1.mlp.down_proj": 3,
                "q_proj": 8,
            },
            "alpha_pattern": {
                r".*\.1\.self_attn\.k_proj": 7,
                "model.layers.0.mlp.up_proj": 5.5,
                "proj": 99,
                "v_proj": 3,
            },
        },
        None,
        1e-6,
    ),
    (
        "rslora-with-patterns",
        {"use_rslora": True, "r": 4, "rank_pattern": {"gate_proj": 9}, "alpha_pattern": {"o_proj": 2}},
        None,
        1e-6,
    ),
    (
        "regex-targets",
        {"target_modules": r".*\.layers\.[02]\.(self_attn\.(q|v)_proj|mlp\.down_proj)"},
        None,
        1e-6,
    ),
    ("all-linear-as-saved", {"target_modules": "all-linear"}, None, 1e-6),
    (
        "all-linear-in-config",
        {"target_modules": "all-linear"},
        _config_post(target_modules="all-linear"),
        1e-6,
    ),
    ("subset", {"target_modules": ["q_proj", "v_proj"]}, None, 1e-6),
    ("exclude-modules", {"exclude_modules": r".*layers\.1\.mlp\..*"}, None, 1e-6),
    ("layers-to-transform", {"layers_to_transform": [0, 2], "layers_pattern": "layers"}, None, 1e-6),
    ("one-layer-as-int", {"layers_to_transform": 1}, None, 1e-6),
    ("bin", {"safe_serialization": False}, None, 1e-6),
    ("no-prefix", {}, _keys_post(lambda k: k.removeprefix("base_model.model.")), 1e-6),
    ("default-infix-legacy-keys", {}, _legacy_post, 1e-6),
    ("float-alpha", {"lora_alpha": 12.5}, None, 1e-6),
    ("bf16", {"rank_pattern": {"q_proj": 6}}, _to_dtype(torch.bfloat16), 2e-2),
    ("fp16", {"use_rslora": True}, _to_dtype(torch.float16), 2e-3),
]


@pytest.mark.parametrize(("case", "kwargs", "post", "tol"), MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_loaded_adapter_computes_what_peft_computes(tmp_path, tiny_spec, case, kwargs, post, tol):
    d = tmp_path / case
    model = make_peft_adapter(d, **kwargs)
    if post:
        post(d, model)
    adapter = hf_peft.load(d)
    parts, deltas = _peft_oracle(model)

    assert adapter.format == "hf" and set(adapter.weights) == set(parts)
    for key, (a, b, scaling) in parts.items():
        w = adapter.weights[key]
        assert torch.equal(w.a, a.detach()) and torch.equal(w.b, b.detach()), key  # unscaled, stored dtype
        assert w.scale == scaling, (key, w.scale, scaling)  # exactly PEFT's float
    _assert_same_math(_our_deltas(adapter, tiny_spec), deltas, tol)


def test_adapter_meta_and_base_model(tmp_path):
    make_peft_adapter(tmp_path, r=4, lora_alpha=12.5, use_rslora=True)
    edit_peft_config(tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    adapter = hf_peft.load(tmp_path)
    assert adapter.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        adapter.meta["r"] == 4 and adapter.meta["lora_alpha"] == 12.5 and adapter.meta["use_rslora"] is True
    )
    assert adapter.meta["weights_file"] == SAFE and adapter.source == str(tmp_path)


def test_safetensors_is_read_and_an_agreeing_bin_is_fine(tmp_path):
    make_peft_adapter(tmp_path)
    stored = load_file(str(tmp_path / SAFE))
    torch.save(dict(stored), tmp_path / "adapter_model.bin")
    adapter = hf_peft.load(tmp_path)
    assert torch.equal(
        adapter.weights[(0, "attn_q")].a,
        stored["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )
    assert adapter.meta["weights_file"] == SAFE


def test_a_bin_that_disagrees_with_the_safetensors_is_refused(tmp_path):
    make_peft_adapter(tmp_path)
    stored = load_file(str(tmp_path / SAFE))
    torch.save({k: v * 2 for k, v in stored.items()}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="disagree"):
        hf_peft.load(tmp_path)


def test_zero3_empty_tensors_load_and_validate_reports_them(tmp_path, tiny_spec):
    make_peft_adapter(tmp_path, target_modules=["q_proj"])
    rewrite_peft_tensors(tmp_path, lambda t: {k: torch.empty(0) for k in t})
    adapter = hf_peft.load(tmp_path)
    assert len(adapter) == 3
    assert any("empty tensor" in p for p in validate(adapter, tiny_spec))


@pytest.mark.parametrize(
    ("files", "expected"),
    [((CONFIG, SAFE), True), ((CONFIG, "adapter_model.bin"), True), ((SAFE,), False), ((CONFIG,), False)],
)
def test_detect(tmp_path, files, expected):
    for f in files:
        (tmp_path / f).write_text("{}")
    assert hf_peft.detect(tmp_path) is expected


# ------------------------------------------------------------------------------------ writing, PEFT as judge


def _load_in_peft(d: Path):
    """PeftModel.from_pretrained on a fresh tiny Llama: no key warnings; file keys == the model's LoRA keys."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama_model(), str(d))
    complaints = [
        str(w.message)
        for w in caught
        if any(s in str(w.message) for s in ("missing", "pattern", "not found"))
    ]
    assert not complaints, complaints
    in_model = {k.replace(".default.", ".") for k, _ in model.named_parameters() if ".lora_" in k}
    assert set(load_file(str(d / SAFE))) == in_model
    return model


def _subset(adapter: LoraAdapter, keys) -> LoraAdapter:
    return adapter.with_weights({k: adapter.weights[k] for k in keys})


WRITE_CASES = [
    # (id, LoraConfig kwargs of the source adapter, which (layer, module) to keep; None = all)
    ("defaults", {}, None),
    (
        "patterns",
        {"rank_pattern": {"q_proj": 8, "model.layers.2.mlp.up_proj": 2}, "alpha_pattern": {"v_proj": 3.3}},
        None,
    ),
    ("rslora", {"use_rslora": True, "r": 6, "lora_alpha": 5}, None),
    ("layers-subset", {"layers_to_transform": [1, 2]}, None),
    ("irregular-modules", {}, [(0, "attn_q"), (1, "attn_v"), (1, "mlp_gate"), (2, "mlp_4h_to_h")]),
]


@pytest.mark.parametrize(("case", "kwargs", "keep"), WRITE_CASES, ids=[c[0] for c in WRITE_CASES])
def test_saved_adapter_loads_in_peft_with_the_same_math(tmp_path, tiny_spec, case, kwargs, keep):
    make_peft_adapter(tmp_path / "src", **kwargs)
    adapter = hf_peft.load(tmp_path / "src")
    if keep:
        adapter = _subset(adapter, keep)
    written = hf_peft.save(adapter, tmp_path / "out", tiny_spec)
    assert sorted(p.name for p in written) == [CONFIG, SAFE]

    model = _load_in_peft(tmp_path / "out")
    parts, deltas = _peft_oracle(model)
    assert all(parts[k][2] == w.scale for k, w in adapter)  # PEFT's scaling of what we wrote, exactly
    _assert_same_math({k: w.delta() for k, w in adapter}, deltas, 1e-6)


def _random_adapter(dtype: torch.dtype) -> LoraAdapter:
    """Per-module ranks and awkward scales, including fused modules a Llama does not have."""
    gen = torch.Generator().manual_seed(3)
    dims = {
        "attn_q": (32, 32),
        "attn_v": (32, 16),
        "attn_qkv": (32, 64),
        "mlp_gate_up": (32, 96),
        "mlp_4h_to_h": (48, 32),
    }
    weights = {}
    for i, (module, (d_in, d_out)) in enumerate(dims.items()):
        for layer in (0, 2):
            r = 1 + (i + layer) % 5
            a, b = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
            weights[(layer, module)] = LoraWeights(
                a=a.to(dtype), b=b.to(dtype), scale=[1.0, 0.37, 2 / 3, 1e-3, 5.0][i]
            )
    return LoraAdapter(weights=weights, format="trtllm", base_model="tiny-llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_is_identity(tmp_path, tiny_spec, dtype):
    adapter = _random_adapter(dtype)
    hf_peft.save(adapter, tmp_path, tiny_spec)
    back = hf_peft.load(tmp_path)
    assert set(back.weights) == set(adapter.weights) and back.base_model == "tiny-llama"
    for key, w in adapter:
        got = back.weights[key]
        assert got.a.dtype == dtype and torch.equal(got.a, w.a) and torch.equal(got.b, w.b), key
        assert got.scale == w.scale, (key, got.scale, w.scale)
    keys = load_file(str(tmp_path / SAFE))
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.2.mlp.gate_up_proj.lora_B.weight" in keys


def test_scale_one_writes_alpha_equal_to_r(tmp_path, tiny_spec):
    adapter = LoraAdapter(
        weights={
            (0, "attn_q"): LoraWeights(torch.ones(4, 32), torch.ones(32, 4)),
            (1, "attn_q"): LoraWeights(torch.ones(8, 32), torch.ones(32, 8)),
        },
        format="trtllm",
    )
    hf_peft.save(adapter, tmp_path, tiny_spec)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 4)
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 8}
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.q_proj": 8}
    assert cfg["layers_to_transform"] == [0, 1] and cfg["target_modules"] == ["q_proj"]


def test_save_refuses_what_peft_cannot_express(tmp_path, tiny_spec):
    adapter = LoraAdapter(
        weights={(0, "cross_attn_q"): LoraWeights(torch.ones(2, 32), torch.ones(32, 2))}, format="trtllm"
    )
    with pytest.raises(AdapterFormatError, match="no Hugging Face name"):
        hf_peft.save(adapter, tmp_path, tiny_spec)


def test_alpha_for_gives_back_peft_scales_exactly():
    from trtllm_peft.formats.hf_peft_config import peft_scale
    from trtllm_peft.formats.hf_peft_config_writer import alpha_for

    assert all(alpha_for(a / r, r) == a for a in range(1, 130) for r in range(1, 130))  # ints stay ints
    assert all(
        peft_scale(alpha_for(a / r, r), r, False) == a / r for a in (0.5, 12.5, 3.3) for r in range(1, 130)
    )
    awkward = 0.22941573387056174  # no float alpha divides by 230 back to it: the nearest is one ulp off
    assert abs(peft_scale(alpha_for(awkward, 230), 230, False) - awkward) <= math.ulp(awkward)
