"""The generated repository's `peft` model (adapters by name) on the Python-backend stand-in, bf16 engine.

The model.py that `trtllm-peft triton-repo` writes is imported as Triton's stub imports it, with
tests/triton_python_standin/ as `triton_python_backend_utils`. Its BLS calls reach an `ensemble` checked against
the generated ensemble/config.pbtxt, whose engine step is TrtllmExecutor on the TensorRT-LLM stand-in
(tests/trtllm_standin: TensorRT-LLM's PEFT cache, dtype rule and "not found in cache" text) over a tiny bf16
reference engine. The ensemble's tokenizer is a byte map (the tiny model has none); everything LoRA is real.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import triton_python_standin as standin
from tests import trtllm_standin
from tests.conftest import make_peft_adapter, tiny_llama_model
from tests.triton_python_standin import server as srv
from trtllm_peft import formats
from trtllm_peft.engine.build import build_engine
from trtllm_peft.executor.api import LoraConfig, OutputConfig, Request
from trtllm_peft.executor.trtllm import TrtllmExecutor
from trtllm_peft.lora import load_spec, pack
from trtllm_peft.settings import Settings
from trtllm_peft.triton_repo import generate_repository

GIB = 1024**3
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bf16_engine")
    tiny_llama_model(0).save_pretrained(str(d / "hf"))
    return build_engine(
        d / "hf", d / "engine", dtype="bfloat16", max_batch_size=4, max_seq_len=64, max_lora_rank=16,
        max_gpu_loras=1, max_cpu_loras=1, budget_bytes=GIB, quiet=True,
    )  # fmt: skip


@pytest.fixture
def loras(tmp_path) -> Path:
    root = tmp_path / "loras"
    make_peft_adapter(root / "alpha", seed=1, r=4, lora_alpha=8)
    make_peft_adapter(root / "beta", seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return root


def prompt_ids(text: bytes, vocab: int) -> list[int]:
    return [1 + b % (vocab - 1) for b in text]  # the harness's tokenizer


class Ensemble:
    """The `ensemble` BLS reaches: its config from the repository, its engine TrtllmExecutor on the stand-in."""

    def __init__(self, executor: TrtllmExecutor, vocab: int, streaming: bool = False):
        self.executor, self.vocab, self.sent = executor, vocab, []  # sent: (task id, weights dtype | None)
        self.streaming = streaming  # decoupled: one response per engine step, as tensorrt_llm sends them

    def __call__(self, request):
        get = lambda name: standin.pb_utils.get_input_tensor_by_name(request, name)  # noqa: E731
        lora = None
        if get("lora_task_id") is not None:
            task = int(get("lora_task_id").as_numpy()[0][0])
            weights = get("lora_weights")  # [1, N, W]: squeezed as the backend's utils::squeezeTensor does
            w = torch.from_dlpack(weights.to_dlpack())[0] if weights is not None else None
            c = torch.from_numpy(get("lora_config").as_numpy()[0]) if weights is not None else None
            lora = LoraConfig(task, w, c)
            self.sent.append((task, None if w is None else w.dtype))
        ids = prompt_ids(get("text_input").as_numpy()[0][0], self.vocab)
        max_tokens = int(get("max_tokens").as_numpy()[0][0])
        for tokens, error in run(self.executor, ids, max_tokens, lora, streaming=self.streaming):
            if error:
                yield standin.pb_utils.InferenceResponse(error=standin.pb_utils.TritonError(error))
                return
            text = np.array([[" ".join(map(str, tokens)).encode()]], dtype=np.object_)
            yield standin.pb_utils.InferenceResponse(
                output_tensors=[standin.pb_utils.Tensor("text_output", text)]
            )
        if self.streaming:
            yield standin.pb_utils.InferenceResponse()  # the final flag alone, as a decoupled model may end


def collect(executor, ids, max_tokens, lora) -> tuple[list[int], str | None]:
    tokens = []
    for step, error in run(executor, ids, max_tokens, lora):
        if error:
            return [], error
        tokens += step
    return tokens, None


def run(executor, ids: list[int], max_tokens: int, lora: LoraConfig | None, *, streaming: bool = False):
    """(new tokens, error) per engine response; one item unless streaming."""
    out = OutputConfig(exclude_input_from_output=True)
    rid = executor.enqueue_request(
        Request(ids, max_tokens, streaming=streaming, output_config=out, lora_config=lora)
    )
    deadline, tokens = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        for r in executor.await_responses(timeout=0.5):
            if r.request_id != rid:
                continue
            if r.has_error():
                yield [], r.error_msg
                return
            tokens += list(r.result.output_token_ids[0])
            if streaming:
                yield list(r.result.output_token_ids[0]), None
            if r.result.is_final:
                if not streaming:
                    yield tokens, None
                return
    raise AssertionError("no final response")


class Clock:
    """Starts at the real monotonic time (the model's first scan used it), then moves only when told."""

    def __init__(self):
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def make_world(engine, loras, tmp_path, monkeypatch, *, decoupled: bool):
    """(peft model as Triton loads it, its config, the ensemble, repository, clock, executor)."""
    trtllm_standin.install(monkeypatch)
    standin.install(monkeypatch)
    settings = Settings(peft_source=loras, max_gpu_loras=1, max_cpu_loras=1, peft_refresh_interval=30)
    repo = tmp_path / "repo"
    generate_repository(engine, repo, settings, gpu_free_bytes=40 * GIB, decoupled=decoupled)
    executor = TrtllmExecutor(engine, max_gpu_loras=1, max_cpu_loras=1)
    ensemble = Ensemble(executor, load_spec(engine).vocab_size, streaming=decoupled)
    srv.SERVER.add(srv.read_config(repo / "ensemble" / "config.pbtxt"), ensemble)
    for name, value in {"NIM_PEFT_SOURCE": str(loras), "NIM_PEFT_REFRESH_INTERVAL": "30"}.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("peft_model_py", repo / "peft" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # `import triton_python_backend_utils` finds the stand-in
    model = module.TritonPythonModel()
    config = srv.read_config(repo / "peft" / "config.pbtxt")
    model.initialize(srv.model_args(config, repo))
    clock = Clock()
    model.router.clock = clock
    return model, config, ensemble, repo, clock, executor


@pytest.fixture
def world(engine, loras, tmp_path, monkeypatch):
    *w, executor = make_world(engine, loras, tmp_path, monkeypatch, decoupled=False)
    yield tuple(w)
    executor.shutdown()


@pytest.fixture
def stream_world(engine, loras, tmp_path, monkeypatch):
    *w, executor = make_world(engine, loras, tmp_path, monkeypatch, decoupled=True)
    yield tuple(w)
    executor.shutdown()


def ask(model, config, text: str, lora_name: str | None = None):
    pb = standin.pb_utils
    inputs = [
        pb.Tensor("text_input", np.array([[text.encode()]], dtype=np.object_)),
        pb.Tensor("max_tokens", np.array([[MAX_TOKENS]], dtype=np.int32)),
    ]
    if lora_name is not None:
        inputs.append(pb.Tensor("lora_name", np.array([[lora_name.encode()]], dtype=np.object_)))
    (response,) = model.execute([srv.client_request(config, inputs)])
    return response


def tokens_of(response) -> list[int]:
    assert not response.has_error(), response.error().message()
    (text,) = standin.pb_utils.get_output_tensor_by_name(response, "text_output").as_numpy().reshape(-1)
    return [int(t) for t in text.split()]


def reference(engine, adapter_dir: Path | None, text: str) -> list[int]:
    """The same request straight to a fresh executor, the adapter converted by the package as a client would."""
    spec = load_spec(engine)
    ex = TrtllmExecutor(engine, max_gpu_loras=1, max_cpu_loras=1)
    try:
        lora = None
        if adapter_dir is not None:
            packed = pack(formats.load_for_engine(adapter_dir, spec), spec.torch_dtype)
            lora = LoraConfig(7, packed.weights, packed.config)
        tokens, error = collect(ex, prompt_ids(text.encode(), spec.vocab_size), MAX_TOKENS, lora)
        assert error is None, error
        return tokens
    finally:
        ex.shutdown()


def test_by_name_weights_once_then_by_id_then_resend_after_eviction(world, engine, loras):
    model, config, ensemble, repo, _ = world
    want_alpha = reference(engine, loras / "alpha", "hello there")
    assert tokens_of(ask(model, config, "hello there", "alpha")) == want_alpha
    assert ensemble.sent == [(1, torch.bfloat16)]  # lora_tasks.json's id; weights in the engine dtype
    assert tokens_of(ask(model, config, "hello there", "alpha")) == want_alpha
    assert ensemble.sent[1:] == [(1, None)]  # by id afterwards
    assert tokens_of(ask(model, config, "hello there", "beta")) == reference(
        engine, loras / "beta", "hello there"
    )
    assert ensemble.sent[2:] == [(2, torch.bfloat16)]  # the host cache (1 adapter) evicts alpha
    assert tokens_of(ask(model, config, "hello there", "alpha")) == want_alpha
    assert ensemble.sent[3:] == [(1, None), (1, torch.bfloat16)]  # "not found in cache" → one resend
    base = tokens_of(ask(model, config, "hello there"))
    assert base == reference(engine, None, "hello there") != want_alpha and len(ensemble.sent) == 5


def test_refresh_interval_picks_up_a_new_adapter(world, engine, loras):
    model, config, ensemble, _, clock = world
    make_peft_adapter(loras / "gamma", seed=3, r=2)
    early = ask(model, config, "hi", "gamma")
    assert early.has_error() and early.error().code() == standin.pb_utils.TritonError.NOT_FOUND
    assert "Available adapters: alpha, beta" in early.error().message()
    clock.now += 31  # NIM_PEFT_REFRESH_INTERVAL=30 has passed: the next request rescans
    assert tokens_of(ask(model, config, "hi", "gamma")) == reference(engine, loras / "gamma", "hi")
    task, dtype = ensemble.sent[-1]
    assert task >= 1 << 40 and dtype == torch.bfloat16  # not numbered by triton-repo: a router id


@pytest.mark.parametrize(
    "name, code, text",
    [
        ("nope", "NOT_FOUND", "The adapter 'nope' does not exist"),
        ("empty", "NOT_FOUND", "does not exist"),  # made after the last scan: unknown until a rescan
    ],
)
def test_bad_names_are_refused_by_name(world, loras, name, code, text):
    model, config, ensemble, _, _ = world
    (loras / "empty").mkdir()
    response = ask(model, config, "x", name)
    assert response.has_error() and response.error().code() == getattr(standin.pb_utils.TritonError, code)
    assert text in response.error().message() and ensemble.sent == []


def test_peft_config_offers_lora_name_instead_of_lora_tensors(world):
    _, config, _, _, _ = world
    names = {i.name for i in config.input}
    assert "lora_name" in names and not names & {"lora_task_id", "lora_weights", "lora_config"}
    with pytest.raises(ValueError, match="unexpected inference input 'lora_task_id'"):
        srv.client_request(
            config,
            [
                standin.pb_utils.Tensor("text_input", np.array([[b"x"]], dtype=np.object_)),
                standin.pb_utils.Tensor("max_tokens", np.array([[1]], dtype=np.int32)),
                standin.pb_utils.Tensor("lora_task_id", np.array([[1]], dtype=np.uint64)),
            ],
        )


def test_decoupled_repository_streams_every_step_and_resends_on_not_found(stream_world, engine, loras):
    model, config, ensemble, _, _ = stream_world
    pb = standin.pb_utils

    def stream(lora_name: str) -> list[list[int]]:
        inputs = [
            pb.Tensor("text_input", np.array([[b"hello there"]], dtype=np.object_)),
            pb.Tensor("max_tokens", np.array([[MAX_TOKENS]], dtype=np.int32)),
            pb.Tensor("lora_name", np.array([[lora_name.encode()]], dtype=np.object_)),
        ]
        request = srv.client_request(config, inputs)
        assert model.execute([request]) is None  # decoupled: responses go through the sender
        sent = request.get_response_sender().sent
        assert sent[-1] == (None, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # closed once, by the flag alone
        return [tokens_of(r) for r, _ in sent[:-1]]

    steps = stream("alpha")
    assert len(steps) == MAX_TOKENS and sum(steps, []) == reference(engine, loras / "alpha", "hello there")
    stream("beta")  # evicts alpha from the 1-adapter host cache
    assert sum(stream("alpha"), []) == sum(steps, [])
    assert ensemble.sent == [(1, torch.bfloat16), (2, torch.bfloat16), (1, None), (1, torch.bfloat16)]
