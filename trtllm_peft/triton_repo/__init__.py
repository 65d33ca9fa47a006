"""A tensorrtllm_backend (Triton) model repository for a built engine: `trtllm-peft triton-repo`."""

from trtllm_peft.triton_repo.repo import add_triton_repo_arguments, generate_repository, run_triton_repo

__all__ = ["add_triton_repo_arguments", "generate_repository", "run_triton_repo"]
