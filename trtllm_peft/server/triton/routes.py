"""Triton's HTTP protocol (KServe v2 + Triton's generate extension) beside the OpenAI routes.

/v2, /v2/health/{live,ready}, /v2/repository/index, /v2/models/{model}[/versions/1][/ready | /infer |
/generate | /generate_stream]. Models: `ensemble` and `tensorrt_llm_bls` (tensorrtllm_backend's inputs,
LoRA by `lora_task_id` [+ `lora_weights`, `lora_config`]), the base model, and every adapter by name.
Errors are Triton's `{"error": "..."}` with Triton's status codes, not OpenAI's error object.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from trtllm_peft import __version__
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.json_body import parse_json
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.triton.generation import Totals, TritonGeneration
from trtllm_peft.server.triton.lora_tasks import ClientLoraTasks
from trtllm_peft.server.triton.schemas import (
    TRITON_MODELS,
    VERSION,
    check_inputs,
    json_inputs,
    model_inputs,
    model_metadata,
    parse_request,
)
from trtllm_peft.server.triton.tensors import (
    HEADER_LENGTH,
    Tensor,
    TritonProtocolError,
    bytes_tensor,
    decode_request,
    encode_response,
    to_json_value,
)
from trtllm_peft.serving.orchestrator import ModelNotFoundError

EXTENSIONS = ["binary_tensor_data", "generate", "model_repository"]


class _TritonRoute(APIRoute):
    """Every failure of a Triton route becomes Triton's error body."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except TrtllmPeftError as e:
                status = e.http_status
                headers = {"Retry-After": "1"} if status == 429 else None
                return JSONResponse({"error": str(e)}, status_code=status, headers=headers)

        return route


router = APIRouter(route_class=_TritonRoute)


def _rt(request: Request) -> Runtime:
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise TritonProtocolError("Server not ready")
    return rt


def _tasks(request: Request, rt: Runtime) -> ClientLoraTasks:
    """The client LoRA task table of this server (one per runtime; it shares the host cache)."""
    tasks = getattr(request.app.state, "triton_lora_tasks", None)
    if tasks is None or tasks.host_cache is not rt.host_cache:
        tasks = request.app.state.triton_lora_tasks = ClientLoraTasks(rt.spec, rt.host_cache)
    return tasks


def _model(rt: Runtime, name: str, version: str | None) -> tuple[str, bool]:
    """(platform, takes LoRA inputs) of a v2 model; Triton's error for an unknown name or version."""
    if version not in (None, "", VERSION):
        raise TritonProtocolError(f"Request for unknown model: '{name}' version {version} is not found")
    if name in TRITON_MODELS:
        return TRITON_MODELS[name], True
    try:
        rt.orchestrator.resolve(name)
    except ModelNotFoundError:
        raise TritonProtocolError(f"Request for unknown model: '{name}' is not found") from None
    return "ensemble", False


def _target(rt: Runtime, name: str) -> str:
    """What the orchestrator serves for a v2 model name: the base model behind Triton's model names."""
    return rt.base_model_id if name in TRITON_MODELS else name


def _routes(method: str, suffix: str):
    """Register a handler under /v2/models/{model}{suffix} and /v2/models/{model}/versions/{version}{suffix}."""

    def register(fn):
        router.add_api_route(f"/v2/models/{{model:path}}/versions/{{version}}{suffix}", fn, methods=[method])
        router.add_api_route(f"/v2/models/{{model:path}}{suffix}", fn, methods=[method])
        return fn

    return register


# ---- server ----------------------------------------------------------------------------------------------


@router.get("/v2")
async def server_metadata():
    return {"name": "trtllm-peft", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live")
async def live():
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request):
    draining = getattr(request.app.state, "drain", None) is not None and request.app.state.drain.draining
    ok = getattr(request.app.state, "runtime", None) is not None and not draining  # not ready from SIGTERM on
    return Response(status_code=200 if ok else 400)


@router.post("/v2/repository/index")
async def repository_index(request: Request):
    """Every model this server answers for, all READY: Triton's names, the base model, each adapter."""
    rt = _rt(request)
    names = [*TRITON_MODELS, rt.base_model_id, *(e.name for e in rt.catalog)]
    return [{"name": n, "version": VERSION, "state": "READY"} for n in names]


# ---- models ----------------------------------------------------------------------------------------------


@_routes("GET", "/ready")
async def model_ready(request: Request, model: str, version: str | None = None):
    _model(_rt(request), model, version)
    return Response(status_code=200)


@_routes("POST", "/infer")
async def infer(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    _, with_lora = _model(rt, model, version)
    header, inputs = decode_request(
        await request.body(), request.headers, rt.settings.max_triton_request_bytes
    )
    gen = await _start(request, rt, model, with_lora, inputs)
    totals = await gen.collect()
    outputs = _outputs(gen, totals, requested=_requested(header))
    binary = _binary_outputs(header, outputs)
    reply = {"model_name": model, "model_version": VERSION}
    if "id" in header:
        reply["id"] = header["id"]
    body, header_len = encode_response(reply, outputs, binary)
    if header_len is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})


@_routes("POST", "/generate")
async def generate(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    _, with_lora = _model(rt, model, version)
    gen = await _start(
        request, rt, model, with_lora, _json_body_inputs(rt, model, with_lora, await request.body())
    )
    totals = await gen.collect()
    return {"model_name": model, "model_version": VERSION, **_generate_fields(_outputs(gen, totals, None))}


@_routes("POST", "/generate_stream")
async def generate_stream(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    _, with_lora = _model(rt, model, version)
    gen = await _start(
        request, rt, model, with_lora, _json_body_inputs(rt, model, with_lora, await request.body())
    )
    return StreamingResponse(
        _events(model, gen),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@_routes("GET", "")
async def metadata(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    platform, with_lora = _model(rt, model, version)
    return model_metadata(model, platform, model_inputs(rt.spec, with_lora))


# ---- request → generation → outputs ----------------------------------------------------------------------


async def _start(
    request: Request, rt: Runtime, model: str, with_lora: bool, inputs: dict[str, Tensor]
) -> TritonGeneration:
    check_inputs(model, inputs, model_inputs(rt.spec, with_lora))
    req = parse_request(inputs)
    if req.lora_task_id is None and (req.lora_weights is not None or req.lora_config is not None):
        raise TritonProtocolError("lora_weights and lora_config need a lora_task_id")
    gen = TritonGeneration(rt, _tasks(request, rt), _target(rt, model), req)
    await gen.start()
    return gen


def _json_body_inputs(rt: Runtime, model: str, with_lora: bool, raw: bytes) -> dict[str, Tensor]:
    body = parse_json(raw or b"{}")
    if not isinstance(body, dict):
        raise TritonProtocolError("the generate request must be a JSON object")
    body.pop("id", None)
    return json_inputs(model, body, model_inputs(rt.spec, with_lora))


def _requested(header: dict[str, Any]) -> list[str] | None:
    outs = header.get("outputs")
    return [str(o.get("name")) for o in outs] if outs else None


def _outputs(gen: TritonGeneration, totals: Totals, requested: list[str] | None) -> list[Tensor]:
    """The ensemble's output tensors for one finished (or streamed) sequence, batch 1."""
    req, n = gen.req, len(totals.token_ids)
    values: dict[str, Tensor] = {
        "text_output": bytes_tensor("text_output", [totals.text], [1, 1]),
        "batch_index": Tensor("batch_index", "INT32", np.zeros((1, 1), np.int32)),
        "sequence_index": Tensor("sequence_index", "INT32", np.zeros((1, 1), np.int32)),
        "num_input_tokens": Tensor(
            "num_input_tokens", "INT32", np.full((1, 1), len(gen.prompt_ids), np.int32)
        ),
        "num_output_tokens": Tensor("num_output_tokens", "INT32", np.full((1, 1), n, np.int32)),
    }
    lps = np.asarray(totals.logprobs if req.return_log_probs else [0.0] * n, np.float32).reshape(1, 1, n)
    values["output_log_probs"] = Tensor("output_log_probs", "FP32", lps)
    values["cum_log_probs"] = Tensor("cum_log_probs", "FP32", lps.sum(axis=2, dtype=np.float32))
    if requested is None:
        requested = ["text_output", "batch_index", "sequence_index"]
        requested += ["cum_log_probs", "output_log_probs"] if req.return_log_probs else []
        requested += ["num_input_tokens"] if req.return_num_input_tokens else []
        requested += ["num_output_tokens"] if req.return_num_output_tokens else []
    unknown = [r for r in requested if r not in values]
    if unknown:
        raise TritonProtocolError(f"unexpected inference output '{unknown[0]}' for model '{gen.model}'")
    return [values[r] for r in requested]


def _binary_outputs(header: dict[str, Any], outputs: list[Tensor]) -> set[str]:
    """Outputs to send as binary: all when `binary_data_output` is set, else those asking `binary_data`."""
    if (header.get("parameters") or {}).get("binary_data_output"):
        return {t.name for t in outputs}
    asked = {
        str(o.get("name")): (o.get("parameters") or {}).get("binary_data")
        for o in header.get("outputs") or []
    }
    return {name for name, flag in asked.items() if flag}


def _generate_fields(outputs: list[Tensor]) -> dict[str, Any]:
    """Generate-extension JSON: one-element tensors as scalars, others as flat lists."""
    fields = {}
    for t in outputs:
        flat = to_json_value(t)
        fields[t.name] = flat[0] if len(flat) == 1 else flat
    return fields


async def _events(model: str, gen: TritonGeneration) -> AsyncIterator[bytes]:
    """One SSE event per new piece of text; an error after the start is an `error` event, as on Triton."""
    try:
        async for chunk in gen.chunks():
            piece = Totals(chunk.text, chunk.token_ids, chunk.logprobs, chunk.finish_reason)
            fields = _generate_fields(_outputs(gen, piece, None))
            yield _sse({"model_name": model, "model_version": VERSION, **fields})
    except TrtllmPeftError as e:
        yield _sse({"error": str(e)})


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


__all__ = ["router"]
