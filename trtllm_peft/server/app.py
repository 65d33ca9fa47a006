"""The FastAPI application: routes, error mapping (the one place errors meet HTTP), lifespan."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from trtllm_peft import __version__
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.openai_routes import router as openai_router
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.schemas import error_body
from trtllm_peft.server.triton.grpc_service import start_grpc
from trtllm_peft.server.triton.routes import router as triton_router
from trtllm_peft.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


def create_app(settings: Settings, executor_factory, host: str = "0.0.0.0") -> FastAPI:
    """The server for `settings`; `executor_factory(settings, engine_dir) -> Executor` picks the backend.

    The KServe v2 gRPC service (settings.grpc_port, 0 = off) runs in the same event loop, on `host`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runtime = None
        grpc_server = None
        if settings.grpc_port:
            grpc_server = await start_grpc(app.state, host, settings.grpc_port)
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
    return app


def _add_management_routes(app: FastAPI) -> None:
    @app.get("/v1/health/live")
    async def live():
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready")
    async def ready(request: Request):
        if getattr(request.app.state, "runtime", None) is None:
            return JSONResponse({"object": "health.response", "message": "not ready"}, status_code=503)
        return {"object": "health.response", "message": "ready"}

    @app.get("/v1/version")
    async def version():
        return {"release": __version__, "api": "1.0.0"}

    @app.get("/v1/metrics")
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
        headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else None
        if status >= 500:
            log.error("request failed: %s", exc)
        return JSONResponse(error_body(str(exc), status), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errors
        )
        return JSONResponse(error_body(message or "invalid request", 400, param), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", 500), status_code=500)
