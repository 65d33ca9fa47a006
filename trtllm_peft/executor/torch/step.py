"""One iteration's forward: the planned prompt chunks and decodes (schedule.py) turned into the model's
inputs, the forward, and each sequence's progress and sampled token.

The per-step Python work is kept to list building and one tensor per input (ids, positions, adapters,
block tables): at decode batch sizes it runs every ~20-80 ms, so it must not grow with the sequences'
lengths (block tables are the only per-sequence lists, a block per `tokens_per_block` tokens).
"""

from __future__ import annotations

import torch

from trtllm_peft.executor.api import FinishReason
from trtllm_peft.executor.torch.kv import BlockManager, PagedKVCache
from trtllm_peft.executor.torch.model import Chunk, LlamaModel
from trtllm_peft.executor.torch.sampler import sample
from trtllm_peft.executor.torch.sequence import Sequence


def run_step(
    model: LlamaModel,
    kv: PagedKVCache,
    blocks: BlockManager,
    chunks: list[tuple[Sequence, int]],
    decoding: list[Sequence],
    lora,
    index: dict[int, int],
    masks=None,
) -> None:
    """Take the blocks the iteration writes, run its forward, advance every sequence and sample the ones
    whose prompt completed or that decode. `index`: task id -> its index in `lora` (absent: base)."""
    new: list[int] = []
    for seq, n in chunks:
        new += blocks.ensure(seq.id, seq.cached + n)
    for seq in decoding:
        new += blocks.ensure(seq.id, seq.cached + 1)
    kv.clear(new)
    ids, positions, owner, parts = [], [], [], []
    for seq, n in chunks:
        ids += seq.tokens[seq.cached : seq.cached + n]
        positions += range(seq.cached, seq.cached + n)
        owner += [index.get(seq.task_id, -1)] * n
        table = kv.tables([blocks.table(seq.id)])[0]
        parts.append(Chunk(table, seq.cached, n, logits=seq.cached + n == seq.prompt_len))
    ids += [s.tokens[-1] for s in decoding]
    positions += [s.cached for s in decoding]
    owner += [index.get(s.task_id, -1) for s in decoding]
    tables = kv.tables([blocks.table(s.id) for s in decoding]) if decoding else None
    dev = model.device
    context = {
        i: None for i, (seq, _) in enumerate(chunks) if seq.request.output_config.return_context_logits
    }
    logits = model.step(
        torch.tensor(ids, dtype=torch.long, device=dev),
        torch.tensor(positions, dtype=torch.long, device=dev),
        parts,
        tables,
        kv,
        lora,
        torch.tensor(owner, device=dev) if lora is not None else None,
        context,
    )
    for i, (seq, n) in enumerate(chunks):
        seq.cached += n
        if i in context:  # [n, V] per chunk, in order: [prompt_len, V] once the prompt is done
            part = context[i]
            seq.context_logits = part if seq.context_logits is None else torch.cat([seq.context_logits, part])
    for seq in decoding:
        seq.cached += 1
    sampled = [seq for (seq, _), c in zip(chunks, parts, strict=True) if c.logits] + decoding
    take(logits, sampled, masks, model.ops.argmax)
    for seq in [s for s, _ in chunks] + decoding:
        blocks.store(seq.id, seq.tokens, seq.cached)


def _generation_row(logits: torch.Tensor, i: int, req) -> torch.Tensor | None:
    """Row i of the step's logits [B, V] for a request that asked for generation logits: a view when it
    streams (its response, built at the end of this iteration, copies the rows it sends: one copy per token,
    and the view pins the step's logits only until then), else a copy (kept until the final response)."""
    if not req.output_config.return_generation_logits:
        return None
    return logits[i] if req.streaming else logits[i].clone()  # [V]


def take(logits: torch.Tensor, seqs: list[Sequence], masks=None, argmax=None) -> None:
    """Sample a token for each of `seqs` from its row of `logits` [len(seqs), V] and append it; guided rows
    keep only what their grammar allows first (guidedDecoder.cpp execute), `masks`: guided.MaskBuffer."""
    guided = [i for i, s in enumerate(seqs) if s.guide is not None]
    if guided:
        masks.apply(logits, guided, [seqs[i].guide for i in guided])
    want = any(s.request.output_config.return_log_probs for s in seqs)
    tokens, lps = sample(
        logits,
        [s.sampling for s in seqs],
        [s.tokens for s in seqs],
        [len(s.generated) for s in seqs],
        want,
        argmax,
    )
    for i, s in enumerate(seqs):
        s.add(tokens[i], lps[i] if lps is not None else None, _generation_row(logits, i, s.request))
    for i in guided:
        s = seqs[i]
        s.guide.accept(tokens[i])
        if s.guide.terminated and s.finish == FinishReason.NOT_FINISHED:
            s.finish = FinishReason.END_ID  # the guide is complete (its stop token was sampled)
