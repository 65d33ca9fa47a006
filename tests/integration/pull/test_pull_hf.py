"""`trtllm-peft pull hf:…`: huggingface_hub against the loopback Hub (conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, wait_for
from tests.integration.pull.conftest import (
    CHUNK,
    closed_port,
    files_of,
    hf_creds,
    saved,
    visible,
)
from trtllm_peft.pull import Credentials, PullError, PullRequest, pull_one
from trtllm_peft.pull.staging import Staging


def test_hf_pull_installs_only_the_adapter_files(hub, tmp_path, hf_files, check):
    extra = {"README.md": b"# a LoRA\n", "adapter_model.bin": b"not wanted", "tokenizer.json": b"{}"}
    hub.add_repo("me/smol-lora", {**hf_files, **extra})
    result = pull_one(PullRequest.of("hf:me/smol-lora"), tmp_path, hf_creds(hub), check)

    assert result.path == tmp_path / "smol-lora" and result.format == "hf"
    assert files_of(tmp_path / "smol-lora") == hf_files  # byte for byte, nothing else
    assert os.listdir(tmp_path) == ["smol-lora"]  # no staging left behind
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.log if r.method == "GET"}
    assert not fetched & {"README.md", "adapter_model.bin", "tokenizer.json"}


def test_hf_token_goes_to_the_hub_and_never_to_the_cdn(hub, tmp_path, hf_files, check):
    hub.add_repo("me/private-lora", hf_files, token="hf_secret")
    pull_one(PullRequest.of("hf:me/private-lora", "mine"), tmp_path, hf_creds(hub, "hf_secret"), check)

    assert files_of(tmp_path / "mine") == hf_files
    on_hub = [r for r in hub.log if not r.path.startswith("/cdn/")]
    on_cdn = hub.requests_for("/cdn/")
    assert on_hub and all(r.authorization == "Bearer hf_secret" for r in on_hub)
    assert on_cdn and all(r.authorization is None and r.host.startswith("localhost") for r in on_cdn)


def test_hf_revision_pins_a_commit(hub, tmp_path, hf_files, hf_files_2, check):
    old = hub.add_repo("me/lora", hf_files)
    hub.add_repo("me/lora", hf_files_2)  # main moves on
    pull_one(PullRequest.of(f"hf:me/lora@{old}", "old"), tmp_path, hf_creds(hub), check)
    pull_one(PullRequest.of("hf:me/lora", "new"), tmp_path, hf_creds(hub), check)
    assert files_of(tmp_path / "old") == hf_files and files_of(tmp_path / "new") == hf_files_2


@pytest.fixture(scope="module")
def not_lora_files(spec, tmp_path_factory) -> dict:
    """name -> files of repos that are not servable LoRA adapters."""
    too_big = saved(tmp_path_factory, spec, "hf", seed=4, rank=64)  # the engine's max rank is 32
    return {
        "full-model": {"config.json": b"{}", "model.safetensors": b"\0" * 64},
        "corrupt": {"adapter_config.json": b'{"peft_type": "LORA"', "adapter_model.safetensors": b"junk"},
        "too-big": too_big,
    }


@pytest.mark.parametrize(
    ("case", "kind", "phrase"),
    [
        ("missing repo", "not_found", "no such repository"),
        ("private, no token", "not_found", "set HF_TOKEN if it is private"),
        ("bad token", "auth", "HF_TOKEN was rejected (HTTP 401)"),
        ("missing revision", "not_found", "no revision 'v9'"),
        ("no network", "network", "cannot reach"),
        ("full model, no adapter", "not_lora", "is not a LoRA adapter repo: no adapter_config.json"),
        ("corrupt adapter files", "not_lora", "is not a readable LoRA adapter"),
        ("rank above the engine's", "not_lora", "does not fit"),
    ],
)
def test_hf_errors_are_clear_and_leave_nothing(
    case, kind, phrase, hub, tmp_path, hf_files, check, not_lora_files
):
    bad = not_lora_files
    hub.add_repo("me/private", hf_files, token="hf_right")
    for name, files in bad.items():
        hub.add_repo(f"me/{name}", files)
    spec_text, creds = {
        "missing repo": ("hf:me/nothing-here", hf_creds(hub)),
        "private, no token": ("hf:me/private", hf_creds(hub)),
        "bad token": ("hf:me/private", hf_creds(hub, "hf_wrong")),
        "missing revision": ("hf:me/private@v9", hf_creds(hub, "hf_right")),
        "no network": ("hf:me/private", Credentials(hf_endpoint=f"http://127.0.0.1:{closed_port()}")),
        "full model, no adapter": ("hf:me/full-model", hf_creds(hub)),
        "corrupt adapter files": ("hf:me/corrupt", hf_creds(hub)),
        "rank above the engine's": ("hf:me/too-big", hf_creds(hub)),
    }[case]
    root = tmp_path / "loras"
    with pytest.raises(PullError, match=phrase.replace("(", r"\(").replace(")", r"\)")) as err:
        pull_one(PullRequest.of(spec_text, "x"), root, creds, check)
    assert err.value.kind == kind
    assert visible(root) == []
    if not err.value.retryable:
        assert os.listdir(root) == []  # the staging directory is gone too
    if kind == "not_lora" and case == "full model, no adapter":
        assert not hub.requests_for("/resolve/")  # refused from the file list, before any download


def test_hf_broken_download_leaves_nothing_visible_and_resumes(hub, tmp_path, big_hf_files, check):
    """The CDN drops the line at 12 MB and then fails: a clear error, nothing under the adapter's name, the
    first 10 MiB kept in staging; the next run asks for the rest (Range) and not for the finished config."""
    hub.add_repo("me/lora", big_hf_files)
    hub.cut(big_hf_files["adapter_model.safetensors"], after=12_000_000, mode="die")
    with pytest.raises(PullError, match="run again to resume") as err:
        pull_one(PullRequest.of("hf:me/lora"), tmp_path, hf_creds(hub), check)
    assert err.value.kind == "network" and visible(tmp_path) == []
    (part,) = tmp_path.glob(".pull-lora-*/.partial/adapter_model.safetensors.*.part")
    assert part.stat().st_size == CHUNK

    hub.heal()
    pull_one(PullRequest.of("hf:me/lora"), tmp_path, hf_creds(hub), check)
    assert files_of(tmp_path / "lora") == big_hf_files and os.listdir(tmp_path) == ["lora"]
    assert hub.requests_for("/cdn/")[-1].range == f"bytes={CHUNK}-"
    assert len([r for r in hub.requests_for("adapter_config.json") if r.method == "GET"]) == 1


def test_hf_file_larger_than_announced_is_refused_and_not_kept(hub, tmp_path, big_hf_files, check):
    """The CDN sends 50 MB more than the HEAD announced: refused at the announced size, and the oversized
    stream is not kept in staging (huggingface_hub alone writes all of it, then complains; issue #16)."""
    hub.add_repo("me/lora", big_hf_files)
    hub.inflate(big_hf_files["adapter_model.safetensors"], extra=50_000_000)
    announced = len(big_hf_files["adapter_model.safetensors"])
    with pytest.raises(PullError, match=f"more than the {announced} bytes it announced") as err:
        pull_one(PullRequest.of("hf:me/lora"), tmp_path, hf_creds(hub), check)
    assert err.value.kind == "registry" and visible(tmp_path) == []
    assert list(tmp_path.glob(".pull-*")) == []  # staging gone: nothing oversized left on disk


def test_hf_killed_pull_leaves_nothing_visible_and_resumes(hub, tmp_path, big_hf_files, smollm2_engine):
    """A pull killed (SIGKILL) mid-file: nothing under the adapter root; the same command resumes."""
    hub.add_repo("me/lora", big_hf_files)
    hub.cut(big_hf_files["adapter_model.safetensors"], after=12_000_000, mode="hang")
    cmd = [sys.executable, "-m", "trtllm_peft.pull", "hf:me/lora", "--peft-source", str(tmp_path)]
    cmd += ["--base", str(smollm2_engine), "--no-progress"]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(
            lambda: any(p.stat().st_size >= CHUNK for p in tmp_path.glob(".pull-*/.partial/*")), 60
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert visible(tmp_path) == []

    hub.heal()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"-> {tmp_path / 'lora'}" in done.stdout
    assert files_of(tmp_path / "lora") == big_hf_files and os.listdir(tmp_path) == ["lora"]
    assert hub.requests_for("/cdn/")[-1].range == f"bytes={CHUNK}-"


def test_existing_name_is_kept_unless_forced(hub, tmp_path, hf_files, hf_files_2, check):
    hub.add_repo("me/a", hf_files)
    hub.add_repo("me/b", hf_files_2)
    pull_one(PullRequest.of("hf:me/a", "lora"), tmp_path, hf_creds(hub), check)
    requests_before = len(hub.log)
    with pytest.raises(PullError, match="exists: pass --force") as err:
        pull_one(PullRequest.of("hf:me/b", "lora"), tmp_path, hf_creds(hub), check)
    assert err.value.kind == "exists" and len(hub.log) == requests_before  # refused before downloading

    pull_one(PullRequest.of("hf:me/b", "lora"), tmp_path, hf_creds(hub), check, force=True)
    assert files_of(tmp_path / "lora") == hf_files_2 and os.listdir(tmp_path) == ["lora"]


def test_a_second_pull_into_the_same_staging_is_refused(hub, tmp_path, hf_files, check):
    hub.add_repo("me/lora", hf_files)
    request = PullRequest.of("hf:me/lora")
    with Staging(tmp_path, request), pytest.raises(PullError, match="another pull is writing"):
        pull_one(request, tmp_path, hf_creds(hub), check)
