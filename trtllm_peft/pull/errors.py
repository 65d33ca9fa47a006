"""The one error a pull raises: what went wrong, for whom, and whether running it again can help."""

from __future__ import annotations

from trtllm_peft.errors import TrtllmPeftError

# What a failed pull was stopped by. `retryable` kinds keep the staging directory, so that running the same
# pull again resumes; the others delete it, since the same bytes would fail the same way.
KINDS = {
    "usage": False,  # a bad source spec, name or flag
    "exists": False,  # NIM_PEFT_SOURCE/NAME is there already (and no --force)
    "busy": False,  # another pull is writing the same staging directory
    "not_found": False,  # no such repo / model / revision / version
    "auth": False,  # the token is missing, wrong, or has no access
    "not_lora": False,  # the files are there but are not a (fitting) LoRA adapter
    "registry": False,  # the registry refused for another reason it states (e.g. an unfinished upload)
    "network": True,  # cannot reach the registry, or the connection broke mid-transfer
    "corrupt": True,  # bytes arrived but their checksum is wrong
    "disk": True,  # the local disk failed (full, read-only)
    "interrupted": True,  # Ctrl-C
}


class PullError(TrtllmPeftError):
    """A pull that did not put an adapter in place. `kind` is one of KINDS; the message says what to do."""

    def __init__(self, kind: str, message: str):
        assert kind in KINDS, kind
        self.kind = kind
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        return KINDS[self.kind]
