"""How much an adapter file may hold, checked from sizes and headers before any tensor is read.

An adapter for an engine can be no larger than LoRA on every module of every layer at the engine's
max_lora_rank, stored in float32 (the widest dtype an adapter file uses). Anything larger (a 2 GB member of
a gzip .nemo, a sparse `.npy` whose header claims [1, 90, 5000000]) is refused from its size or header alone,
so a hostile file costs a stat() and a few header bytes, not its size in memory; what passes is read into
memory, bounded by these ceilings (safe_io.py says why not memory-mapped). Without an engine spec
(`trtllm-peft inspect` of a lone file) a fixed ceiling applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.lora.spec import ModelSpec

MODULES_PER_LAYER = 7  # q, k, v, o, gate, up, down: fused qkv / gate_up carry the same rows in fewer tensors
WIDEST_ITEM = 4  # bytes per value in float32
SLACK_BYTES = 16 << 20  # headers, pickles' framing, zip directories
NO_SPEC_FILE_BYTES = 4 << 30  # without an engine: no adapter of a model we could serve is near 4 GiB
NO_SPEC_TENSOR_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class ReadLimits:
    """Ceilings for one adapter: elements of one tensor, bytes of one weights file or archive member."""

    tensor_elements: int
    file_bytes: int
    why: str  # what the ceilings come from, for the error messages

    @classmethod
    def for_spec(cls, spec: ModelSpec | None) -> ReadLimits:
        """The ceilings for an adapter of `spec`'s engine (or the fixed ones without a spec)."""
        if spec is None or not spec.max_lora_rank:
            return cls(NO_SPEC_TENSOR_ELEMENTS, NO_SPEC_FILE_BYTES, "the ceiling without an engine")
        names = ("attn_qkv", "attn_dense", "mlp_gate_up", "mlp_4h_to_h")
        dim = max(max(spec.module_dims(m)) for m in names)
        rank = spec.max_lora_rank
        per_layer = MODULES_PER_LAYER * rank * 2 * dim  # A [r, in] + B [out, r], in and out <= dim
        return cls(
            tensor_elements=rank * dim,
            file_bytes=spec.num_layers * per_layer * WIDEST_ITEM + SLACK_BYTES,
            why=f"LoRA of rank <= {rank} (max_lora_rank) on {spec.num_layers} layers of widths <= {dim}",
        )

    def check_file(self, path: Path, size: int | None = None, what: str = "file") -> None:
        """Refuse a file (or archive member) larger than any adapter of this engine."""
        size = path.stat().st_size if size is None else size
        if size > self.file_bytes:
            raise AdapterFormatError(
                path,
                f"{what} of {size} bytes is larger than any adapter this engine can take "
                f"({self.file_bytes} bytes at most: {self.why})",
            )

    def tensor_problem(self, name: str, shape: list[int] | tuple[int, ...]) -> str | None:
        """Why a tensor of `shape` cannot be part of an adapter of this engine (from its header), or None."""
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            return f"{name}: shape {list(shape)} is not a list of sizes"
        elements = math.prod(shape)
        if elements > self.tensor_elements:
            return (
                f"{name}: shape {list(shape)} ({elements} values) is larger than any LoRA tensor this "
                f"engine takes ({self.tensor_elements} values at most: {self.why})"
            )
        return None
