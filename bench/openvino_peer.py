"""OpenVINO GenAI as a benchmark peer: a worker that runs inside `.venv-openvino` (`make openvino`).

OpenVINO GenAI lives in its own virtual environment (its own transformers/optimum pins), so bench/engine.py
starts this file with `.venv-openvino/bin/python` and talks to it over stdin/stdout, one JSON object a line:

    export  python bench/openvino_peer.py export HF_VIEW OUT     # optimum-cli, fp32 weights, no compression
    serve   python bench/openvino_peer.py serve OUT --dtype bfloat16 --threads 2 --adapter A.safetensors ...

`serve` reads requests {"op": "run", "prompts": [[ids]], "tokens": N, "adapter": k | null,
"return_tokens": bool} and answers {"seconds": t, "tokens": [[ids]]}: the time of one
`ContinuousBatchingPipeline.generate` call on all the prompts (greedy, exactly N new tokens, EOS ignored).
Adapters are PEFT safetensors read by `openvino_genai.Adapter`; OpenVINO applies one adapter set per
`generate` call (src/cpp/src/continuous_batching/pipeline_impl.cpp, "LoRA adapters value must be the same for
all requests"), so a batch of distinct adapters is one call per adapter: the caller does that.
This file imports only the standard library and OpenVINO's packages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PRECISION = {"float32": "f32", "bfloat16": "bf16"}


def export(hf_view: Path, out: Path) -> None:
    """The HF checkpoint view → OpenVINO IR with fp32 weights (no weight compression); the tokenizer too."""
    cli = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(cli), "export", "openvino", "--model", str(hf_view), "--task", "text-generation-with-past"]
    subprocess.run([*cmd, "--weight-format", "fp32", str(out)], check=True, stdout=sys.stderr)


def properties(dtype: str, threads: int) -> dict:
    """Explicit precision and threads: the model's dtype for compute and for the KV cache (OpenVINO's CPU
    default KV cache is u8-compressed; ours is not), no dynamic activation quantization."""
    p = PRECISION[dtype]
    return {
        "INFERENCE_PRECISION_HINT": p,
        "KV_CACHE_PRECISION": p,
        "INFERENCE_NUM_THREADS": threads,
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
        "sampler_num_threads": 1,
    }


class Peer:
    """Two pipelines on the same IR: one plain (base), one with the adapters registered (LoRA cases)."""

    def __init__(self, model: Path, dtype: str, threads: int, adapters: list[str], max_batch: int) -> None:
        import openvino_genai as ov_genai

        self.ov_genai = ov_genai
        self.adapters = [ov_genai.Adapter(a) for a in adapters]
        props = properties(dtype, threads)
        self.base = ov_genai.ContinuousBatchingPipeline(str(model), self.scheduler(max_batch), "CPU", props)
        self.lora = None
        if self.adapters:
            cfg = ov_genai.AdapterConfig(self.adapters)
            self.lora = ov_genai.ContinuousBatchingPipeline(
                str(model), self.scheduler(max_batch), "CPU", {**props, "adapters": cfg}
            )

    def scheduler(self, max_batch: int):
        s = self.ov_genai.SchedulerConfig()
        s.max_num_seqs = max_batch
        s.max_num_batched_tokens = 2048  # a whole batch's prompts (or a 512-token prompt) in one step
        s.cache_size = 1  # GB of KV cache
        s.enable_prefix_caching = False  # the benchmark repeats prompts: no reuse across calls
        return s

    def run(self, prompts: list[list[int]], tokens: int, adapter: int | None) -> tuple[float, list]:
        import numpy as np
        import openvino as ov

        g = self.ov_genai.GenerationConfig()
        g.max_new_tokens = g.min_new_tokens = tokens
        g.ignore_eos = True
        g.do_sample = False
        pipe = self.base
        if adapter is not None:
            pipe = self.lora
            g.adapters = self.ov_genai.AdapterConfig(self.adapters[adapter])
        ids = [ov.Tensor(np.array([p], dtype=np.int64)) for p in prompts]
        t = time.perf_counter()
        out = pipe.generate(ids, [g] * len(ids))
        seconds = time.perf_counter() - t
        return seconds, [list(r.m_generation_ids[0]) for r in out]


def serve(args) -> None:
    peer = Peer(Path(args.model), args.dtype, args.threads, args.adapter, args.max_batch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            seconds, tokens = peer.run(req["prompts"], req["tokens"], req.get("adapter"))
            reply = {"seconds": seconds, "tokens": tokens if req.get("return_tokens") else None}
        except Exception as e:  # reported to the caller, which stops the bench with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("hf_view")
    ex.add_argument("out")
    sv = sub.add_parser("serve")
    sv.add_argument("model")
    sv.add_argument("--dtype", choices=list(PRECISION), required=True)
    sv.add_argument("--threads", type=int, default=2)
    sv.add_argument("--max-batch", type=int, default=64)
    sv.add_argument("--adapter", action="append", default=[])
    args = ap.parse_args()
    if args.cmd == "export":
        export(Path(args.hf_view), Path(args.out))
    else:
        serve(args)


if __name__ == "__main__":
    main()
