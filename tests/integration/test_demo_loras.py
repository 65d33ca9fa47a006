"""The demo adapters (`make demo-loras`): one trained LoRA in three formats gives the same engine tensors and
the same answers on the SmolLM2 reference engine, and those answers are GSM8K style (`#### N`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from trtllm_peft import formats
from trtllm_peft.executor.api import LoraConfig, OutputConfig, Request
from trtllm_peft.formats import safe_io
from trtllm_peft.lora import load_spec, pack

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "engines" / "smollm2-135m"
TRAINED = REPO / "demo" / "loras-src" / "smollm2-math-hf"
DOC_QUESTION = (
    "John buys 10 packs of magic cards. each pack of 20 cards and 1/4 of those cards are uncommon. "
    "How many uncommon cards did he get?"
)
NAMES = ("smollm2-math-hf", "smollm2-math-nemo", "smollm2-math-trtllm")

pytestmark = [
    pytest.mark.skipif(
        not (TRAINED / "adapter_config.json").is_file(),
        reason=f"no trained demo adapter at {TRAINED}: run `make train-demo-lora`",
    ),
]


def _make_demo_loras():
    """scripts/ is not a package: load scripts/make_demo_loras.py by path."""
    spec = importlib.util.spec_from_file_location("make_demo_loras", REPO / "scripts" / "make_demo_loras.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _engine(smollm2_engine):
    """The default engine, built on first use: a fresh clone has none, and this must not skip in CI."""
    assert smollm2_engine.resolve() == ENGINE.resolve()


@pytest.fixture(scope="module")
def spec():
    return load_spec(ENGINE)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loras")
    written = _make_demo_loras().make(out, ENGINE)
    assert sorted(p.name for p in written) == sorted(NAMES)
    return out


@pytest.fixture(scope="module")
def packed(loras, spec):
    """name -> the packed runtime tensors the server would send to the engine (engine dtype)."""
    return {name: pack(formats.load_for_engine(loras / name, spec), spec.dtype) for name in NAMES}


def test_each_directory_is_the_format_its_name_says(loras):
    assert [formats.detect(loras / n) for n in NAMES] == ["hf", "nemo", "trtllm"]


def test_the_three_formats_pack_to_the_same_tensors(packed):
    ref = packed["smollm2-math-hf"]
    assert ref.weights.shape[0] == 30 * 3  # q, k, v in every layer
    for name in NAMES[1:]:
        assert torch.equal(packed[name].config, ref.config), name
        torch.testing.assert_close(packed[name].weights, ref.weights, msg=name)


def test_the_nemo_file_is_the_fused_qkv_lora_tensorrt_llm_reads(loras):
    """TensorRT-LLM's NeMo loader takes only lora_kqv_adapter keys and applies no alpha/dim scaling."""
    (nemo_file,) = (loras / "smollm2-math-nemo").glob("*.nemo")
    with safe_io.open_tar(nemo_file) as tar:
        config = yaml.safe_load(tar.extractfile(safe_io.tar_member(tar, "model_config.yaml")).read())
        state = safe_io.torch_load_bytes(
            tar.extractfile(safe_io.tar_member(tar, "model_weights.ckpt")).read(), nemo_file
        )
    tuning = config["peft"]["lora_tuning"]
    assert (tuning["variant"], tuning["target_modules"]) == ("nemo", ["attention_qkv"])
    assert tuning["alpha"] == tuning["adapter_dim"]
    assert len(state) == 2 * 30 and all("lora_kqv_adapter" in k for k in state)


def test_greedy_answers_are_identical_across_formats_and_gsm8k_style(packed):
    from transformers import AutoTokenizer

    from trtllm_peft.executor.torch import TorchExecutor

    tok = AutoTokenizer.from_pretrained(str(ENGINE))
    prompt = list(tok(DOC_QUESTION)["input_ids"])
    loras = [None, *(LoraConfig(i + 1, packed[n].weights, packed[n].config) for i, n in enumerate(NAMES))]
    out = OutputConfig(exclude_input_from_output=True)
    with TorchExecutor(ENGINE, max_batch_size=4, max_gpu_loras=3, max_cpu_loras=3) as ex:
        ids = ex.enqueue_requests(
            [Request(prompt, 64, end_id=tok.eos_token_id, output_config=out, lora_config=lc) for lc in loras]
        )
        finals = {rid: ex.await_responses(rid, timeout=300) for rid in ids}
    tokens = []
    for rid in ids:
        assert len(finals[rid]) == 1, f"request {rid}: no final response within 300 s"
        (response,) = finals[rid]
        assert not response.has_error(), response.error_msg
        tokens.append(response.result.output_token_ids[0])
    base, *adapted = (tok.decode(t, skip_special_tokens=True) for t in tokens)
    assert tokens[1] == tokens[2] == tokens[3], adapted
    assert "####" in adapted[0] and "####" not in base, (base, adapted[0])
