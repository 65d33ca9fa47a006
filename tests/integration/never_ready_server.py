"""A stand-in `serve` that never becomes ready and has a child, for test_server_cleanup.py.

Run as `python -m tests.integration.never_ready_server serve --host H`, like trtllm_peft.cli."""

from __future__ import annotations

import subprocess
import sys
import time

if __name__ == "__main__":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"child {child.pid}", flush=True)
    time.sleep(600)
