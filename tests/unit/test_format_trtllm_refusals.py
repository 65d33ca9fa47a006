"""TensorRT-LLM adapter files that are broken, hostile or unfit for the engine: each refused with a precise
error before a byte more than the engine's largest adapter is read (formats/trtllm.py, trtllm_raw.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trtllm_fixtures import (
    SPEC,
    torch_to_numpy,
    trtllm_arrays,
    write_dir,
)
from trtllm_peft.errors import AdapterError, AdapterFormatError, AdapterIncompatibleError
from trtllm_peft.formats import trtllm, trtllm_writer
from trtllm_peft.lora import LoraAdapter, LoraWeights, fit_to_spec


def _good(d: Path, columns: int = 4, dtype=torch.float16) -> tuple[torch.Tensor, np.ndarray]:
    w, c = trtllm_arrays(dtype, columns)
    write_dir(d, torch_to_numpy(w)[None], c[None])
    return w, c


def _weights16() -> np.ndarray:
    return torch_to_numpy(trtllm_arrays(torch.float16)[0])


def _with_config(d: Path, edit) -> None:
    w, c = _good(d)
    edit(c)
    np.save(d / "model.lora_config.npy", c[None])


def _replace(d: Path, name: str, content) -> None:
    _good(d)
    if isinstance(content, bytes):
        (d / name).write_bytes(content)
    else:
        np.save(d / name, content, allow_pickle=True)


def _truncate(d: Path) -> None:
    _good(d)
    p = d / "model.lora_weights.npy"
    p.write_bytes(p.read_bytes()[:-10])


def _set(row: int, col: int, value: int):
    def edit(c):
        c[row, col] = value

    return edit


REFUSALS = [
    # (id, how to break a good directory, error type, phrase)
    (
        "row-too-short",
        lambda d: _replace(d, "model.lora_weights.npy", _weights16()[None, :, :100]),
        AdapterFormatError,
        "needs",
    ),
    ("unknown-module-id", lambda d: _with_config(d, _set(1, 0, 99)), AdapterFormatError, "module id 99"),
    ("module-not-in-llama", lambda d: _with_config(d, _set(1, 0, 13)), AdapterFormatError, "module id 13"),
    (
        "layer-out-of-range",
        lambda d: _with_config(d, _set(0, 1, 7)),
        AdapterIncompatibleError,
        "out of range",
    ),
    ("rank-zero", lambda d: _with_config(d, _set(0, 2, 0)), AdapterFormatError, "must be > 0"),
    (
        "is-dora-not-0-or-1",
        lambda d: _with_config(d, _set(2, 3, 2)),
        AdapterFormatError,
        "is_dora must be 0 or 1",
    ),
    (
        "mismatched-rows",
        lambda d: _replace(d, "model.lora_config.npy", trtllm_arrays(torch.float16)[1][None, :3]),
        AdapterFormatError,
        "5 rows but lora_config has 3",
    ),
    (
        "float-config",
        lambda d: _replace(d, "model.lora_config.npy", np.zeros((1, 5, 4), np.float32)),
        AdapterFormatError,
        "must be int32",
    ),
    (
        "five-columns",
        lambda d: _replace(d, "model.lora_config.npy", np.zeros((1, 5, 5), np.int32)),
        AdapterFormatError,
        "3|4",
    ),
    (
        "batch-of-two",
        lambda d: _replace(d, "model.lora_weights.npy", np.zeros((2, 5, 8), np.float16)),
        AdapterFormatError,
        "batch dimension to be 1",
    ),
    (
        "float64-weights",
        lambda d: _replace(d, "model.lora_weights.npy", np.zeros((1, 5, 800), np.float64)),
        AdapterFormatError,
        "float64",
    ),
    (
        "object-array",
        lambda d: _replace(d, "model.lora_weights.npy", np.array([{"x": 1}], dtype=object)),
        AdapterFormatError,
        "pickle",
    ),
    (
        "lfs-pointer",
        lambda d: _replace(d, "model.lora_weights.npy", b"version https://git-lfs.github.com/spec/v1\n"),
        AdapterFormatError,
        "Git-LFS",
    ),
    ("truncated-npy", _truncate, AdapterFormatError, "truncated .npy"),
    (
        "not-npy",
        lambda d: _replace(d, "model.lora_config.npy", b"PK\x03\x04 something else"),
        AdapterFormatError,
        "not a .npy",
    ),
    (
        "missing-weights",
        lambda d: (_good(d), (d / "model.lora_weights.npy").unlink()),
        AdapterFormatError,
        "missing model.lora_weights",
    ),
    (
        "missing-config",
        lambda d: (_good(d), (d / "model.lora_config.npy").unlink()),
        AdapterFormatError,
        "missing model.lora_config.npy",
    ),
    (
        "bin-not-int32",
        lambda d: (
            _good(d),
            (d / "model.lora_config.npy").unlink(),
            (d / "model.lora_config.bin").write_bytes(b"123"),
        ),
        AdapterFormatError,
        "3 bytes",
    ),
]


@pytest.mark.parametrize(("case", "breaker", "error", "phrase"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusals(tmp_path, case, breaker, error, phrase):
    d = tmp_path / "adapter"
    breaker(d)
    with pytest.raises(error) as err:
        fit_to_spec(trtllm.load(d, SPEC), SPEC)
    assert phrase in str(err.value), str(err.value)
    assert str(d) in str(err.value)


def test_reading_needs_the_engine_spec(tmp_path):
    _good(tmp_path)
    with pytest.raises(AdapterFormatError, match="--base"):
        trtllm.load(tmp_path, None)


def test_writing_refuses_what_cannot_be_rows(tmp_path):
    bad = LoraAdapter({(0, "attn_q"): LoraWeights(torch.randn(2, 32), torch.randn(32, 3))}, "hf", source="x")
    with pytest.raises(AdapterError, match="one rank"):
        trtllm_writer.write_npy(bad, tmp_path, "float16")
    assert not any(tmp_path.iterdir())
