"""What each route answers, for ``/openapi.json``: every status it can return, with TGI's error body, and the
content types it really sends (JSON, server-sent events, Prometheus text, or no body at all).

FastAPI documents only a route's 200 JSON answer by itself; clients and schema fuzzers read this document, so it
must list the error statuses (400 malformed JSON, 401 auth, 404, 413 payload, 422 validation, 424 generation,
429 overloaded) and the event streams too.
"""

from __future__ import annotations

from typing import Any

from serving.schemas import ErrorResponse

_WHY = {
    400: "the body is not valid JSON",
    401: "missing or wrong bearer token",
    404: "no such adapter or tokenizer",
    413: "the body is larger than --payload-limit",
    422: "input validation error",
    424: "generation failed",
    429: "too many requests in flight (--max-concurrent-requests)",
    503: "the server is shutting down or its engine failed",
}
# each event's data is one JSON chunk (StreamResponse, ChatCompletionChunk, CompletionChunk) or OpenAI's `[DONE]`
_EVENTS = {"text/event-stream": {"schema": {"description": "server-sent events, `data:{...}` lines"}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": _WHY[code]} for code in codes}


GENERATION_ERRORS = errors(400, 401, 413, 422, 424, 429)
JSON_OR_EVENTS = {200: {"description": "the answer, or its token stream when `stream` is true", "content": _EVENTS}}
EVENTS = {200: {"description": "one event per token; the last carries `generated_text`", "content": _EVENTS}}
NO_BODY = {200: {"description": "healthy (empty body)"}}
PROMETHEUS = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}
