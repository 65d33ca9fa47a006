"""Writing NeMo 1.x `.nemo` LoRA (formats/nemo_writer.py): the file NeMo and TensorRT-LLM's NeMo loader read,
checked by reading it back (tarfile + torch.load) and against the math of what was written.
"""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from tests.nemo_fixtures import (
    assert_same_deltas,
    canonical_deltas,
    model_config,
    random_nemo_lora,
    state_dict,
    write_fixture,
)
from trtllm_peft.errors import AdapterError, AdapterIncompatibleError
from trtllm_peft.formats import nemo
from trtllm_peft.lora import LoraAdapter, LoraWeights


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
