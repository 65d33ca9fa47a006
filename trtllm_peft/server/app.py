"""The FastAPI application: routes, error mapping (the one place errors meet HTTP), lifespan."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from trtllm_peft import __version__
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.drain import Drain, DrainMiddleware
from trtllm_peft.server.edge import EdgeMiddleware
from trtllm_peft.server.http_errors import error_response
from trtllm_peft.server.limits import BodyLimitMiddleware, Limits
from trtllm_peft.server.openai_routes import router as openai_router
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.triton.grpc_service import start_grpc
from trtllm_peft.server.triton.routes import router as triton_router
from trtllm_peft.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, executor_factory, host: str = "0.0.0.0") -> FastAPI:
    """The server for `settings`; `executor_factory(settings, engine_dir) -> Executor` picks the backend.

    The KServe v2 gRPC service (settings.grpc_port, 0 = off) runs in the same event loop, on `host`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runtime = None
        grpc_server = None
        if settings.grpc_port:
            grpc_server = await start_grpc(
                app.state, host, settings.grpc_port, settings.max_triton_request_bytes
            )
        try:
            app.state.runtime = await Runtime.start(settings, executor_factory)
            log.info("ready: http://0.0.0.0:%d/v1/models", settings.server_port)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2)
            if app.state.runtime is not None:
                await app.state.runtime.close()

    app = FastAPI(
        title="trtllm-peft",
        version=__version__,
        lifespan=lifespan,
        description="NIM-compatible multi-LoRA server (OpenAI API)",
    )
    app.include_router(openai_router)
    app.include_router(triton_router)
    _add_management_routes(app)
    _add_error_handlers(app)
    app.add_middleware(EdgeMiddleware, api_key=settings.api_key)  # API key, X-Request-Id
    limits = Limits(settings.max_request_bytes, settings.max_triton_request_bytes, settings.read_timeout)
    app.add_middleware(BodyLimitMiddleware, limits=limits)
    app.state.drain = Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)  # outermost: counts every request
    return app


def _add_management_routes(app: FastAPI) -> None:
    @app.get("/v1/health/live")
    async def live():
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready")
    @app.get("/health")  # vLLM's path (probes written for vLLM)
    async def ready(request: Request):
        if getattr(request.app.state, "runtime", None) is None or request.app.state.drain.draining:
            return JSONResponse({"object": "health.response", "message": "not ready"}, status_code=503)
        return {"object": "health.response", "message": "ready"}

    @app.get("/v1/version")
    @app.get("/version")  # vLLM's path; `version` is vLLM's key
    async def version():
        return {"release": __version__, "api": "1.0.0", "version": __version__}

    @app.get("/v1/metrics")
    @app.get("/metrics")  # vLLM's path, scraped by default by the Gateway API Inference Extension
    async def metrics(request: Request):
        rt: Runtime | None = getattr(request.app.state, "runtime", None)
        if rt is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        rt.update_gauges()
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TrtllmPeftError)
    async def known(request: Request, exc: TrtllmPeftError):
        status = exc.http_status
        if status >= 500:
            log.error("request failed: %s", exc)
        return error_response(request.url.path, str(exc), status, getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {str(e.get('msg')).removeprefix('Value error, ')}"
            for e in errors
        )
        return error_response(request.url.path, message or "invalid request", 400, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # FastAPI's own refusals (404 route, 405 method, body it could not read) in the API's shape
        response = error_response(request.url.path, str(exc.detail), exc.status_code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, "internal server error", 500)
