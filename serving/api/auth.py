"""Bearer-token checks: TGI's ``--api-key`` on the generation routes, the admin token on the admin routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from serving.api.errors import ApiError
from serving.api.state import app_state


def _unauthorized(message: str) -> ApiError:
    return ApiError(message, 401, "unauthorized", {"www-authenticate": "Bearer"})


def require_api_key(request: Request) -> None:
    """TGI's ``--api-key``: a bearer token on the generation routes (compared case-insensitively, as TGI)."""
    key = app_state(request).settings.api_key
    if key and request.headers.get("authorization", "").lower() != f"bearer {key}".lower():
        raise _unauthorized("Unauthorized")


def require_admin(request: Request) -> None:
    """The admin token (``FLORA_ADMIN_TOKEN``), compared in constant time; without one the admin API is off."""
    token = app_state(request).settings.admin_token
    if not token:
        raise ApiError("the admin API is disabled: set FLORA_ADMIN_TOKEN to enable it", 403, "forbidden")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise _unauthorized("invalid or missing admin token")
