"""The canonical adapter, packing to TensorRT-LLM rows, validation against a spec, fused-module splitting."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from trtllm_peft.errors import AdapterFormatError, AdapterIncompatibleError, EngineError
from trtllm_peft.lora import (
    LoraAdapter,
    LoraWeights,
    ModelSpec,
    fit_to_spec,
    load_spec,
    pack,
    unpack,
    validate,
)
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES, MODULE_IDS

SPEC = ModelSpec(
    num_layers=2,
    hidden_size=16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    intermediate_size=24,
    dtype="float32",
    max_lora_rank=8,
)


def weights(spec: ModelSpec, module: str, rank: int, scale: float = 1.0, seed: int = 0) -> LoraWeights:
    d_in, d_out = spec.module_dims(module)
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        a=torch.randn(rank, d_in, generator=g), b=torch.randn(d_out, rank, generator=g), scale=scale
    )


def adapter(spec=SPEC, modules=DEFAULT_TARGET_MODULES, rank=4, scale=0.5) -> LoraAdapter:
    w = {
        (layer, m): weights(spec, m, rank + layer, scale, seed=layer * 10 + i)
        for layer in range(spec.num_layers)
        for i, m in enumerate(modules)
    }
    return LoraAdapter(weights=w, format="hf", source="test")


def test_pack_layout_matches_tensorrt_llm_rows():
    ad = adapter()
    packed = pack(ad, torch.float32)
    assert packed.config.dtype == torch.int32 and packed.config.shape == (len(ad), 4)
    # rows are ordered by layer, then module id
    keys = [(int(r[1]), int(r[0])) for r in packed.config]
    assert keys == sorted(keys)
    for row, cfg in zip(packed.weights, packed.config.tolist(), strict=True):
        module = {v: k for k, v in MODULE_IDS.items()}[cfg[0]]
        w = ad.weights[(cfg[1], module)]
        r, (d_in, d_out) = cfg[2], SPEC.module_dims(module)
        assert r == w.rank and cfg[3] == 0
        assert torch.equal(row[: r * d_in].reshape(r, d_in), w.a)
        assert torch.allclose(row[r * d_in : r * (d_in + d_out)].reshape(d_out, r), w.b * w.scale)
        assert not row[r * (d_in + d_out) :].any()  # zero padding to W


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_roundtrip_keeps_the_delta(dtype):
    ad = adapter()
    back = unpack(*(lambda p: (p.weights, p.config))(pack(ad, dtype)), SPEC)
    assert set(back.weights) == set(ad.weights)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for key, w in ad:
        assert back.weights[key].scale == 1.0
        assert torch.allclose(back.weights[key].delta(), w.delta(), atol=tol, rtol=tol)


def test_pack_scales_b_in_float32_before_casting():
    w = weights(SPEC, "attn_q", 2, scale=1 / 3)
    packed = pack(LoraAdapter({(0, "attn_q"): w}, format="hf"), torch.float16)
    n_a = w.a.numel()
    assert torch.equal(packed.weights[0, n_a : n_a + w.b.numel()], (w.b.float() * (1 / 3)).half().reshape(-1))


def test_unpack_accepts_batch_dim_and_three_columns():
    packed = pack(adapter(), torch.float32)
    three = packed.config[:, :3].contiguous()
    back = unpack(packed.weights.unsqueeze(0), three.unsqueeze(0), SPEC)
    assert len(back) == packed.num_rows


@pytest.mark.parametrize(
    ("mutate", "phrase"),
    [
        (lambda w, c: (w, c.float()), "must be int32"),
        (lambda w, c: (w, c[:, :2].contiguous()), "3 or 4 columns"),
        (lambda w, c: (w[:-1], c), "rows but lora_config has"),
        (lambda w, c: (w[:, :5], c), "needs"),
        (lambda w, c: (w, _set(c, 0, 0, 17)), "is not a module"),
        (lambda w, c: (w, _set(c, 0, 3, 2)), "is_dora must be 0 or 1"),
        (lambda w, c: (w, _set(c, 0, 2, 0)), "must be > 0"),
        (lambda w, c: (w.unsqueeze(0).expand(2, -1, -1), c), "batch dimension"),
        (lambda w, c: (w.to(torch.int16), c), "floating-point"),
    ],
)
def test_unpack_refuses_bad_tensors(mutate, phrase):
    packed = pack(adapter(), torch.float32)
    w, c = mutate(packed.weights.clone(), packed.config.clone())
    with pytest.raises(AdapterFormatError, match=phrase):
        unpack(w, c, SPEC)


def _set(t, row, col, value):
    t[row, col] = value
    return t


def test_validate_collects_every_problem_grouped_by_layers():
    spec = SPEC.with_limits(max_lora_rank=4, lora_target_modules=("attn_q", "attn_k", "attn_v"))
    w = {(layer, "attn_q"): weights(SPEC, "attn_q", 6) for layer in range(2)}
    w[(0, "attn_dense")] = weights(SPEC, "attn_dense", 2)
    w[(7, "attn_k")] = weights(SPEC, "attn_k", 2)
    w[(1, "attn_v")] = LoraWeights(a=torch.randn(2, 16), b=torch.randn(5, 2))
    nan = weights(SPEC, "attn_k", 2)
    nan.b[0, 0] = float("nan")
    w[(0, "attn_k")] = nan
    problems = validate(LoraAdapter(w, format="hf"), spec)
    text = "\n".join(problems)
    assert "attn_q (q_proj): rank 6 exceeds max_lora_rank 4 (NIM_MAX_LORA_RANK) (layers 0-1)" in problems
    assert "attn_dense (o_proj) is not enabled in this engine" in text
    assert "layer index out of range [0, 2) (layer 7)" in text
    assert "expected A [r, 16] and B [8, r]" in text
    assert "NaN or inf" in text
    assert len(problems) == 5


def _poke(value: float, where: str, dtype: torch.dtype = torch.float32, dora: bool = False) -> LoraWeights:
    w = weights(SPEC, "attn_q", 2)
    a, b = w.a.to(dtype), w.b.to(dtype)
    mag = torch.ones(w.out_features, dtype=dtype) if dora else None
    target = {"a": a, "b": b, "magnitude": mag}[where]
    target.view(-1)[3] = value
    return LoraWeights(a=a, b=b, magnitude=mag, normalized=dora)


NONFINITE_CASES = [  # (value, tensor, dtype, DoRA, expected problem or None)
    (float("nan"), "a", torch.float32, False, "attn_q (q_proj): contains NaN or inf"),
    (float("inf"), "b", torch.float32, False, "attn_q (q_proj): contains NaN or inf"),
    (float("-inf"), "a", torch.bfloat16, False, "attn_q (q_proj): contains NaN or inf"),
    (float("nan"), "b", torch.float16, False, "attn_q (q_proj): contains NaN or inf"),
    (float("inf"), "magnitude", torch.float32, True, "DoRA magnitude is not finite"),
    (float("nan"), "magnitude", torch.bfloat16, True, "DoRA magnitude is not finite"),
    # finite values whose float32 sum overflows: the fast check is unsure, the exact one clears them
    (3e38, "a", torch.float32, False, None),
    (6e4, "b", torch.float16, False, None),
    (1.0, "a", torch.float32, False, None),
]


@pytest.mark.parametrize(("value", "where", "dtype", "dora", "problem"), NONFINITE_CASES)
def test_validate_finds_nan_and_inf_exactly(value, where, dtype, dora, problem):
    """validate()'s finiteness check is one float32 sum per tensor, elementwise only where a sum is not
    finite: every NaN/inf is found (in A, B or a DoRA magnitude, any float dtype), and finite values whose
    sum overflows are not reported."""
    spec = dataclasses.replace(SPEC, dora_plugin=True) if dora else SPEC
    w = _poke(value, where, dtype, dora)
    if value == 3e38:  # a second huge value in the same tensor: the sum overflows float32
        w.a.view(-1)[5] = 3e38
    fine = {(1, "attn_k"): weights(SPEC, "attn_k", 2)}
    problems = validate(LoraAdapter({(0, "attn_q"): w, **fine}, format="hf"), spec)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0] and "(layer 0)" in problems[0]


def test_validate_empty_and_zero_rank():
    assert validate(LoraAdapter({}, format="hf"), SPEC) == ["adapter has no LoRA weights"]
    empty = LoraWeights(a=torch.empty(0), b=torch.empty(0))
    assert "empty tensor" in validate(LoraAdapter({(0, "attn_q"): empty}, format="hf"), SPEC)[0]


def test_fit_splits_fused_qkv_exactly_and_raises_all_problems():
    fused = weights(SPEC, "attn_qkv", 3, scale=2.0)
    fitted = fit_to_spec(LoraAdapter({(1, "attn_qkv"): fused}, format="nemo"), SPEC)
    assert sorted(m for _, m in fitted.weights) == ["attn_k", "attn_q", "attn_v"]
    stacked = torch.cat([fitted.weights[(1, m)].delta() for m in ("attn_q", "attn_k", "attn_v")])
    assert torch.allclose(stacked, fused.delta())
    with pytest.raises(AdapterIncompatibleError) as err:
        fit_to_spec(LoraAdapter({(0, "attn_q"): weights(SPEC, "attn_q", 9)}, format="hf", source="big"), SPEC)
    assert err.value.source == "big" and "rank 9 exceeds" in str(err.value)


def test_fused_module_kept_when_engine_has_it():
    spec = SPEC.with_limits(lora_target_modules=("attn_qkv",))
    fitted = fit_to_spec(LoraAdapter({(0, "attn_qkv"): weights(SPEC, "attn_qkv", 2)}, format="nemo"), spec)
    assert list(fitted.weights) == [(0, "attn_qkv")]


def test_spec_from_hf_and_engine_configs(tmp_path, tiny_llama_dir):
    hf = load_spec(tiny_llama_dir, max_lora_rank=16)
    assert (hf.num_layers, hf.hidden_size, hf.num_kv_heads, hf.head_dim) == (3, 32, 2, 8)
    assert hf.module_dims("attn_k") == (32, 16) and hf.module_dims("mlp_4h_to_h") == (48, 32)
    assert hf.max_lora_rank == 16 and hf.dtype == "float32"
    engine = {
        "pretrained_config": {
            "architecture": "LlamaForCausalLM",
            "dtype": "bfloat16",
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "hidden_size": 16,
            "intermediate_size": 40,
            "vocab_size": 99,
        },
        "build_config": {"lora_config": {"lora_target_modules": ["attn_q", "attn_v"], "max_lora_rank": 8}},
    }
    (tmp_path / "config.json").write_text(json.dumps(engine))
    spec = load_spec(tmp_path)
    assert spec.lora_target_modules == ("attn_q", "attn_v") and spec.max_lora_rank == 8
    assert spec.torch_dtype == torch.bfloat16 and spec.module_dims("attn_v") == (16, 4)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "no config.json"),
        ("{", "unreadable config"),
        ("[]", "not a JSON object"),
        ('{"hidden_size": 4}', "not a Llama-family config"),
    ],
)
def test_spec_errors(tmp_path, content, phrase):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(EngineError, match=phrase):
        load_spec(tmp_path)
