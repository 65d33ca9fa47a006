"""The AVX-512 decode kernels of csrc/: compiled once per machine, or None where they can't run.

Why our own kernels: at decode batch sizes every projection is a skinny matmul whose cost is streaming the
weights. oneDNN's packed GEMM reaches ~20 GB/s on two cores here; a 16-column k-major layout that reads each
weight byte once reaches 30-45 GB/s (bench/README.md). The same file fuses the per-layer small ops (RMSNorm,
SiLU·up, RoPE + KV write + attention) whose eager cost is dispatch overhead, not arithmetic, and applies
mixed-adapter LoRA per adapter segment straight from the device tier's packed tensors (csrc/lora.cpp).

Compiled by torch's extension loader into its cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
on first use, ~1 min, reused afterwards; the module's name carries a hash of the sources, so an edited
source is a new module, never a stale one. Needs g++ and a CPU with avx512f/bw/vl
and avx512_bf16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later); anywhere else the
executor uses the pure-torch ops, which compute the same thing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is not there)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def why_unavailable(flags: set[str] | None = None) -> str | None:
    """None when the kernels can be built and run here, else the reason in one line."""
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++/g++) on PATH"
    return None


def load() -> ModuleType | None:
    """The compiled module (built on first call, then cached for the process), or None with a logged reason."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]  # type: ignore[return-value]


def _build() -> ModuleType | None:
    reason = why_unavailable()
    if reason is not None:
        log.info("CPU decode kernels off (%s): using the pure-torch ops", reason)
        return None
    from torch.utils.cpp_extension import load as load_extension

    files = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(CFLAGS).encode()).hexdigest()
    log.info("loading the CPU decode kernels (compiled once per machine, ~1 min the first time)")
    try:
        return load_extension(
            f"trtllm_peft_cpu_kernels_{digest[:12]}",
            [str(f) for f in files if f.suffix == ".cpp"],
            extra_cflags=CFLAGS,
            extra_include_paths=[str(CSRC)],
            verbose=False,
        )
    except Exception as exc:  # a failed compile must not stop the server: the torch ops are complete
        log.warning("CPU decode kernels failed to build (%s): using the pure-torch ops", str(exc)[:500])
        return None
