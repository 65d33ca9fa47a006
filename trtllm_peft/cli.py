"""`trtllm-peft`: build engines, convert and inspect adapters (and, later, serve them).

Every user error ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.settings import Settings

log = logging.getLogger("trtllm_peft")

DESCRIPTION = """\
trtllm-peft serves one base LLM with many LoRA adapters, NIM-compatible, on TensorRT-LLM
(GPU) or on its PyTorch reference engine (anywhere).

Adapters may be Hugging Face PEFT directories (adapter_config.json + adapter_model.safetensors|bin),
NeMo directories (one .nemo file) or TensorRT-LLM directories (model.lora_config.npy +
model.lora_weights.npy). Settings come from NIM's environment variables (NIM_MAX_LORA_RANK, ...).
"""


def _spec(base: str, settings: Settings, max_lora_rank: int | None, dtype: str | None):
    from trtllm_peft.lora.spec import spec_for_base

    return spec_for_base(
        base, default_max_lora_rank=settings.max_lora_rank, max_lora_rank=max_lora_rank, dtype=dtype
    )


def cmd_convert(args: argparse.Namespace, settings: Settings) -> int:
    from trtllm_peft import formats
    from trtllm_peft.engine.base_weights import BaseWeights
    from trtllm_peft.lora import fit_to_spec

    spec = _spec(args.base, settings, args.max_lora_rank, args.dtype)
    adapter = fit_to_spec(formats.load(args.src, spec), spec)
    # DoRA magnitudes change form between formats (PEFT's trained m, TensorRT-LLM's normalized factor):
    # that needs the base weights, read from --base only when a DoRA adapter needs them
    base = BaseWeights.open(args.base) if adapter.is_dora else None
    written = formats.save(adapter, args.out, args.to, spec, base)
    for path in written:
        log.info("wrote %s", path)
    print(
        f"converted {args.src} ({adapter.format}) -> {args.out} ({args.to}, {spec.dtype}): "
        f"{len(adapter)} module-layers, max rank {adapter.max_rank}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from trtllm_peft.inspect_adapter import inspect, render

    spec = _spec(args.base, settings, args.max_lora_rank, None) if args.base else None
    report = inspect(args.src, spec)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0 if report.ok else 1


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from trtllm_peft.engine.engine_dir import EngineDir
    from trtllm_peft.engine.host_malloc import tune_for_server
    from trtllm_peft.executor.factory import create_executor
    from trtllm_peft.server.app import create_app
    from trtllm_peft.server.drain import GracefulServer
    from trtllm_peft.server.http_protocol import protocol_with_read_timeout

    settings = settings.replace(
        engine_dir=args.engine, server_port=args.port, grpc_port=args.grpc_port, peft_source=args.peft_source
    )
    log.info(
        "engine %s, adapters from %s",
        settings.engine_dir,
        settings.peft_source or "(none: NIM_PEFT_SOURCE unset)",
    )
    tune_for_server()  # before the engine's threads start (engine/host_malloc.py: RSS of a long-running server)
    # the engine starts before the port opens: a bad engine or memory plan is one line and exit 2
    executor = create_executor(settings, EngineDir.open(settings.engine_dir))
    app = create_app(settings, lambda *_: executor, host=args.host)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=settings.server_port,
        log_config=None,
        http=protocol_with_read_timeout(settings.read_timeout),
        timeout_keep_alive=5,  # idle keep-alive connections
        timeout_graceful_shutdown=5,  # after the drain (SIGTERM) only idle connections are left
    )
    # SIGTERM: not ready, new requests 503, running ones finish (TRTLLM_PEFT_DRAIN_TIMEOUT), exit 0
    GracefulServer(config, app.state.drain, settings.drain_timeout).run()
    return 0


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="largest rank allowed (default: the engine's, or NIM_MAX_LORA_RANK for a HF base)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trtllm-peft", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert_command(sub)
    _add_inspect_command(sub)
    _add_serve_command(sub)
    _add_engine_commands(sub)
    _add_kernels_command(sub)
    _add_pull_command(sub)
    _add_triton_repo_command(sub)
    return parser


def _add_convert_command(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an adapter to TensorRT-LLM tensors (or to HF / NeMo)",
        description="Read an adapter in any format, check it against the base model or engine, "
        "and write it as TensorRT-LLM tensors (model.lora_weights.npy [1,N,W], "
        "model.lora_config.npy [1,N,4] int32), a Hugging Face PEFT adapter or a .nemo adapter.",
    )
    p.add_argument("src", help="adapter directory (HF PEFT, NeMo or TensorRT-LLM)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", required=True, help="base model directory (HF config.json) or engine directory")
    p.add_argument(
        "--to", choices=("trtllm", "hf", "nemo"), default="trtllm", help="output format (default trtllm)"
    )
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="weights dtype of the output (default: the engine's / the base model's)",
    )
    _add_limits(p)
    p.set_defaults(func=cmd_convert)


def _add_inspect_command(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show an adapter's format, ranks, modules, size and problems",
        description="Exit code 0 when the adapter is readable (and fits --base), 1 otherwise.",
    )
    p.add_argument("src", help="adapter directory")
    p.add_argument("--base", default=None, help="check against this base model or engine directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_limits(p)
    p.set_defaults(func=cmd_inspect)


def _add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the NIM-compatible OpenAI server over an engine and NIM_PEFT_SOURCE",
        description="Serve the engine's base model and every adapter directory under "
        "NIM_PEFT_SOURCE on an OpenAI-compatible API (/v1/models, /v1/completions, "
        "/v1/chat/completions, /v1/health/ready, /v1/metrics). Configuration: NIM_* variables.",
    )
    p.add_argument(
        "--engine", type=Path, default=None, help="engine directory (default TRTLLM_PEFT_ENGINE_DIR)"
    )
    p.add_argument("--peft-source", type=Path, default=None, help="adapter root (default NIM_PEFT_SOURCE)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default NIM_SERVER_PORT, 8000)")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="KServe v2 gRPC port (default TRTLLM_PEFT_GRPC_PORT, 8001; 0 turns gRPC off)",
    )
    p.set_defaults(func=cmd_serve)


def _add_kernels_command(sub) -> None:
    p = sub.add_parser(
        "build-kernels",
        help="compile the reference engine's CPU decode kernels ahead of time (what `make install` runs)",
        description="Compile executor/torch/csrc into executor/torch/_prebuilt, so that no server or test "
        "compiles them on its first start. Needs g++ and an AVX-512 (bf16) CPU; elsewhere it says why "
        "and exits 0: the reference engine then runs the pure-torch ops, which compute the same thing.",
    )
    p.set_defaults(func=cmd_build_kernels)


def _add_triton_repo_command(sub) -> None:
    from trtllm_peft.triton_repo import add_triton_repo_arguments, run_triton_repo

    p = sub.add_parser(
        "triton-repo",
        help="write a tensorrtllm_backend (Triton) model repository for an engine",
        description="Write preprocessing, tensorrt_llm, postprocessing, ensemble and "
        "tensorrt_llm_bls models for ENGINE, with the LoRA cache sized from NIM_* and the adapters "
        "of NIM_PEFT_SOURCE converted into lora_prefetch_dir.",
    )
    add_triton_repo_arguments(p)
    p.set_defaults(func=run_triton_repo)


def _add_pull_command(sub) -> None:
    from trtllm_peft.pull import command as pull_command

    p = sub.add_parser(
        "pull",
        help="download adapters from Hugging Face or NGC into NIM_PEFT_SOURCE (atomic, resumable)",
        description=(pull_command.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull_command.add_pull_arguments(p)
    p.set_defaults(func=pull_command.run_pull)


def _add_engine_commands(sub) -> None:
    """`build` lives with the engine; registered here only if its module is present."""
    try:
        from trtllm_peft.engine import build
    except ImportError:
        return
    p = sub.add_parser(
        "build",
        help="build an engine from a base model (default: SmolLM2-135M-Instruct)",
        description=(build.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_build_arguments(p)
    p.set_defaults(func=build.run_build)


def cmd_build_kernels(args: argparse.Namespace, settings: Settings) -> int:
    from trtllm_peft.executor.torch import cpu_kernels

    reason = cpu_kernels.why_unavailable()
    if reason is not None:
        print(f"CPU decode kernels not built: {reason} (the reference engine uses the pure-torch ops)")
        return 0
    name = cpu_kernels.module_name()
    print(f"building the CPU decode kernels into {cpu_kernels.PREBUILT} (~1-3 min)", flush=True)
    if cpu_kernels.build(cpu_kernels.PREBUILT, name) is None:
        return 1
    print(f"built {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from trtllm_peft.log import setup_logging

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        setup_logging(settings)
        return args.func(args, settings)
    except TrtllmPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
