"""A stand-in for Triton's Python backend (`triton_python_backend_utils` and BLS), for tests without Triton.

`install(monkeypatch)` registers triton_python_backend_utils.py under its real name, so a model.py written for
Triton imports it unchanged; server.py holds the models BLS requests reach.
"""

from __future__ import annotations

import sys

import pytest

from tests.triton_python_standin import server
from tests.triton_python_standin import triton_python_backend_utils as pb_utils


def install(monkeypatch: pytest.MonkeyPatch):
    """Register the stand-in as `triton_python_backend_utils` and give it an empty server."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.setattr(server, "SERVER", server.Server())
    return pb_utils
