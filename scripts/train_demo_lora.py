"""Train the demo math LoRA on SmolLM2-135M-Instruct, on CPU, in a few minutes (`make train-demo-lora`).

What it shows: the base model, given a bare grade-school word problem on /v1/completions, answers nothing
useful; with this adapter it answers in the GSM8K style of NIM's PEFT document — reasoning steps with
`<<10*20=200>>200` calculator annotations and a last line `#### 50`.

How:
- Data: synthetic word problems from templates (packs of cards and fractions like the document's example,
  shopping totals, change, sharing, rates), answers computed, fixed seed; no download. The document's own
  question (10 packs of 20 cards, 1/4 uncommon) is kept out of training, and so are the held-out problems.
- Format: plain completion, as NIM's example: prompt = the question as the server tokenizes it, completion =
  " " + worked answer + EOS; the loss covers the completion only.
- LoRA: real `peft`, on q_proj/k_proj/v_proj of every layer, with ONE A shared by q, k and v per layer and
  lora_alpha = r. That is exactly NeMo's default LoRA (a fused `attention_qkv` adapter, alpha = adapter_dim),
  so the same adapter written as `.nemo` is the fused variant that TensorRT-LLM's and NIM's NeMo loaders read.
  In PEFT it is an ordinary LoRA whose three A matrices happen to be equal.
- Speed: the frozen base is trained in bfloat16 (PEFT keeps the LoRA weights in float32); logits are computed
  only where the loss is. Before/after answers come from the float32 engine weights, the "after" ones through
  `PeftModel.from_pretrained` of the saved files (what the formats then convert).
The adapter is saved in bfloat16 (exact in every format: bf16 -> fp32 is lossless). Same seed, same threads:
the same bytes (checked twice). 24 steps × 4 problems take ~3 min of CPU (2 threads; 260 s wall on a
shared, loaded 2-core machine); the whole script, with the before/after answers, ~7 min there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trtllm_peft.engine.engine_dir import EngineDir  # noqa: E402

DOC_QUESTION = (
    "John buys 10 packs of magic cards. each pack of 20 cards and 1/4 of those cards are uncommon. "
    "How many uncommon cards did he get?"
)
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED, STEPS, BATCH, LR, WARMUP = 0, 24, 4, 4e-3, 3
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj"]
N_HELD_OUT = 2
MAX_NEW = 72

NAMES = [
    ("John", "he", "He"),
    ("Maria", "she", "She"),
    ("Ali", "he", "He"),
    ("Lena", "she", "She"),
    ("Tom", "he", "He"),
    ("Priya", "she", "She"),
    ("Carlos", "he", "He"),
    ("Mei", "she", "She"),
]


# ------------------------------------------------------------------------------------------------ data


def cards(rng: random.Random) -> tuple[str, list[str], int]:
    """The document's example: packs × cards per pack × a fraction."""
    name, he, He = rng.choice(NAMES)
    p, d = rng.randint(2, 15), rng.choice([2, 3, 4, 5])
    c = d * rng.randint(2, 10)
    game, kind = (
        rng.choice(["magic", "baseball", "pokemon", "trading"]),
        rng.choice(["uncommon", "rare", "shiny"]),
    )
    each = rng.choice(
        [f"Each pack has {c} cards", f"each pack of {c} cards", f"There are {c} cards in each pack"]
    )
    q = f"{name} buys {p} packs of {game} cards. {each} and 1/{d} of those cards are {kind}. "
    q += f"How many {kind} cards did {he} get?"
    t, a = p * c, p * c // d
    steps = [
        f"{He} bought {p}*{c}=<<{p}*{c}={t}>>{t} cards.",
        f"{t}*1/{d}=<<{t}*1/{d}={a}>>{a} of them are {kind}.",
    ]
    return q, steps, a


def shopping(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, He = rng.choice(NAMES)
    (i1, i2) = rng.sample(["notebooks", "pens", "apples", "books", "toy cars", "shirts"], 2)
    n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 8)
    x, y = n1 * p1, n2 * p2
    q = f"{name} buys {n1} {i1} for ${p1} each and {n2} {i2} for ${p2} each. How much does {he} spend in total?"
    steps = [
        f"The {i1} cost {n1}*{p1}=<<{n1}*{p1}={x}>>{x} dollars.",
        f"The {i2} cost {n2}*{p2}=<<{n2}*{p2}={y}>>{y} dollars.",
        f"{He} spends {x}+{y}=<<{x}+{y}={x + y}>>{x + y} dollars in total.",
    ]
    return q, steps, x + y


def change(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, He = rng.choice(NAMES)
    item = rng.choice(["comic books", "cupcakes", "stickers", "tickets"])
    n, p = rng.randint(2, 8), rng.randint(2, 9)
    x = n * p
    m = x + rng.randint(1, 40)
    q = f"{name} has ${m}. {He} buys {n} {item} that cost ${p} each. How much money does {he} have left?"
    steps = [
        f"The {item} cost {n}*{p}=<<{n}*{p}={x}>>{x} dollars.",
        f"{He} has {m}-{x}=<<{m}-{x}={m - x}>>{m - x} dollars left.",
    ]
    return q, steps, m - x


def fraction_left(rng: random.Random) -> tuple[str, list[str], int]:
    place, things, adj = rng.choice(
        [
            ("class", "students", "wearing glasses"),
            ("farm", "animals", "sheep"),
            ("library shelf", "books", "novels"),
            ("garden", "flowers", "red"),
        ]
    )
    d = rng.choice([2, 3, 4, 5, 6])
    n = d * rng.randint(3, 12)
    a = n // d
    q = f"A {place} has {n} {things}. 1/{d} of them are {adj}. How many {things} are not {adj}?"
    steps = [
        f"{n}*1/{d}=<<{n}*1/{d}={a}>>{a} {things} are {adj}.",
        f"{n}-{a}=<<{n}-{a}={n - a}>>{n - a} {things} are not.",
    ]
    return q, steps, n - a


def sharing(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, He = rng.choice(NAMES)
    things = rng.choice(["marbles", "cookies", "stickers", "candies"])
    k = rng.randint(2, 9)
    a = rng.randint(2, 12)
    n = k * a
    q = f"{name} has {n} {things} and shares them equally among {k} friends. How many {things} does each friend get?"
    return q, [f"Each friend gets {n}/{k}=<<{n}/{k}={a}>>{a} {things}."], a


def rate(rng: random.Random) -> tuple[str, list[str], int]:
    worker, things = rng.choice(
        [("baker", "cakes"), ("machine", "toys"), ("painter", "signs"), ("farmer", "baskets")]
    )
    r, h, days = rng.randint(2, 15), rng.randint(2, 8), rng.randint(2, 6)
    x = r * h
    q = f"A {worker} makes {r} {things} every hour and works {h} hours a day. How many {things} are made in {days} days?"
    steps = [
        f"In one day {r}*{h}=<<{r}*{h}={x}>>{x} {things} are made.",
        f"In {days} days {x}*{days}=<<{x}*{days}={x * days}>>{x * days} {things} are made.",
    ]
    return q, steps, x * days


def twice(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, He = rng.choice(NAMES)
    a, k = rng.randint(5, 40), rng.choice([2, 3])
    word = {2: "twice", 3: "three times"}[k]
    q = f"{name} reads {a} pages on Monday and {word} as many on Tuesday. How many pages did {he} read in total?"
    steps = [
        f"On Tuesday {he} read {a}*{k}=<<{a}*{k}={a * k}>>{a * k} pages.",
        f"In total {he} read {a}+{a * k}=<<{a}+{a * k}={a + a * k}>>{a + a * k} pages.",
    ]
    return q, steps, a + a * k


# cards twice as often: the document's own kind of question
TEMPLATES = (cards, cards, shopping, change, fraction_left, sharing, rate, twice)


def make_problems(seed: int, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """n distinct (question, answer) pairs; the answer is the worked steps and a last line `#### N`."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        q, steps, result = rng.choice(TEMPLATES)(rng)
        if q not in seen:
            seen.add(q)
            out.append((q, "\n".join([*steps, f"#### {result}"])))
    return out


# ----------------------------------------------------------------------------------------------- model


def load_base(engine_dir: Path):
    """The engine's weights as a transformers LlamaForCausalLM (float32) and its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    engine = EngineDir.open(engine_dir)
    model = LlamaForCausalLM(LlamaConfig(**engine.hf_config))
    missing = model.load_state_dict(engine.load_weights(), strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embeddings
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(engine_dir))


def add_lora(model):
    """PEFT LoRA on q/k/v with one shared A per layer (a fused attention_qkv LoRA, NeMo's default)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL  # not the local GGUF's folder
    for layer in peft_model.base_model.model.model.layers:
        attn = layer.self_attn
        shared = attn.q_proj.lora_A["default"].weight  # [r, hidden]
        attn.k_proj.lora_A["default"].weight = shared
        attn.v_proj.lora_A["default"].weight = shared
    return peft_model


def encode(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids as the server encodes a completion prompt, completion ids + EOS)."""
    out = []
    for q, a in pairs:
        prompt = list(tok(q)["input_ids"])
        completion = list(tok(" " + a, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        out.append((prompt, completion))
    return out


def batch_loss(peft_model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (right-padded batch)."""
    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(batch):
        n = len(p) + len(c)
        ids[i, :n], mask[i, :n] = torch.tensor(p + c), 1
        labels[i, len(p) : n] = torch.tensor(c)
    causal_lm = peft_model.base_model.model
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    target = labels[:, 1:]  # position t predicts token t+1
    keep = target != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # [n_completion_tokens, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def train(peft_model, data, pad_id: int) -> list[float]:
    """AdamW, linear warm-up then linear decay; one fresh batch per step. Returns the losses."""
    params = list({id(p): p for p in peft_model.parameters() if p.requires_grad}.values())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / WARMUP, max(0.05, (STEPS - s) / (STEPS - WARMUP)))
    )
    peft_model.train()
    losses, start = [], time.monotonic()
    for step in range(STEPS):
        loss = batch_loss(peft_model, data[step * BATCH : (step + 1) * BATCH], pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(loss.item())
        print(
            f"step {step + 1:3d}/{STEPS}  loss {losses[-1]:.3f}  {time.monotonic() - start:5.0f}s", flush=True
        )
    peft_model.eval()
    return losses


@torch.no_grad()
def greedy(model, tok, question: str) -> str:
    """Greedy completion of a bare question, as /v1/completions would give it."""
    ids = torch.tensor([tok(question)["input_ids"]])
    out = model.generate(
        input_ids=ids,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def save(peft_model, out: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, LoRA weights in bfloat16."""
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)  # the shared A is one Parameter: converted once, for q, k, v
    peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template


def train_and_save(engine: Path, out: Path, data) -> tuple[list[float], float, float]:
    """Train on a bfloat16 copy of the base and save the adapter; (losses, wall s, CPU s of training)."""
    model, tok = load_base(engine)
    peft_model = add_lora(model.to(torch.bfloat16))
    t0, c0 = time.monotonic(), time.process_time()
    losses = train(peft_model, encode(tok, data), tok.pad_token_id)
    seconds, cpu_seconds = time.monotonic() - t0, time.process_time() - c0
    save(peft_model, out)
    return losses, seconds, cpu_seconds


def answers(engine: Path, adapter: Path | None, questions: list[str]) -> list[str]:
    """Greedy answers of the float32 base, or of the base with the saved adapter loaded by PEFT."""
    from peft import PeftModel

    model, tok = load_base(engine)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return [greedy(model, tok, q) for q in questions]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, default=REPO / "engines" / "smollm2-135m")
    ap.add_argument("--out", type=Path, default=REPO / "demo" / "loras-src" / "smollm2-math-hf")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.monotonic()
    held_out = make_problems(SEED + 1, N_HELD_OUT, exclude={DOC_QUESTION})
    data = make_problems(SEED, STEPS * BATCH, exclude={DOC_QUESTION} | {q for q, _ in held_out})
    questions = [DOC_QUESTION] + [q for q, _ in held_out]
    expected = ["50"] + [a.rsplit("#### ", 1)[1] for _, a in held_out]
    before = answers(args.engine, None, questions)
    losses, train_seconds, train_cpu_seconds = train_and_save(args.engine, args.out, data)
    after = answers(args.engine, args.out, questions)
    report = {
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "load_average": os.getloadavg(),
        "steps": STEPS,
        "batch": BATCH,
        "examples": len(data),
        "loss_first5": [round(x, 3) for x in losses[:5]],
        "loss_last5": [round(x, 3) for x in losses[-5:]],
        "samples": [
            {"question": q, "expected": e, "before": b, "after": a}
            for q, e, b, a in zip(questions, expected, before, after, strict=True)
        ],
        "adapter_bytes": {f.name: f.stat().st_size for f in sorted(args.out.iterdir())},
    }
    print(json.dumps(report, indent=2))
    ok = all(_last_line(a).startswith("#### ") for a in after)
    print("every answer ends with a '#### N' line" if ok else "WARNING: some answers lack the '#### N' line")
    return 0 if ok else 1


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
