"""`trtllm-peft triton-repo`: every config.pbtxt read back with Triton's own ModelConfig schema (from tritonclient).

The engine is the tiny Llama's config in TensorRT-LLM's engine schema (bf16, max rank 8); adapters are real
PEFT adapters. Expected PEFT-cache numbers are worked out by hand below from TensorRT-LLM's page rules.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LLAMA, make_peft_adapter
from trtllm_peft import formats
from trtllm_peft.engine.engine_dir import engine_config, write_configs
from trtllm_peft.errors import SettingsError
from trtllm_peft.lora import load_spec, pack
from trtllm_peft.settings import Settings
from trtllm_peft.triton_repo import add_triton_repo_arguments, generate_repository, run_triton_repo

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

GIB = 1024**3
MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls", "peft")
# Tiny Llama, 7 modules, in+out per module: q 64, k 48, v 48, dense 64 (hidden×hidden), gate/up/down 80.
# page width = min = 48 values; slots per page = max(8 · 3 layers · Σ ceil(d/48) = 8·3·12, ceil(8·80/48)) = 288
PAGE_WIDTH, SLOTS_PER_PAGE, BF16 = 48, 288, 2
PAGE_BYTES = PAGE_WIDTH * SLOTS_PER_PAGE * BF16


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("engine")
    cfg = engine_config(
        TINY_LLAMA, dtype="bfloat16", max_batch_size=16, max_seq_len=128, max_num_tokens=256, max_lora_rank=8
    )
    write_configs(d, cfg, {"backend": "trtllm"})
    return d


@pytest.fixture(scope="module")
def engine16(tmp_path_factory) -> Path:
    """The same engine in fp16: the dtype TensorRT-LLM can read prefetch files of."""
    d = tmp_path_factory.mktemp("engine16")
    cfg = engine_config(
        TINY_LLAMA, dtype="float16", max_batch_size=16, max_seq_len=128, max_num_tokens=256, max_lora_rank=8
    )
    write_configs(d, cfg, {"backend": "trtllm"})
    return d


@pytest.fixture(scope="module")
def peft_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    make_peft_adapter(root / "billing", seed=1, r=4)
    make_peft_adapter(root / "support", seed=2, r=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(root / "too-big", seed=3, r=16)  # the engine's max rank is 8
    (root / "empty").mkdir()
    return root


def settings(peft_source: Path, **kw) -> Settings:
    return Settings(peft_source=peft_source, max_gpu_loras=3, max_cpu_loras=5, **kw)


@pytest.fixture(scope="module")
def repo(engine, peft_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo")
    generate_repository(engine, out, settings(peft_source), gpu_free_bytes=40 * GIB)
    return out


def read_config(repo: Path, model: str):
    """Parse with Triton's schema: an unknown field or a wrong type raises."""
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_every_config_parses_with_tritons_schema(repo, engine):
    kinds = {}
    for model in MODELS:
        cfg = read_config(repo, model)
        assert cfg.name == model and cfg.max_batch_size == 16  # the engine's max_batch_size
        assert (repo / model / "1").is_dir()  # Triton needs a version folder, ensembles too
        kinds[model] = cfg.platform or cfg.backend
    assert kinds == {
        "preprocessing": "python",
        "tensorrt_llm": "tensorrtllm",
        "postprocessing": "python",
        "ensemble": "ensemble",
        "tensorrt_llm_bls": "python",
        "peft": "python",
    }
    trt = read_config(repo, "tensorrt_llm")
    p = params(trt)
    assert p["gpt_model_path"] == str(engine.resolve()) and p["gpt_model_type"] == "inflight_fused_batching"
    assert not trt.model_transaction_policy.decoupled
    assert params(read_config(repo, "preprocessing"))["tokenizer_dir"] == str(engine.resolve())
    assert params(read_config(repo, "tensorrt_llm_bls"))["tensorrt_llm_model_name"] == "tensorrt_llm"
    peft = params(read_config(repo, "peft"))
    assert peft["target_model"] == "ensemble" and peft["engine_dir"] == str(engine.resolve())
    assert peft["lora_tasks_file"] == str(repo.resolve() / "lora_tasks.json")
    assert "class TritonPythonModel(PeftModel)" in (repo / "peft" / "1" / "model.py").read_text()


def test_lora_inputs_take_the_engine_dtype(repo):
    for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls"):
        inputs = {i.name: i for i in read_config(repo, model).input}
        assert inputs["lora_weights"].data_type == model_config_pb2.TYPE_BF16, model
        assert inputs["lora_config"].data_type == model_config_pb2.TYPE_INT32
        assert inputs["lora_task_id"].data_type == model_config_pb2.TYPE_UINT64
        assert inputs["lora_weights"].optional and list(inputs["lora_weights"].dims) == [-1, -1]


def test_peft_cache_parameters_hold_exactly_nim_counts(repo):
    p = params(read_config(repo, "tensorrt_llm"))
    assert (
        p["lora_cache_optimal_adapter_size"] == p["lora_cache_max_adapter_size"] == "8"
    )  # one page per adapter
    host = int(p["lora_cache_host_memory_bytes"])
    assert host == 5 * PAGE_BYTES  # NIM_MAX_CPU_LORAS=5
    slots = host // (PAGE_WIDTH * BF16)  # TensorRT-LLM: host_cache_size / (page width · dtype bytes)
    assert math.ceil(slots / SLOTS_PER_PAGE) == 5 and slots % SLOTS_PER_PAGE == 0
    fraction, free = float(p["lora_cache_gpu_memory_fraction"]), 40 * GIB  # free after the engine

    def device_pages(f: float, free_now: float) -> int:  # getMaxNumSlots: percent × free, then pages
        return math.ceil(int(f * free_now) // (PAGE_WIDTH * BF16) / SLOTS_PER_PAGE)

    # NIM_MAX_GPU_LORAS=3 even when 10% less is free than stated (the margin), and not more than needed then
    assert device_pages(fraction, free) >= device_pages(fraction, 0.9 * free) >= 3
    assert device_pages(fraction - 1e-4, 0.9 * free) < 3


def test_ensemble_agrees_with_its_steps(repo):
    """What Triton checks when it loads an ensemble: names, types, every required input fed."""
    ens = read_config(repo, "ensemble")
    produced = {i.name: i.data_type for i in ens.input}
    consumed: set[str] = set()
    for step in ens.ensemble_scheduling.step:
        model = read_config(repo, step.model_name)
        inputs, outputs = {i.name: i for i in model.input}, {o.name: o for o in model.output}
        for key, tensor in step.input_map.items():
            assert key in inputs, (step.model_name, key)
            assert produced[tensor] == inputs[key].data_type, (step.model_name, key)
            consumed.add(tensor)
        required = {n for n, i in inputs.items() if not i.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        for key, tensor in step.output_map.items():
            assert key in outputs and tensor not in produced, (step.model_name, key)
            produced[tensor] = outputs[key].data_type
    assert {i.name for i in ens.input} <= consumed  # no ensemble input goes nowhere
    for out in ens.output:
        assert produced[out.name] == out.data_type
    required = {i.name for i in ens.input if not i.optional}
    assert required == {"text_input", "max_tokens"}


def test_prefetch_dir_holds_converted_adapters_by_task_id(engine16, peft_source, tmp_path):
    repo = tmp_path / "repo"
    generate_repository(engine16, repo, settings(peft_source), gpu_free_bytes=40 * GIB)
    spec = load_spec(engine16)
    tasks = json.loads((repo / "lora_tasks.json").read_text())
    assert tasks["tasks"] == {"billing": 1, "support": 2} and tasks["prefetched"] is True
    assert "rank 16" in tasks["skipped"]["too-big"] and "empty" in tasks["skipped"]
    assert params(read_config(repo, "tensorrt_llm"))["lora_prefetch_dir"] == str(
        repo.resolve() / "tensorrt_llm" / "lora_prefetch"
    )
    prefetch = repo / "tensorrt_llm" / "lora_prefetch"
    assert sorted(p.name for p in prefetch.iterdir()) == ["1", "2"]  # TensorRT-LLM reads numeric folders only
    for name, task_id in tasks["tasks"].items():
        files = {f.name for f in (prefetch / str(task_id)).iterdir()}
        assert files == {"model.lora_weights.npy", "model.lora_config.npy"}
        assert np.load(prefetch / str(task_id) / "model.lora_weights.npy").dtype.str == "<f2"  # loadNpy's f2
        got = pack(formats.load(prefetch / str(task_id), spec), torch.float16)
        want = pack(formats.load_for_engine(peft_source / name, spec), torch.float16)
        assert torch.equal(got.config, want.config) and torch.equal(got.weights, want.weights)


def test_bf16_engine_gets_ids_but_no_prefetch_files(repo):
    """loadNpy (numpyUtils.cpp typeFromNumpyDesc) knows ? u1 i1 i4 i8 f2 f4: a |V2 file would stop the start."""
    tasks = json.loads((repo / "lora_tasks.json").read_text())
    assert tasks["tasks"] == {"billing": 1, "support": 2} and tasks["prefetched"] is False
    assert set(tasks["fingerprints"]) == {
        "billing",
        "support",
    }  # the peft model reuses ids of unchanged files
    assert not any((repo / "tensorrt_llm" / "lora_prefetch").iterdir())
    assert "lora_prefetch_dir" not in params(read_config(repo, "tensorrt_llm"))


def test_regenerating_keeps_task_ids(engine, peft_source, tmp_path):
    src = tmp_path / "loras"
    src.mkdir()
    make_peft_adapter(src / "b", seed=4, r=2)
    out = tmp_path / "repo"
    generate_repository(engine, out, settings(src), gpu_free_bytes=40 * GIB)
    make_peft_adapter(src / "a", seed=5, r=2)  # sorts first, but "b" keeps its id
    generate_repository(engine, out, settings(src), gpu_free_bytes=40 * GIB, decoupled=True)
    assert json.loads((out / "lora_tasks.json").read_text())["tasks"] == {"b": 1, "a": 2}
    assert read_config(out, "tensorrt_llm").model_transaction_policy.decoupled


def test_served_paths_and_python_models(engine16, peft_source, tmp_path):
    backend = tmp_path / "all_models" / "inflight_batcher_llm"
    for model in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        (backend / model / "1" / "lib").mkdir(parents=True)
        (backend / model / "1" / "model.py").write_text(f"# {model}\n")
    out = tmp_path / "repo"
    report = generate_repository(
        engine16,
        out,
        settings(peft_source),
        gpu_free_bytes=40 * GIB,
        served_engine_dir="/engines/tiny",
        served_repo_dir="/models",
        python_models=backend,
    )
    assert report.python_models_from == backend
    assert (out / "tensorrt_llm_bls" / "1" / "model.py").read_text() == "# tensorrt_llm_bls\n"
    p = params(read_config(out, "tensorrt_llm"))
    assert (
        p["gpt_model_path"] == "/engines/tiny"
        and p["lora_prefetch_dir"] == "/models/tensorrt_llm/lora_prefetch"
    )
    assert params(read_config(out, "postprocessing"))["tokenizer_dir"] == "/engines/tiny"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu-free-gib", "0.00005"], "NIM_MAX_GPU_LORAS=3: the device LoRA cache needs"),
        (["--gpu-free-gib", "40", "--python-models", "/nonexistent"], "not tensorrtllm_backend's all_models"),
    ],
)
def test_cli_errors(engine, peft_source, tmp_path, argv, message):
    parser = argparse.ArgumentParser()
    add_triton_repo_arguments(parser)
    args = parser.parse_args(["--engine", str(engine), "--out", str(tmp_path / "r"), *argv])
    with pytest.raises(SettingsError, match=message):
        run_triton_repo(args, settings(peft_source))


def test_cli_writes_and_reports(engine, peft_source, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_triton_repo_arguments(parser)
    args = parser.parse_args(["--engine", str(engine), "--out", str(tmp_path / "r"), "--gpu-free-gib", "40"])
    assert run_triton_repo(args, settings(peft_source)) == 0
    text = capsys.readouterr().out
    assert "no lora_prefetch_dir" in text and "2 adapters served by name" in text and "2 skipped" in text
    assert "skipped too-big" in text and "of the 40.00 GiB free after the engine" in text
    assert read_config(tmp_path / "r", "ensemble").platform == "ensemble"


def test_kv_cache_settings_follow_nim_variables(engine, peft_source, tmp_path):
    out = tmp_path / "r"
    nim = settings(peft_source, kv_cache_percent=0.75, enable_kv_cache_reuse=True)
    generate_repository(engine, out, nim, gpu_free_bytes=40 * GIB)
    p = params(read_config(out, "tensorrt_llm"))
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.75" and p["enable_kv_cache_reuse"] == "True"
    generate_repository(engine, out, nim, gpu_free_bytes=40 * GIB, kv_cache_free_gpu_mem_fraction=0.5)
    assert (
        params(read_config(out, "tensorrt_llm"))["kv_cache_free_gpu_mem_fraction"] == "0.5"
    )  # the flag wins
