"""The server's malloc settings (engine/host_malloc.py) take on glibc, and do nothing elsewhere."""

from __future__ import annotations

import ctypes
import platform

import pytest

from trtllm_peft.engine import host_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_threshold_and_the_arena_limit():
    assert host_malloc.tune_for_server() is True
    assert host_malloc.tune_for_server() is True  # idempotent: `serve` may run it after a test did


def test_without_glibc_nothing_is_set(monkeypatch):
    def no_libc(*_):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert host_malloc.tune_for_server() is False
