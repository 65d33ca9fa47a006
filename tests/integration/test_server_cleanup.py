"""A test server that fails readiness leaves no process behind (issue #16, finding 10).

Before, `Server.__init__` raised and the process kept running (seen holding ~4 GB for 40+ minutes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Server, ServerNotReady


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (from /proc/<pid>/stat, field 5)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.2)
    return False


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def children_of(ppid: int) -> list[int]:
    """Live processes whose parent is `ppid` (/proc/<pid>/stat, field 4)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split() if stat else []
        if fields and int(fields[1]) == ppid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def test_a_server_whose_starter_is_killed_outright_goes_with_it(tmp_path):
    """SIGKILL of the test process (a CI timeout) runs no finally and no atexit: the parent-death signal does."""
    start = (
        "from pathlib import Path; from tests.integration.conftest import Server; "
        f"p = Path({str(tmp_path)!r}); "
        "Server(p, p, p / 'server.log', module='tests.integration.never_ready_server', ready_timeout=600)"
    )
    starter = subprocess.Popen([sys.executable, "-c", start], cwd=Path(__file__).resolve().parents[2])
    server, log = None, tmp_path / "server.log"
    try:
        deadline = time.time() + 300  # the starter imports torch first: slow on a loaded box
        while server is None and time.time() < deadline and starter.poll() is None:
            if log.exists() and "child" in log.read_text():
                server = children_of(starter.pid)[0]
            time.sleep(0.2)
        assert server is not None, "the stand-in server did not start"
        starter.kill()
        starter.wait()
        deadline = time.time() + 30
        while alive(server) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(server), f"server {server} outlived its killed starter"
    finally:
        starter.kill()
        if server is not None:
            with contextlib.suppress(ProcessLookupError):  # the stand-in's own child: the signal reaches
                os.killpg(server, signal.SIGKILL)  # the server only


def test_a_server_with_children_that_never_gets_ready_is_killed_with_them(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(ServerNotReady, match="not ready after 5s") as info:
        Server(tmp_path, tmp_path, log, module="tests.integration.never_ready_server", ready_timeout=5)
    assert "child" in log.read_text()  # it did start its child before the timeout
    assert gone(info.value.pid), f"left running: {group_members(info.value.pid)}"
    assert not Server.running


@pytest.mark.slow
def test_the_real_server_stopped_while_loading_leaves_nothing(tmp_path, smollm2_engine):
    """`trtllm-peft serve` caught mid-start (engine and kernels loading) by a short readiness bound."""
    (tmp_path / "loras").mkdir()
    with pytest.raises(ServerNotReady) as info:
        Server(smollm2_engine, tmp_path / "loras", tmp_path / "server.log", ready_timeout=3)
    assert gone(info.value.pid), f"left running: {group_members(info.value.pid)}"


def test_a_server_that_exits_at_start_is_reported_and_reaped(tmp_path):
    with pytest.raises(ServerNotReady, match="server exited") as info:
        Server(tmp_path / "no-engine", tmp_path, tmp_path / "server.log", ready_timeout=120)
    assert gone(info.value.pid)
    assert not os.path.exists(f"/proc/{info.value.pid}") or group_members(info.value.pid) == []
