"""`trtllm-peft pull` tests: real huggingface_hub and ngcsdk clients against loopback registries.

Hugging Face: tests/integration/fake_hub.py speaks the Hub's HTTP API on 127.0.0.1 (HF_ENDPOINT), so
model_info, the HEAD with ETag / X-Repo-Commit / CDN redirect, and the Range GETs are huggingface_hub's
own code. NGC: ngcsdk's `requests` traffic is routed to tests/integration/fake_ngc.py at
`HTTPAdapter.send`, the one method every request of the SDK goes through. The adapters are real HF PEFT
and NeMo adapters for the SmolLM2 engine; "installed" means readable and fitting that engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import random_adapter
from tests.integration.fake_hub import FakeHub
from tests.integration.fake_ngc import FakeNgc, route_ngc_to
from trtllm_peft import formats
from trtllm_peft.pull import Check, Credentials

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


def saved(tmp_path_factory, spec, fmt: str, seed: int, rank: int = 8, modules=("attn_q", "attn_v")) -> dict:
    out = tmp_path_factory.mktemp(f"{fmt}{seed}") / "adapter"
    formats.save(random_adapter(spec, rank=rank, modules=modules, seed=seed), out, fmt, spec)
    return files_of(out)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory, spec):
    """adapter_config.json + adapter_model.safetensors (~1.9 MB) of a real PEFT adapter for SmolLM2."""
    return saved(tmp_path_factory, spec, "hf", seed=1)


@pytest.fixture(scope="module")
def big_hf_files(tmp_path_factory, spec):
    """A rank-16 adapter on all seven modules: ~20 MB, more than one of http_get's 10 MiB chunks."""
    return saved(tmp_path_factory, spec, "hf", seed=5, rank=16, modules=ALL7)


@pytest.fixture(scope="module")
def hf_files_2(tmp_path_factory, spec):
    return saved(tmp_path_factory, spec, "hf", seed=2)


@pytest.fixture(scope="module")
def nemo_files(tmp_path_factory, spec):
    return saved(tmp_path_factory, spec, "nemo", seed=3)


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


def closed_port() -> int:
    from tests.integration.conftest import free_port

    return free_port()  # bound then closed: connection refused
