"""DoRA adapters: PEFT's files read and written, TensorRT-LLM's rows (normalized magnitude after B, is_dora = 1),
the conversions between PEFT's trained magnitude and TensorRT-LLM's normalized one, checked against PEFT's own
DoraLinearLayer and merge_and_unload, and the refusals (engine without the DoRA plugin, NeMo, no base weights).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import make_peft_adapter, tiny_llama_model
from trtllm_peft import formats
from trtllm_peft.engine.base_weights import BaseWeights
from trtllm_peft.errors import AdapterError, AdapterFormatError
from trtllm_peft.lora import dora, fit_to_spec, pack, unpack, validate
from trtllm_peft.lora.modules import HF_PARENT, TRTLLM_TO_HF
from trtllm_peft.lora.pack import row_order


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny Llama (seed 0, as make_peft_adapter's base) saved with its weights."""
    d = tmp_path_factory.mktemp("tiny_base")
    tiny_llama_model(0).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def peft_dora(tmp_path_factory):
    d = tmp_path_factory.mktemp("dora")
    model = make_peft_adapter(d, seed=7, r=4, lora_alpha=8, use_dora=True)
    return d, model.eval()


def _module(model, layer: int, module: str):
    hf = TRTLLM_TO_HF[module]
    return model.get_submodule(f"base_model.model.model.layers.{layer}.{HF_PARENT[hf]}.{hf}")


def test_peft_dora_adapter_reads_with_its_trained_magnitudes(peft_dora, tiny_spec):
    d, model = peft_dora
    adapter = formats.load(d)
    assert adapter.is_dora and adapter.meta["use_dora"] is True
    for (layer, module), w in adapter:
        peft_mod = _module(model, layer, module)
        assert not w.normalized
        torch.testing.assert_close(w.magnitude, peft_mod.lora_magnitude_vector["default"].weight.detach())
    assert validate(adapter, tiny_spec) == []


def test_normalized_magnitude_is_peft_magnitude_over_peft_weight_norm(peft_dora, tiny_spec, base_dir):
    d, model = peft_dora
    adapter = dora.normalized(fit_to_spec(formats.load(d), tiny_spec), BaseWeights.open(base_dir))
    for (layer, module), w in adapter:
        m = _module(model, layer, module)
        layer_dora = m.lora_magnitude_vector["default"]
        lora_weight = m.lora_B["default"].weight @ m.lora_A["default"].weight
        norm = layer_dora.get_weight_norm(m.get_base_layer().weight, lora_weight, m.scaling["default"])
        assert w.normalized
        torch.testing.assert_close(w.magnitude, (layer_dora.weight / norm).detach(), rtol=1e-6, atol=1e-7)


def test_factor_times_merged_update_is_peft_merged_weight(peft_dora, tiny_spec, base_dir):
    """g ⊙ (W + s·B·A) row-wise is exactly what PEFT's merge_and_unload writes into the base layer."""
    d, model = peft_dora
    adapter = dora.normalized(fit_to_spec(formats.load(d), tiny_spec), BaseWeights.open(base_dir))
    merged = copy.deepcopy(model).merge_and_unload()
    weights = BaseWeights.open(base_dir)
    for (layer, module), w in adapter:
        ours = w.magnitude[:, None] * (weights(layer, module) + w.delta().float())
        hf = TRTLLM_TO_HF[module]
        theirs = merged.get_submodule(f"model.layers.{layer}.{HF_PARENT[hf]}.{hf}").weight
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_dora_rows_carry_the_magnitude_after_b_with_is_dora_set(peft_dora, tiny_spec, base_dir):
    d, _ = peft_dora
    adapter = formats.load_for_engine(d, tiny_spec, BaseWeights.open(base_dir))
    packed = pack(adapter, torch.float32)
    assert packed.config[:, 3].tolist() == [1] * packed.num_rows
    (layer, module), w = row_order(adapter)[0]
    d_in, d_out = tiny_spec.module_dims(module)
    row = packed.weights[0]
    start = w.rank * (d_in + d_out)
    torch.testing.assert_close(row[start : start + d_out], w.magnitude)
    back = unpack(packed.weights, packed.config, tiny_spec)
    for key, w in adapter:
        assert back.weights[key].normalized
        torch.testing.assert_close(back.weights[key].magnitude, w.magnitude)


def test_convert_round_trip_hf_trtllm_hf(peft_dora, tiny_spec, base_dir, tmp_path):
    d, _ = peft_dora
    base = BaseWeights.open(base_dir)
    original = fit_to_spec(formats.load(d), tiny_spec)
    formats.save(original, tmp_path / "trt", "trtllm", tiny_spec, base)
    config = np.load(tmp_path / "trt" / "model.lora_config.npy")
    assert config.shape[-1] == 4 and (config[0, :, 3] == 1).all()
    trt = formats.load(tmp_path / "trt", tiny_spec)
    assert all(w.normalized for _, w in trt)
    formats.save(trt, tmp_path / "hf", "hf", tiny_spec, base)
    back = formats.load(tmp_path / "hf")
    assert back.meta["use_dora"] is True
    for key, w in original:
        torch.testing.assert_close(back.weights[key].magnitude, w.magnitude, rtol=1e-5, atol=1e-6)


def test_peft_loads_the_dora_adapter_we_write(peft_dora, tiny_spec, tmp_path):
    from peft import PeftModel

    d, model = peft_dora
    formats.save(formats.load(d), tmp_path / "out", "hf", tiny_spec)
    again = PeftModel.from_pretrained(tiny_llama_model(0), str(tmp_path / "out")).eval()
    ids = torch.tensor([[1, 5, 9, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


REFUSALS = [
    # (what, action, text in the error)
    (
        "no base weights for PEFT -> TensorRT-LLM",
        lambda a, s, o: formats.save(a, o, "trtllm", s),
        "base model",
    ),
    ("NeMo has no DoRA", lambda a, s, o: formats.save(a, o, "nemo", s), "NeMo 1.x"),
    ("pack of trained magnitudes", lambda a, s, o: pack(a, torch.float32), "not normalized"),
    (
        "engine without the DoRA plugin",
        lambda a, s, o: fit_to_spec(a, s.__class__(**{**s.__dict__, "dora_plugin": False})),
        "DoRA plugin",
    ),
]


@pytest.mark.parametrize("what,action,text", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_dora_refusals_say_why(peft_dora, tiny_spec, tmp_path, what, action, text):
    adapter = fit_to_spec(formats.load(peft_dora[0]), tiny_spec)
    with pytest.raises(AdapterError, match=text):
        action(adapter, tiny_spec, tmp_path / "out")


def test_magnitude_without_use_dora_and_use_dora_without_magnitudes_are_refused(peft_dora, tmp_path):
    import json
    import shutil

    d = tmp_path / "a"
    shutil.copytree(peft_dora[0], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(AdapterFormatError, match="although use_dora is not set"):
        formats.load(d)
    plain = tmp_path / "plain"
    make_peft_adapter(plain, seed=1)
    cfg = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterFormatError, match="without lora_magnitude_vector"):
        formats.load(plain)


def test_a_dora_row_too_short_for_its_magnitude_is_refused(peft_dora, tiny_spec, base_dir):
    adapter = formats.load_for_engine(peft_dora[0], tiny_spec, BaseWeights.open(base_dir))
    packed = pack(adapter, torch.float32)
    with pytest.raises(AdapterFormatError, match="DoRA magnitude needs"):
        unpack(
            packed.weights[:, :-1], packed.config, tiny_spec
        )  # every row is full: the magnitude loses a value


def test_the_widest_dora_row_is_within_the_npy_read_limits(tiny_spec):
    """A max-rank DoRA row on the widest module (r·(in + out) + out values) is not refused as too wide."""
    from trtllm_peft.formats.trtllm import max_row_width
    from trtllm_peft.lora import LoraWeights
    from trtllm_peft.lora.pack import row_size

    r = tiny_spec.max_lora_rank
    for module in tiny_spec.lora_target_modules:
        d_in, d_out = tiny_spec.module_dims(module)
        w = LoraWeights(
            torch.zeros(r, d_in), torch.zeros(d_out, r), magnitude=torch.ones(d_out), normalized=True
        )
        assert row_size(w) <= max_row_width(tiny_spec)


def test_reads_dora_rows_laid_out_as_tensorrt_llm_writes_them(tiny_spec, tmp_path):
    """Rows built by hand the way lora_manager / hf_lora_convert concatenate them (A, B·scale, magnitude, then
    zero padding; config [id, layer, r, 1]), independently of lora.pack, read back by our .npy reader."""
    from trtllm_peft.lora.modules import MODULE_IDS

    g = torch.Generator().manual_seed(3)
    entries, rows, config = {}, [], []
    for layer, module, r in [(0, "attn_q", 2), (1, "mlp_4h_to_h", 3), (2, "attn_v", 1)]:
        d_in, d_out = tiny_spec.module_dims(module)
        a, b, m = (
            torch.randn(r, d_in, generator=g),
            torch.randn(d_out, r, generator=g),
            torch.rand(d_out) + 0.5,
        )
        entries[(layer, module)] = (a, b, m)
        rows.append(torch.cat([a.flatten(), b.flatten(), m]))
        config.append([MODULE_IDS[module], layer, r, 1])
    width = max(len(r) for r in rows)
    weights = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "model.lora_weights.npy", weights.numpy()[None])
    np.save(tmp_path / "t" / "model.lora_config.npy", np.array(config, dtype=np.int32)[None])
    adapter = formats.load(tmp_path / "t", tiny_spec)
    for key, (a, b, m) in entries.items():
        w = adapter.weights[key]
        assert w.normalized and torch.equal(w.a, a) and torch.equal(w.b, b) and torch.equal(w.magnitude, m)


def test_hf_lora_convert_without_a_base_model_refuses_dora_with_the_way_out(peft_dora, tmp_path, capsys):
    """TensorRT-LLM's converter appends the magnitude as stored, right only after normalize_weights.py; ours
    has no base model to normalize with, so it says how to convert instead of writing wrong rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "converters" / "hf_lora_convert.py"
    spec = importlib.util.spec_from_file_location("hf_lora_convert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["-i", str(peft_dora[0]), "-o", str(tmp_path / "o"), "--storage-type", "float32"]) == 2
    assert "trtllm-peft convert --to trtllm --base" in capsys.readouterr().err


def test_inspect_reports_dora_and_its_form(peft_dora, tiny_spec, base_dir, tmp_path):
    from trtllm_peft.inspect_adapter import inspect, render

    report = inspect(peft_dora[0], tiny_spec)
    assert report.ok and report.dora == "trained" and "DoRA      magnitudes trained" in render(report)
    formats.save(formats.load(peft_dora[0]), tmp_path / "t", "trtllm", tiny_spec, BaseWeights.open(base_dir))
    assert inspect(tmp_path / "t", tiny_spec).dora == "normalized"
    plain = tmp_path / "plain"
    make_peft_adapter(plain)
    assert inspect(plain, tiny_spec).dora is None
