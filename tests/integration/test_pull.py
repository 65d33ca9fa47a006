"""`trtllm-peft pull`: real huggingface_hub and ngcsdk clients against loopback registries.

Hugging Face: tests/integration/fake_hub.py speaks the Hub's HTTP API on 127.0.0.1 (HF_ENDPOINT), so
model_info, the HEAD with ETag / X-Repo-Commit / CDN redirect, and the Range GETs are huggingface_hub's
own code. NGC: ngcsdk's `requests` traffic is routed to tests/integration/fake_ngc.py at
`HTTPAdapter.send`, the one method every request of the SDK goes through. The adapters are real HF PEFT
and NeMo adapters for the SmolLM2 engine; "installed" means readable and fitting that engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import REPO, Server, random_adapter
from tests.integration.fake_hub import FakeHub
from tests.integration.fake_ngc import FakeNgc, route_ngc_to
from trtllm_peft import formats
from trtllm_peft.pull import Check, Credentials, PullError, PullRequest, pull_one
from trtllm_peft.pull.command import add_pull_arguments, run_pull
from trtllm_peft.pull.staging import Staging
from trtllm_peft.settings import Settings

NVAPI = "nvapi-test-key"


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def visible(root: Path) -> list[str]:
    """What the catalog would consider: non-hidden entries of the adapter root."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


@pytest.fixture(scope="module")
def check(spec, smollm2_engine):
    return Check(spec, str(smollm2_engine))


ALL7 = ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")
CHUNK = 10 * 1024 * 1024  # huggingface_hub's http_get writes in 10 MiB chunks: what a broken pull keeps


def _saved(tmp_path_factory, spec, fmt: str, seed: int, rank: int = 8, modules=("attn_q", "attn_v")) -> dict:
    out = tmp_path_factory.mktemp(f"{fmt}{seed}") / "adapter"
    formats.save(random_adapter(spec, rank=rank, modules=modules, seed=seed), out, fmt, spec)
    return files_of(out)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory, spec):
    """adapter_config.json + adapter_model.safetensors (~1.9 MB) of a real PEFT adapter for SmolLM2."""
    return _saved(tmp_path_factory, spec, "hf", seed=1)


@pytest.fixture(scope="module")
def big_hf_files(tmp_path_factory, spec):
    """A rank-16 adapter on all seven modules: ~20 MB, more than one of http_get's 10 MiB chunks."""
    return _saved(tmp_path_factory, spec, "hf", seed=5, rank=16, modules=ALL7)


@pytest.fixture(scope="module")
def hf_files_2(tmp_path_factory, spec):
    return _saved(tmp_path_factory, spec, "hf", seed=2)


@pytest.fixture(scope="module")
def nemo_files(tmp_path_factory, spec):
    return _saved(tmp_path_factory, spec, "nemo", seed=3)


@pytest.fixture
def hub():
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def ngc(monkeypatch, tmp_path):
    fake = FakeNgc(nvapi_keys={NVAPI}, legacy_keys={"legacy-key"}).start()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ngcsdk may read ~/.ngc: keep the user's out of it
    route_ngc_to(fake.port, monkeypatch)
    yield fake
    fake.stop()


def hf_creds(hub: FakeHub, token: str | None = None) -> Credentials:
    return Credentials(hf_token=token, hf_endpoint=hub.url)


# -- Hugging Face -------------------------------------------------------------------------------------


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
    too_big = _saved(tmp_path_factory, spec, "hf", seed=4, rank=64)  # the engine's max rank is 32
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
        "no network": ("hf:me/private", Credentials(hf_endpoint=f"http://127.0.0.1:{_closed_port()}")),
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


def _closed_port() -> int:
    from tests.integration.conftest import free_port

    return free_port()  # bound then closed: connection refused


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
        assert _wait(lambda: any(p.stat().st_size >= CHUNK for p in tmp_path.glob(".pull-*/.partial/*")), 60)
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


# -- NGC ----------------------------------------------------------------------------------------------


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
        route_ngc_to(_closed_port(), monkeypatch)
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


# -- many at once, the command line, a running server -------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_pull_arguments(parser)
    return parser.parse_args(list(argv))


def test_from_file_pulls_in_parallel_and_prints_a_table(
    hub, ngc, tmp_path, hf_files, nemo_files, capsys, smollm2_engine
):
    hub.add_repo("me/one", hf_files)
    (nemo,) = nemo_files.values()
    ngc.add_version("nim/loras/two", "v1", {"two.nemo": nemo})
    listing = tmp_path / "adapters.txt"
    listing.write_text(
        "# adapters for smollm2\nhf:me/one\nngc:nim/loras/two:v1  two\n\nhf:me/missing  three\n"
    )
    root = tmp_path / "loras"
    settings = Settings(hf_endpoint=hub.url, ngc_api_key=NVAPI, engine_dir=smollm2_engine)

    code = run_pull(_args("--from-file", str(listing), "--peft-source", str(root), "--no-progress"), settings)
    out = capsys.readouterr().out
    assert code == 1  # one of three failed
    assert visible(root) == ["one", "two"]
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "STATUS", "SIZE", "TIME", "PROBLEM"]
    assert lines[1].split()[:3] == ["one", "hf:me/one", "ok"] and lines[2].split()[:3] == [
        "two",
        "ngc:nim/loras/two:v1",
        "ok",
    ]
    assert (
        lines[3].split()[:4] == ["three", "hf:me/missing", "failed:", "not_found"]
        and "no such repository" in lines[3]
    )
    assert "2 pulled, 1 failed" in out


def test_from_file_is_checked_before_anything_is_pulled(tmp_path):
    listing = tmp_path / "adapters.txt"
    listing.write_text("hf:me/a  same\nhf:me/b  same\ngit:me/c\n")
    with pytest.raises(PullError, match=r"adapters.txt:3: 'git:me/c' is not a source") as err:
        run_pull(_args("--from-file", str(listing), "--peft-source", str(tmp_path / "loras")), Settings())
    assert "both pull into 'same'" in str(err.value) and not (tmp_path / "loras").exists()


def test_cli_wires_pull():
    from trtllm_peft import cli

    parser = cli.build_parser()
    try:
        parser.parse_args(["pull", "--help"])
    except SystemExit as e:
        if e.code != 0:
            pytest.skip("`trtllm-peft pull` is not wired into trtllm_peft/cli.py yet")
    assert cli.main(["pull"]) == 2  # nothing to pull: one clear line, no traceback


@pytest.mark.slow  # starts the server (~15 s on two cores)
def test_running_server_serves_pulled_adapters(
    hub, ngc, tmp_path, hf_files, nemo_files, check, smollm2_engine
):
    """The refresh loop of a running server picks up what `pull` puts in place, from HF and from NGC."""
    root = tmp_path / "loras"
    root.mkdir()
    server = Server(smollm2_engine, root, tmp_path / "server.log", NIM_PEFT_REFRESH_INTERVAL="0.3")
    try:
        hub.add_repo("me/math-lora", hf_files)
        (nemo,) = nemo_files.values()
        ngc.add_version("nim/loras/smol", "nemo-v1", {"smol.nemo": nemo})
        pull_one(PullRequest.of("hf:me/math-lora"), root, hf_creds(hub), check)
        pull_one(PullRequest.of("ngc:nim/loras/smol:nemo-v1"), root, Credentials(ngc_api_key=NVAPI), check)

        def listed() -> set[str]:
            return {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}

        assert _wait(lambda: {"math-lora", "smol_vnemo-v1"} <= listed(), 20), listed()
        for model in ("math-lora", "smol_vnemo-v1"):
            body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model and r.json()["choices"][0]["text"]
    finally:
        server.stop()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
