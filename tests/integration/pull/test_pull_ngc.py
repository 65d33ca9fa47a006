"""`trtllm-peft pull ngc:…`: ngcsdk against the loopback NGC (conftest.py)."""

from __future__ import annotations

import os

import pytest

from tests.integration.fake_ngc import route_ngc_to
from tests.integration.pull.conftest import (
    NVAPI,
    closed_port,
    files_of,
    visible,
)
from trtllm_peft.pull import Credentials, PullError, PullRequest, pull_one


def test_ngc_pull_installs_the_version_under_nims_name(ngc, tmp_path, hf_files, check):
    ngc.add_version("nim/loras/smol-lora", "hf-math-v1", hf_files)
    result = pull_one(
        PullRequest.of("ngc:nim/loras/smol-lora:hf-math-v1"), tmp_path, Credentials(ngc_api_key=NVAPI), check
    )

    assert (
        result.path == tmp_path / "smol-lora_vhf-math-v1"
    )  # what `ngc registry model download-version` makes
    assert files_of(result.path) == hf_files and os.listdir(tmp_path) == [result.path.name]
    api = [r for r in ngc.log if r.host == "api.ngc.nvidia.com" and r.path.startswith("v2/")]
    assert api and all(r.authorization == f"Bearer {NVAPI}" for r in api)
    storage = [r for r in ngc.log if r.host.endswith("amazonaws.com")]
    assert storage and all(r.authorization is None for r in storage)


def test_ngc_nested_nemo_adapter_and_legacy_key(ngc, tmp_path, nemo_files, check):
    """A legacy (non-nvapi) key goes through NGC's token exchange; a version whose adapter sits in a
    sub-directory is installed as that directory."""
    (nemo,) = nemo_files.values()
    ngc.add_version("nim/smol-nemo", "v2", {"lora/smol.nemo": nemo, "README.md": b"trained on math"})
    result = pull_one(
        PullRequest.of("ngc:nim/smol-nemo:v2", "math"), tmp_path, Credentials(ngc_api_key="legacy-key"), check
    )
    assert result.format == "nemo" and files_of(tmp_path / "math") == {"smol.nemo": nemo}
    assert os.listdir(tmp_path) == ["math"]
    assert {r.path for r in ngc.log if r.host == "authn.nvidia.com"} == {"token"}  # the key, exchanged
    assert {r.authorization for r in ngc.log if r.path.startswith("v2/")} == {"Bearer tok-legacy-key"}


@pytest.mark.parametrize(
    ("case", "kind", "phrase"),
    [
        ("missing model", "not_found", "no such model version"),
        ("missing version", "not_found", "no such model version"),
        ("bad nvapi key", "auth", "NGC_API_KEY was rejected"),
        ("bad legacy key", "auth", "NGC_API_KEY was rejected"),
        ("no network", "network", "not reachable"),
        ("not a LoRA", "not_lora", "is not one LoRA adapter"),
        ("corrupt adapter", "not_lora", "is not a readable LoRA adapter"),
    ],
)
def test_ngc_errors_are_clear_and_leave_nothing(
    case, kind, phrase, ngc, tmp_path, hf_files, check, monkeypatch
):
    ngc.add_version("nim/loras/good", "v1", hf_files)
    ngc.add_version("nim/loras/weights", "v1", {"model.safetensors": b"\0" * 64, "config.json": b"{}"})
    ngc.add_version(
        "nim/loras/corrupt", "v1", {"adapter_config.json": b"{", "adapter_model.safetensors": b"x"}
    )
    if case == "no network":
        route_ngc_to(closed_port(), monkeypatch)
    target, key = {
        "missing model": ("nim/loras/nothing:v1", NVAPI),
        "missing version": ("nim/loras/good:v9", NVAPI),
        "bad nvapi key": ("nim/loras/good:v1", "nvapi-wrong"),
        "bad legacy key": ("nim/loras/good:v1", "wrong-legacy"),
        "no network": ("nim/loras/good:v1", NVAPI),
        "not a LoRA": ("nim/loras/weights:v1", NVAPI),
        "corrupt adapter": ("nim/loras/corrupt:v1", NVAPI),
    }[case]
    root = tmp_path / "loras"
    with pytest.raises(PullError, match=phrase) as err:
        pull_one(PullRequest.of(f"ngc:{target}", "x"), root, Credentials(ngc_api_key=key), check)
    assert err.value.kind == kind and visible(root) == []
    if not err.value.retryable:
        assert os.listdir(root) == []


def test_ngc_broken_download_leaves_nothing_visible_and_resumes(ngc, tmp_path, hf_files, check):
    """Storage drops the weights mid-file (the SDK retries, then gives up): a clear error and nothing under
    the name; the next run fetches only the file that was not complete."""
    ngc.add_version("nim/loras/smol", "v1", hf_files)
    ngc.cuts["nim/loras/smol/v1/adapter_model.safetensors"] = 600_000
    request = PullRequest.of("ngc:nim/loras/smol:v1", "smol")
    with pytest.raises(PullError, match="run again to resume") as err:
        pull_one(request, tmp_path, Credentials(ngc_api_key=NVAPI), check)
    assert err.value.kind == "network" and visible(tmp_path) == []

    ngc.cuts.clear()
    pull_one(request, tmp_path, Credentials(ngc_api_key=NVAPI), check)
    assert files_of(tmp_path / "smol") == hf_files and os.listdir(tmp_path) == ["smol"]
    storage = [r.path.rsplit("/", 1)[-1] for r in ngc.log if r.host.endswith("amazonaws.com")]
    assert storage.count("adapter_config.json") == 1  # complete after the first run: not fetched again


def test_ngc_file_larger_than_listed_is_cut_while_it_streams(ngc, tmp_path, hf_files, check):
    """Storage sends 64 MiB more than NGC's listing announced (ngcsdk alone writes it all, then retries the
    range, five times): each stream is cut at the listed size, the pull is refused and nothing is kept."""
    ngc.add_version("nim/loras/smol", "v1", hf_files)
    weights = "adapter_model.safetensors"
    ngc.inflate[f"nim/loras/smol/v1/{weights}"] = 64 << 20
    announced = len(hf_files[weights])
    with pytest.raises(PullError, match=f"{weights}: NGC sent more than the {announced} bytes") as err:
        pull_one(
            PullRequest.of("ngc:nim/loras/smol:v1", "smol"), tmp_path, Credentials(ngc_api_key=NVAPI), check
        )
    assert err.value.kind == "registry" and visible(tmp_path) == []
    assert list(tmp_path.glob(".pull-*")) == []  # staging gone: nothing oversized left on disk
    # each answer was cut short: what got out is the listed bytes plus what the sockets' buffers took in
    assert ngc.sent and max(ngc.sent) < announced + (32 << 20), ngc.sent
