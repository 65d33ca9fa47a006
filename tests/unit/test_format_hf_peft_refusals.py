"""Hugging Face PEFT adapters that are not plain LoRA, broken, or hostile: each refused with a precise error,
every problem of one adapter in one message. The adapters are real ones made by peft (conftest), then broken.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import edit_peft_config, make_peft_adapter, rewrite_peft_tensors
from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats import hf_peft

SAFE = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _peft(**kwargs):
    def build(d: Path) -> None:
        shutil.rmtree(d)
        make_peft_adapter(d, target_modules=kwargs.pop("target_modules", ["q_proj", "v_proj"]), **kwargs)

    return build


def _add_tensor(key: str, shape=(4, 4)):
    return lambda d: rewrite_peft_tensors(d, lambda t: {**t, key: torch.zeros(shape)})


def _drop(suffix: str):
    return lambda d: rewrite_peft_tensors(d, lambda t: {k: v for k, v in t.items() if not k.endswith(suffix)})


def _fake(config: dict, tensors: dict):
    """A hand-made adapter of another architecture, written with safetensors."""

    def build(d: Path) -> None:
        (d / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
        save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(d / SAFE))

    return build


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def _pickle_bin(d: Path) -> None:
    (d / SAFE).unlink()
    torch.save({"x": _RunsCode()}, d / "adapter_model.bin")


Q = "base_model.model.model.layers.0.self_attn.q_proj"
GPT2 = "base_model.model.transformer.h.0.attn.c_attn"
BLOOM = "base_model.model.transformer.h.0.self_attention.query_key_value"
REFUSALS = [
    # (id, how to turn a good adapter (q_proj, v_proj; r=4) into a refused one, phrase of the message)
    ("not-lora", lambda d: edit_peft_config(d, peft_type="IA3"), "peft_type 'IA3' is not supported"),
    ("no-peft-type", lambda d: edit_peft_config(d, peft_type=None), "missing peft_type"),
    (
        "dora-without-magnitudes",
        lambda d: edit_peft_config(d, use_dora=True),
        "without lora_magnitude_vector",
    ),
    ("dora-tensors-only", _add_tensor(f"{Q}.lora_magnitude_vector", (32,)), "although use_dora is not set"),
    ("modules-to-save", _peft(modules_to_save=["lm_head"]), "modules_to_save is not supported"),
    ("bias-all", _peft(bias="all"), "bias='all' is not supported"),
    ("lora-bias", _peft(lora_bias=True), "lora_bias is not supported"),
    ("lora-bias-tensors-only", _add_tensor(f"{Q}.lora_B.bias", (32,)), "LoRA bias tensors"),
    ("embedding-lora", _peft(target_modules=["q_proj", "embed_tokens"]), "embedding LoRA"),
    (
        "base-layer-weights",
        _add_tensor("base_model.model.model.embed_tokens.base_layer.weight"),
        "base model weights",
    ),
    ("lm-head-weights", _add_tensor("base_model.model.lm_head.weight"), "base model weights"),
    (
        "layer-replication",
        lambda d: edit_peft_config(d, layer_replication=[[0, 2], [1, 3]]),
        "layer_replication",
    ),
    ("alora", lambda d: edit_peft_config(d, alora_invocation_tokens=[5, 6]), "Activated LoRA"),
    ("trainable-tokens", _peft(trainable_token_indices=[1, 2]), "trainable_token_indices is not supported"),
    (
        "target-parameters",
        lambda d: edit_peft_config(d, target_parameters=["mlp.down_proj.weight"]),
        "target_parameters",
    ),
    (
        "pissa-unconverted",
        lambda d: edit_peft_config(d, init_lora_weights="pissa_niter_4"),
        "rewrote at initialisation",
    ),
    (
        "gpt2-c-attn",
        _fake(
            {"target_modules": ["c_attn"]},
            {f"{GPT2}.lora_A.weight": (4, 32), f"{GPT2}.lora_B.weight": (96, 4)},
        ),
        "cannot be mapped",
    ),
    (
        "conv-lora",
        _fake(
            {"target_modules": ["q_proj"]},
            {f"{Q}.lora_A.weight": (4, 32, 1, 1), f"{Q}.lora_B.weight": (32, 4, 1, 1)},
        ),
        "not 2-D",
    ),
    (
        "legacy-merged-linear",
        _fake(
            {
                "enable_lora": [True, False, True],
                "merge_weights": False,
                "target_modules": ["query_key_value"],
            },
            {f"{BLOOM}.lora_A.weight": (8, 32), f"{BLOOM}.lora_B.weight": (64, 4, 1)},
        ),
        "legacy MergedLinear",
    ),
    (
        "missing-b",
        _drop("q_proj.lora_B.weight"),
        "modules missing lora_B.weight: model.layers.0.self_attn.q_proj",
    ),
    ("missing-a", _drop("v_proj.lora_A.weight"), "modules missing lora_A.weight"),
    ("no-config", lambda d: (d / CONFIG).unlink(), "missing adapter_config.json"),
    ("config-not-json", lambda d: (d / CONFIG).write_text("{r: 8"), "not valid JSON"),
    ("config-not-object", lambda d: (d / CONFIG).write_text("[1, 2]"), "must hold a JSON object"),
    ("config-missing-r", lambda d: edit_peft_config(d, r=None), "missing r"),
    ("config-bad-alpha", lambda d: edit_peft_config(d, lora_alpha="8"), "lora_alpha must be a number"),
    ("config-no-targets", lambda d: edit_peft_config(d, target_modules=None), "missing target_modules"),
    (
        "bad-regex",
        lambda d: edit_peft_config(d, rank_pattern={"q_proj(": 8}),
        "not a valid regular expression",
    ),
    (
        "regex-with-layers",
        lambda d: edit_peft_config(d, target_modules=".*q_proj", layers_to_transform=[0]),
        "cannot be used with a regex",
    ),
    ("no-lora-tensors", lambda d: save_file({}, str(d / SAFE)), "holds no LoRA tensors"),
    ("no-weights-file", lambda d: (d / SAFE).unlink(), "missing adapter weights"),
    ("rank-disagrees", lambda d: edit_peft_config(d, r=8), "differs from the config's r=8"),
    ("not-targeted", lambda d: edit_peft_config(d, target_modules=["q_proj"]), "do not select"),
    (
        "layer-not-targeted",
        lambda d: edit_peft_config(d, layers_to_transform=[0, 2]),
        "ignore them): model.layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj",
    ),
    (
        "int-tensors",
        lambda d: rewrite_peft_tensors(d, lambda t: {k: v.to(torch.int32) for k, v in t.items()}),
        "non-floating-point",
    ),
    (
        "duplicate-keys",
        lambda d: rewrite_peft_tensors(
            d, lambda t: {**t, **{k.removeprefix("base_model.model."): v.clone() for k, v in t.items()}}
        ),
        "appear twice",
    ),
    ("pickle-runs-code", _pickle_bin, "would run code"),
    (
        "bin-not-named-tensors",
        lambda d: torch.save({1: torch.ones(2), "x": [1]}, d / "adapter_model.bin") or (d / SAFE).unlink(),
        "entries that are not named tensors: 1, 'x'",
    ),
    ("truncated", lambda d: (d / SAFE).write_bytes((d / SAFE).read_bytes()[:200]), "truncated"),
    (
        "lfs-pointer",
        lambda d: (d / SAFE).write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"
        ),
        "Git-LFS",
    ),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pristine") / "adapter"
    make_peft_adapter(d, target_modules=["q_proj", "v_proj"])
    return d


@pytest.mark.parametrize(("case", "breaker", "phrase"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refused_with_a_precise_error(tmp_path, pristine, case, breaker, phrase):
    d = tmp_path / "adapter"
    shutil.copytree(pristine, d)
    breaker(d)
    with pytest.raises(AdapterFormatError) as err:
        hf_peft.load(d)
    assert phrase in str(err.value), str(err.value)
    assert err.value.source.startswith(str(d))


def test_every_problem_is_reported_at_once(tmp_path, pristine):
    d = tmp_path / "adapter"
    shutil.copytree(pristine, d)
    edit_peft_config(d, lora_bias=True, modules_to_save=["lm_head"], bias="all", r=None)
    _add_tensor("base_model.model.lm_head.weight")(d)
    _drop("q_proj.lora_B.weight")(d)
    with pytest.raises(AdapterFormatError) as err:
        hf_peft.load(d)
    assert len(err.value.problems) == 6, err.value.problems
