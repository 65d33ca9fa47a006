"""Hostile adapters dropped into a live server's NIM_PEFT_SOURCE (issue #16, findings 1, 2, 3, 6, symlinks).

For each: the adapter is put in place while the server runs, requested, and the answer must be the precise
422 of its finding; while the attack runs a second thread polls /v1/health/live (each poll answered within
1 s: the issue's bar for "not frozen") and samples the server's RSS (peak within 200 MB of the value
before); a second request gets the same 422 without a second load (the adapter is marked invalid until its
files change); afterwards a good adapter still answers 200.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Server, random_adapter, smollm2_server
from tests.unit.test_hostile_inputs import (
    REDOS,
    SECRET,
    config_edit,
    config_text,
    nemo_rewrite,
    npy_header,
    safetensors_header,
)
from trtllm_peft import formats

pytestmark = pytest.mark.slow
MB = 1 << 20
MODULES = ("attn_q", "attn_v", "mlp_4h_to_h")
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def link_outside(secret: Path):
    def brk(d: Path) -> None:
        (d / "adapter_model.safetensors").unlink()
        (d / "adapter_model.safetensors").symlink_to(secret)

    return brk


ATTACKS = [
    # (name, format, breaker, phrase of the 422)
    ("redos", "hf", config_edit(target_modules=REDOS), "target_modules do not select"),
    ("deep-json", "hf", config_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    (
        "sparse-safetensors",
        "hf",
        safetensors_header(
            {Q_PROJ_A: {"dtype": "F32", "shape": [1, 90, 5_000_000], "data_offsets": [0, 1_800_000_000]}},
            data_len=1_800_000_000,
        ),
        "larger than any adapter this engine can take",
    ),
    (
        "nemo-tp-1e8",
        "nemo",
        nemo_rewrite(config={"tensor_model_parallel_size": 100_000_000}),
        "more than 1024",
    ),
    (
        "nemo-gzip-bomb",  # 2 GB of zeros in a ~2 MB gzip
        "nemo",
        nemo_rewrite(members=[("big/model_weights.ckpt", 2 << 30)], gz=True),
        "larger than any adapter this engine can take",
    ),
    (
        "sparse-npy",  # 1.8 GB, header [1, 90, 5000000]: accepted before
        "trtllm",
        npy_header("model.lora_weights.npy", (1, 90, 5_000_000)),
        "rows of 5000000 values are wider than any this engine takes",
    ),
    ("symlink-out", "hf", None, "leading outside NIM_PEFT_SOURCE"),
]


@pytest.fixture(scope="module")
def setup(request, spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "loras"
    root.mkdir()
    secret = root.parent / "shadow"
    secret.write_bytes(SECRET)
    good = random_adapter(spec, rank=4, modules=MODULES, seed=7)
    formats.save(good, root / "good", "hf", spec)
    with smollm2_server(request, root, NIM_PEFT_REFRESH_INTERVAL="0.3") as server:
        yield server, root, secret


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Watch(threading.Thread):
    """Polls /v1/health/live and samples the server's RSS until stopped."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.stop_event = server, threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.peak_rss = rss_mb(server.proc.pid)
        self.polled = threading.Event()  # the first poll is in: the attack is watched from its start

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop_event.is_set():
                t0 = time.monotonic()
                try:
                    if http.get(f"{self.server.url}/v1/health/live").status_code != 200:
                        self.failures.append("not 200")
                except httpx.HTTPError as e:
                    self.failures.append(type(e).__name__)
                self.latencies.append(time.monotonic() - t0)
                self.peak_rss = max(self.peak_rss, rss_mb(self.server.proc.pid))
                self.polled.set()
                time.sleep(0.1)

    def __enter__(self) -> Watch:
        self.start()
        self.polled.wait(timeout=60)  # else two quick 422s can end before a single poll (no latency to check)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.join(timeout=30)


def complete(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)


def place(root: Path, name: str, fmt: str, breaker, spec, secret: Path) -> None:
    """Write a valid adapter, break it, rename it into place (the catalog never sees half of it)."""
    tmp = root / f".{name}.tmp"
    formats.save(random_adapter(spec, rank=4, modules=MODULES, seed=3), tmp, fmt, spec)
    (breaker or link_outside(secret))(tmp)
    tmp.rename(root / name)


def wait_known(server: Server, name: str) -> None:
    """Until the refresh loop has seen `name` (listed, or skipped at the scan: then 422 without a load)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        ids = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}
        if name in ids or (name == "symlink-out" and complete(server, name).status_code == 422):
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} never showed up")


@pytest.mark.parametrize(("name", "fmt", "breaker", "phrase"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_hostile_adapter_is_refused_and_costs_nothing(setup, spec, name, fmt, breaker, phrase):
    server, root, secret = setup
    place(root, name, fmt, breaker, spec, secret)
    wait_known(server, name)
    before = rss_mb(server.proc.pid)
    with Watch(server) as watch:
        first = complete(server, name)
        again = complete(server, name)
    assert first.status_code == 422, first.text
    message = first.json()["error"]["message"]
    assert phrase in message, message
    assert SECRET[:8].decode() not in message
    assert again.status_code == 422 and phrase in again.json()["error"]["message"]  # now from the catalog
    log = server.log.read_text()
    assert log.count(f"adapter '{name}' skipped") <= 1, "loaded again on the second request"
    assert "Traceback" not in log
    print(
        f"{name}: {len(watch.latencies)} live polls, slowest {max(watch.latencies):.3f} s; RSS {before:.0f} MB, peak {watch.peak_rss:.0f} MB"
    )
    assert not watch.failures, watch.failures
    assert max(watch.latencies) < 1.0, f"/v1/health/live took {max(watch.latencies):.2f} s during the attack"
    assert watch.peak_rss - before < 200, f"RSS {before:.0f} MB -> peak {watch.peak_rss:.0f} MB"
    ok = complete(server, "good")
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"], ok.text


def test_server_still_lists_and_serves_after_every_attack(setup):
    server, _, _ = setup
    assert httpx.get(f"{server.url}/v1/health/ready", timeout=10).status_code == 200
    assert complete(server, "smollm2").status_code == 200
    assert server.proc.poll() is None and os.path.exists(f"/proc/{server.proc.pid}")
