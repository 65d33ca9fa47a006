"""A start killed while it compiles the CPU kernels never hangs the next start (issue #16, finding 9).

torch's extension loader guards a build with an O_EXCL `lock` file and polls it forever when it exists
(torch/utils/cpp_extension.py `_jit_compile`, torch/utils/file_baton.py `FileBaton.wait`); a process killed
mid-build leaves that file behind. cpu_kernels.build() takes an flock first, which dies with its holder, and
removes the stale file. This test kills a real build (its whole process group, as Ctrl-C or a pod kill does)
and starts another in the same TORCH_EXTENSIONS_DIR: it must build and load the kernels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from trtllm_peft.executor.torch import cpu_kernels

REPO = Path(__file__).resolve().parents[2]
# The child takes the JIT path, as without `make install`: its PREBUILT points at an empty directory (a
# monkeypatch here would not reach the child, which would load the kernels `make install` built).
LOAD = (
    "import logging, pathlib, sys; logging.basicConfig(level=logging.INFO);"
    "from trtllm_peft.executor.torch import cpu_kernels;"
    "cpu_kernels.PREBUILT = pathlib.Path(sys.argv[1]);"
    "sys.exit(0 if cpu_kernels.load() is not None else 3)"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        cpu_kernels.why_unavailable() is not None, reason=f"CPU kernels: {cpu_kernels.why_unavailable()}"
    ),
]


def start_loader(ext: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", LOAD, str(log.parent / "no-prebuilt")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_a_start_after_a_killed_build_builds_and_loads(tmp_path):
    ext = tmp_path / "ext"
    torch_lock = ext / cpu_kernels.module_name() / "lock"
    first = start_loader(ext, tmp_path / "first.log")
    try:
        assert wait_for(torch_lock.exists, 300), (tmp_path / "first.log").read_text()
        time.sleep(2)  # well inside the compile (~1 min): the compilers are running
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert torch_lock.exists(), "the killed build left torch's lock file (the state that used to hang)"

    second = start_loader(ext, tmp_path / "second.log")
    try:
        rc = second.wait(timeout=1200)  # a cold build on a loaded machine; it used to never return
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()
    assert rc == 0, log
    assert "removing" in log and "left by a build that was killed" in log, log
    assert not torch_lock.exists()
