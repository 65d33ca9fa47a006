"""The AVX-512 decode kernels of csrc/: compiled once per machine, or None where they can't run.

Why our own kernels: at decode batch sizes every projection is a skinny matmul whose cost is streaming the
weights. oneDNN's packed GEMM reaches ~20 GB/s on two cores here; a 16-column k-major layout that reads each
weight byte once reaches 30-45 GB/s (bench/README.md). The same file fuses the per-layer small ops (RMSNorm,
SiLU·up, RoPE + KV write + attention) whose eager cost is dispatch overhead, not arithmetic, and applies
mixed-adapter LoRA per adapter segment straight from the device tier's packed tensors (csrc/lora.cpp).
Where a bfloat16 product has many rows (decode at batch >= 16, prefill, the lm_head, LoRA-A of a long
segment) it is compute-bound instead, and runs on AMX tiles where the CPU has them (csrc/amx.cpp: same packed
weights, detected at run time; `set_amx(False)` forces the streaming kernel, as tests do to compare both).

Built ahead of time by `make install` (`trtllm-peft build-kernels`, cli.py, into
_prebuilt/ beside this file); where that was not run, or the sources changed since, compiled on first use by
torch's extension loader into its cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), ~1 min,
reused afterwards. The module's name carries a hash of the sources, the flags and the sources' directory, so
an edited source is a new module, never a stale one, and two checkouts on one machine never rebuild each
other's build directory.

The JIT path can never wait forever: torch's loader guards a build with an O_EXCL `lock` file that a killed
build leaves behind, and every later loader then polls it forever (torch/utils/file_baton.py, FileBaton.wait).
We take an flock(2) first (the kernel drops it when its holder dies, however it dies); whoever holds it knows
a `lock` file it finds is stale and removes it. Waiting for another live builder is bounded (BUILD_WAIT_S) and
logged; past the bound the executor runs the pure-torch ops. Needs g++ and a CPU with avx512f/bw/vl
and avx512_bf16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later); anywhere else the
executor uses the pure-torch ops, which compute the same thing. AMX is optional: its functions carry target
attributes (no global -mamx flag) and run only after cpuid, XCR0 and Linux's arch_prctl grant say yes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
PREBUILT = Path(__file__).with_name("_prebuilt")  # `make install` builds here (gitignored)
BUILD_WAIT_S = (
    900.0  # longest wait for another process's build: a cold build takes 1-3 min on a loaded 2-core box
)
LOG_EVERY_S = 15.0
OUR_LOCK = "trtllm_peft.flock"
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
    """The compiled module (prebuilt, or built on first call, then cached for the process), or None with a
    logged reason."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _load_or_build()
        return _state["module"]  # type: ignore[return-value]


def module_name(csrc: Path = CSRC) -> str:
    """The extension's module name: a hash of the sources, the flags and where the sources are."""
    files = _sources(csrc)
    h = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(CFLAGS).encode())
    h.update(str(csrc.resolve()).encode())  # two checkouts, two modules: neither rebuilds the other's
    return f"trtllm_peft_cpu_kernels_{h.hexdigest()[:12]}"


def _sources(csrc: Path) -> list[Path]:
    return sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.h"))


def _load_or_build() -> ModuleType | None:
    reason = why_unavailable()
    if reason is not None:
        log.info("CPU decode kernels off (%s): using the pure-torch ops", reason)
        return None
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory, _import_module_from_library

    name = module_name()
    if (PREBUILT / f"{name}{LIB_EXT}").is_file():
        try:
            module = _import_module_from_library(name, str(PREBUILT), True)
            log.info("CPU decode kernels: the ones `make install` built (%s)", PREBUILT)
            return module
        except (ImportError, OSError) as exc:  # built against another torch: build again below
            log.warning("CPU decode kernels in %s do not load (%s): building them", PREBUILT, exc)
    log.info("loading the CPU decode kernels (compiled once per machine, ~1 min the first time)")
    try:
        return build(Path(_get_build_directory(name, verbose=False)), name)
    except Exception as exc:  # a failed compile must not stop the server: the torch ops are complete
        log.warning("CPU decode kernels failed to build (%s): using the pure-torch ops", str(exc)[:500])
        return None


def build(build_dir: Path, name: str, wait_s: float = BUILD_WAIT_S) -> ModuleType | None:
    """Compile (or reuse) the extension `name` in build_dir under our flock; None when another process held
    the lock for longer than wait_s (logged)."""
    from torch.utils.cpp_extension import load as load_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir / OUR_LOCK, wait_s) as held:
        if not held:
            log.warning(
                "CPU decode kernels: another process kept building them for over %.0f s (%s): "
                "using the pure-torch ops",
                wait_s,
                build_dir,
            )
            return None
        stale = build_dir / "lock"  # torch's FileBaton; under our flock nobody alive can be holding it
        if stale.exists():
            log.warning("CPU decode kernels: removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        return load_extension(
            name,
            [str(f) for f in _sources(CSRC) if f.suffix == ".cpp"],
            extra_cflags=CFLAGS,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            verbose=False,
        )


@contextlib.contextmanager
def build_lock(path: Path, wait_s: float) -> Iterator[bool]:
    """flock(path), waiting at most wait_s and logging who holds it every LOG_EVERY_S; yields whether it was
    taken. The kernel releases an flock when its process dies, so a killed build never leaves it held."""
    with open(path, "a+") as f:  # opened close-on-exec: the compiler processes never inherit the lock
        start, last_log = time.monotonic(), time.monotonic()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= wait_s:
                    yield False
                    return
                if time.monotonic() - last_log >= LOG_EVERY_S:
                    log.info(
                        "CPU decode kernels: waiting %.0f s for %s to finish building", waited, _holder(f)
                    )
                    last_log = time.monotonic()
                time.sleep(0.2)
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(f) -> str:
    f.seek(0)
    return f.read(64).strip() or "another process"
