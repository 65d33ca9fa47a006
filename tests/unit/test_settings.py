"""NIM_* variables → Settings: defaults, parsing, and one message naming every bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtllm_peft.errors import SettingsError
from trtllm_peft.settings import Settings


def test_defaults_are_nims():
    s = Settings.from_env({})
    assert (s.max_gpu_loras, s.max_cpu_loras, s.max_lora_rank, s.server_port) == (8, 16, 32, 8000)
    assert s.peft_source is None and s.peft_refresh_interval is None and not s.jsonl_logging
    assert s.cpu_kernels


def test_values_are_parsed():
    s = Settings.from_env(
        {
            "NIM_PEFT_SOURCE": "/loras",
            "NIM_PEFT_REFRESH_INTERVAL": "2.5",
            "NIM_MAX_GPU_LORAS": "4",
            "NIM_MAX_CPU_LORAS": "40",
            "NIM_MAX_LORA_RANK": "64",
            "NIM_JSONL_LOGGING": "1",
            "NIM_LOG_LEVEL": "debug",
            "TRTLLM_PEFT_BACKEND": "TORCH",
            "TRTLLM_PEFT_CPU_KERNELS": "0",
        }
    )
    assert s.peft_source == Path("/loras") and s.peft_refresh_interval == 2.5
    assert (s.max_gpu_loras, s.max_cpu_loras, s.max_lora_rank) == (4, 40, 64)
    assert s.jsonl_logging and s.log_level == "DEBUG" and s.backend == "torch" and not s.cpu_kernels


def test_local_peft_directory_is_the_fallback():
    assert Settings.from_env({"LOCAL_PEFT_DIRECTORY": "/x"}).peft_source == Path("/x")
    assert Settings.from_env({"LOCAL_PEFT_DIRECTORY": "/x", "NIM_PEFT_SOURCE": "/y"}).peft_source == Path(
        "/y"
    )


@pytest.mark.parametrize(
    ("env", "phrase"),
    [
        ({"NIM_MAX_GPU_LORAS": "eight"}, "NIM_MAX_GPU_LORAS='eight' is not an integer"),
        ({"NIM_MAX_CPU_LORAS": "0"}, "NIM_MAX_CPU_LORAS=0 must be >= 1"),
        ({"NIM_MAX_LORA_RANK": "-4"}, "NIM_MAX_LORA_RANK=-4 must be >= 1"),
        ({"NIM_SERVER_PORT": "70000"}, "NIM_SERVER_PORT=70000 must be between 1 and 65535"),
        ({"NIM_PEFT_REFRESH_INTERVAL": "soon"}, "NIM_PEFT_REFRESH_INTERVAL='soon' is not a number"),
        ({"NIM_PEFT_REFRESH_INTERVAL": "0"}, "must be >= 0.1 seconds"),
        ({"NIM_JSONL_LOGGING": "maybe"}, "NIM_JSONL_LOGGING='maybe' must be one of"),
        ({"NIM_LOG_LEVEL": "loud"}, "NIM_LOG_LEVEL='loud' must be one of"),
        ({"TRTLLM_PEFT_BACKEND": "onnx"}, "TRTLLM_PEFT_BACKEND='onnx' must be one of auto, torch, trtllm"),
        ({"TRTLLM_PEFT_CPU_KERNELS": "fast"}, "TRTLLM_PEFT_CPU_KERNELS='fast' must be one of 1, 0"),
        ({"TRTLLM_PEFT_GRPC_PORT": "-1"}, "TRTLLM_PEFT_GRPC_PORT=-1 must be between 0 and 65535"),
        ({"TRTLLM_PEFT_GRPC_PORT": "8000"}, "TRTLLM_PEFT_GRPC_PORT (8000) must differ from NIM_SERVER_PORT"),
        (
            {"NIM_MAX_GPU_LORAS": "32", "NIM_MAX_CPU_LORAS": "16"},
            "NIM_MAX_CPU_LORAS (16) must be >= NIM_MAX_GPU_LORAS",
        ),
    ],
)
def test_bad_values_name_the_variable(env, phrase):
    with pytest.raises(SettingsError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_every_bad_variable_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"NIM_MAX_GPU_LORAS": "x", "NIM_SERVER_PORT": "y"})
    assert "NIM_MAX_GPU_LORAS" in str(err.value) and "NIM_SERVER_PORT" in str(err.value)


def test_pull_credentials_are_read_and_kept_out_of_repr():
    s = Settings.from_env(
        {"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://mirror:8080/", "NGC_CLI_API_KEY": "nvapi-y"}
    )
    assert (s.hf_token, s.hf_endpoint, s.ngc_api_key) == ("hf_x", "http://mirror:8080", "nvapi-y")
    assert "hf_x" not in repr(s) and "nvapi-y" not in repr(s)
    assert Settings.from_env({}).hf_endpoint == "https://huggingface.co"
    with pytest.raises(SettingsError, match="HF_ENDPOINT='mirror' must be an http"):
        Settings.from_env({"HF_ENDPOINT": "mirror"})
