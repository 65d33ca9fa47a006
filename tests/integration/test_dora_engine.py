"""DoRA on the reference engine against transformers + peft (the oracle), on the tiny Llama and on SmolLM2.

Real PEFT DoRA adapters (get_peft_model with LoraConfig(use_dora=True), random A, B and magnitudes), read by
our loader, normalized once against the engine's weights (lora/dora.py) and sent as TensorRT-LLM rows
(is_dora = 1): greedy tokens equal PEFT's (a divergence only at a numerical tie) and log-probs within 1e-3,
alone and in batches mixed with plain LoRA adapters and base requests, through the CPU kernels and torch ops.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_engine, make_peft_adapter, randomize_lora
from tests.integration.test_engine_build import _hf_model, smol_engine  # noqa: F401 (fixture)
from tests.integration.test_torch_executor import PROMPTS, assert_matches, collect, reference, req
from trtllm_peft import formats
from trtllm_peft.engine.base_weights import BaseWeights
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.lora import load_spec, pack

N_NEW = 6
ADAPTERS = {  # name -> make_peft_adapter kwargs
    "dora_all_r4": dict(seed=11, r=4, lora_alpha=8, use_dora=True),
    "dora_qv_o_r8": dict(
        seed=12, r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"]
    ),
    "dora_mlp_rs6": dict(
        seed=13, r=6, lora_alpha=12, use_rslora=True, use_dora=True, target_modules=["up_proj", "down_proj"]
    ),
    "lora_all_r4": dict(seed=1, r=4, lora_alpha=8),
    "lora_qv_r8": dict(seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_engine_dora"), max_seq_len=64)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, engine):
    """name -> (PeftModel oracle, packed rows: DoRA magnitudes normalized against the engine's weights)."""
    spec, base = EngineDir.open(engine).spec, BaseWeights.open(engine)
    out = {}
    for name, kw in ADAPTERS.items():
        d = tmp_path_factory.mktemp(name)
        model = make_peft_adapter(d, **kw).eval()
        model.dora_dir = d
        out[name] = (model, pack(formats.load_for_engine(d, spec, base), torch.float32))
    return out


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_a_dora_adapter_alone_matches_peft(engine, adapters, cpu_kernels):
    model, packed = adapters["dora_all_r4"]
    with TorchExecutor(engine, memory_budget_bytes=2**30, cpu_kernels=cpu_kernels) as ex:
        rid = ex.enqueue_request(req(PROMPTS[0], packed, 1, n=N_NEW))
        r = collect(ex, [rid])[rid]
    assert not r.has_error(), r.error_msg
    assert_matches(r.result.output_token_ids[0], r.result.log_probs[0], reference(model, PROMPTS[0], N_NEW))


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_dora_and_lora_rows_side_by_side_match_peft(engine, adapters, cpu_kernels):
    """Every adapter and the base model in one engine, arriving while others decode: mixed prefills and
    decode steps hold DoRA rows (rescaled projections, o/down unfused) beside plain LoRA and base rows."""
    names = list(ADAPTERS)
    plan = [(p, names[i % len(names)] if i % 6 != 5 else None) for i, p in enumerate(PROMPTS * 3)]
    tasks = {n: i + 1 for i, n in enumerate(names)}
    with TorchExecutor(engine, memory_budget_bytes=2**30, cpu_kernels=cpu_kernels) as ex:
        first = [
            ex.enqueue_request(req(p, adapters[a][1] if a else None, tasks.get(a), n=N_NEW, streaming=True))
            for p, a in plan[:4]
        ]
        ex.await_responses(first[0], timeout=30)
        later = ex.enqueue_requests(
            [req(p, adapters[a][1] if a else None, tasks.get(a), n=N_NEW) for p, a in plan[4:]]
        )
        finals = collect(ex, first[1:] + later)
    for rid, (prompt, a) in zip(first[1:] + later, plan[1:], strict=True):
        r = finals[rid]
        assert not r.has_error(), r.error_msg
        model = adapters[a or names[0]][0]
        ref = reference(model, prompt, N_NEW, a is not None)
        assert_matches(r.result.output_token_ids[0], r.result.log_probs[0], ref)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "torch-ops"])
def test_smollm2_dora_beside_lora_matches_peft(smol_engine, tmp_path, cpu_kernels):  # noqa: F811
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    spec, base = load_spec(smol_engine), BaseWeights.open(smol_engine)
    models, packed = {}, {}
    for name, kw in {
        "dora": dict(use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        "lora": dict(target_modules=["k_proj", "up_proj"]),
    }.items():
        model = get_peft_model(
            _hf_model(smol_engine, tmp_path / name), PeftLoraConfig(r=8, lora_alpha=16, **kw)
        )
        randomize_lora(model, seed=len(name), std=0.05)
        model.save_pretrained(str(tmp_path / name / "a"))
        models[name] = model.eval()
        packed[name] = pack(formats.load_for_engine(tmp_path / name / "a", spec, base), torch.float32)
    prompts = [[1, 9690, 198, 2683, 359, 253], [504, 3458, 282, 4649, 314]]
    plan = [
        (prompts[0], "dora", 1),
        (prompts[1], "lora", 2),
        (prompts[1], "dora", 1),
        (prompts[0], None, None),
    ]
    with TorchExecutor(
        smol_engine, memory_budget_bytes=3 * 2**30, max_batch_size=4, max_seq_len=64, cpu_kernels=cpu_kernels
    ) as ex:
        start = time.monotonic()
        ids = ex.enqueue_requests([req(p, packed.get(a), t, n=3) for p, a, t in plan])
        finals = collect(ex, ids, timeout=180 + (time.monotonic() - start))
    for rid, (prompt, a, _) in zip(ids, plan, strict=True):
        r = finals[rid]
        assert not r.has_error(), r.error_msg
        ref = reference(models[a or "lora"], prompt, 3, a is not None)
        assert_matches(r.result.output_token_ids[0], r.result.log_probs[0], ref)


def _engine_as_trtllm(engine: Path, out: Path, *, dora_plugin: bool) -> Path:
    """The tiny engine's files under a config.json as trtllm-build writes it (version 1.2.0), with or without
    the DoRA plugin: what the TensorRT-LLM stand-in (tests/trtllm_standin) serves through the reference engine."""
    out.mkdir()
    for f in engine.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((engine / "config.json").read_text())
    cfg["version"] = "1.2.0"
    cfg["build_config"]["plugin_config"]["dora_plugin"] = dora_plugin
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("dora_plugin", [True, False], ids=["dora-plugin", "no-dora-plugin"])
def test_trtllm_executor_passes_dora_rows_as_tensorrt_llm_1_2_runs_them(
    engine, adapters, tmp_path, monkeypatch, dora_plugin
):
    """Through TrtllmExecutor and the stand-in: with the DoRA plugin the 4-column rows (is_dora = 1) give
    PEFT's DoRA outputs; without it 1.2 takes the same rows and ignores the magnitudes (no refusal, no warning:
    examples/dora/README.md), which is why lora.validate refuses DoRA for such an engine before sending."""
    from tests import trtllm_standin
    from trtllm_peft.errors import AdapterIncompatibleError
    from trtllm_peft.executor.trtllm import TrtllmExecutor
    from trtllm_peft.lora import fit_to_spec

    trtllm_standin.install(monkeypatch)
    trt_engine = _engine_as_trtllm(engine, tmp_path / "trt", dora_plugin=dora_plugin)
    model, packed = adapters["dora_all_r4"]
    ex = TrtllmExecutor(trt_engine, max_gpu_loras=2, max_cpu_loras=4)
    try:
        rid = ex.enqueue_request(req(PROMPTS[2], packed, 1, n=N_NEW))
        r = collect(ex, [rid])[rid]
        (seen,) = ex._exec.requests_seen
    finally:
        ex.shutdown()
    assert not r.has_error(), r.error_msg
    assert torch.equal(seen.lora_config.config, packed.config) and bool((packed.config[:, 3] == 1).all())
    assert torch.equal(seen.lora_config.weights, packed.weights)
    if dora_plugin:
        ref = reference(model, PROMPTS[2], N_NEW)
    else:
        ref = reference(_without_magnitudes(model), PROMPTS[2], N_NEW)
        with pytest.raises(AdapterIncompatibleError, match="without the DoRA plugin"):
            fit_to_spec(formats.load(model.dora_dir), EngineDir.open(trt_engine).spec)
    assert_matches(r.result.output_token_ids[0], r.result.log_probs[0], ref)


def _without_magnitudes(model):
    """The same PEFT model with every DoRA factor 1 (m = ‖W + s·B·A‖_row): plain LoRA."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for m in plain.modules():
            for key, mag in getattr(m, "lora_magnitude_vector", {}).items():
                delta = m.lora_B[key].weight @ m.lora_A[key].weight
                mag.weight.copy_(mag.get_weight_norm(m.get_base_layer().weight, delta, m.scaling[key]))
    return plain
