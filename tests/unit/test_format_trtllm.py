"""TensorRT-LLM adapter files: reading every layout TensorRT-LLM's tools write, and exact writes.

Fixtures: tests/trtllm_fixtures.py (TensorRT-LLM's layout, independent of lora.pack). Broken files:
test_format_trtllm_refusals.py.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from tests.trtllm_fixtures import (
    DTYPES,
    ROWS,
    SPEC,
    assert_holds_source,
    torch_to_numpy,
    trtllm_arrays,
    write_dir,
)
from trtllm_peft.errors import AdapterFormatError, AdapterIncompatibleError
from trtllm_peft.formats import trtllm, trtllm_writer
from trtllm_peft.lora import LoraAdapter, LoraWeights, pack
from trtllm_peft.lora.pack import write_scaled_b


def test_detect(tmp_path):
    w, c = trtllm_arrays(torch.float16)
    assert trtllm.detect(write_dir(tmp_path / "a", torch_to_numpy(w)[None], c[None]))
    assert trtllm.detect(
        write_dir(tmp_path / "k", torch_to_numpy(w)[None], c[None], config_name="model.lora_keys.npy")
    )
    assert trtllm.detect(
        write_dir(
            tmp_path / "b",
            torch_to_numpy(w),
            c,
            weights_name="model.lora_weights.bin",
            config_name="model.lora_config.bin",
        )
    )
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "model.lora_weights.npy", torch_to_numpy(w))
    assert not trtllm.detect(tmp_path / "c")


@pytest.mark.parametrize("columns", [3, 4])
@pytest.mark.parametrize("store", ["float16", "float32", "bfloat16-V2", "bfloat16-int16"])
def test_reads_what_tensorrt_llm_writes(tmp_path, columns, store):
    dtype = DTYPES[store.split("-")[0]]
    weights, config = trtllm_arrays(dtype, columns)
    arr = weights.view(torch.int16).numpy() if store.endswith("int16") else torch_to_numpy(weights)
    d = write_dir(tmp_path, arr[None], config[None])
    adapter = trtllm.load(d, SPEC.with_limits(dtype=dtype))
    assert adapter.format == "trtllm" and adapter.meta["config_columns"] == columns
    assert adapter.meta["dtype"] == store.split("-")[0] and adapter.meta["notes"] == []
    assert_holds_source(adapter, dtype)


def test_lora_keys_alias(tmp_path):
    w, c = trtllm_arrays(torch.float16)
    d = write_dir(tmp_path, torch_to_numpy(w)[None], c[None], config_name="model.lora_keys.npy")
    adapter = trtllm.load(d, SPEC)
    assert adapter.meta["files"] == ["model.lora_keys.npy", "model.lora_weights.npy"]
    assert_holds_source(adapter, torch.float16)


def test_two_dimensional_arrays_are_read_and_noted(tmp_path):
    w, c = trtllm_arrays(torch.float32)
    adapter = trtllm.load(write_dir(tmp_path, torch_to_numpy(w), c), SPEC)
    assert_holds_source(adapter, torch.float32)
    assert any("2-D" in n for n in adapter.meta["notes"])


@pytest.mark.parametrize(
    ("columns", "store", "engine"),
    [
        (4, "float16", "float16"),
        (3, "bfloat16", "bfloat16"),
        (3, "float32", "float16"),
        (4, "float32", "bfloat16"),
    ],
)
def test_raw_bin_shape_and_dtype_inferred(tmp_path, columns, store, engine):
    weights, config = trtllm_arrays(DTYPES[store], columns)
    d = write_dir(
        tmp_path,
        torch_to_numpy(weights)[None],
        config[None],
        weights_name="model.lora_weights.bin",
        config_name="model.lora_config.bin",
    )
    adapter = trtllm.load(d, SPEC.with_limits(dtype=engine))
    assert_holds_source(adapter, DTYPES[store])
    assert f"{columns}-column config with {store} weights" in adapter.meta["notes"][0]


def test_raw_bin_weights_with_npy_config(tmp_path):
    weights, config = trtllm_arrays(torch.float16, 3)
    d = write_dir(tmp_path, torch_to_numpy(weights), config[None], weights_name="model.lora_weights.bin")
    assert_holds_source(trtllm.load(d, SPEC), torch.float16)


def test_ambiguous_raw_bin_is_refused(tmp_path):
    """2-byte weights for a float32 engine: float16 and bfloat16 both fit; we say so instead of guessing."""
    weights, config = trtllm_arrays(torch.float16, 4)
    d = write_dir(
        tmp_path,
        torch_to_numpy(weights),
        config,
        weights_name="model.lora_weights.bin",
        config_name="model.lora_config.bin",
    )
    with pytest.raises(AdapterFormatError) as err:
        trtllm.load(d, SPEC.with_limits(dtype="float32"))
    msg = str(err.value)
    assert "2 readings fit" in msg and "float16 weights" in msg and "bfloat16 weights" in msg, msg


def test_raw_bin_that_fits_no_reading_lists_why(tmp_path):
    weights, config = trtllm_arrays(torch.float16, 4)
    d = write_dir(
        tmp_path,
        torch_to_numpy(weights)[:, :-1],
        config,
        weights_name="model.lora_weights.bin",
        config_name="model.lora_config.bin",
    )
    with pytest.raises(AdapterFormatError) as err:
        trtllm.load(d, SPEC)
    msg = str(err.value)
    assert "no reading fits" in msg and "4-column config with float16 weights: weights file has" in msg, msg
    assert "3-column config" in msg


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_save_writes_what_numpy_would_and_reads_back_bit_exact(tmp_path, dtype):
    g = torch.Generator().manual_seed(3)
    w = {
        (layer, m): LoraWeights(
            torch.randn(r, SPEC.module_dims(m)[0], generator=g),
            torch.randn(SPEC.module_dims(m)[1], r, generator=g),
            scale=s,
        )
        for m, layer, r in ROWS
        for s in [0.37 * (layer + 1)]
    }
    adapter = LoraAdapter(w, format="hf")
    spec = SPEC.with_limits(dtype=dtype)
    files = trtllm.save(adapter, tmp_path / "out", spec)
    assert [f.name for f in files] == ["model.lora_weights.npy", "model.lora_config.npy"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f.name for f in files
    )  # no .tmp left
    packed = pack(adapter, dtype)
    for f, arr in zip(
        files, (torch_to_numpy(packed.weights)[None], packed.config.numpy()[None]), strict=True
    ):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.save(buf, arr)
        assert f.read_bytes() == buf.getvalue(), f.name  # header and data, bf16 as '|V2' like torch_to_numpy
    back = trtllm.load(tmp_path / "out", spec)
    folded = adapter.folded(DTYPES[dtype])
    for key, lw in back:
        assert torch.equal(lw.a.view(torch.uint8), folded.weights[key].a.view(torch.uint8))
        assert torch.equal(lw.b.view(torch.uint8), folded.weights[key].b.view(torch.uint8))
    trtllm.save(back, tmp_path / "again", spec)
    assert (tmp_path / "again" / files[0].name).read_bytes() == files[0].read_bytes()


def test_bfloat16_file_has_tensorrt_llm_descr(tmp_path):
    w, c = trtllm_arrays(torch.float32)
    adapter = trtllm.load(write_dir(tmp_path / "in", torch_to_numpy(w)[None], c[None]), SPEC)
    trtllm_writer.write_npy(adapter, tmp_path / "out", "bfloat16")
    with open(tmp_path / "out" / "model.lora_weights.npy", "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    assert dtype.str == "|V2" and shape == (
        1,
        len(ROWS),
        max(r * sum(SPEC.module_dims(m)) for m, _, r in ROWS),
    )


def test_save_fits_the_adapter_to_the_engine(tmp_path):
    spec = SPEC.with_limits(max_lora_rank=4)
    d_in, d_out = spec.module_dims("attn_qkv")
    qkv = LoraAdapter(
        {(0, "attn_qkv"): LoraWeights(torch.randn(2, d_in), torch.randn(d_out, 2), 0.5)}, "nemo"
    )
    trtllm.save(qkv, tmp_path / "split", spec)
    assert sorted(trtllm.load(tmp_path / "split", spec).modules) == ["attn_k", "attn_q", "attn_v"]
    big = LoraAdapter({(0, "attn_q"): LoraWeights(torch.randn(8, 32), torch.randn(32, 8))}, "hf")
    with pytest.raises(AdapterIncompatibleError, match="exceeds max_lora_rank 4"):
        trtllm.save(big, tmp_path / "big", spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scaled_b_without_float32_temporaries_is_bit_identical(dtype):
    """write_scaled_b's fast paths against B·scale in float32 then cast, over every 16-bit pattern.

    Identical bits for every number; NaN stays NaN (its payload may differ, and validation refuses NaN anyway).
    """
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 8)
    for source in (dtype, torch.float32):
        b = every.to(source)
        for scale in (1.0, 2.0, 0.5, 1 / 3, 16 / 7**0.5, 1e-3, 3.7, 65504.0):
            w = LoraWeights(a=torch.zeros(8, 1), b=b, scale=scale)
            out = torch.empty_like(b, dtype=dtype)
            write_scaled_b(w, out)
            ref = w.scaled_b(dtype)
            nan = ref.isnan()
            assert torch.equal(out.isnan(), nan), (source, scale)
            assert torch.equal(out.view(torch.int16)[~nan], ref.view(torch.int16)[~nan]), (source, scale)


@pytest.mark.parametrize("source", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_b_into_float32_is_bit_identical(source):
    """Into a float32 row (a float32 engine) B·scale has the bits of `scaled_b(float32)`, one pass or two."""
    g = torch.Generator().manual_seed(0)
    b = (
        torch.cat(
            [
                torch.randn(4096, generator=g) * 10.0 ** torch.randint(-30, 30, (4096,), generator=g),
                torch.tensor([0.0, -0.0, 3e38, -3e38, 1e-45, float("inf")]),
            ]
        )
        .to(source)
        .reshape(-1, 2)
    )
    for scale in (1.0, 2.0, 0.5, 1 / 3, 16 / 7**0.5, 1e-3, 3.7, 65504.0):
        w = LoraWeights(a=torch.zeros(2, 1), b=b, scale=scale)
        out = torch.empty_like(b, dtype=torch.float32)
        write_scaled_b(w, out)
        assert torch.equal(out.view(torch.int32), w.scaled_b(torch.float32).view(torch.int32)), (
            source,
            scale,
        )
