"""`trtllm-peft convert` and `inspect` on real adapters, in-process (and once as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import make_peft_adapter
from trtllm_peft.cli import main


@pytest.fixture
def hf_adapter(tmp_path):
    d = tmp_path / "math-hf"
    make_peft_adapter(d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return d


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for word in ("convert", "inspect", "build", "NIM_MAX_LORA_RANK", "NeMo", "TensorRT-LLM"):
        assert word in out


@pytest.mark.parametrize(("dtype", "np_kind"), [("float16", "f"), ("float32", "f"), ("bfloat16", "V")])
def test_convert_hf_to_trtllm(hf_adapter, tiny_llama_dir, tmp_path, capsys, dtype, np_kind):
    out = tmp_path / "trt"
    assert (
        main(["convert", str(hf_adapter), "--out", str(out), "--base", str(tiny_llama_dir), "--dtype", dtype])
        == 0
    )
    weights = np.load(out / "model.lora_weights.npy")
    config = np.load(out / "model.lora_config.npy")
    assert config.dtype == np.int32 and config.shape == (1, 9, 4)  # 3 layers x 3 modules
    assert weights.shape[:2] == (1, 9) and weights.dtype.kind == np_kind
    assert sorted(set(config[0, :, 0].tolist())) == [1, 3, 6]  # attn_q, attn_v, mlp_4h_to_h
    assert "converted" in capsys.readouterr().out


def test_convert_any_format_to_any_other(hf_adapter, tiny_llama_dir, tmp_path):
    """HF -> TRT -> NeMo -> HF -> TRT keeps the math; NeMo adds zero k rows (its fused/canonical QKV
    adapter always has all three parts), which change nothing."""
    from trtllm_peft import formats
    from trtllm_peft.lora import load_spec

    base = ["--base", str(tiny_llama_dir), "--dtype", "float32"]
    src = hf_adapter
    for fmt, name in [("trtllm", "t1"), ("nemo", "n1"), ("hf", "h1"), ("trtllm", "t2")]:
        assert main(["convert", str(src), "--to", fmt, "--out", str(tmp_path / name), *base]) == 0
        src = tmp_path / name
    spec = load_spec(tiny_llama_dir)
    first, last = formats.load(tmp_path / "t1", spec), formats.load(tmp_path / "t2", spec)
    for key, w in last:
        expected = first.weights[key].delta() if key in first.weights else 0 * w.delta()
        assert torch.allclose(w.delta(), expected, atol=1e-6), key
    assert set(first.weights) <= set(last.weights)


def test_inspect_json_reports_format_ranks_size_and_fit(hf_adapter, tiny_llama_dir, capsys):
    assert main(["inspect", str(hf_adapter), "--base", str(tiny_llama_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf" and report["ok"] and report["problems"] == []
    assert report["modules"] == {"attn_q": [4], "attn_v": [4], "mlp_4h_to_h": [4]}
    assert report["layers"] == [0, 1, 2] and report["max_rank"] == 4
    # A [4,32] + B [32,4] (q), A [4,32] + B [16,4] (v), A [4,48] + B [32,4] (down), 3 layers, float32
    assert report["num_params"] == 3 * (256 + 192 + 320) and report["size_bytes"] == 4 * report["num_params"]
    assert report["nim_formula_elements"] == 4 * 32 * 3 * 3


def test_inspect_names_every_problem_and_exits_1(hf_adapter, tiny_llama_dir, capsys):
    assert main(["inspect", str(hf_adapter), "--base", str(tiny_llama_dir), "--max-lora-rank", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("exceeds max_lora_rank 2") == 3 and "layers 0-2" in out


def test_user_errors_are_one_line_without_traceback(hf_adapter, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "trtllm_peft.cli",
            "convert",
            str(hf_adapter),
            "--out",
            str(tmp_path / "o"),
            "--base",
            str(tmp_path / "no-such-model"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert (
        run.stderr.startswith("error: ") and "no config.json" in run.stderr and "Traceback" not in run.stderr
    )


# ---- build-kernels: what `make install` and the CPU image run ---------------------------------------------


def test_build_kernels_where_the_cpu_cannot_run_them_says_why_and_exits_0(monkeypatch, tmp_path, capsys):
    from trtllm_peft.executor.torch import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "PREBUILT", tmp_path / "_prebuilt")
    monkeypatch.setattr(cpu_kernels, "why_unavailable", lambda: "no avx512_bf16 (a test CPU)")
    assert main(["build-kernels"]) == 0
    assert "not built: no avx512_bf16 (a test CPU)" in capsys.readouterr().out
    assert not (tmp_path / "_prebuilt").exists()


@pytest.mark.parametrize(("built", "code"), [(True, 0), (False, 1)], ids=["built", "lock-held-too-long"])
def test_build_kernels_builds_the_current_sources_into_prebuilt(monkeypatch, tmp_path, capsys, built, code):
    from trtllm_peft.executor.torch import cpu_kernels

    calls = []
    monkeypatch.setattr(cpu_kernels, "PREBUILT", tmp_path / "_prebuilt")
    monkeypatch.setattr(cpu_kernels, "why_unavailable", lambda: None)
    # the compiler is the seam: compiling is integration work (tests/integration/test_kernel_build_lock.py)
    monkeypatch.setattr(
        cpu_kernels, "build", lambda d, name: calls.append((d, name)) or (sys if built else None)
    )
    assert main(["build-kernels"]) == code
    assert calls == [(tmp_path / "_prebuilt", cpu_kernels.module_name())]
    assert (f"built {cpu_kernels.module_name()}" in capsys.readouterr().out) is built
