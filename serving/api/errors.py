"""Errors in TGI's wire shape: ``{"error": ..., "error_type": ...}`` with the status each error class carries.

The engine's messages are bare; ``error_message`` adds the prefixes of TGI's ``InferError`` so clients that match
on TGI's wording (``huggingface_hub``, ``text-generation``) keep working.
"""

from __future__ import annotations

from typing import Mapping, Optional

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.schemas import ErrorResponse
from serving.types import (
    AdapterError,
    FloraServeError,
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    ValidationError,
)


class ApiError(FloraServeError):
    """An HTTP-layer error with its own status (auth, not found, batch size...)."""

    def __init__(self, message: str, status_code: int, error_type: str, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.headers = headers


_PREFIXES = {ValidationError: "Input validation error: ", GenerationError: "Request failed during generation: "}


def error_message(exc: FloraServeError) -> str:
    """TGI's wording: its ``InferError`` wraps every cause with a fixed prefix (adapter errors go out as they are)."""
    text = str(exc)
    if isinstance(exc, OverloadedError):
        return "Model is overloaded"
    if isinstance(exc, IncompleteGenerationError):
        return "Incomplete generation"
    if isinstance(exc, AdapterError):
        return text
    for cls, head in _PREFIXES.items():
        if isinstance(exc, cls) and not text.startswith(head):
            return head + text
    return text


def failure_label(exc: FloraServeError) -> str:
    """The ``err`` label of ``tgi_request_failure``, as TGI spells it."""
    if isinstance(exc, ValidationError):  # AdapterError included
        return "validation"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, IncompleteGenerationError):
        return "incomplete"
    return "generation"


def error_payload(exc: FloraServeError) -> ErrorResponse:
    """The body of an error response, or of the last event of a stream that failed."""
    return ErrorResponse(error=utf8_safe(error_message(exc)), error_type=exc.error_type)


def utf8_safe(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON escapes, not in UTF-8) replaced: an error message that echoes
    a client's ``\\ud800`` must still be sendable, or the error itself becomes a 500."""
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(exc: FloraServeError) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    return JSONResponse(error_payload(exc).model_dump(), status_code=exc.status_code, headers=headers)


def request_error_response(exc: RequestValidationError) -> JSONResponse:
    """Body errors in TGI's shape; malformed JSON is a 400 as in axum, a wrong field a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(ApiError("Failed to parse the request body as JSON", 400, "validation"))
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    message = "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)
    return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)


def http_error_response(status_code: int, detail: object, headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the same shape, with their headers (405's Allow)."""
    kind = "not_found" if status_code == 404 else "http"
    return JSONResponse({"error": str(detail), "error_type": kind}, status_code=status_code, headers=headers)
