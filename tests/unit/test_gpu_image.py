"""deploy/docker/Dockerfile.gpu refuses a base image whose TensorRT-LLM is not 1.2.x (its RUN step, executed here
against a fake installed distribution: importlib.metadata reads the dist-info, as in NVIDIA's image)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "Dockerfile.gpu"


def version_check() -> str:
    text = DOCKERFILE.read_text().replace("\\\n", "")
    m = re.search(r'^RUN python3 -c "(.*tensorrt_llm.*)"$', text, re.M)
    assert m, "Dockerfile.gpu has no RUN step checking tensorrt_llm's version"
    return m.group(1)


def fake_distribution(root: Path, version: str) -> Path:
    info = root / f"tensorrt_llm-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
    return root


@pytest.mark.parametrize(
    "version, ok",
    [("1.2.0", True), ("1.2.1", True), ("1.1.0", False), ("1.3.0rc1", False), ("0.21.0", False)],
)
def test_image_build_fails_unless_tensorrt_llm_is_1_2(tmp_path, version, ok):
    site = fake_distribution(tmp_path, version)
    r = subprocess.run(
        [sys.executable, "-c", version_check()],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (r.returncode == 0) is ok, r.stderr
    if not ok:
        assert f"this image ships TensorRT-LLM {version}, not 1.2.x" in r.stderr


def test_base_image_is_pinned_after_the_checked_version():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG TRITON_TAG=26\.04-trtllm-python-py3$", text, re.M)
    assert text.index("FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}") < text.index(
        "m.version('tensorrt_llm')"
    )
