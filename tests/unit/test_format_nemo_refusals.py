"""NeMo `.nemo` LoRA files that are broken, hostile, NeMo 2, or of another model: each refused with a precise
error (the problems of one file collected in one message), and a pickle that runs code is never run.
"""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from tests.nemo_fixtures import (
    TINY_GEOMETRY,
    RunsCode,
    model_config,
    random_nemo_lora,
    state_dict,
    write_fixture,
    write_nemo,
)
from trtllm_peft.errors import AdapterFormatError, AdapterIncompatibleError
from trtllm_peft.formats import nemo


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
