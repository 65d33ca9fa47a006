"""SIGTERM during 8 streams (issue #16, finding 7): readiness turns 503 at once, new requests get 503, the
8 streams run to their end and `data: [DONE]`, the process exits 0 and logs no error and no traceback."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.integration.conftest import Server

STREAMS = 8
MAX_TOKENS = 48


def _stream(url: str, lines: list[str], started: threading.Barrier) -> None:
    body = {
        "model": "smollm2",
        "prompt": "Tell me a story about a lighthouse keeper",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        events = (line for line in r.iter_lines() if line)
        lines.append(next(events))
        started.wait()  # every stream has its first token before SIGTERM
        lines.extend(events)


def test_sigterm_drains_running_streams(smollm2_engine, tmp_path):
    srv = Server(
        smollm2_engine,
        tmp_path,
        tmp_path / "server.log",
        NIM_MAX_CPU_LORAS="2",
        NIM_MAX_GPU_LORAS="2",
        NIM_SERVED_MODEL_NAME="smollm2",
        TRTLLM_PEFT_DRAIN_TIMEOUT="300",  # generous: a loaded machine is slow, and this is not a timing test
    )
    try:
        started = threading.Barrier(STREAMS + 1)
        outputs: list[list[str]] = [[] for _ in range(STREAMS)]
        threads = [threading.Thread(target=_stream, args=(srv.url, out, started)) for out in outputs]
        for t in threads:
            t.start()
        started.wait(timeout=300)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while httpx.get(f"{srv.url}/v1/health/ready").status_code != 503:
            assert time.time() < deadline, "readiness still 200 after SIGTERM"
            time.sleep(0.05)
        assert httpx.get(f"{srv.url}/v1/health/live").status_code == 200
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 400  # Triton's "not ready"
        refused = httpx.post(f"{srv.url}/v1/completions", json={"model": "smollm2", "prompt": "x"})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
        for t in threads:
            t.join(timeout=600)
        assert srv.proc.wait(timeout=120) == 0
    finally:
        srv.stop()
    for out in outputs:
        assert out[-1] == "data: [DONE]" and len(out) == MAX_TOKENS + 1, out[-3:]
    log = (tmp_path / "server.log").read_text()
    assert "drained: every running request finished" in log
    bad = [
        line for line in log.splitlines() if " ERROR " in line or "Traceback" in line or " CRITICAL " in line
    ]
    assert bad == [], bad
