"""Integration fixtures: the SmolLM2 reference engine, adapters in every format, a real server on a port."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from trtllm_peft import formats
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ENGINE = REPO / "engines" / "smollm2-135m"
BACKENDS = ("torch", "trtllm-standin")
QVO = ("attn_q", "attn_v", "mlp_4h_to_h")  # the modules of the adapter most tests serve


@pytest.fixture(scope="session")
def smollm2_engine() -> Path:
    """engines/smollm2-135m, built on first use exactly as `make engine` does (reused afterwards)."""
    if not (DEFAULT_ENGINE / "trtllm_peft.json").is_file():
        from trtllm_peft.engine.build import build_engine

        build_engine(None, DEFAULT_ENGINE, quiet=True)
    return DEFAULT_ENGINE


@pytest.fixture(scope="session")
def smollm2_standin_engine(smollm2_engine, tmp_path_factory) -> Path:
    """The SmolLM2 engine directory marked as a TensorRT-LLM engine, for the stand-in (tests/trtllm_standin):
    the server then runs TrtllmExecutor, whose stand-in delegates generation to the reference engine.
    Its build_config says it was built with `--gather_context_logits --gather_generation_logits`."""
    return standin_engine(smollm2_engine, tmp_path_factory.mktemp("standin"), gather_logits=True)


@pytest.fixture(scope="module")
def spec(smollm2_engine) -> ModelSpec:
    """The SmolLM2 engine's ModelSpec."""
    return load_spec(smollm2_engine)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """The same tests on both executors: the reference engine, and TrtllmExecutor over the TensorRT-LLM
    stand-in (tests/trtllm_standin), which enforces TensorRT-LLM 1.2's request and PEFT-cache contract.
    A module whose fixtures ask for it runs once per backend, with a server of each (smollm2_server)."""
    return request.param


@pytest.fixture(scope="module")
def adapter(spec) -> LoraAdapter:
    """A random rank-8 LoRA on q, v and the MLP's down projection."""
    return random_adapter(spec, rank=8, modules=QVO, seed=3)


@pytest.fixture(scope="module")
def npy_dir(tmp_path_factory, spec, adapter) -> Path:
    """`adapter` as TensorRT-LLM tensors, outside NIM_PEFT_SOURCE: only a client can send it."""
    return write_adapter(adapter, tmp_path_factory.mktemp("npy") / "sql-npy", "trtllm", spec)


def smollm2_server(request, peft_source: Path, backend: str = "torch", **env: str) -> Server:
    """`trtllm-peft serve` of the SmolLM2 engine as model `smollm2` on `backend` (BACKENDS), adapters from
    `peft_source`, NIM_*/TRTLLM_PEFT_* settings from `env`. In a fixture, `with smollm2_server(...) as srv:
    yield srv` stops it however the tests end."""
    standin = backend == "trtllm-standin"
    engine = request.getfixturevalue("smollm2_standin_engine" if standin else "smollm2_engine")
    log = request.getfixturevalue("tmp_path_factory").mktemp("log") / "server.log"
    module = "tests.trtllm_standin.serve" if standin else "trtllm_peft.cli"
    return Server(engine, peft_source, log, module=module, **{"NIM_SERVED_MODEL_NAME": "smollm2", **env})


def openai_client(server: Server, *, api_key: str = "not-used", timeout: float = 120) -> openai.OpenAI:
    """The official client on `server`, without retries (a test sees every error)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


def standin_engine(engine: Path, parent: Path, *, gather_logits: bool) -> Path:
    """A copy of `engine` (files linked) marked as a TensorRT-LLM engine; `gather_logits` sets build_config's
    gather_context_logits / gather_generation_logits as `trtllm-build --gather_…_logits` writes them."""
    d = parent / "smollm2-135m-trtllm"
    d.mkdir(parents=True)
    for f in engine.iterdir():
        if f.name not in ("trtllm_peft.json", "config.json"):
            (d / f.name).symlink_to(f.resolve())
    meta = json.loads((engine / "trtllm_peft.json").read_text())
    (d / "trtllm_peft.json").write_text(json.dumps({**meta, "backend": "trtllm"}))
    config = json.loads((engine / "config.json").read_text())
    flags = {"gather_context_logits": gather_logits, "gather_generation_logits": gather_logits}
    config["build_config"] = {**config["build_config"], **flags}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


def random_adapter(
    spec: ModelSpec, *, rank: int, modules: tuple[str, ...], seed: int, scale: float = 2.0, std: float = 0.05
) -> LoraAdapter:
    """A LoRA strong enough to change greedy outputs (random, not trained: tests check plumbing, not skill)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(spec.num_layers):
        for m in modules:
            d_in, d_out = spec.module_dims(m)
            a = torch.randn(rank, d_in, generator=g) * std
            b = torch.randn(d_out, rank, generator=g) * std
            weights[(layer, m)] = LoraWeights(a=a, b=b, scale=scale)
    return LoraAdapter(weights=weights, format="hf", base_model="SmolLM2-135M-Instruct")


def write_adapter(adapter: LoraAdapter, out: Path, fmt: str, spec: ModelSpec) -> Path:
    """Save into a temp dir, then rename into place: the catalog never sees half an adapter."""
    tmp = out.parent / f".{out.name}.tmp"
    formats.save(adapter, tmp, fmt, spec)
    tmp.rename(out)
    return out


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Whether `predicate()` became true within `timeout` seconds (polled every 0.1 s): give generous ones."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerNotReady(RuntimeError):
    """The server exited or did not become ready in time; `pid` is the (killed) process it was."""

    def __init__(self, message: str, pid: int):
        super().__init__(message)
        self.pid = pid


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it dies (Linux PR_SET_PDEATHSIG), so a
    starter killed outright (SIGKILL, a CI timeout: no atexit, no finally) leaves no server holding GBs."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """`trtllm-peft serve` in a subprocess on a free loopback port, in its own process group.

    Never outlives its starter: when it does not become ready (or anything interrupts the wait) the whole
    group is killed before the error propagates, an atexit hook kills any server a fixture forgot, and a
    starter killed outright takes its server with it (the parent-death signal; only when started from the main
    thread, since the signal follows the starting thread, not the process). Usable as a context manager."""

    running: set[Server] = set()

    def __init__(
        self,
        engine: Path,
        peft_source: Path,
        log: Path,
        *,
        module: str = "trtllm_peft.cli",
        ready_timeout: float = 600,  # a cold CPU-kernel compile on a loaded 2-core box takes minutes
        **env: str,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()  # KServe v2 gRPC: never Triton's 8001, several servers run at once
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log = log
        full_env = {
            **os.environ,
            "NIM_PEFT_SOURCE": str(peft_source),
            "TRTLLM_PEFT_ENGINE_DIR": str(engine),
            "NIM_SERVER_PORT": str(self.port),
            "TRTLLM_PEFT_GRPC_PORT": str(self.grpc_port),
            **env,
        }
        on_main = threading.current_thread() is threading.main_thread()
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "serve", "--host", "127.0.0.1"],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches its children too
                preexec_fn=_die_with_parent if on_main else None,
            )
        Server.running.add(self)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerNotReady(f"server exited:\n{self.log.read_text()[-3000:]}", self.proc.pid)
            try:
                if httpx.get(f"{self.url}/v1/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise ServerNotReady(
            f"server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}", self.proc.pid
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; then SIGKILL whatever is left of its process group."""
        Server.running.discard(self)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children (compilers, workers) of a dead server


@atexit.register
def _stop_forgotten_servers() -> None:
    for server in list(Server.running):
        server.stop()
