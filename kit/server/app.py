"""The OpenAI-compatible HTTP app: `create_app(llm, ServerConfig(...))` -> a FastAPI app.

    POST /v1/completions       POST /v1/chat/completions      (stream=true: server-sent events)
    GET  /v1/models            GET  /health                   GET /metrics (Prometheus text)

Every error is OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`):
400 bad JSON or parameters (pydantic's message for a wrong type, the kit's own for a
wrong value), 401 a missing or wrong API key, 404 an unknown model or route, 413 a body
over `max_body_bytes`, 503 a full queue or an engine that is shutting down.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kit.llm import LLM
from kit.server.engine_client import EngineClient
from kit.server.metrics import ServerMetrics
from kit.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, model_card
from kit.server.serving import APIError, OpenAIServing

__all__ = ["ServerConfig", "create_app"]


@dataclass(frozen=True)
class ServerConfig:
    """How the app answers: the served model name, the key, the queue and body limits."""

    model_name: str
    api_key: str | None = None
    max_queue: int = 256  # requests that may wait beyond a full batch before 503
    max_body_bytes: int = 4 * 2**20
    shutdown_engine: bool = True  # shut the LLM down with the app (False: the caller owns it)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"ServerConfig.model_name must be a non-empty str, got {self.model_name!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("ServerConfig.api_key must be None or a non-empty str")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"ServerConfig.max_queue must be an int >= 0, got {self.max_queue!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"ServerConfig.max_body_bytes must be an int >= 1024, got {self.max_body_bytes!r}")


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """pydantic's errors -> one line naming each bad field (first error per field) and its value."""
    seen: dict[str, str] = {}
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        field = loc[0] if loc else "body"
        if field not in seen:
            value = repr(err.get("input"))
            value = value if len(value) <= 60 else value[:57] + "..."
            seen[field] = f"{'.'.join(loc) or 'body'}: {err['msg']} (got {value})"
    return "; ".join(seen.values()), next(iter(seen), None)


async def _read_body(request: Request, model: type[BaseModel], limit: int) -> Any:
    """Read at most `limit` bytes of JSON and validate it as `model`; 413 / 400 otherwise."""
    declared = request.headers.get("content-length")
    body, size = bytearray(), 0
    async for piece in request.stream():  # NOTE: drained in full, so the client can read our answer
        size += len(piece)
        if size <= limit:
            body += piece
    if size > limit or (declared and declared.isdigit() and int(declared) > limit):
        raise APIError(413, f"request body is {size} bytes, over this server's limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param=param) from None


def create_app(llm: LLM | EngineClient, config: ServerConfig) -> FastAPI:
    """An app serving `llm` (an `LLM` in this process, or an `EngineClient` such as the
    `ProcessEngineClient` of an engine process) under `config.model_name`; `app.state.serving`
    holds its state."""
    engine = llm if isinstance(llm, EngineClient) else EngineClient(llm)
    metrics = ServerMetrics(engine, config.model_name)
    serving = OpenAIServing(engine, metrics, config.model_name, config.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if config.shutdown_engine:  # NOTE: after uvicorn has drained the in-flight requests
            engine.shutdown()

    app = FastAPI(title="kit", summary="OpenAI-compatible server for a kit LLM", lifespan=lifespan)
    app.state.serving, app.state.metrics, app.state.engine = serving, metrics, engine

    def error(status: int, body: dict[str, Any]) -> JSONResponse:
        metrics.rejected.labels(str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error(e.status, e.body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(e.status_code, error_body(f"{request.method} {request.url.path}: {e.detail}", kind,
                                               code=e.status_code))

    async def check_key(request: Request) -> None:
        # NOTE: a dependency, not a middleware: BaseHTTPMiddleware would sit between a stream and its disconnect
        if config.api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        lim = engine.limits
        return {"object": "list", "data": [model_card(config.model_name, lim.max_seq_len, lim.vocab_size, created)]}

    async def _generate(request: Request, schema: Any, start: Any, body: Any):
        arrival = time.monotonic()
        req = await _read_body(request, schema, config.max_body_bytes)
        runs = start(req)
        if req.stream:
            return StreamingResponse(serving.stream(req, runs, arrival), media_type="text/event-stream")
        outs = await serving.collect(runs, arrival, request.is_disconnected)
        return body(req, runs, outs)

    @v1.post("/completions")
    async def completions(request: Request):
        return await _generate(request, CompletionRequest, serving.start_completion, serving.completion_body)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, ChatCompletionRequest, serving.start_chat, serving.chat_body)

    app.include_router(v1)
    return app
