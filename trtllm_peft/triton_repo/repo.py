"""`trtllm-peft triton-repo`: a tensorrtllm_backend model repository for a built engine.

    OUT/
      preprocessing/config.pbtxt   1/   (model.py from tensorrtllm_backend, copied when found)
      tensorrt_llm/config.pbtxt    1/   lora_prefetch/<task id>/model.lora_{weights,config}.npy
      postprocessing/config.pbtxt  1/
      ensemble/config.pbtxt        1/
      tensorrt_llm_bls/config.pbtxt 1/
      peft/config.pbtxt            1/model.py   adapters by name (NIM_PEFT_SOURCE), peft_model.py
      lora_tasks.json              adapter name -> task id (Triton clients send ids)

Every config is filled: engine and tokenizer paths, batch size and dtype from the engine, the PEFT cache from
NIM_MAX_GPU_LORAS / NIM_MAX_CPU_LORAS (lora_cache.py), the prefetch directory from NIM_PEFT_SOURCE. The Python
models' code is tensorrtllm_backend's own: NVIDIA's Triton TensorRT-LLM image ships it in
/app/all_models/inflight_batcher_llm, which is copied from when present (or from --python-models).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from trtllm_peft.engine.base_weights import BaseWeights
from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.engine.peft_cache_sizing import EngineMemoryEstimate, engine_memory_estimate
from trtllm_peft.errors import SettingsError
from trtllm_peft.settings import Settings
from trtllm_peft.triton_repo.lora_cache import GIB, LoraCacheParams, lora_cache_params
from trtllm_peft.triton_repo.models import MODELS, PYTHON_MODELS, RepoParams
from trtllm_peft.triton_repo.pbtxt import render
from trtllm_peft.triton_repo.peft_model import MODEL_PY as PEFT_MODEL_PY
from trtllm_peft.triton_repo.prefetch import TASKS_FILE, PrefetchResult, previous_ids, write_prefetch_dir

log = logging.getLogger(__name__)

CONTAINER_MODELS = Path("/app/all_models/inflight_batcher_llm")
PREFETCH_DIR = (
    Path("tensorrt_llm") / "lora_prefetch"
)  # inside a model folder: Triton does not take it for a model
TRITON_DTYPES = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32"}


@dataclass
class RepoReport:
    out: Path
    lora: LoraCacheParams
    prefetch: PrefetchResult
    python_models_from: Path | None

    def lines(self) -> list[str]:
        d, h = self.lora.sizing.device, self.lora.sizing.host
        src = self.python_models_from
        n, skipped = len(self.prefetch.tasks), len(self.prefetch.skipped)
        prefetch = (
            f"  lora_prefetch_dir: {n} adapters, {skipped} skipped; ids in {self.out / TASKS_FILE}"
            if self.prefetch.prefetched
            else f"  no lora_prefetch_dir (TensorRT-LLM reads no bf16 .npy): {n} adapters served by name "
            f"through the peft model, {skipped} skipped; ids in {self.out / TASKS_FILE}"
        )
        return [
            f"Triton model repository: {self.out}",
            f"  LoRA cache: GPU fraction {self.lora.gpu_memory_fraction} of the "
            f"{self.lora.gpu_free_after_engine / GIB:.2f} GiB free after the engine ({d.pages} pages, "
            f"{d.bytes / GIB:.2f} GiB), host {self.lora.host_memory_bytes:,} bytes ({h.pages} pages)",
            prefetch,
            f"  Python models: copied from {src}"
            if src
            else "  Python models: model.py NOT copied (no tensorrtllm_backend found): run this inside NVIDIA's "
            "Triton TensorRT-LLM image, or pass --python-models <tensorrtllm_backend>/all_models/inflight_batcher_llm",
        ]


def generate_repository(
    engine_dir: Path,
    out: Path,
    settings: Settings,
    *,
    gpu_free_bytes: int,
    served_engine_dir: str | None = None,
    served_repo_dir: str | None = None,
    decoupled: bool = False,
    kv_cache_free_gpu_mem_fraction: float | None = None,
    python_models: Path | None = None,
    xgrammar_tokenizer_info: str | None = None,
) -> RepoReport:
    """Write the repository for `engine_dir` into `out` (configs replaced; other files kept)."""
    engine = EngineDir.open(engine_dir)
    spec = engine.spec
    lora = lora_cache_params(
        spec,
        max_gpu_loras=settings.max_gpu_loras,
        max_cpu_loras=settings.max_cpu_loras,
        gpu_free_bytes=gpu_free_bytes,
    )
    out.mkdir(parents=True, exist_ok=True)
    prefetch = write_prefetch_dir(
        settings.peft_source,
        out / PREFETCH_DIR,
        spec,
        previous_ids(out / TASKS_FILE),
        BaseWeights.open(engine.path) if spec.dora_plugin else None,
    )
    (out / TASKS_FILE).write_text(prefetch.to_json())
    repo_dir = (served_repo_dir or str(out.resolve())).rstrip("/")
    served_engine = served_engine_dir or str(engine.path.resolve())
    # absent (not empty) when nothing is prefetched: an empty path would still be scanned
    prefetch_dir = (
        {"lora_prefetch_dir": f"{repo_dir}/{PREFETCH_DIR.as_posix()}"} if prefetch.prefetched else {}
    )
    params = RepoParams(
        engine_dir=served_engine,
        tokenizer_dir=served_engine,  # the engine directory carries the tokenizer
        dtype=TRITON_DTYPES[spec.dtype],
        max_batch_size=int(engine.build_config.get("max_batch_size", 8)),
        decoupled=decoupled,
        lora_cache={**lora.as_parameters(), **prefetch_dir},
        # the flag, else NIM_KVCACHE_PERCENT, else the backend's usual 0.9
        kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction or settings.kv_cache_percent or 0.9,
        enable_kv_cache_reuse=settings.enable_kv_cache_reuse,
        xgrammar_tokenizer_info_path=xgrammar_tokenizer_info or "",
        lora_tasks_file=f"{repo_dir}/{TASKS_FILE}",
        peft_source=str(settings.peft_source.resolve()) if settings.peft_source else "",
        peft_refresh_interval=str(settings.peft_refresh_interval or ""),
    )
    for name, build in MODELS.items():
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(render(build(params)))
    (out / "peft" / "1" / "model.py").write_text(PEFT_MODEL_PY)
    source = python_models or (CONTAINER_MODELS if CONTAINER_MODELS.is_dir() else None)
    copied = _copy_python_models(source, out) if source else None
    return RepoReport(out=out, lora=lora, prefetch=prefetch, python_models_from=copied)


def _copy_python_models(source: Path, out: Path) -> Path:
    """Copy tensorrtllm_backend's `<model>/1/` code (model.py, lib/) for the Python models."""
    missing = [m for m in PYTHON_MODELS if not (source / m / "1" / "model.py").is_file()]
    if missing:
        raise SettingsError(
            f"{source}: not tensorrtllm_backend's all_models/inflight_batcher_llm (no {missing[0]}/1/model.py)"
        )
    for model in PYTHON_MODELS:
        shutil.copytree(source / model / "1", out / model / "1", dirs_exist_ok=True)
    return source


def _gpu0_free_bytes() -> int | None:
    """Free memory of GPU 0 now, when one is visible (None without CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # no usable CUDA: the flag is needed
        return None
    return None


def engine_estimate(engine_dir: Path) -> EngineMemoryEstimate:
    """What the engine, its buffers and decoder will take on the GPU before the PEFT cache is made."""
    engine = EngineDir.open(engine_dir)
    build = engine.build_config
    seq = int(build.get("max_seq_len", 2048))
    return engine_memory_estimate(
        engine.spec,
        engine_bytes=sum(f.stat().st_size for f in engine.path.glob("*.engine")),
        max_batch_size=int(build.get("max_batch_size", 8)),
        max_seq_len=seq,
        max_num_tokens=int(build.get("max_num_tokens") or seq),
    )


def free_after_engine(engine_dir: Path, gpu_free_gib: float | None) -> int:
    """`--gpu-free-gib` when given; else GPU 0's free memory now less the engine's estimate (logged)."""
    if gpu_free_gib:
        return int(gpu_free_gib * GIB)
    free = _gpu0_free_bytes()
    if not free:
        raise SettingsError(
            "no GPU visible: pass --gpu-free-gib (GPU memory free after the engine, runtime buffers and decoder)"
        )
    estimate = engine_estimate(engine_dir)
    log.info("GPU memory before the PEFT cache, estimated:\n%s", "\n".join(estimate.lines()))
    return free - estimate.total


def add_triton_repo_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `trtllm-peft triton-repo` (NIM_* come from the environment, as for `serve`)."""
    p.add_argument(
        "--engine", type=Path, default=None, help="engine directory (default TRTLLM_PEFT_ENGINE_DIR)"
    )
    p.add_argument("--out", type=Path, required=True, help="model repository to write")
    p.add_argument(
        "--peft-source", type=Path, default=None, help="adapters to prefetch (default NIM_PEFT_SOURCE)"
    )
    p.add_argument(
        "--gpu-free-gib",
        type=float,
        default=None,
        help="GPU memory free after the engine, runtime buffers and decoder are allocated, GiB (TensorRT-LLM "
        "applies lora_cache_gpu_memory_fraction to it; its [MemUsageChange] log lines give it). Default: the free "
        "memory of GPU 0 less an estimate of engine + activations + buffers + decoder",
    )
    p.add_argument(
        "--served-engine-dir", default=None, help="the engine's path as Triton sees it (in a container)"
    )
    p.add_argument("--served-repo-dir", default=None, help="the repository's path as Triton sees it")
    p.add_argument(
        "--decoupled", action="store_true", help="decoupled mode (streaming; needs gRPC or generate_stream)"
    )
    p.add_argument(
        "--kv-cache-free-gpu-mem-fraction",
        type=float,
        default=None,
        help="KV cache share of the memory left (default NIM_KVCACHE_PERCENT, else 0.9)",
    )
    p.add_argument(
        "--xgrammar-tokenizer-info",
        default=None,
        help="guided decoding: the tokenizer-info JSON of TensorRT-LLM's generate_xgrammar_tokenizer_info.py "
        "(as Triton sees it); sets guided_decoding_backend=xgrammar (default: off)",
    )
    p.add_argument(
        "--python-models",
        type=Path,
        default=None,
        help="tensorrtllm_backend's all_models/inflight_batcher_llm",
    )


def run_triton_repo(args: argparse.Namespace, settings: Settings) -> int:
    """`trtllm-peft triton-repo`: write the repository and print what it holds."""
    settings = settings.replace(engine_dir=args.engine, peft_source=args.peft_source)
    free = free_after_engine(settings.engine_dir, args.gpu_free_gib)
    report = generate_repository(
        settings.engine_dir,
        args.out,
        settings,
        gpu_free_bytes=free,
        served_engine_dir=args.served_engine_dir,
        served_repo_dir=args.served_repo_dir,
        decoupled=args.decoupled,
        kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
        python_models=args.python_models,
        xgrammar_tokenizer_info=args.xgrammar_tokenizer_info,
    )
    print("\n".join(report.lines()))
    for name, why in sorted(report.prefetch.skipped.items()):
        print(f"  skipped {name}: {why}")
    return 0
