"""Admin routes (bearer ``FLORA_ADMIN_TOKEN``): list, hot-load and unload adapters.

Hot-loading reads only folders under the configured adapter roots (``FLORA_ADAPTER_ROOTS``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from serving.adapters.store import check_adapter_name, resolve_folder
from serving.api.auth import require_admin
from serving.api.errors import ApiError
from serving.api.openapi_docs import errors
from serving.api.state import State
from serving.schemas import AdapterList, AdapterLoadRequest
from serving.settings import ServerSettings
from serving.types import AdapterError

router = APIRouter()
_admin = [Depends(require_admin)]


def allowed_adapter_path(settings: ServerSettings, path: str) -> str:
    """The resolved folder, if it lies under one of the adapter roots (symlinks resolved first)."""
    if not settings.adapter_roots:
        raise AdapterError("hot-loading is disabled: no adapter roots are configured (FLORA_ADAPTER_ROOTS)")
    resolved = resolve_folder(path)
    for root in settings.adapter_roots:
        if resolved.is_relative_to(resolve_folder(root)):
            return str(resolved)
    roots = ", ".join(settings.adapter_roots)
    raise AdapterError(f"adapter path `{path}` is outside the allowed adapter roots ({roots})")


@router.get("/admin/adapters", dependencies=_admin, response_model=AdapterList, responses=errors(401, 404))
async def list_adapters(state: State) -> Response:
    names = sorted(state.engine.adapter_names())
    return JSONResponse(
        AdapterList(adapters=names, max_loaded_adapters=state.settings.max_loaded_adapters).model_dump()
    )


@router.post("/admin/adapters", dependencies=_admin, status_code=201, responses=errors(400, 401, 404, 413, 422))
async def load_adapter(body: AdapterLoadRequest, state: State) -> Response:
    check_adapter_name(body.name)
    if body.name in ("tgi", state.model_id):
        raise AdapterError(f"`{body.name}` names the base model and cannot be an adapter name")
    path = allowed_adapter_path(state.settings, body.path)
    await state.engine.load_adapter(body.name, path)
    names = sorted(state.engine.adapter_names())
    return JSONResponse({"name": body.name, "path": path, "adapters": names}, status_code=201)


@router.delete("/admin/adapters/{name:path}", dependencies=_admin, responses=errors(401, 404, 422))
async def unload_adapter(name: str, state: State) -> Response:
    if name not in state.engine.adapter_names():
        raise ApiError(f"adapter `{name}` is not loaded", 404, "not_found")
    await state.engine.unload_adapter(name)
    return JSONResponse({"name": name, "adapters": sorted(state.engine.adapter_names())})
