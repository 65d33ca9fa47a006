"""KServe v2 over gRPC (Triton's GRPCInferenceService, port 8001 by default) in the server's own event loop.

Built on grpcio's asyncio server with the service stubs tritonclient[grpc] ships (service_pb2_grpc): no
protobufs of our own. Same models, inputs, outputs and error texts as the HTTP routes (models.py);
errors are gRPC statuses mapped from the HTTP ones (400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 / 503
UNAVAILABLE, 501 UNIMPLEMENTED, else INTERNAL). ModelStreamInfer handles many requests on one stream
concurrently; a decoupled model sends tensorrtllm_backend's responses (one per step when streaming), each
with the `triton_final_response` parameter, true on the last one; an error is an in-stream
`error_message`, and the stream stays open, as on Triton.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from trtllm_peft import __version__
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.triton.config import model_config
from trtllm_peft.server.triton.grpc_codec import infer_response, request_inputs, requested_outputs
from trtllm_peft.server.triton.models import Inference, V2Model, lora_tasks, model_names, resolve
from trtllm_peft.server.triton.outputs import default_outputs, select
from trtllm_peft.server.triton.schemas import VERSION

log = logging.getLogger(__name__)

EXTENSIONS = ["model_repository", "model_configuration"]
MAX_STREAM_REQUESTS = 64  # in flight on one ModelStreamInfer stream
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.UNAVAILABLE,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class NotReadyError(TrtllmPeftError):
    http_status = 503


def _status(handler):
    """Unary handlers: our errors become the matching gRPC status; anything else INTERNAL, logged."""

    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except TrtllmPeftError as e:
            await context.abort(_CODES.get(e.http_status, grpc.StatusCode.INTERNAL), str(e))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("gRPC %s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    return wrapped


class TritonService(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 services on the HTTP app's state (its `runtime`, and the LoRA task table both share)."""

    def __init__(self, state: Any):
        self.state = state

    def _rt(self) -> Runtime:
        rt = getattr(self.state, "runtime", None)
        if rt is None:
            raise NotReadyError("Server not ready")
        return rt

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        drain = getattr(self.state, "drain", None)
        draining = drain is not None and drain.draining  # SIGTERM: not ready, as /v1/health/ready
        return pb.ServerReadyResponse(ready=getattr(self.state, "runtime", None) is not None and not draining)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="trtllm-peft", version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        try:
            resolve(self._rt(), request.name, request.version)
        except TrtllmPeftError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_status
    async def ModelMetadata(self, request, context):
        meta = resolve(self._rt(), request.name, request.version).metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    @_status
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=model_config(resolve(self._rt(), request.name, request.version)))

    @_status
    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex
        names = model_names(self._rt())
        return pb.RepositoryIndexResponse(
            models=[index(name=n, version=VERSION, state="READY") for n in names]
        )

    @_status
    async def ModelInfer(self, request, context):
        model, inference = await self._start(request)
        reply = await inference.collect()
        return infer_response(request, _select(model, inference, reply.tensors, request))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests are served concurrently as they arrive; the call ends once the client closed its side
        and every request was answered (tritonclient's stop_stream)."""
        out: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_STREAM_REQUESTS)
        reader = asyncio.create_task(self._read_stream(request_iterator, out, slots))
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_stream(self, requests, out: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(self._stream_one(request, out))
                task.add_done_callback(lambda _: slots.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await out.put(None)

    async def _stream_one(self, request: pb.ModelInferRequest, out: asyncio.Queue) -> None:
        """One request of a stream: its responses, or its error, onto `out`."""
        try:
            model, inference = await self._start(request)
            async for reply in inference.stream():
                params = {"triton_final_response": reply.final} if model.decoupled else None
                tensors = _select(model, inference, reply.tensors, request)
                await out.put(
                    pb.ModelStreamInferResponse(infer_response=infer_response(request, tensors, params))
                )
        except TrtllmPeftError as e:
            await out.put(_stream_error(request, str(e)))
        except Exception:
            log.exception("gRPC stream request failed")
            await out.put(_stream_error(request, "internal server error"))

    async def _start(self, request: pb.ModelInferRequest) -> tuple[V2Model, Inference]:
        rt = self._rt()
        model = resolve(rt, request.model_name, request.model_version)
        inference = Inference(rt, lora_tasks(self.state, rt), model, request_inputs(request))
        await inference.start()
        return model, inference


def _select(model: V2Model, inference: Inference, tensors, request: pb.ModelInferRequest):
    names = requested_outputs(request) or default_outputs(model.kind, inference.request, list(tensors))
    return select(model.name, tensors, names, {io.name for io in model.outputs})


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


async def start_grpc(state: Any, host: str, port: int, max_message_bytes: int) -> grpc.aio.Server:
    """Serve on host:port in the running loop; raises (startup fails) when the port cannot be bound.

    SO_REUSEPORT is off so that a second server on the same port fails instead of sharing it; a request
    message is bounded as an HTTP infer body is (TRTLLM_PEFT_MAX_TRITON_REQUEST_BYTES: LoRA weights
    travel in-band)."""
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(TritonService(state), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot serve gRPC on {address}: {e}") from None
    if not bound:
        raise OSError(f"cannot serve gRPC on {address}: port in use")
    await server.start()
    log.info("gRPC (KServe v2) on %s", address)
    return server
