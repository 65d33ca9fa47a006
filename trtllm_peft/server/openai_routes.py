"""/v1/models, /v1/completions, /v1/chat/completions: OpenAI's shapes, NIM's model list."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.executor.api import GuidedDecodingParams
from trtllm_peft.server import structured, tools
from trtllm_peft.server.generation import Generation, Piece, Sequence
from trtllm_peft.server.generation_params import generation_params
from trtllm_peft.server.http_errors import BadRequestError
from trtllm_peft.server.json_body import JsonRoute
from trtllm_peft.server.openai_logprobs import CompletionLogprobs, chat_logprobs, merge_blocks
from trtllm_peft.server.prompts import check_prompt_chars, completion_prompts
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    _Sampling,
)
from trtllm_peft.serving.orchestrator import GenerationParams

router = APIRouter(route_class=JsonRoute)  # bodies checked (UTF-8, depth, Unicode) before validation


DISCONNECT_POLL_S = 0.5

__all__ = ["BadRequestError", "router"]


class ClientGoneError(TrtllmPeftError):
    http_status = 499  # nginx's "client closed request": nobody reads it, but logs and metrics do


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """NIM's shape: the base model, then one entry per adapter with `root` = the base model's id."""
    rt = _rt(request)
    base = rt.base_model_id
    cards = [_card(base, base, rt.started)]
    cards += [_card(e.name, base, int(e.created)) for e in rt.catalog]
    return {"object": "list", "data": cards}


def _card(model_id: str, root: str, created: float) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(created),
        "owned_by": "system",
        "root": root,
        "parent": None,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, model_id).hex}",
                "object": "model_permission",
                "created": int(created),
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


async def _start(
    rt: Runtime, body: _Sampling, prompts: list[list[int]], params: GenerationParams
) -> Generation:
    """Every prompt × n sequences submitted together (they batch in the engine)."""
    gen = Generation(
        rt.orchestrator,
        rt.tokenizer,
        rt.metrics,
        model=body.model,
        prompts=prompts,
        params=params,
        stops=body.stop,
        n=body.n,
    )
    await gen.start()
    for p in prompts:
        rt.metrics.prompt_tokens.labels(body.model).inc(len(p) * body.n)
        rt.metrics.request_prompt.labels(body.model).observe(len(p))
    return gen


def _usage(prompt_tokens: int, gen: Generation) -> dict[str, int]:
    """Each prompt counted once, whatever n (as OpenAI and vLLM count); completion tokens of all choices."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=gen.completion_tokens,
        total_tokens=prompt_tokens + gen.completion_tokens,
    ).model_dump()


def _response_id(request: Request, prefix: str) -> str:
    """`<prefix>-<X-Request-Id>` when the client sent one (vLLM's rule), else a random one."""
    rid = request.headers.get("x-request-id")
    return f"{prefix}-{rid}" if rid else f"{prefix}-{uuid.uuid4().hex}"


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class _ChoiceFrames:
    """`_sse({**base, "choices": [choice]})` of one stream, byte for byte, with the fields every chunk
    repeats (id, object, created, model) encoded once: only the choice is encoded per token."""

    def __init__(self, base: dict[str, Any]):
        self._head = _sse({**base, "choices": []}).removesuffix(b"]}\n\n")

    def __call__(self, choice: dict[str, Any]) -> bytes:
        return self._head + json.dumps(choice, separators=(",", ":")).encode() + b"]}\n\n"


# ---- /v1/completions -------------------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    rt = _rt(request)
    guide = structured.guide_for(body)
    await structured.checked(guide)
    prompts = await completion_prompts(rt, body.prompt)
    if len(prompts) * body.n > MAX_CHOICES:
        raise BadRequestError(f"{len(prompts)} prompts × n={body.n} is more than {MAX_CHOICES} choices")
    longest = max((ids for ids, _ in prompts), key=len)
    k = body.logprobs
    params = generation_params(
        rt,
        body,
        len(longest),
        body.max_tokens or 16,
        top_logprobs=k,
        prompt_logprobs=k if body.echo and k is not None else None,
    )
    gen = await _start(rt, body, [ids for ids, _ in prompts], replace(params, guided=guide))
    rid, created = _response_id(request, "cmpl"), int(time.time())
    echoes = [text if body.echo else "" for _, text in prompts]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    if body.stream:
        return _stream(_completion_chunks(rt, body, gen, rid, created, echoes, prompt_tokens))
    seqs = await _collect(request, gen)
    choices = []
    for s in seqs:
        echo = echoes[s.index // body.n]
        choices.append(
            {
                "index": s.index,
                "text": echo + s.text,
                "finish_reason": s.finish_reason,
                "stop_reason": None,
                "logprobs": _completion_block(rt, gen, body, s.index, s.token_ids, s.top, body.echo),
            }
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(prompt_tokens, gen),
    }


def _completion_block(
    rt, gen: Generation, body, index: int, token_ids, top, with_prompt: bool, logprobs=None
):
    """`choices[i].logprobs` of a completion (the echoed prompt's first when `with_prompt`)."""
    if body.logprobs is None:
        return None
    builder = logprobs or CompletionLogprobs(rt.tokenizer)
    block = None
    if with_prompt:
        prompt_ids = gen.prompts[index // body.n]
        block = builder.block(prompt_ids, gen.prompt_logprobs[index // body.n])
    return merge_blocks(block, builder.block(token_ids, top))


async def _completion_chunks(
    rt, body, gen: Generation, rid, created, echoes: list[str], prompt_tokens: int
) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    frame = _ChoiceFrames(base)
    builders: dict[int, CompletionLogprobs] = {}
    async for p in gen.stream():
        text, logprobs = p.text, None
        first = p.index not in builders
        builder = builders.setdefault(p.index, CompletionLogprobs(rt.tokenizer))
        echo = echoes[p.index // body.n] if first else ""
        if body.logprobs is not None:
            with_prompt = first and body.echo
            logprobs = _completion_block(rt, gen, body, p.index, p.token_ids, p.top, with_prompt, builder)
        choice = {
            "index": p.index,
            "text": echo + text,
            "logprobs": logprobs,
            "finish_reason": p.finish_reason,
            "stop_reason": None,
        }
        yield frame(choice)
    if body.stream_options and body.stream_options.include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, gen)})
    yield b"data: [DONE]\n\n"


# ---- /v1/chat/completions --------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    rt = _rt(request)
    if body.n > MAX_CHOICES:
        raise BadRequestError(f"n={body.n} is more than {MAX_CHOICES} choices")
    plan = _tool_plan(rt, body)
    guide = await _chat_guide(body, plan)
    try:
        messages = [_chat_message(m) for m in body.messages]
        check_prompt_chars(rt, sum(len(m["content"]) for m in messages))
        native = rt.tokenizer.template_knows_tools
        messages = tools.render_messages(messages, plan, native)
        listed = plan.tools if plan and native and plan.choice != "none" else None
        prompt = await asyncio.to_thread(rt.tokenizer.apply_chat_template, messages, listed)
    except ValueError as e:
        raise BadRequestError(str(e), param="messages") from None
    k = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = generation_params(rt, body, len(prompt.token_ids), max_tokens, top_logprobs=k)
    gen = await _start(rt, body, [prompt.token_ids], replace(params, guided=guide))
    rid, created = _response_id(request, "chatcmpl"), int(time.time())
    if body.stream:
        return _stream(_chat_chunks(rt, body, gen, rid, created, len(prompt.token_ids), plan))
    seqs: list[Sequence] = await _collect(request, gen)
    choices = []
    for s in seqs:
        message, reason = tools.message(plan, s.text, s.finish_reason)
        choices.append(
            {
                "index": s.index,
                "message": message,
                "logprobs": chat_logprobs(rt.tokenizer, s.top) if k is not None else None,
                "finish_reason": reason,
                "stop_reason": None,
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(len(prompt.token_ids), gen),
    }


def _chat_message(m) -> dict[str, Any]:
    out = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _tool_plan(rt: Runtime, body: ChatCompletionRequest) -> tools.ToolPlan | None:
    """tools + tool_choice checked together, before anything else (a bad pair is a 400 at once)."""
    parser = rt.settings.tool_call_parser
    if parser == "auto":
        parser = tools.default_parser(rt.tokenizer.chat_template)
    return tools.plan(body.tools, body.tool_choice, parser)


async def _chat_guide(
    body: ChatCompletionRequest, plan: tools.ToolPlan | None
) -> GuidedDecodingParams | None:
    guide = structured.guide_for(body)
    if plan is not None and plan.forced:
        if guide is not None:
            raise BadRequestError(
                f"tool_choice {plan.choice} cannot be combined with response_format or guided_*"
            )
        guide, field = plan.guide(), "tools"
    else:
        field = "response_format"
    await structured.checked(guide, field)
    return guide


async def _chat_chunks(
    rt, body, gen: Generation, rid, created, prompt_len, plan: tools.ToolPlan | None = None
) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    frame = _ChoiceFrames(base)
    for i in range(body.n):  # OpenAI opens each choice with the role
        yield frame(
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )
    gates = {i: tools.StreamGate(plan) for i in range(body.n)} if plan and plan.choice != "none" else {}
    async for p in gen.stream():
        for delta in _tool_deltas(rt, body, p, gates.get(p.index)):
            yield frame(delta)
    if body.stream_options and body.stream_options.include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(prompt_len, gen)})
    yield b"data: [DONE]\n\n"


def _tool_deltas(rt: Runtime, body, p: Piece, gate: tools.StreamGate | None) -> list[dict[str, Any]]:
    """Chunks of one piece: content as it comes; with tools, calls held back and sent whole at the end
    (`delta.tool_calls` with id, name and all the arguments), finish_reason `tool_calls`."""
    if gate is None:
        return [_chat_delta(rt, body, p)]
    text = gate.feed(p.text)
    if not p.finish_reason:
        return [_chat_delta(rt, body, replace(p, text=text))]
    rest, calls = gate.finish()
    last = _chat_delta(rt, body, replace(p, text=text + rest))
    if calls:
        last["delta"]["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
        last["finish_reason"] = p.finish_reason if p.finish_reason == "length" else "tool_calls"
    return [last]


def _chat_delta(rt: Runtime, body: ChatCompletionRequest, p: Piece) -> dict[str, Any]:
    return {
        "index": p.index,
        "delta": {"content": p.text} if p.text else {},
        "logprobs": chat_logprobs(rt.tokenizer, p.top or []) if body.logprobs else None,
        "finish_reason": p.finish_reason,
    }


async def _collect(request: Request, gen: Generation) -> list[Sequence]:
    """Run a non-streaming generation to the end, cancelling it if the client goes away meanwhile."""
    task = asyncio.create_task(gen.collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await gen.aclose()
            raise ClientGoneError("client disconnected")


def _stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
