"""`trtllm-peft pull`: LoRA adapters from Hugging Face (huggingface_hub) and NGC (ngcsdk) into
NIM_PEFT_SOURCE, staged in a hidden directory, checked, and renamed into place atomically.

source.py (what to pull) → staging.py (where, atomically) → hf.py / ngc.py (the registries) →
pipeline.py (one pull) → command.py (the CLI, parallel lists) → result.py (rows and the table).
"""

from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.pipeline import Check, Credentials, pull_one
from trtllm_peft.pull.source import PullRequest, parse_source

__all__ = ["Check", "Credentials", "PullError", "PullRequest", "parse_source", "pull_one"]
