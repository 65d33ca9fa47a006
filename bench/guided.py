"""Guided decoding cost: the same batch of 8 requests constrained (xgrammar masks) and free, in one process.

    .venv/bin/python bench/guided.py            # 64 tokens per request, 3 alternating repeats
    .venv/bin/python bench/guided.py --quick    # 32 tokens, one repeat

Every request runs exactly `--tokens` tokens (no end id: the constrained ones use guides that never end, so both
sides generate the same count), greedy, batch 8, on the reference engine (engines/smollm2-135m). tokens/s =
8 × tokens / wall time from enqueue to the last final response; the ratio constrained / free is the cost of the
masks (target ≥ 0.90). Guides: four EBNF grammars without an end (JSON-like objects, sentences, a yes/no
list, numbers), mixed over the batch. Then each guide kind's compile time on a fresh compiler (no cache), and the cache hit. Writes
bench/results/guided.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trtllm_peft.executor.api import GuidedDecodingParams, GuideType, Request  # noqa: E402
from trtllm_peft.executor.guided import GuideCompiler, guided_decoding_config  # noqa: E402
from trtllm_peft.executor.torch import TorchExecutor  # noqa: E402

ENGINE = ROOT / "engines" / "smollm2-135m"
BATCH = 8
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
}
# guides without an accepting end (every derivation recurses), so a constrained request runs as many tokens as
# its free twin: xgrammar allows the stop token only where a guide may end
ENDLESS = [
    GuidedDecodingParams(
        GuideType.EBNF_GRAMMAR,
        'root ::= obj ", " root\nobj ::= "{\\"name\\": \\"" [a-z]{1,8} "\\", \\"age\\": " [0-9]{1,2} "}"',
    ),
    GuidedDecodingParams(
        GuideType.EBNF_GRAMMAR, 'root ::= [A-Z] [a-z]{1,10} " is " [0-9]{1,2} " years old. " root'
    ),
    GuidedDecodingParams(GuideType.EBNF_GRAMMAR, 'root ::= ("yes" | "no") ", " root'),
    GuidedDecodingParams(GuideType.EBNF_GRAMMAR, 'root ::= "[" [0-9]{1,4} "] " root'),
]
COMPILED = {
    "json (builtin)": GuidedDecodingParams(GuideType.JSON),
    "json_schema person": GuidedDecodingParams(GuideType.JSON_SCHEMA, json.dumps(PERSON)),
    "json_schema array of person": GuidedDecodingParams(
        GuideType.JSON_SCHEMA, json.dumps({"type": "array", "items": PERSON})
    ),
    "regex sentence": GuidedDecodingParams(GuideType.REGEX, r"([A-Z][a-z]+ is [0-9]+ years old\. )+"),
    "ebnf endless objects (bench)": ENDLESS[0],
    "choice (3 literals)": GuidedDecodingParams(
        GuideType.EBNF_GRAMMAR, 'root ::= "positive" | "negative" | "neutral"'
    ),
    "regex .{0,64}": GuidedDecodingParams(GuideType.REGEX, ".{0,64}"),
}


def prompts(tok) -> list[list[int]]:
    asks = ["Describe people as JSON.", "List some ages.", "Answer yes or no, repeatedly.", "Give numbers."]
    out = []
    for i in range(BATCH):
        msgs = [{"role": "user", "content": asks[i % len(asks)] + f" ({i})"}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def run(ex, ids: list[list[int]], tokens: int, guided: bool) -> tuple[float, int]:
    """Wall seconds and tokens generated for the batch (all enqueued at once)."""
    reqs = [
        Request(p, tokens, guided_decoding_params=ENDLESS[i % len(ENDLESS)] if guided else None)
        for i, p in enumerate(ids)
    ]
    start = time.perf_counter()
    rids = ex.enqueue_requests(reqs)
    done: dict[int, int] = {}
    while len(done) < len(rids):
        for r in ex.await_responses(timeout=1.0):
            if r.has_error():
                raise RuntimeError(r.error_msg)
            if r.result.is_final:
                done[r.request_id] = len(r.result.output_token_ids[0]) - len(
                    reqs[rids.index(r.request_id)].input_token_ids
                )
    return time.perf_counter() - start, sum(done.values())


def compile_times(cfg, vocab: int) -> dict[str, float]:
    out = {}
    for name, params in COMPILED.items():
        c = GuideCompiler(cfg, vocab)
        start = time.perf_counter()
        c.compile(params)
        out[name] = time.perf_counter() - start
        start = time.perf_counter()
        c.compile(params)
        out[name + " (cached)"] = time.perf_counter() - start
        c.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.repeats = 32, 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ENGINE))
    cfg = guided_decoding_config(tok)
    ids = prompts(tok)
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    with TorchExecutor(
        ENGINE, guided_decoding_config=cfg, max_batch_size=BATCH, memory_budget_bytes=3 << 30
    ) as ex:
        run(ex, ids, 4, False), run(ex, ids, 4, True)  # warm-up: kernels, grammars compiled and cached
        for _ in range(a.repeats):
            for kind in ("free", "constrained"):  # alternating, so load on the machine hits both alike
                secs, n = run(ex, ids, a.tokens, kind == "constrained")
                assert n == BATCH * a.tokens, f"{kind}: {n} tokens, expected {BATCH * a.tokens}"
                rates[kind].append(n / secs)
        vocab = ex.arch.vocab_size
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["constrained"] / best["free"]
    # the ratio of each back-to-back pair, median: one load spike on either side moves best-of, not this
    pairs = sorted(c / f for f, c in zip(rates["free"], rates["constrained"], strict=True))
    print(
        f"batch {BATCH} × {a.tokens} tokens, best of {a.repeats}: free {best['free']:.1f} tok/s, "
        f"constrained {best['constrained']:.1f} tok/s, ratio {ratio:.3f} (target ≥ 0.90); "
        f"median pair ratio {pairs[len(pairs) // 2]:.3f}"
    )
    comp = compile_times(cfg, vocab)
    for name, secs in comp.items():
        print(f"  compile {name:34s} {secs * 1e3:9.2f} ms")
    out = {"batch": BATCH, "tokens": a.tokens, "rates": rates, "ratio": ratio, "pair_ratios": pairs}
    out["compile_s"] = comp
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "guided.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
