"""`trtllm-peft serve` with the TensorRT-LLM stand-in installed: the real server, TrtllmExecutor as its
executor (the engine directory says backend "trtllm"), TensorRT-LLM's contract enforced by the stand-in.

    python -m tests.trtllm_standin.serve serve --host 127.0.0.1     (same arguments as trtllm-peft)
"""

import sys

from tests.trtllm_standin import install_for_process

install_for_process()

from trtllm_peft.cli import main  # noqa: E402  (after the stand-in is in sys.modules)

sys.exit(main(sys.argv[1:]))
