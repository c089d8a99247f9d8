"""``create_app``: the FastAPI app of ``flora-serve`` (TGI's routes and wire format, OpenAI and admin routes).

Behaviour follows TGI's router (``router/src/server.rs``) except where noted:

- Errors known before the first byte of a stream (validation, 429, unknown adapter, a failing prefill) get a real
  HTTP status and a JSON body; TGI answers 200 and sends them as the first SSE event. Every client handles both,
  and a status code is what load balancers and retries look at. Errors after the stream started are a final
  ``data:{"error": ..., "error_type": ...}`` event, as in TGI.
- An unknown ``adapter_id`` is a 422 naming it and the loaded adapters (TGI silently uses the base model).
- OpenAI routes: ``model`` names the adapter; ``top_p == 1.0`` means "off" (TGI answers 422); ``n`` > 1 is
  served (TGI ignores it); fields it cannot honour (``presence_penalty``, ``logit_bias``, completion
  ``logprobs``; ``suffix`` as TGI) are refused with a 422, never silently ignored.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api import admin_routes, openai_routes, tgi_routes
from serving.api.errors import ApiError, error_response, http_error_response, request_error_response
from serving.api.state import VERSION, AppContext
from serving.settings import ServerSettings
from serving.types import Engine, FloraServeError


class PayloadLimit:
    """TGI's ``--payload-limit`` on the bytes actually read: a declared ``Content-Length`` over the limit is refused
    before reading, and a body without one (``Transfer-Encoding: chunked``) is counted as it arrives and refused
    the moment it passes the limit. The body read is handed on to the app unchanged."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> ASGIApp:
        return error_response(ApiError(f"Payload too large (limit {self.limit} bytes)", 413, "payload_too_large"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large()(scope, receive, send)
            return
        body: list[Message] = []
        size = 0
        while True:  # the body is read here anyway (the routes parse it whole), so buffering adds no memory
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large()(scope, receive, send)
                return
            body.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(body)

        async def receive_body_then_events() -> Message:
            message = next(replay, None)
            return message if message is not None else await receive()  # then disconnects, for streams

        await self.app(scope, receive_body_then_events, send)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The ASGI app; ``engine.shutdown`` runs when the server stops (graceful shutdown)."""
    state = AppContext(engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)  # optional: an engine with async start-up work (vLLM's adapters)
        if start is not None:
            await start()
        yield
        await state.drain()

    # no /docs or /redoc: their pages load scripts from a CDN, blank on an offline machine; /openapi.json stays
    app = FastAPI(title="flora-serve", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.flora = state
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origin or ["*"],
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["content-type", "authorization"],
    )
    app.add_middleware(PayloadLimit, limit=settings.payload_limit)

    @app.exception_handler(FloraServeError)
    async def _serve_error(_: Request, exc: FloraServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _body_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return request_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    for routes in (tgi_routes, openai_routes, admin_routes):
        app.include_router(routes.router)
    return app
