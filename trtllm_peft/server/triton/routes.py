"""Triton's HTTP protocol (KServe v2 + Triton's generate extension) beside the OpenAI routes.

/v2, /v2/health/{live,ready}, /v2/repository/index, /v2/models/{model}[/versions/1][/ready | /config |
/infer | /generate | /generate_stream]. Models (models.py): tensorrtllm_backend's stock five (`ensemble`,
`tensorrt_llm_bls`, `preprocessing`, `tensorrt_llm`, `postprocessing`; LoRA by `lora_task_id` [+
`lora_weights`, `lora_config`]), the base model, and every adapter by name. The gRPC service (grpc_service.py)
serves the same models with the same semantics. Errors are Triton's `{"error": "..."}` with Triton's
status codes, not OpenAI's error object.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from trtllm_peft import __version__
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.json_body import parse_json
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.triton.config import model_config_json
from trtllm_peft.server.triton.models import Inference, Reply, V2Model, lora_tasks, model_names, resolve
from trtllm_peft.server.triton.outputs import default_outputs, select
from trtllm_peft.server.triton.schemas import VERSION, json_inputs
from trtllm_peft.server.triton.tensors import (
    HEADER_LENGTH,
    Tensor,
    TritonProtocolError,
    decode_request,
    encode_response,
    to_json_value,
)

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
    return [{"name": n, "version": VERSION, "state": "READY"} for n in model_names(_rt(request))]


# ---- models ----------------------------------------------------------------------------------------------


@_routes("GET", "/ready")
async def model_ready(request: Request, model: str, version: str | None = None):
    resolve(_rt(request), model, version)
    return Response(status_code=200)


@_routes("POST", "/infer")
async def infer(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    v2 = resolve(rt, model, version)
    header, inputs = decode_request(
        await request.body(), request.headers, rt.settings.max_triton_request_bytes
    )
    inference = await _start(request, rt, v2, inputs)
    reply = await inference.collect()
    outputs = _select(v2, inference, reply, _requested(header))
    binary = _binary_outputs(header, outputs)
    body_header = {"model_name": model, "model_version": VERSION}
    if "id" in header:
        body_header["id"] = header["id"]
    body, header_len = encode_response(body_header, outputs, binary)
    if header_len is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})


@_routes("POST", "/generate")
async def generate(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    v2 = resolve(rt, model, version)
    inference = await _start(request, rt, v2, _json_body_inputs(v2, await request.body()))
    reply = await inference.collect()
    fields = _generate_fields(_select(v2, inference, reply, None))
    return {"model_name": model, "model_version": VERSION, **fields}


@_routes("POST", "/generate_stream")
async def generate_stream(request: Request, model: str, version: str | None = None):
    rt = _rt(request)
    v2 = resolve(rt, model, version)
    inference = await _start(request, rt, v2, _json_body_inputs(v2, await request.body()))
    return StreamingResponse(
        _events(v2, inference),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@_routes("GET", "/config")
async def config(request: Request, model: str, version: str | None = None):
    """Triton's model configuration extension: the ModelConfig message as JSON (proto field names)."""
    return model_config_json(resolve(_rt(request), model, version))


@_routes("GET", "")
async def metadata(request: Request, model: str, version: str | None = None):
    return resolve(_rt(request), model, version).metadata()


# ---- request → inference → outputs -----------------------------------------------------------------------


async def _start(request: Request, rt: Runtime, v2: V2Model, inputs: dict[str, Tensor]) -> Inference:
    inference = Inference(rt, lora_tasks(request.app.state, rt), v2, inputs)
    await inference.start()
    return inference


def _json_body_inputs(v2: V2Model, raw: bytes) -> dict[str, Tensor]:
    body = parse_json(raw or b"{}")
    if not isinstance(body, dict):
        raise TritonProtocolError("the generate request must be a JSON object")
    body.pop("id", None)
    return json_inputs(v2.name, body, v2.inputs)


def _requested(header: dict[str, Any]) -> list[str] | None:
    outs = header.get("outputs")
    return [str(o.get("name")) for o in outs] if outs else None


def _select(v2: V2Model, inference: Inference, reply: Reply, requested: list[str] | None) -> list[Tensor]:
    req = inference.request
    names = requested or default_outputs(v2.kind, req, list(reply.tensors))
    return select(v2.name, reply.tensors, names, {io.name for io in v2.outputs})


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


async def _events(v2: V2Model, inference: Inference) -> AsyncIterator[bytes]:
    """One SSE event per response (per step when `stream` is set); an error after the start is an
    `error` event, as on Triton."""
    try:
        async for reply in inference.stream():
            fields = _generate_fields(_select(v2, inference, reply, None))
            yield _sse({"model_name": v2.name, "model_version": VERSION, **fields})
    except TrtllmPeftError as e:
        yield _sse({"error": str(e)})


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


__all__ = ["router"]
