"""NeMo 1.x `.nemo` LoRA: reading every documented layout, the exact math against Hugging Face/PEFT (writing:
test_format_nemo_writer.py; refusals: test_format_nemo_refusals.py).

Fixtures are built by tests/nemo_fixtures.py from NeMo's documented layout (torch.save + tarfile + yaml),
never by our writer; their Hugging Face equivalents are picked out by hand, head by head.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import LLAMA_TARGETS, tiny_llama_model
from tests.nemo_fixtures import (
    TINY_GEOMETRY,
    assert_same_deltas,
    canonical_deltas,
    expected_deltas,
    hf_equivalent,
    model_config,
    pipeline_chunks,
    random_nemo_lora,
    split_fused_qkv,
    state_dict,
    tp_shards,
    write_fixture,
    write_nemo,
)
from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats import nemo
from trtllm_peft.lora import fit_to_spec, pack, unpack
from trtllm_peft.lora.modules import HF_PARENT, TRTLLM_TO_HF

# --- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style,dot_slash,gzip",
    [
        ("mcore", True, False),
        ("mcore", False, False),
        ("mcore", True, True),
        ("legacy", True, False),
        ("o2", True, False),
    ],
    ids=["plain-dot-slash", "bare-names", "gzip", "legacy-keys", "o2-keys"],
)
def test_fused_gqa_adapter_equals_its_hf_equivalent(tmp_path, tiny_spec, style, dot_slash, gzip):
    weights = random_nemo_lora(r=4, seed=1)
    write_nemo(
        tmp_path,
        model_config(),
        {"model_weights.ckpt": state_dict(weights, style)},
        dot_slash=dot_slash,
        gzip=gzip,
    )
    adapter = nemo.load(tmp_path, tiny_spec)
    assert adapter.format == "nemo" and adapter.source.endswith("adapter.nemo")
    assert adapter.modules == ["attn_dense", "attn_qkv", "mlp_4h_to_h", "mlp_gate", "mlp_h_to_4h"]
    assert_same_deltas(canonical_deltas(adapter), expected_deltas(weights, 1.0))
    # canonical attn_qkv rows are [Q; K; V] exactly, de-interleaved from groups [q0 q1 k0 v0 | q2 q3 k1 v1]
    q, k, v = split_fused_qkv(weights[(1, "lora_kqv_adapter")][1], TINY_GEOMETRY)
    assert torch.equal(adapter.weights[(1, "attn_qkv")].b, torch.cat([q, k, v]))
    assert not torch.equal(q, weights[(1, "lora_kqv_adapter")][1][:32])  # the interleave really matters


def test_mha_fused_qkv_is_per_head_q_k_v(tmp_path):
    geo = {**TINY_GEOMETRY, "num_query_groups": None, "kv_channels": None}  # NeMo's MHA defaults
    weights = random_nemo_lora(geo, r=2, targets=["attention_qkv"], seed=2)
    write_fixture(tmp_path, weights, geo=geo, r=2, targets=["attention_qkv"])
    adapter = nemo.load(tmp_path)  # geometry from model_config.yaml alone
    b = weights[(0, "lora_kqv_adapter")][1]  # [4 heads x (q, k, v) x 8, r]
    per_head = b.reshape(4, 3, 8, 2)
    assert torch.equal(
        adapter.weights[(0, "attn_qkv")].b, torch.cat([per_head[:, i].reshape(32, 2) for i in range(3)])
    )
    sizes = {"attn_q": 32, "attn_k": 32, "attn_v": 32}
    assert_same_deltas(canonical_deltas(adapter, sizes), expected_deltas(weights, 1.0, geo))


@pytest.mark.parametrize("alpha,scale", [(None, 1.0), (4, 1.0), (16, 4.0), (2.0, 0.5)])
def test_scale_is_alpha_over_adapter_dim(tmp_path, tiny_spec, alpha, scale):
    weights = random_nemo_lora(r=4, seed=3)
    write_fixture(tmp_path, weights, r=4, alpha=alpha)
    adapter = nemo.load(tmp_path, tiny_spec)
    assert {w.scale for _, w in adapter} == {scale}
    assert_same_deltas(canonical_deltas(adapter), expected_deltas(weights, scale))


def test_layer_selection_is_one_based(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, layers=[0, 2], seed=4)
    write_fixture(tmp_path, weights, layer_selection=[1, 3])
    adapter = nemo.load(tmp_path, tiny_spec)
    assert adapter.layers == [0, 2]
    assert_same_deltas(canonical_deltas(adapter), expected_deltas(weights, 1.0))


def test_canonical_variant_keeps_each_module(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, variant="canonical", seed=5)
    write_fixture(tmp_path, weights, variant="canonical", alpha=8)
    adapter = nemo.load(tmp_path, tiny_spec)
    assert adapter.modules == [
        "attn_dense",
        "attn_k",
        "attn_q",
        "attn_v",
        "mlp_4h_to_h",
        "mlp_gate",
        "mlp_h_to_4h",
    ]
    k_in = weights[(2, "lora_unfused_kqv_adapter.k_adapter")][0]
    assert torch.equal(adapter.weights[(2, "attn_k")].a, k_in)  # each part keeps its own A
    assert_same_deltas(canonical_deltas(adapter), expected_deltas(weights, 2.0))


def test_non_gated_fc1_is_one_module(tmp_path):
    geo = {**TINY_GEOMETRY, "activation": "gelu"}
    weights = random_nemo_lora(geo, r=2, targets=["mlp_fc1"], seed=6)
    write_fixture(tmp_path, weights, geo=geo, r=2, targets=["mlp_fc1"])
    adapter = nemo.load(tmp_path)
    assert adapter.modules == ["mlp_h_to_4h"] and adapter.weights[(0, "mlp_h_to_4h")].out_features == 48


def test_tensor_parallel_shards_merge_to_the_full_adapter(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, seed=7)
    shards = tp_shards(state_dict(weights), 2)
    fc1 = "model.decoder.layers.0.mlp.adapter_layer.lora_hto4h_adapter.linear_out.weight"
    naive = torch.cat([shards[0][fc1], shards[1][fc1]])
    assert not torch.equal(naive, state_dict(weights)[fc1])  # per-rank [gate_t; up_t]: concatenation is wrong
    write_nemo(
        tmp_path, model_config(tp=2), {f"mp_rank_{t:02d}/model_weights.ckpt": s for t, s in enumerate(shards)}
    )
    adapter = nemo.load(tmp_path, tiny_spec)
    assert adapter.meta["nemo"]["tensor_parallel"] == 2
    assert_same_deltas(canonical_deltas(adapter), expected_deltas(weights, 1.0))


def test_tensor_and_pipeline_parallel_shards_place_every_layer(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, seed=8)
    chunks = pipeline_chunks(state_dict(weights), num_layers=3, pp=3)
    ckpts = {}
    for (stage, _), part in chunks.items():
        for t, shard in enumerate(tp_shards(part, 2)):
            ckpts[f"tp_rank_{t:02d}_pp_rank_{stage:03d}/model_weights.ckpt"] = shard
    write_nemo(tmp_path, model_config(tp=2, pp=3), ckpts)
    assert_same_deltas(canonical_deltas(nemo.load(tmp_path, tiny_spec)), expected_deltas(weights, 1.0))


def test_virtual_pipeline_chunks_are_placed_like_megatron(tmp_path):
    geo = {**TINY_GEOMETRY, "num_layers": 4}
    weights = random_nemo_lora(geo, r=2, targets=["attention_dense"], seed=9)
    chunks = pipeline_chunks(state_dict(weights), num_layers=4, pp=2, vpp=2)
    ckpts = {
        f"tp_rank_00_pp_rank_{p:03d}/model_weights.ckpt": {f"model_{c}": chunks[(p, c)] for c in (0, 1)}
        for p in (0, 1)
    }
    write_nemo(tmp_path, model_config(geo, r=2, targets=["attention_dense"], pp=2), ckpts)
    adapter = nemo.load(tmp_path)
    for layer in range(4):
        assert torch.equal(
            adapter.weights[(layer, "attn_dense")].b, weights[(layer, "lora_dense_attention_adapter")][1]
        )


def test_geometry_falls_back_to_the_engine_spec(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, seed=10)
    cfg = {k: v for k, v in model_config().items() if k not in TINY_GEOMETRY or k == "activation"}
    write_nemo(tmp_path, cfg, {"model_weights.ckpt": state_dict(weights)})
    with pytest.raises(AdapterFormatError, match="lacks hidden_size"):
        nemo.load(tmp_path)
    assert_same_deltas(canonical_deltas(nemo.load(tmp_path, tiny_spec)), expected_deltas(weights, 1.0))


def test_matches_peft_through_fit_pack_unpack(tmp_path, tiny_spec):
    """The oracle: a real PeftModel holding the same A/B/alpha merges the same weights as our packed rows."""
    from peft import LoraConfig, get_peft_model

    weights = random_nemo_lora(r=4, seed=11)
    write_fixture(tmp_path, weights, r=4, alpha=12)
    base = tiny_llama_model()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for (layer, module), (a, b) in hf_equivalent(weights).items():
            hf = TRTLLM_TO_HF[module]
            target = getattr(getattr(model.base_model.model.model.layers[layer], HF_PARENT[hf]), hf)
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
    merged = dict(model.merge_and_unload().named_parameters())

    packed = pack(fit_to_spec(nemo.load(tmp_path, tiny_spec), tiny_spec), torch.float32)
    ours = unpack(packed.weights, packed.config, tiny_spec)
    assert len(ours) == 3 * 7
    for (layer, module), w in ours:
        hf = TRTLLM_TO_HF[module]
        name = f"model.layers.{layer}.{HF_PARENT[hf]}.{hf}.weight"
        torch.testing.assert_close((merged[name] - before[name]).double(), w.delta(), atol=2e-6, rtol=1e-5)


# --- detection ---------------------------------------------------------------------


def test_detect(tmp_path):
    write_fixture(tmp_path / "nemo1", random_nemo_lora(r=2, seed=0), r=2)
    (tmp_path / "nemo2" / "weights").mkdir(parents=True)
    (tmp_path / "nemo2" / "weights" / "adapter_metadata.json").write_text("{}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "adapter_config.json").write_text("{}")
    assert nemo.detect(tmp_path / "nemo1") and nemo.detect(tmp_path / "nemo2")
    assert not nemo.detect(tmp_path / "hf") and not nemo.detect(tmp_path / "nemo1" / "adapter.nemo")


def test_registry_finds_and_fits_a_nemo_adapter(tmp_path, tiny_spec):
    from trtllm_peft import formats

    weights = random_nemo_lora(r=4, seed=22)
    write_fixture(tmp_path, weights, alpha=8)
    assert formats.detect(tmp_path) == "nemo"
    fitted = formats.load_for_engine(tmp_path, tiny_spec)  # attn_qkv split into the engine's q, k, v
    assert len(fitted) == 3 * 7 and "attn_qkv" not in fitted.modules
    assert_same_deltas({k: w.delta() for k, w in fitted}, expected_deltas(weights, 2.0))
