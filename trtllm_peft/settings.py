"""Settings from the environment (NIM's variable names). The only module that reads os.environ.

Built once at startup (`Settings.from_env()`), frozen, and passed down. A bad value stops startup with a
message that names the variable and says what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from trtllm_peft.errors import SettingsError

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKENDS = ("auto", "torch", "trtllm")
SYMLINK_POLICIES = ("inside", "all", "none")


@dataclass(frozen=True)
class Settings:
    """Every knob a user sets through the environment. Field docs double as `--help` text."""

    peft_source: Path | None = (
        None  # NIM_PEFT_SOURCE (or LOCAL_PEFT_DIRECTORY): one sub-directory per adapter
    )
    peft_refresh_interval: float | None = (
        None  # NIM_PEFT_REFRESH_INTERVAL: seconds between rescans; None = once
    )
    max_gpu_loras: int = 8  # NIM_MAX_GPU_LORAS: device PEFT cache, in adapters of max rank
    max_cpu_loras: int = 16  # NIM_MAX_CPU_LORAS: host PEFT cache, in adapters of max rank
    max_lora_rank: int = 32  # NIM_MAX_LORA_RANK: largest rank the engine accepts
    served_model_name: str | None = None  # NIM_SERVED_MODEL_NAME: id of the base model in /v1/models
    server_port: int = 8000  # NIM_SERVER_PORT
    grpc_port: int = 8001  # TRTLLM_PEFT_GRPC_PORT: KServe v2 gRPC (Triton's 8001); 0 turns it off
    max_model_len: int | None = None  # NIM_MAX_MODEL_LEN: longest prompt + completion
    log_level: str = "INFO"  # NIM_LOG_LEVEL
    jsonl_logging: bool = False  # NIM_JSONL_LOGGING: one JSON object per log line
    cache_path: Path | None = None  # NIM_CACHE_PATH: where downloads and converted adapters go
    engine_dir: Path = Path("engines/smollm2-135m")  # TRTLLM_PEFT_ENGINE_DIR: the built engine to serve
    backend: str = "auto"  # TRTLLM_PEFT_BACKEND: auto | torch | trtllm
    cpu_kernels: bool = True  # TRTLLM_PEFT_CPU_KERNELS: 0 runs the reference engine on plain torch ops only
    follow_symlinks: str = (
        "inside"  # TRTLLM_PEFT_FOLLOW_SYMLINKS: inside (links resolving under NIM_PEFT_SOURCE) | all | none
    )
    # HTTP limits: what one client may cost before it gets a precise error (server/limits.py)
    max_request_bytes: int = 4 << 20  # TRTLLM_PEFT_MAX_REQUEST_BYTES: largest OpenAI request body (413)
    max_triton_request_bytes: int = 64 << 20  # TRTLLM_PEFT_MAX_TRITON_REQUEST_BYTES: /v2 bodies (413)
    read_timeout: float = 30.0  # TRTLLM_PEFT_READ_TIMEOUT: s to send a request head / the next body bytes
    drain_timeout: float = 30.0  # TRTLLM_PEFT_DRAIN_TIMEOUT: s running requests get to finish on SIGTERM
    lora_queue_timeout: float = 30.0  # TRTLLM_PEFT_LORA_QUEUE_TIMEOUT: s to wait for host-cache room (429)
    lora_queue_size: int = 1024  # TRTLLM_PEFT_LORA_QUEUE_SIZE: requests waiting for host-cache room at most
    # TRTLLM_PEFT_DISK_LORAS: packed adapters kept on local disk (NIM_CACHE_PATH, else the temp dir) for
    # host-cache misses, in adapters of max rank (None: 2 x NIM_MAX_CPU_LORAS; 0: none)
    disk_loras: int | None = None
    enable_kv_cache_reuse: bool = (
        False  # NIM_ENABLE_KV_CACHE_REUSE: reuse cached prompt prefixes (per adapter)
    )
    kv_cache_percent: float | None = (
        None  # NIM_KVCACHE_PERCENT: share of the free memory for the KV cache (0.9)
    )
    enable_chunked_context: bool = True  # TRTLLM_PEFT_ENABLE_CHUNKED_CONTEXT: prefill long prompts in chunks
    max_num_tokens: int | None = None  # TRTLLM_PEFT_MAX_NUM_TOKENS: tokens per engine iteration (engine's)
    # TRTLLM_PEFT_CHUNK_TOKENS_WHILE_DECODING: prompt-chunk tokens per iteration while streams decode
    # (reference engine; None: its device's default, 24 on CPU; 0: only max_num_tokens)
    chunk_tokens_while_decoding: int | None = None
    tool_call_parser: str = "auto"  # TRTLLM_PEFT_TOOL_CALL_PARSER: hermes | llama3_json | mistral | auto
    # `trtllm-peft pull`. Secrets are kept out of repr() so that logging a Settings never leaks them.
    hf_token: str | None = field(default=None, repr=False)  # HF_TOKEN (or HUGGING_FACE_HUB_TOKEN)
    hf_endpoint: str = "https://huggingface.co"  # HF_ENDPOINT: the Hugging Face Hub (or a mirror)
    ngc_api_key: str | None = field(default=None, repr=False)  # NGC_API_KEY (or NGC_CLI_API_KEY)
    # TRTLLM_PEFT_API_KEY: when set, /v1/* and /v2/* (health routes excepted) need `Authorization: Bearer <key>`
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; SettingsError lists each bad one."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        values = dict(
            peft_source=reader.path("NIM_PEFT_SOURCE", fallback="LOCAL_PEFT_DIRECTORY"),
            peft_refresh_interval=reader.number("NIM_PEFT_REFRESH_INTERVAL", minimum=0.1),
            max_gpu_loras=reader.integer("NIM_MAX_GPU_LORAS", 8, minimum=1),
            max_cpu_loras=reader.integer("NIM_MAX_CPU_LORAS", 16, minimum=1),
            max_lora_rank=reader.integer("NIM_MAX_LORA_RANK", 32, minimum=1),
            served_model_name=env.get("NIM_SERVED_MODEL_NAME") or None,
            server_port=reader.integer("NIM_SERVER_PORT", 8000, minimum=1, maximum=65535),
            grpc_port=reader.integer("TRTLLM_PEFT_GRPC_PORT", 8001, minimum=0, maximum=65535),
            max_model_len=reader.integer("NIM_MAX_MODEL_LEN", None, minimum=1),
            log_level=reader.choice("NIM_LOG_LEVEL", "INFO", LOG_LEVELS),
            jsonl_logging=reader.boolean("NIM_JSONL_LOGGING"),
            cache_path=reader.path("NIM_CACHE_PATH"),
            engine_dir=reader.path("TRTLLM_PEFT_ENGINE_DIR") or cls.engine_dir,
            backend=reader.choice("TRTLLM_PEFT_BACKEND", "auto", BACKENDS, upper=False),
            tool_call_parser=reader.choice(
                "TRTLLM_PEFT_TOOL_CALL_PARSER",
                "auto",
                ("auto", "hermes", "llama3_json", "mistral"),
                upper=False,
            ),
            cpu_kernels=reader.boolean("TRTLLM_PEFT_CPU_KERNELS", default=True),
            follow_symlinks=reader.choice(
                "TRTLLM_PEFT_FOLLOW_SYMLINKS", "inside", SYMLINK_POLICIES, upper=False
            ),
            max_request_bytes=reader.integer("TRTLLM_PEFT_MAX_REQUEST_BYTES", 4 << 20, minimum=1024),
            max_triton_request_bytes=reader.integer(
                "TRTLLM_PEFT_MAX_TRITON_REQUEST_BYTES", 64 << 20, minimum=1024
            ),
            read_timeout=reader.seconds("TRTLLM_PEFT_READ_TIMEOUT", 30.0, minimum=0.1),
            drain_timeout=reader.seconds("TRTLLM_PEFT_DRAIN_TIMEOUT", 30.0, minimum=0),
            lora_queue_timeout=reader.seconds("TRTLLM_PEFT_LORA_QUEUE_TIMEOUT", 30.0, minimum=0),
            lora_queue_size=reader.integer("TRTLLM_PEFT_LORA_QUEUE_SIZE", 1024, minimum=0),
            disk_loras=reader.integer("TRTLLM_PEFT_DISK_LORAS", None, minimum=0),
            enable_kv_cache_reuse=reader.boolean("NIM_ENABLE_KV_CACHE_REUSE"),
            kv_cache_percent=reader.fraction("NIM_KVCACHE_PERCENT"),
            enable_chunked_context=reader.boolean("TRTLLM_PEFT_ENABLE_CHUNKED_CONTEXT", default=True),
            max_num_tokens=reader.integer("TRTLLM_PEFT_MAX_NUM_TOKENS", None, minimum=1),
            chunk_tokens_while_decoding=reader.integer(
                "TRTLLM_PEFT_CHUNK_TOKENS_WHILE_DECODING", None, minimum=0
            ),
            hf_token=reader.text("HF_TOKEN", fallback="HUGGING_FACE_HUB_TOKEN"),
            hf_endpoint=reader.url("HF_ENDPOINT") or cls.hf_endpoint,
            ngc_api_key=reader.text("NGC_API_KEY", fallback="NGC_CLI_API_KEY"),
            api_key=reader.text("TRTLLM_PEFT_API_KEY"),
        )
        reader.raise_if_errors()
        return cls(**values)._consistent()

    def _consistent(self) -> Settings:
        """Self, once the variables that constrain each other agree (SettingsError naming both otherwise)."""
        if self.grpc_port == self.server_port:
            raise SettingsError(
                f"TRTLLM_PEFT_GRPC_PORT ({self.grpc_port}) must differ from NIM_SERVER_PORT: "
                "gRPC has its own port (0 turns it off)"
            )
        if self.max_cpu_loras < self.max_gpu_loras:
            raise SettingsError(
                f"NIM_MAX_CPU_LORAS ({self.max_cpu_loras}) must be >= NIM_MAX_GPU_LORAS "
                f"({self.max_gpu_loras}): every adapter on the GPU is also held in host memory"
            )
        return self

    def replace(self, **changes) -> Settings:
        """A copy with some fields changed (command-line flags override the environment)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class _Reader:
    """Parses variables, collecting every error instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]):
        self.env, self.errors = env, []

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def integer(
        self, name: str, default: int | None, *, minimum: int, maximum: int | None = None
    ) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.errors.append(f"{name}={raw!r} is not an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.errors.append(f"{name}={value} must be {bound}")
        return value

    def number(self, name: str, *, minimum: float) -> float | None:
        """Seconds between rescans: unset means "scan only at start"."""
        return self.seconds(name, None, minimum=minimum, hint=" (unset it to scan only at start)")

    def seconds(self, name: str, default: float | None, *, minimum: float, hint: str = "") -> float | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.errors.append(f"{name}={raw!r} is not a number of seconds")
            return default
        if not minimum <= value < float("inf"):
            self.errors.append(f"{name}={raw} must be >= {minimum} seconds and finite{hint}")
        return value

    def fraction(self, name: str) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0.0 < value <= 1.0:
            self.errors.append(f"{name}={raw!r} must be a number in (0, 1]")
            return None
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        self.errors.append(f"{name}={raw!r} must be one of 1, 0, true, false")
        return False

    def choice(self, name: str, default: str, options: tuple[str, ...], *, upper: bool = True) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            self.errors.append(f"{name}={raw!r} must be one of {', '.join(options)}")
            return default
        return value

    def path(self, name: str, *, fallback: str | None = None) -> Path | None:
        raw = self.text(name, fallback=fallback)
        return Path(raw).expanduser() if raw else None

    def text(self, name: str, *, fallback: str | None = None) -> str | None:
        return self._raw(name) or (self._raw(fallback) if fallback else None)

    def url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is not None and not raw.startswith(("http://", "https://")):
            self.errors.append(f"{name}={raw!r} must be an http:// or https:// URL")
            return None
        return raw.rstrip("/") if raw else None

    def raise_if_errors(self) -> None:
        if self.errors:
            raise SettingsError("invalid environment:\n" + "\n".join(f"  - {e}" for e in self.errors))
