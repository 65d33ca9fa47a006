"""Bad adapters, one row each: every one gives a precise AdapterError, never a traceback, never runs code.

Each case builds a broken adapter directory from a real one (made with peft) and checks the error type
and a phrase that tells the user what is wrong. The same cases run through the CLI (`inspect`), which
must print the problem and exit 1, without a traceback.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_peft_adapter
from trtllm_peft import formats
from trtllm_peft.errors import AdapterError, AdapterFormatError, AdapterIncompatibleError

MARKER = Path("/tmp/trtllm_peft_pwned")


class _RunsCode:
    """A pickle payload: unpickling it would create MARKER."""

    def __reduce__(self):
        return (MARKER.touch, ())


def _weights(d: Path) -> dict:
    return load_file(str(d / "adapter_model.safetensors"))


def _rewrite(d: Path, fn) -> None:
    save_file(fn(_weights(d)), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _nan(t: dict) -> dict:
    k = next(k for k in t if "lora_B" in k)
    t[k][0, 0] = float("nan")
    return t


def _pickle_bin(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    torch.save({"x": _RunsCode()}, d / "adapter_model.bin")


def _lfs(d: Path) -> None:
    (d / "adapter_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 123456\n"
    )


def _truncate(d: Path) -> None:
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _disagreeing_bin(d: Path) -> None:
    t = _weights(d)
    t = {k: v * 2 for k, v in t.items()}
    torch.save(t, d / "adapter_model.bin")


def _big_rank(d: Path) -> None:
    shutil.rmtree(d)
    make_peft_adapter(d, r=80, lora_alpha=16)


def _other_model(d: Path) -> None:
    _rewrite(d, lambda t: {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in t.items()})


def _deeper_model(d: Path) -> None:
    _rewrite(d, lambda t: {k.replace("layers.2.", "layers.7."): v for k, v in t.items()})


def _zero3(d: Path) -> None:
    _rewrite(d, lambda t: {k: torch.empty(0) for k in t})


def _nemo_two_files(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()
    (d / "a.nemo").write_bytes(b"x")
    (d / "b.nemo").write_bytes(b"y")


def _nemo_corrupt(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()
    (d / "adapter.nemo").write_bytes(b"this is not a tar archive" * 40)


def _trt(d: Path, weights, config) -> None:
    shutil.rmtree(d)
    d.mkdir()
    np.save(d / "model.lora_weights.npy", weights, allow_pickle=True)
    np.save(d / "model.lora_config.npy", config, allow_pickle=True)


def _trt_with_stale_bin(d: Path) -> None:
    from trtllm_peft.lora import load_spec

    spec = load_spec(TINY_DIR[0], max_lora_rank=64, dtype="float32")
    adapter = formats.load(d)
    shutil.rmtree(d)
    formats.save(adapter, d, "trtllm", spec)
    weights = np.load(d / "model.lora_weights.npy")
    (weights * 2).tofile(d / "model.lora_weights.bin")


TINY_DIR: list[Path] = []  # set by the `good` fixture: the spec's base model dir


CASES = [
    # (id, how to break a good HF adapter dir, error type, phrase)
    ("missing", lambda d: shutil.rmtree(d), AdapterFormatError, "does not exist"),
    ("not-a-dir", lambda d: (shutil.rmtree(d), d.write_text("x")), AdapterFormatError, "is not a directory"),
    ("empty-dir", lambda d: (shutil.rmtree(d), d.mkdir()), AdapterFormatError, "empty directory"),
    (
        "unrelated-files",
        lambda d: (shutil.rmtree(d), d.mkdir(), (d / "README.md").write_text("hi")),
        AdapterFormatError,
        "no adapter found",
    ),
    (
        "config-not-json",
        lambda d: (d / "adapter_config.json").write_text("{r: 8"),
        AdapterFormatError,
        "JSON",
    ),
    ("pickle-runs-code", _pickle_bin, AdapterFormatError, "would run code"),
    ("git-lfs-pointer", _lfs, AdapterFormatError, "Git-LFS pointer"),
    ("truncated-safetensors", _truncate, AdapterFormatError, "truncated"),
    ("two-files-disagree", _disagreeing_bin, AdapterFormatError, "disagree"),
    ("dora", lambda d: _edit_config(d, use_dora=True), AdapterFormatError, "DoRA"),
    (
        "modules-to-save",
        lambda d: _edit_config(d, modules_to_save=["lm_head"]),
        AdapterFormatError,
        "modules_to_save",
    ),
    ("not-lora", lambda d: _edit_config(d, peft_type="IA3"), AdapterFormatError, "IA3"),
    ("rank-over-limit", _big_rank, AdapterIncompatibleError, "exceeds max_lora_rank 64"),
    ("trained-for-other-model", _other_model, AdapterIncompatibleError, "wrong base model"),
    ("layer-beyond-model", _deeper_model, AdapterIncompatibleError, "out of range"),
    ("nan-weights", lambda d: _rewrite(d, _nan), AdapterIncompatibleError, "NaN"),
    ("zero3-empty-tensors", _zero3, AdapterError, "empty"),
    ("nemo-two-files", _nemo_two_files, AdapterFormatError, ".nemo"),
    ("nemo-not-a-tar", _nemo_corrupt, AdapterFormatError, "tar"),
    ("trtllm-npy-and-bin-disagree", _trt_with_stale_bin, AdapterFormatError, "disagree"),
    (
        "trtllm-float-config",
        lambda d: _trt(d, np.zeros((1, 2, 8), np.float16), np.zeros((1, 2, 4), np.float32)),
        AdapterFormatError,
        "int32",
    ),
    (
        "trtllm-object-array",
        lambda d: _trt(d, np.array([_RunsCode()], dtype=object), np.zeros((1, 2, 4), np.int32)),
        AdapterFormatError,
        "pickle",
    ),
]


@pytest.fixture
def good(tmp_path, tiny_llama_dir) -> Path:
    TINY_DIR[:] = [tiny_llama_dir]
    d = tmp_path / "adapter"
    make_peft_adapter(d)
    return d


@pytest.mark.parametrize(("case", "breaker", "error", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_gives_a_precise_error(good, tiny_spec, case, breaker, error, phrase):
    MARKER.unlink(missing_ok=True)
    breaker(good)
    with pytest.raises(error) as err:
        formats.load_for_engine(good, tiny_spec)
    assert phrase in str(err.value), str(err.value)
    assert str(good) in str(err.value) or err.value.source.startswith(str(good))
    assert not MARKER.exists(), "loading the adapter ran code from it"


@pytest.mark.parametrize(
    ("case", "breaker", "error", "phrase"), CASES[5:9] + CASES[12:14], ids=lambda c: str(c)[:30]
)
def test_cli_inspect_reports_without_traceback(good, tiny_llama_dir, case, breaker, error, phrase):
    breaker(good)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "trtllm_peft.cli",
            "inspect",
            str(good),
            "--base",
            str(tiny_llama_dir),
            "--max-lora-rank",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert phrase in run.stdout and "Traceback" not in run.stdout + run.stderr


def test_pickle_payload_is_real():
    """The payload used above does run code under a plain pickle load: the refusal is what saves us."""
    MARKER.unlink(missing_ok=True)
    pickle.loads(pickle.dumps(_RunsCode()))
    assert MARKER.exists()
    MARKER.unlink()
