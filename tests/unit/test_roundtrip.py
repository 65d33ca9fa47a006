"""HF PEFT -> TensorRT-LLM -> HF PEFT -> TensorRT-LLM loses nothing; the converter scripts write what formats.save does.

The adapter is a real one made by peft (rsLoRA and a rank_pattern, so ranks and scales differ per module);
PEFT's own `scaling` is the oracle for the B·scale stored in the TensorRT-LLM file.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_peft_adapter
from trtllm_peft import formats
from trtllm_peft.lora.modules import HF_TO_TRTLLM
from trtllm_peft.lora.spec import DTYPES

CONVERTERS = Path(__file__).resolve().parents[2] / "converters"


@pytest.fixture(scope="module")
def peft(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft") / "adapter"
    model = make_peft_adapter(
        d, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2, "down_proj": 6}
    )
    return d, model


def same_bytes(a: Path, b: Path) -> bool:
    return np.array_equal(np.fromfile(a, dtype=np.uint8), np.fromfile(b, dtype=np.uint8))


def peft_scaled(model, dtype: torch.dtype) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, module) -> (A, B·scaling) as PEFT computes the update, cast like TensorRT-LLM does."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layer = int(name.split(".layers.")[1].split(".")[0])
            a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            out[(layer, HF_TO_TRTLLM[name.rsplit(".", 1)[1]])] = (
                a.to(dtype),
                (b.float() * module.scaling["default"]).to(dtype),
            )
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_hf_trtllm_hf_trtllm_is_bit_identical(peft, tiny_spec, tmp_path, dtype):
    peft_dir, model = peft
    spec = tiny_spec.with_limits(dtype=dtype)
    first = formats.save(formats.load(peft_dir), tmp_path / "trt1", "trtllm", spec)
    formats.save(formats.load(tmp_path / "trt1", spec), tmp_path / "hf", "hf", spec)
    assert formats.detect(tmp_path / "hf") == "hf"
    second = formats.save(formats.load(tmp_path / "hf"), tmp_path / "trt2", "trtllm", spec)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert same_bytes(a, b), a.name

    # and the first file holds what PEFT computes: A, and B times PEFT's own scaling (rsLoRA, rank_pattern)
    back = formats.load(tmp_path / "trt1", spec)
    expected = peft_scaled(model, DTYPES[dtype])
    assert sorted(back.weights) == sorted(expected) and len(expected) == 3 * 7
    assert back.ranks["attn_q"] == [2] and back.ranks["mlp_4h_to_h"] == [6] and back.ranks["attn_k"] == [4]
    for key, w in back:
        a, b = expected[key]
        assert torch.equal(w.a, a) and torch.equal(w.b, b), key


def run_converter(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CONVERTERS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("storage", [None, "bfloat16"])
def test_hf_lora_convert_script_writes_what_formats_save_writes(peft, tiny_spec, tmp_path, storage):
    peft_dir, _ = peft
    flags = ["--storage-type", storage] if storage else []
    run = run_converter("hf_lora_convert.py", "-i", peft_dir, "-o", tmp_path / "script", *flags)
    assert run.returncode == 0, run.stderr
    assert "[1, 21, " in run.stdout and "ranks 2-6" in run.stdout
    spec = tiny_spec.with_limits(dtype=storage or "float16")  # float16: TensorRT-LLM's default too
    for ref in formats.save(formats.load(peft_dir), tmp_path / "ref", "trtllm", spec):
        assert same_bytes(tmp_path / "script" / ref.name, ref), ref.name


def test_nemo_lora_convert_script_writes_what_formats_save_writes(peft, tiny_spec, tmp_path):
    peft_dir, _ = peft
    spec = tiny_spec.with_limits(dtype="bfloat16")
    formats.save(formats.load(peft_dir), tmp_path / "nemo", "nemo", spec)
    (nemo_file,) = (tmp_path / "nemo").glob("*.nemo")
    for source in (nemo_file, tmp_path / "nemo"):  # the .nemo file itself, or its directory
        out = tmp_path / f"script-{source.suffix or 'dir'}"
        run = run_converter(
            "nemo_lora_convert.py",
            "-i",
            source,
            "-o",
            out,
            "--storage-type",
            "bfloat16",
            "--write-cpp-runtime-tensors",
        )
        assert run.returncode == 0, run.stderr
        for ref in formats.save(formats.load(tmp_path / "nemo"), tmp_path / "ref", "trtllm", spec):
            assert same_bytes(out / ref.name, ref), ref.name


def load_script(name: str):
    """A converter script as a module (converters/ is not a package), to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), CONVERTERS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "source", "phrase"),
    [
        ("hf_lora_convert.py", "missing", "does not exist"),
        ("hf_lora_convert.py", "trtllm", "not a Hugging Face PEFT adapter"),
        ("nemo_lora_convert.py", "peft", "not a NeMo adapter"),
        ("nemo_lora_convert.py", "missing", "does not exist"),
        ("hf_lora_convert.py", "lfs", "Git-LFS pointer"),
    ],
)
def test_converter_scripts_refuse_bad_input(peft, tiny_spec, tmp_path, capsys, script, source, phrase):
    peft_dir, _ = peft
    sources = {
        "missing": tmp_path / "nope",
        "peft": peft_dir,
        "trtllm": tmp_path / "trt",
        "lfs": tmp_path / "lfs",
    }
    formats.save(formats.load(peft_dir), tmp_path / "trt", "trtllm", tiny_spec)
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    (tmp_path / "lfs" / "adapter_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
    )
    assert load_script(script).main(["-i", str(sources[source]), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err, err
    assert not (tmp_path / "out").exists()


def test_converter_script_process_exits_2_without_traceback(tmp_path):
    run = run_converter("hf_lora_convert.py", "-i", tmp_path / "nope", "-o", tmp_path / "out")
    assert run.returncode == 2 and run.stderr == f"error: {tmp_path / 'nope'}: does not exist\n", run.stderr
