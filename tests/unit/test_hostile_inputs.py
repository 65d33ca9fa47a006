"""Hostile adapter files (issue #16, findings 1, 2, 3, 6 and the symlink case): each gets its precise error.

Every case starts from a valid adapter written by our own writers for a small engine spec, breaks one thing
the way an attacker (or a broken exporter) would, and loads it as the server does
(`formats.load_for_engine`). None of them may hang (ReDoS), read its claimed size (sparse files, gzip bombs),
or escape as anything but an AdapterError (the server's 422, the adapter marked invalid).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trtllm_peft import formats
from trtllm_peft.errors import AdapterError
from trtllm_peft.formats import hf_peft
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec
from trtllm_peft.serving.catalog import Catalog
from trtllm_peft.settings import Settings

SPEC = ModelSpec(
    num_layers=2,
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    dtype="float32",
    max_lora_rank=8,
)
MODULES = ("attn_q", "attn_v", "mlp_4h_to_h")
SECRET = b"root:$6$s3cr3t-hash:19000:0:99999:7:::\n"  # what a link to /etc/shadow would show
REDOS = "(([a-z_.0-9])+)+X"  # exponential on Python's re against any module name (~2^31 steps)


def adapter() -> LoraAdapter:
    g = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(SPEC.num_layers):
        for m in MODULES:
            d_in, d_out = SPEC.module_dims(m)
            weights[(layer, m)] = LoraWeights(
                a=torch.randn(4, d_in, generator=g), b=torch.randn(d_out, 4, generator=g), scale=2.0
            )
    return LoraAdapter(weights=weights, format="hf")


def written(tmp_path: Path, fmt: str) -> Path:
    d = tmp_path / f"adapter-{fmt}"
    formats.save(adapter(), d, fmt, SPEC)
    return d


# ---- breakers ---------------------------------------------------------------------------------------------


def config_edit(**changes):
    def brk(d: Path) -> None:
        path = d / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))

    return brk


def config_text(text: str | bytes):
    def brk(d: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (d / "adapter_config.json").write_bytes(data)

    return brk


def safetensors_header(header: dict | str, data_len: int = 0, sparse_to: int | None = None):
    """Replace adapter_model.safetensors by a header (and a sparse data section: a hole, no bytes)."""

    def brk(d: Path) -> None:
        raw = (json.dumps(header) if isinstance(header, dict) else header).encode()
        path = d / "adapter_model.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + data_len if sparse_to is None else sparse_to)

    return brk


def secret_as_weights(d: Path) -> None:
    """adapter_model.safetensors holds a secret (as a link to /etc/shadow would): its bytes must not leak."""
    (d / "adapter_model.safetensors").write_bytes(SECRET)


def nemo_rewrite(*, config: dict | None = None, config_text: str | None = None, members=(), gz=False):
    """Rebuild the .nemo: its model_config.yaml changed, extra members (name, bytes or size of zeros)."""

    def brk(d: Path) -> None:
        (nemo,) = d.glob("*.nemo")
        with tarfile.open(nemo) as tar:
            old = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        cfg_name = next(n for n in old if n.endswith("model_config.yaml"))
        cfg = yaml.safe_load(old[cfg_name])
        cfg.update(config or {})
        old[cfg_name] = (config_text or yaml.safe_dump(cfg)).encode()
        with tarfile.open(nemo, "w:gz" if gz else "w", **({"compresslevel": 1} if gz else {})) as tar:
            for name, data in [*old.items(), *members]:
                info = tarfile.TarInfo(name)
                if isinstance(data, int):  # a member of `data` zero bytes, streamed (a gzip bomb)
                    info.size = data
                    tar.addfile(info, _Zeros(data))
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    return brk


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def many_members(n: int):
    return nemo_rewrite(members=[(f"junk/{i}", b"") for i in range(n)])


def npy_header(name: str, shape: tuple[int, ...], dtype: str = "<f4"):
    """Replace a .npy by a header for `shape` and a sparse data section (a hole: it costs no disk)."""

    def brk(d: Path) -> None:
        path = d / name
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
            f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)

    return brk


def raw_bin(size: int):
    def brk(d: Path) -> None:
        (d / "model.lora_weights.npy").unlink()
        with open(d / "model.lora_weights.bin", "wb") as f:
            f.truncate(size)

    return brk


def deep_yaml(d: Path) -> None:
    nemo_rewrite(config_text="a: " + "[" * 100_000 + "]" * 100_000)(d)


# ---- the table --------------------------------------------------------------------------------------------

LIMIT = f"{formats.limits.ReadLimits.for_spec(SPEC).file_bytes} bytes at most"
CASES = [
    # finding 1: regexes from adapter_config.json run in linear time (RE2); PEFT's fullmatch kept
    ("redos-target-modules", "hf", config_edit(target_modules=REDOS), "target_modules do not select"),
    ("redos-exclude-modules", "hf", config_edit(exclude_modules=REDOS), None),
    ("redos-rank-pattern", "hf", config_edit(rank_pattern={"(x+x+)+y": 2}), None),
    (
        "redos-layers-pattern",
        "hf",
        config_edit(layers_to_transform=[0, 1], layers_pattern=REDOS),
        "target_modules do not select",  # PEFT's answer too: no layer index found by the pattern
    ),
    ("backreference", "hf", config_edit(target_modules=r"(q)\1"), "not a valid regular expression for RE2"),
    ("lookahead", "hf", config_edit(exclude_modules="(?=x)y"), "not a valid regular expression for RE2"),
    ("huge-repeat", "hf", config_edit(target_modules="(a{1000}){1000}"), "invalid repetition size"),
    ("long-pattern", "hf", config_edit(target_modules="a" * 20_000), "longer than 16384 characters"),
    ("surrogate-pattern", "hf", config_text('{"target_modules": "q\\ud800"}'), "not valid UTF-8 text"),
    (
        "many-pattern-keys",
        "hf",
        config_edit(rank_pattern={f"k{i}": 2 for i in range(5000)}),
        "more than 2048",
    ),
    # finding 6: JSON nested 100k deep, huge or undecodable configs
    ("deep-config", "hf", config_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("huge-config", "hf", config_text(" " * (2 << 20) + "{}"), "larger than 1048576 bytes"),
    ("latin1-config", "hf", config_text(b'{"r": 4, "x": "\xe9"}'), "not UTF-8 text (byte"),
    # finding 3: sizes from headers, before any tensor is read
    (
        "safetensors-wide-tensor",
        "hf",
        safetensors_header(
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [1, 90, 5_000_000],
                    "data_offsets": [0, 1_800_000_000],
                }
            },
            data_len=1_800_000_000,
        ),
        "is larger than any adapter this engine can take",
    ),
    (
        "safetensors-big-tensor",
        "hf",
        safetensors_header(
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [1024, 1024],
                    "data_offsets": [0, 4 << 20],
                }
            },
            data_len=4 << 20,
        ),
        "is larger than any LoRA tensor this engine takes (2048 values at most",
    ),
    ("safetensors-deep-header", "hf", safetensors_header("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("safetensors-secret", "hf", secret_as_weights, "corrupt or truncated safetensors file"),
    # finding 2: parallel sizes capped, the shard grid bounded by the archive's own members
    (
        "nemo-tp-1e8",
        "nemo",
        nemo_rewrite(config={"tensor_model_parallel_size": 100_000_000}),
        "more than 1024",
    ),
    (
        "nemo-grid",
        "nemo",
        nemo_rewrite(config={"tensor_model_parallel_size": 1000, "pipeline_model_parallel_size": 1000}),
        "= 1000000 shards (more than 1024), but the archive holds 1 model_weights.ckpt",
    ),
    (
        "nemo-tp-missing-many",
        "nemo",
        nemo_rewrite(config={"tensor_model_parallel_size": 64}),
        "… and 56 more",
    ),
    # finding 3: a gzip bomb costs its headers
    ("nemo-gzip-bomb", "nemo", nemo_rewrite(members=[("junk.bin", 40 << 20)], gz=True), LIMIT),
    ("nemo-many-members", "nemo", many_members(5000), "more than 4096 members"),
    ("nemo-deep-yaml", "nemo", deep_yaml, "nested too deeply"),
    # finding 3: the sparse 1.8 GB .npy [1, 90, 5000000] (row width checked against the engine's)
    (
        "npy-wide-rows",
        "trtllm",
        npy_header("model.lora_weights.npy", (1, 90, 5_000_000)),
        "rows of 5000000 values are wider than any this engine takes (2816",  # rank x (in + out) + out (DoRA)
    ),
    (
        "npy-many-rows",
        "trtllm",
        npy_header("model.lora_weights.npy", (1, 100_000, 8)),
        "100000 rows, more than",
    ),
    (
        "npy-config-rows",
        "trtllm",
        npy_header("model.lora_config.npy", (1, 10**9, 4), "<i4"),
        "rows, more than",
    ),
    ("raw-bin-huge", "trtllm", raw_bin(2 << 30), "is more than any adapter of this engine holds"),
]


@pytest.mark.parametrize(("case", "fmt", "breaker", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_hostile_adapter_gets_its_precise_error(tmp_path, case, fmt, breaker, phrase):
    d = written(tmp_path, fmt)
    breaker(d)
    if phrase is None:  # the pattern matches nothing here: the adapter loads (and took no time to match)
        assert len(formats.load_for_engine(d, SPEC)) == len(adapter())
        return
    with pytest.raises(AdapterError) as err:
        formats.load_for_engine(d, SPEC)
    message = str(err.value)
    assert phrase in message, message
    message.encode("utf-8")  # goes into a JSON answer as it is
    assert SECRET[:8].decode() not in message and str(struct.unpack("<Q", SECRET[:8])[0]) not in message


def test_any_exception_while_reading_becomes_an_adapter_error(tmp_path, monkeypatch):
    """A bug or an exception nobody foresaw: still an AdapterError (422, marked invalid), never a 500."""
    d = written(tmp_path, "hf")

    def boom(*_a, **_k):
        raise KeyError("some internal key")

    monkeypatch.setattr(hf_peft, "_lora_pairs", boom)
    with pytest.raises(AdapterError, match=r"could not be read \(KeyError\)"):
        formats.load_for_engine(d, SPEC)


def test_undecodable_file_names_give_a_printable_error(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    (d / os.fsdecode(b"weights-\xff.bin")).write_bytes(b"x")
    with pytest.raises(AdapterError) as err:
        formats.load_for_engine(d, SPEC)
    assert "weights-\\udcff.bin" in str(err.value)
    str(err.value).encode("utf-8")


# ---- symbolic links and names in NIM_PEFT_SOURCE (serving/catalog.py) --------------------------------------


@pytest.fixture
def linked_root(tmp_path):
    """root/inside-link -> root/real/..., root/outside-link -> a secret outside the root."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    root = tmp_path / "loras"
    root.mkdir()
    real = written(tmp_path, "hf").rename(root / "real")
    out_link = root / "outside-link"
    out_link.mkdir()
    (out_link / "adapter_config.json").write_bytes((real / "adapter_config.json").read_bytes())
    (out_link / "adapter_model.safetensors").symlink_to(outside / "shadow")
    in_link = root / "inside-link"
    in_link.mkdir()
    (in_link / "adapter_config.json").write_bytes((real / "adapter_config.json").read_bytes())
    (in_link / "adapter_model.safetensors").symlink_to(real / "adapter_model.safetensors")
    (root / "dir-link").symlink_to(real, target_is_directory=True)
    return root


@pytest.mark.parametrize(
    ("policy", "served", "refused"),
    [
        ("inside", {"real", "inside-link", "dir-link"}, {"outside-link": "leading outside NIM_PEFT_SOURCE"}),
        ("all", {"real", "inside-link", "dir-link", "outside-link"}, {}),
        (
            "none",
            {"real"},
            {
                "outside-link": "adapter_model.safetensors is a symbolic link (TRTLLM_PEFT_FOLLOW_SYMLINKS=none",
                "inside-link": "adapter_model.safetensors is a symbolic link",
                "dir-link": "dir-link is a symbolic link",
            },
        ),
    ],
)
def test_symlink_policy(linked_root, policy, served, refused):
    catalog = Catalog(linked_root, follow_symlinks=policy)
    catalog.scan()
    assert {e.name for e in catalog} == served
    skipped = catalog.invalid()
    for name, phrase in refused.items():
        assert phrase in skipped[name], skipped[name]
        assert SECRET[:8].decode() not in skipped[name]


def test_undecodable_directory_name_is_skipped_with_a_printable_name(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    written(tmp_path, "hf").rename(root / os.fsdecode(b"bad-\xff"))
    catalog = Catalog(root)
    catalog.scan()
    assert len(catalog) == 0
    assert "not valid UTF-8" in catalog.invalid()["bad-\\udcff"]


@pytest.mark.parametrize(("raw", "expected"), [(None, "inside"), ("ALL", "all"), ("none", "none")])
def test_follow_symlinks_setting(raw, expected):
    env = {} if raw is None else {"TRTLLM_PEFT_FOLLOW_SYMLINKS": raw}
    assert Settings.from_env(env).follow_symlinks == expected


def test_follow_symlinks_setting_refuses_other_values():
    with pytest.raises(
        Exception, match="TRTLLM_PEFT_FOLLOW_SYMLINKS='outside' must be one of inside, all, none"
    ):
        Settings.from_env({"TRTLLM_PEFT_FOLLOW_SYMLINKS": "outside"})
