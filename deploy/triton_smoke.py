"""Real tritonserver on a generated repository: one request per model (used by deploy/gpu-smoke.sh).

    python deploy/triton_smoke.py make-adapter --engine ENGINE --out LORAS/smoke   a random HF PEFT adapter
    python deploy/triton_smoke.py query --url http://127.0.0.1:8000 --adapter smoke

`query` sends what tensorrtllm_backend's clients send, over KServe v2 JSON (stdlib only, so it runs in NVIDIA's
image as is): `preprocessing` → `tensorrt_llm` → `postprocessing` in sequence (as end_to_end_test.py chains
them), then `ensemble`, `tensorrt_llm_bls` and `peft` (by adapter name, and without) through the generate
extension. It prints one line per model and exits 1 if any request failed or came back empty.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

PROMPT = "The capital of France is"
MAX_TOKENS = 8


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from None


def tensor(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def outputs(response: dict) -> dict[str, dict]:
    return {o["name"]: o for o in response.get("outputs", [])}


def chain(base: str) -> list[tuple[str, str]]:
    """preprocessing → tensorrt_llm → postprocessing, each a KServe v2 /infer with its stock tensors."""
    pre = outputs(
        post(
            f"{base}/v2/models/preprocessing/infer",
            {
                "inputs": [
                    tensor("QUERY", "BYTES", [1, 1], [PROMPT]),
                    tensor("REQUEST_OUTPUT_LEN", "INT32", [1, 1], [MAX_TOKENS]),
                ],
                "outputs": [{"name": "INPUT_ID"}, {"name": "REQUEST_INPUT_LEN"}],
            },
        )
    )
    ids, length = pre["INPUT_ID"]["data"], pre["REQUEST_INPUT_LEN"]["data"][0]
    trt = outputs(
        post(
            f"{base}/v2/models/tensorrt_llm/infer",
            {
                "inputs": [
                    tensor("input_ids", "INT32", [1, len(ids)], ids),
                    tensor("input_lengths", "INT32", [1, 1], [length]),
                    tensor("request_output_len", "INT32", [1, 1], [MAX_TOKENS]),
                ],
                "outputs": [{"name": "output_ids"}, {"name": "sequence_length"}],
            },
        )
    )
    out_ids, seq = trt["output_ids"]["data"], trt["sequence_length"]["data"]
    text = outputs(
        post(
            f"{base}/v2/models/postprocessing/infer",
            {
                "inputs": [
                    tensor("TOKENS_BATCH", "INT32", [1, 1, len(out_ids)], out_ids),
                    tensor("SEQUENCE_LENGTH", "INT32", [1, 1], seq),
                ]
            },
        )
    )["OUTPUT"]["data"][0]
    return [
        ("preprocessing", f"{len(ids)} ids"),
        ("tensorrt_llm", f"{seq[0]} tokens"),
        ("postprocessing", repr(text)),
    ]


def generate(base: str, model: str, **extra) -> str:
    body = {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "bad_words": "", "stop_words": "", **extra}
    text = post(f"{base}/v2/models/{model}/generate", body).get("text_output", "")
    if not text:
        raise RuntimeError("empty text_output")
    return repr(text)


def query(base: str, adapter: str) -> int:
    rows, failed = [], 0
    checks = [
        ("chain", lambda: chain(base)),
        ("ensemble", lambda: generate(base, "ensemble")),
        ("tensorrt_llm_bls", lambda: generate(base, "tensorrt_llm_bls")),
        ("peft (base)", lambda: generate(base, "peft")),
        (f"peft ({adapter})", lambda: generate(base, "peft", lora_name=adapter)),
        (f"peft ({adapter}, by id now)", lambda: generate(base, "peft", lora_name=adapter)),
    ]
    for name, check in checks:
        try:
            got = check()
            rows += got if isinstance(got, list) else [(name, got)]
        except Exception as e:  # report every model, then fail
            failed += 1
            rows.append((name, f"FAILED: {e}"))
    for name, what in rows:
        print(f"  {name:<28} {what}")
    return 1 if failed else 0


def make_adapter(engine: Path, out: Path, rank: int = 8, seed: int = 1) -> None:
    """A random HF PEFT adapter on attn_q/attn_v of the engine's model (strong enough to change outputs)."""
    import torch

    from trtllm_peft import formats
    from trtllm_peft.lora import load_spec
    from trtllm_peft.lora.adapter import LoraAdapter, LoraWeights

    spec = load_spec(engine)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(spec.num_layers):
        for m in ("attn_q", "attn_v"):
            d_in, d_out = spec.module_dims(m)
            a, b = torch.randn(rank, d_in, generator=g) * 0.05, torch.randn(d_out, rank, generator=g) * 0.05
            weights[(layer, m)] = LoraWeights(a=a, b=b, scale=2.0)
    formats.save(LoraAdapter(weights=weights, format="hf", base_model=engine.name), out, "hf", spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/triton_smoke.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-adapter")
    m.add_argument("--engine", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("query")
    q.add_argument("--url", default="http://127.0.0.1:8000")
    q.add_argument("--adapter", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "make-adapter":
        make_adapter(args.engine, args.out)
        return 0
    return query(args.url.rstrip("/"), args.adapter)


if __name__ == "__main__":
    sys.exit(main())
