"""The TensorRT-LLM build without TensorRT-LLM: the exact commands, the metadata, recipes, the missing-library
message. The build itself runs in tests/gpu/ (deploy/gpu-smoke.sh)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

import pytest

from tests.conftest import TINY_LLAMA
from trtllm_peft.engine import engine_dir as ed
from trtllm_peft.engine.recipe import RECIPES_DIR, apply_recipe, load_recipe
from trtllm_peft.engine.trtllm_build import (
    TrtllmBuild,
    build_trtllm_engine,
    main,
    run_command,
    run_trtllm_build,
    write_metadata,
)
from trtllm_peft.errors import EngineError
from trtllm_peft.settings import Settings

SEVEN = ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]


def test_commands_carry_the_recipe_and_the_lora_flags(tmp_path):
    r = load_recipe("llama-3-8b-instruct")
    job = TrtllmBuild(
        model_dir=tmp_path / "hf",
        out=tmp_path / "engine",
        checkpoint_dir=tmp_path / "ckpt",
        dtype=r.dtype_for("trtllm"),
        max_batch_size=r.max_batch_size,
        max_seq_len=r.max_seq_len,
        max_num_tokens=r.max_num_tokens,
        lora_target_modules=r.lora_target_modules,
        max_lora_rank=64,
    )
    assert job.build_command() == [
        "trtllm-build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
        "--gemm_plugin", "auto", "--lora_plugin", "auto", "--lora_target_modules", *SEVEN, "--max_lora_rank", "64",
        "--max_batch_size", "64", "--max_input_len", "8191", "--max_seq_len", "8192", "--max_num_tokens", "8192",
        "--kv_cache_type", "paged",
        "--gather_generation_logits",
    ]  # fmt: skip
    assert TrtllmBuild(**{**job.__dict__, "gather_context_logits": True}).build_command()[-1] == (
        "--gather_context_logits"
    )
    assert job.convert_command("python3") == [
        "python3", "-m", "trtllm_peft.engine.trtllm_build", "convert", "--model_dir", str(tmp_path / "hf"),
        "--output_dir", str(tmp_path / "ckpt"), "--dtype", "bfloat16",
    ]  # fmt: skip


@pytest.fixture
def fake_engine(tmp_path, tiny_llama_dir):
    """A directory with TensorRT-LLM's engine config.json (the schema trtllm-build writes), no engine file."""
    out = tmp_path / "engine"
    out.mkdir()
    cfg = ed.engine_config(
        TINY_LLAMA, dtype="bfloat16", max_batch_size=4, max_seq_len=64, max_num_tokens=64, max_lora_rank=8
    )
    cfg["version"] = "1.2.0"  # as trtllm-build writes it (not a reference engine)
    cfg["build_config"]["plugin_config"]["dora_plugin"] = False  # trtllm-build's default
    (out / "config.json").write_text(json.dumps(cfg))
    return TrtllmBuild(
        model_dir=tiny_llama_dir,
        out=out,
        checkpoint_dir=tmp_path / "ckpt",
        max_lora_rank=8,
        lora_target_modules=tuple(SEVEN),
    )


def test_metadata_beside_tensorrt_llms_config(fake_engine):
    cmds = [fake_engine.convert_command(), fake_engine.build_command()]
    meta = write_metadata(
        fake_engine, source=fake_engine.model_dir, commands=cmds, max_gpu_loras=2, max_cpu_loras=5
    )
    engine = ed.EngineDir.open(fake_engine.out)
    assert engine.backend == "trtllm" and engine.spec.max_lora_rank == 8
    assert meta["sized_from"] == {"NIM_MAX_LORA_RANK": 8, "NIM_MAX_GPU_LORAS": 2, "NIM_MAX_CPU_LORAS": 5}
    pcc = meta["peft_cache_config"]
    assert (pcc["optimal_adapter_size"], pcc["max_adapter_size"]) == (8, 8) and pcc[
        "num_device_module_layer"
    ] > 0
    assert (
        meta["commands"][1].startswith("trtllm-build --checkpoint_dir")
        and "--lora_plugin auto" in meta["commands"][1]
    )
    assert engine.hf_config["hidden_size"] == TINY_LLAMA["hidden_size"]


def test_dora_builds_with_the_dora_plugin_and_the_engine_must_have_it(fake_engine):
    """--dora adds trtllm-build's --dora_plugin enable (tensorrt_llm/plugin/plugin.py cli_plugin_args has
    dora_plugin; examples/dora/README.md builds with --dora_plugin=enable), and the built config must say so."""
    job = TrtllmBuild(**{**fake_engine.__dict__, "dora": True})
    assert job.build_command()[-2:] == ["--dora_plugin", "enable"]
    assert "--dora_plugin" not in fake_engine.build_command()
    with pytest.raises(EngineError, match="dora_plugin False"):
        write_metadata(job, source=job.model_dir, commands=[], max_gpu_loras=1, max_cpu_loras=1)
    cfg = json.loads((job.out / "config.json").read_text())
    cfg["build_config"]["plugin_config"]["dora_plugin"] = True
    (job.out / "config.json").write_text(json.dumps(cfg))
    write_metadata(job, source=job.model_dir, commands=[], max_gpu_loras=1, max_cpu_loras=1)
    assert ed.EngineDir.open(job.out).spec.dora_plugin


def test_an_engine_without_our_lora_setup_is_refused(fake_engine):
    wrong = TrtllmBuild(**{**fake_engine.__dict__, "max_lora_rank": 16})
    with pytest.raises(EngineError, match="not the one asked for"):
        write_metadata(wrong, source=wrong.model_dir, commands=[], max_gpu_loras=1, max_cpu_loras=1)


def test_without_tensorrt_llm_the_build_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(EngineError, match="pypi.nvidia.com"):
        build_trtllm_engine(tmp_path, tmp_path / "engine")
    args = Namespace(
        model=str(tmp_path),
        out=tmp_path / "engine",
        dtype=None,
        max_batch_size=4,
        max_seq_len=64,
        max_num_tokens=None,
        lora_target_modules=SEVEN,
    )
    assert run_trtllm_build(args, Settings()) == 1
    assert "pip3 install" in capsys.readouterr().err
    assert main(["convert", "--model_dir", str(tmp_path), "--output_dir", str(tmp_path / "c")]) == 1
    assert not (tmp_path / "engine").exists()


def test_a_failing_step_names_the_command_to_rerun():
    with pytest.raises(EngineError, match=r"(?s)exit code 3; rerun it by hand.*raise SystemExit\(3\)"):
        run_command([sys.executable, "-c", "raise SystemExit(3)"], say=lambda *_: None)


def test_recipes_load_and_fill_only_unset_flags():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"smollm2-135m", "llama-3-8b-instruct"} <= set(names)
    for name in names:
        load_recipe(name)
    smol = load_recipe("smollm2-135m")
    assert (smol.dtype_for("torch"), smol.dtype_for("trtllm"), smol.model) == ("float32", "bfloat16", None)
    args = Namespace(
        model=None,
        out=None,
        dtype=None,
        max_batch_size=8,
        max_seq_len=None,
        max_num_tokens=None,
        lora_target_modules=None,
    )
    apply_recipe(args, load_recipe("llama-3-8b-instruct"), "trtllm")
    assert (args.dtype, args.max_batch_size, args.max_seq_len, str(args.out)) == (
        "bfloat16",
        8,
        8192,
        "engines/llama-3-8b-instruct",
    )
    assert args.lora_target_modules == SEVEN
    assert args.dora is False  # recipes default to no DoRA plugin; `dora: true` or --dora asks for it


def test_a_recipe_asks_for_the_dora_plugin(tmp_path):
    (tmp_path / "d.yaml").write_text("dora: true\n")
    args = Namespace(model=None, out=None, dtype=None, max_batch_size=None, max_seq_len=None)
    args.max_num_tokens = args.lora_target_modules = args.dora = None
    apply_recipe(args, load_recipe(tmp_path / "d.yaml"), "trtllm")
    assert args.dora is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_batch_size: 0\n", "max_batch_size must be a positive integer"),
        ("lora_target_modules: [q_proj]\n", "unknown lora_target_modules"),
        ("dtype: int8\n", "unsupported dtype"),
        ("max_seq_len: 64\nmax_len: 3\n", "unknown key 'max_len'"),
        ("dora: yes please\n", "dora must be true or false"),
        ("[1, 2]\n", "a recipe is a mapping"),
    ],
)
def test_bad_recipes_are_refused(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(EngineError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(EngineError, match="known recipes: .*smollm2-135m"):
        load_recipe("no-such-model")


def test_hf_config_written_for_tensorrt_llms_transformers():
    from trtllm_peft.engine.trtllm_build import portable_hf_config

    v5 = {
        "architectures": ["LlamaForCausalLM"],
        "dtype": "float32",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0},
    }
    out = portable_hf_config(v5, "bfloat16")
    assert (out["torch_dtype"], out["dtype"], out["rope_theta"]) == ("bfloat16", "bfloat16", 500000.0)
    assert out["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    plain = portable_hf_config({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}, "float16")
    assert plain["rope_theta"] == 1e5 and "rope_scaling" not in plain


@pytest.mark.parametrize("flag", [[], ["--gather-context-logits"], ["--gather_context_logits"]])
def test_build_gathers_context_logits_only_when_asked(monkeypatch, tmp_path, tiny_llama_dir, flag):
    """`trtllm-peft build --backend trtllm --gather-context-logits` reaches trtllm-build (the TensorRT-LLM
    executor refuses `echo` + `logprobs` on an engine built without it). The seam is running the commands:
    TensorRT-LLM's conversion and build need a GPU (tests/gpu/)."""
    from trtllm_peft.cli import main as cli_main
    from trtllm_peft.engine import backend, trtllm_build

    ran = []

    def run(cmd, say=print):
        ran.append(cmd)
        if cmd[0] == "trtllm-build":
            raise EngineError("stopped before TensorRT-LLM builds")

    monkeypatch.setattr(backend, "trtllm_unavailable_reason", lambda: None)
    monkeypatch.setattr(trtllm_build, "_trtllm_build_executable", lambda: "trtllm-build")
    monkeypatch.setattr(trtllm_build, "run_command", run)
    args = [
        "build",
        "--backend",
        "trtllm",
        "--model",
        str(tiny_llama_dir),
        "--out",
        str(tmp_path / "e"),
        *flag,
    ]
    assert cli_main(args) == 1
    build_cmd = ran[-1]
    assert build_cmd[0] == "trtllm-build" and "--gather_generation_logits" in build_cmd
    assert ("--gather_context_logits" in build_cmd) is bool(flag)
