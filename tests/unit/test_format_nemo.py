"""NeMo 1.x `.nemo` LoRA: reading every documented layout, the exact math against Hugging Face/PEFT, writing.

Fixtures are built by tests/nemo_fixtures.py from NeMo's documented layout (torch.save + tarfile + yaml),
never by our writer; their Hugging Face equivalents are picked out by hand, head by head.
"""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from tests.conftest import LLAMA_TARGETS, tiny_llama_model
from tests.nemo_fixtures import (
    TINY_GEOMETRY,
    RunsCode,
    hf_equivalent,
    model_config,
    pipeline_chunks,
    random_nemo_lora,
    split_fused_qkv,
    state_dict,
    tp_shards,
    write_nemo,
)
from trtllm_peft.errors import AdapterError, AdapterFormatError, AdapterIncompatibleError
from trtllm_peft.formats import nemo
from trtllm_peft.lora import LoraAdapter, LoraWeights, fit_to_spec, pack, unpack
from trtllm_peft.lora.modules import HF_PARENT, TRTLLM_TO_HF

QKV_SIZES = {"attn_q": 32, "attn_k": 16, "attn_v": 16}  # tiny Llama: 4 heads, 2 kv heads, head_dim 8


def canonical_deltas(adapter: LoraAdapter, sizes=QKV_SIZES) -> dict[tuple[int, str], torch.Tensor]:
    """scale·B·A per (layer, module), the canonical attn_qkv [Q; K; V] read as its three parts."""
    out = {}
    for (layer, module), w in adapter:
        if module == "attn_qkv":
            for part, b in zip(sizes, w.b.split(list(sizes.values())), strict=True):
                out[(layer, part)] = LoraWeights(w.a, b, w.scale).delta()
        else:
            out[(layer, module)] = w.delta()
    return out


def expected_deltas(weights, scale: float, geo=TINY_GEOMETRY) -> dict[tuple[int, str], torch.Tensor]:
    return {k: (b.double() @ a.double()) * scale for k, (a, b) in hf_equivalent(weights, geo).items()}


def assert_same_deltas(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


def write_fixture(directory, weights, *, style="mcore", **config):
    return write_nemo(directory, model_config(**config), {"model_weights.ckpt": state_dict(weights, style)})


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


# --- writing ------------------------------------------------------------------------------------


def read_back(path):
    with tarfile.open(path, "r:") as tar:  # plain tar, NeMo's member names
        assert tar.getnames() == [".", "./model_config.yaml", "./model_weights.ckpt"]
        config = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        state = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    return config, state


def test_save_fused_reproduces_the_original_file(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, layers=[0, 2], seed=12)
    write_fixture(tmp_path / "in", weights, alpha=8, layer_selection=[1, 3])
    adapter = nemo.load(tmp_path / "in", tiny_spec)
    (path,) = nemo.save(adapter, tmp_path / "out", tiny_spec)
    assert path == tmp_path / "out" / "out.nemo"
    config, state = read_back(path)
    tuning = config["peft"]["lora_tuning"]
    assert (config["peft"]["peft_scheme"], tuning["variant"], tuning["adapter_dim"], tuning["alpha"]) == (
        "lora",
        "nemo",
        4,
        8,
    )
    assert tuning["layer_selection"] == [1, 3] and tuning["target_modules"] == list(
        model_config()["peft"]["lora_tuning"]["target_modules"]
    )
    original = state_dict(weights)  # re-interleaved per GQA group, [gate; up] fused: the very same tensors
    assert sorted(state) == sorted(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert_same_deltas(canonical_deltas(nemo.load(tmp_path / "out", tiny_spec)), canonical_deltas(adapter))


def test_save_canonical_when_parts_have_their_own_a(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, variant="canonical", seed=13)
    write_fixture(tmp_path / "in", weights, variant="canonical", alpha=2)
    adapter = nemo.load(tmp_path / "in", tiny_spec)
    (path,) = nemo.save(adapter, tmp_path / "out", tiny_spec)
    config, state = read_back(path)
    assert config["peft"]["lora_tuning"]["variant"] == "canonical"
    assert sorted(state) == sorted(state_dict(weights))
    again = nemo.load(tmp_path / "out", tiny_spec)
    assert torch.equal(again.weights[(1, "attn_v")].a, adapter.weights[(1, "attn_v")].a)
    assert_same_deltas(canonical_deltas(again), canonical_deltas(adapter))


def test_save_pads_ranks_folds_scales_and_zero_fills(tmp_path, tiny_spec):
    """Rank 2 and rank 4, three scales, q and v without k, dense on one layer: still the same B·A·scale."""
    gen = torch.Generator().manual_seed(14)

    def lora(r, d_in, d_out, scale):
        return LoraWeights(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen), scale)

    adapter = LoraAdapter(
        weights={
            (0, "attn_q"): lora(2, 32, 32, 0.5),
            (0, "attn_v"): lora(4, 32, 16, 2.0),
            (1, "attn_q"): lora(4, 32, 32, 0.5),
            (1, "attn_dense"): lora(3, 32, 32, 1.5),
        },
        format="hf",
    )
    (path,) = nemo.save(adapter, tmp_path / "out", tiny_spec)
    config, state = read_back(path)
    tuning = config["peft"]["lora_tuning"]
    assert (tuning["variant"], tuning["adapter_dim"], tuning["alpha"], tuning["layer_selection"]) == (
        "canonical",
        4,
        4,
        [1, 2],
    )
    again = nemo.load(tmp_path / "out", tiny_spec)
    assert {w.rank for _, w in again} == {4} and {w.scale for _, w in again} == {1.0}
    got = canonical_deltas(again)
    want = {k: w.delta() for k, w in adapter}
    for key, delta in got.items():  # every written module; the zero-filled ones add nothing
        torch.testing.assert_close(delta, want.get(key, torch.zeros_like(delta)), atol=1e-5, rtol=1e-5)
    assert set(want) <= set(got)


def test_save_fuses_parts_that_share_a_even_with_different_scales(tmp_path, tiny_spec):
    gen = torch.Generator().manual_seed(15)
    a = torch.randn(4, 32, generator=gen)
    adapter = LoraAdapter(
        weights={
            (layer, m): LoraWeights(a, torch.randn(n, 4, generator=gen), s)
            for layer in range(3)
            for m, n, s in (("attn_q", 32, 2.0), ("attn_k", 16, 2.0), ("attn_v", 16, 0.5))
        },
        format="hf",
    )
    (path,) = nemo.save(adapter, tmp_path / "out", tiny_spec)
    config, state = read_back(path)
    assert config["peft"]["lora_tuning"]["variant"] == "nemo" and config["peft"]["lora_tuning"]["alpha"] == 4
    assert all("lora_kqv_adapter" in k for k in state)
    got = canonical_deltas(nemo.load(tmp_path / "out", tiny_spec))
    for key, w in adapter:
        torch.testing.assert_close(got[key], w.delta(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "weights,message",
    [
        (
            {(0, "cross_attn_q"): LoraWeights(torch.ones(2, 32), torch.ones(32, 2))},
            "no adapter for this module",
        ),
        ({(0, "attn_q"): LoraWeights(torch.ones(2, 32), torch.ones(16, 2))}, "do not fit the model"),
        ({(5, "attn_q"): LoraWeights(torch.ones(2, 32), torch.ones(32, 2))}, "layer out of range"),
    ],
    ids=["module", "shape", "layer"],
)
def test_save_refuses_what_does_not_fit(tmp_path, tiny_spec, weights, message):
    with pytest.raises(AdapterIncompatibleError, match=message):
        nemo.save(LoraAdapter(weights=weights, format="hf"), tmp_path / "out", tiny_spec)


def test_save_refuses_a_directory_with_another_nemo(tmp_path, tiny_spec):
    adapter = LoraAdapter(
        weights={(0, "attn_q"): LoraWeights(torch.ones(2, 32), torch.ones(32, 2))}, format="hf"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.nemo").write_bytes(b"")
    with pytest.raises(AdapterError, match="already holds old.nemo"):
        nemo.save(adapter, tmp_path / "out", tiny_spec)


# --- detection and refusals ---------------------------------------------------------------------


def test_detect(tmp_path):
    write_fixture(tmp_path / "nemo1", random_nemo_lora(r=2, seed=0), r=2)
    (tmp_path / "nemo2" / "weights").mkdir(parents=True)
    (tmp_path / "nemo2" / "weights" / "adapter_metadata.json").write_text("{}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "adapter_config.json").write_text("{}")
    assert nemo.detect(tmp_path / "nemo1") and nemo.detect(tmp_path / "nemo2")
    assert not nemo.detect(tmp_path / "hf") and not nemo.detect(tmp_path / "nemo1" / "adapter.nemo")


def _good():
    return random_nemo_lora(r=4, seed=20)


def _with_key(extra: dict):
    return lambda d: write_nemo(d, model_config(), {"model_weights.ckpt": {**state_dict(_good()), **extra}})


def _with_config(**changes):
    return lambda d: write_nemo(d, model_config(**changes), {"model_weights.ckpt": state_dict(_good())})


def _without(key_part: str):
    return lambda d: write_nemo(
        d,
        model_config(),
        {"model_weights.ckpt": {k: v for k, v in state_dict(_good()).items() if key_part not in k}},
    )


def _two_nemo(d):
    write_nemo(d, model_config(), {"model_weights.ckpt": state_dict(_good())}, name="a.nemo")
    write_nemo(d, model_config(), {"model_weights.ckpt": state_dict(_good())}, name="b.nemo")


def _nemo2(d):
    (d / "weights").mkdir()
    (d / "weights" / "adapter_metadata.json").write_text('{"model_ckpt_path": "/base"}')


def _corrupt(d):
    (d / "adapter.nemo").write_bytes(b"\x00not a tar archive at all" * 40)


def _truncated(d):
    path = write_nemo(d, model_config(), {"model_weights.ckpt": state_dict(_good())})
    path.write_bytes(path.read_bytes()[:3000])


def _lfs(d):
    (d / "adapter.nemo").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")


def _tied():
    cfg = model_config()
    cfg["peft"]["lora_tuning"]["weight_tying"] = True
    return cfg


T = torch.ones(4, 32)
KQV = "model.decoder.layers.0.self_attention.adapter_layer"
REFUSALS = [
    ("no-nemo", lambda d: (d / "README.md").write_text("x"), AdapterFormatError, "no .nemo file"),
    ("two-nemo", _two_nemo, AdapterFormatError, r"2 .nemo files \(a.nemo, b.nemo\)"),
    ("nemo2", _nemo2, AdapterFormatError, "NeMo 2 PEFT checkpoint.*export_lora"),
    (
        "no-config",
        lambda d: write_nemo(d, None, {"model_weights.ckpt": state_dict(_good())}),
        AdapterFormatError,
        "model_config.yaml is not in the archive",
    ),
    (
        "no-weights",
        lambda d: write_nemo(d, model_config(), {}),
        AdapterFormatError,
        r"model_weights.ckpt is not in the archive",
    ),
    (
        "tp-shard-missing",
        lambda d: write_nemo(d, model_config(tp=2), {"mp_rank_00/model_weights.ckpt": {}}),
        AdapterFormatError,
        "mp_rank_01/model_weights.ckpt is not in the archive",
    ),
    ("ptuning-scheme", _with_config(scheme="ptuning"), AdapterFormatError, "ptuning is not LoRA"),
    ("ptuning-and-lora", _with_config(scheme="ptuning,lora"), AdapterFormatError, "ptuning is not LoRA"),
    ("ia3-scheme", _with_config(scheme="ia3"), AdapterFormatError, "ia3 is not LoRA"),
    (
        "ptuning-key",
        _with_key({"model.embedding.adapter_layer.ptuning_adapter.first.weight": T}),
        AdapterFormatError,
        "'ptuning_adapter' is p-tuning",
    ),
    (
        "adapter-1",
        _with_key({f"{KQV}.adapter_1.linear_in.weight": T}),
        AdapterFormatError,
        "bottleneck adapter",
    ),
    (
        "ia3-key",
        _with_key({"model.decoder.layers.0.mlp.adapter_layer.mlp_infused_adapter.scalers": T}),
        AdapterFormatError,
        "'mlp_infused_adapter' is IA3",
    ),
    (
        "unknown-adapter",
        _with_key({f"{KQV}.lora_xyz_adapter.linear_in.weight": T}),
        AdapterFormatError,
        "unknown NeMo adapter 'lora_xyz_adapter'",
    ),
    (
        "stray-tensor",
        _with_key({"model.decoder.final_layernorm.weight": T}),
        AdapterFormatError,
        "unexpected tensor",
    ),
    (
        "weight-tying",
        lambda d: write_nemo(d, _tied(), {"model_weights.ckpt": state_dict(_good())}),
        AdapterFormatError,
        "weight_tying is set",
    ),
    (
        "missing-linear-out",
        _without("layers.1.self_attention.adapter_layer.lora_kqv_adapter.linear_out"),
        AdapterFormatError,
        "layer 1 lora_kqv_adapter: linear_out.weight is missing",
    ),
    ("missing-layer", _without("layers.2."), AdapterFormatError, r"no weights for layers \[2\]"),
    (
        "zero-based-selection",
        lambda d: write_fixture(d, random_nemo_lora(r=4, layers=[0, 2]), layer_selection=[0, 2]),
        AdapterFormatError,
        "layer_selection must be a list of 1-based",
    ),
    (
        "selection-disagrees",
        lambda d: write_fixture(d, random_nemo_lora(r=4, layers=[0, 2]), layer_selection=[2, 3]),
        AdapterFormatError,
        r"weights for layers \[0\] \(0-based\), outside layer_selection \[2, 3\]",
    ),
    (
        "rank-not-adapter-dim",
        _with_config(r=8),
        AdapterFormatError,
        "rank 4 but peft.lora_tuning.adapter_dim is 8",
    ),
    (
        "wrong-geometry",
        _with_config(geo={**TINY_GEOMETRY, "num_query_groups": 4}),
        AdapterFormatError,
        r"do not fit the model \(expected \[r, 32\] / \[96, r\]\)",
    ),
    (
        "alpha-not-a-number",
        _with_config(alpha="${..adapter_dim}"),
        AdapterFormatError,
        "alpha must be a number",
    ),
    ("corrupt-tar", _corrupt, AdapterFormatError, "not a readable tar archive"),
    ("truncated-tar", _truncated, AdapterFormatError, "corrupt or truncated"),
    ("lfs-pointer", _lfs, AdapterFormatError, "Git-LFS pointer"),
]


@pytest.mark.parametrize("build,error,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals(tmp_path, tiny_spec, build, error, message):
    build(tmp_path)
    with pytest.raises(error, match=message):
        nemo.load(tmp_path, tiny_spec)


def test_config_of_another_base_model_is_incompatible(tmp_path, tiny_spec):
    weights = random_nemo_lora(r=4, targets=["attention_dense"], seed=21)
    geo = {**TINY_GEOMETRY, "ffn_hidden_size": 64, "activation": "gelu"}
    write_fixture(tmp_path, weights, geo=geo, targets=["attention_dense"])
    assert nemo.load(tmp_path).modules == ["attn_dense"]  # fine on its own
    with pytest.raises(AdapterIncompatibleError) as e:
        nemo.load(tmp_path, tiny_spec)
    assert "ffn_hidden_size 64, the engine's model has 48" in str(e.value) and "non-gated" in str(e.value)


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path, tiny_spec):
    marker = tmp_path / "pwned"
    write_nemo(
        tmp_path / "a", model_config(), {"model_weights.ckpt": {**state_dict(_good()), "x": RunsCode(marker)}}
    )
    with pytest.raises(AdapterFormatError, match="would run code"):
        nemo.load(tmp_path / "a", tiny_spec)
    assert not marker.exists()
    with tarfile.open(tmp_path / "a" / "adapter.nemo") as tar:  # the fixture is real: unsafe loading runs it
        torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=False)
    assert marker.exists()


def test_problems_are_collected_not_just_the_first(tmp_path, tiny_spec):
    state = state_dict(_good())
    state.pop("model.decoder.layers.0.mlp.adapter_layer.lora_4htoh_adapter.linear_in.weight")
    state[f"{KQV}.ptuning_adapter.linear_in.weight"] = T
    write_nemo(tmp_path, model_config(), {"model_weights.ckpt": state})
    with pytest.raises(AdapterFormatError) as e:
        nemo.load(tmp_path, tiny_spec)
    assert (
        len(e.value.problems) >= 2
        and "p-tuning" in str(e.value)
        and "linear_in.weight is missing" in str(e.value)
    )


def test_registry_finds_and_fits_a_nemo_adapter(tmp_path, tiny_spec):
    from trtllm_peft import formats

    weights = random_nemo_lora(r=4, seed=22)
    write_fixture(tmp_path, weights, alpha=8)
    assert formats.detect(tmp_path) == "nemo"
    fitted = formats.load_for_engine(tmp_path, tiny_spec)  # attn_qkv split into the engine's q, k, v
    assert len(fitted) == 3 * 7 and "attn_qkv" not in fitted.modules
    assert_same_deltas({k: w.delta() for k, w in fitted}, expected_deltas(weights, 2.0))
