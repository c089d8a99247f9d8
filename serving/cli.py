"""``flora-serve``: parse TGI-style flags, build the engine, serve the HTTP API with uvicorn.

The engine comes from ``serving.engine.build_engine(settings)``; ``FLORA_ENGINE_FACTORY=module:function`` swaps in
another factory (the tests use a fake engine, other backends can plug in the same way).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from serving.settings import ServerSettings, parse_args

logger = logging.getLogger("serving")


ENGINE_FACTORIES = {"native": "serving.engine:build_engine", "vllm": "serving.vllm_engine:build_vllm_engine"}


def load_engine_factory(spec: Optional[str] = None, engine: str = "native") -> Callable[[ServerSettings], Any]:
    """``module:function`` (default: the one for ``--engine``); imported lazily so ``--help`` works without torch
    or a model."""
    spec = spec or os.environ.get("FLORA_ENGINE_FACTORY") or ENGINE_FACTORIES[engine]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"FLORA_ENGINE_FACTORY must look like `module:function`, not {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    settings = parse_args(argv)
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from serving.api import create_app

    engine = load_engine_factory(engine=settings.engine)(settings)
    app = create_app(engine, settings)
    logger.info("serving %s on %s:%d", settings.model_id, settings.hostname, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.hostname,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # longer than the engine's grace, so the requests it fails at the end still get their error answers
        timeout_graceful_shutdown=int(settings.graceful_shutdown_timeout) + SHUTDOWN_MARGIN_S,
    )
    draining_server_class()(config, app.state.flora).run()
    return 0


SHUTDOWN_MARGIN_S = 5


def draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, starting the engine's graceful shutdown at the signal itself. uvicorn alone would
        wait for connections and then cut them (a plain-text 500, a stream with no error event) before the app's
        lifespan told the engine anything."""

        def __init__(self, config: Any, state: Any) -> None:
            super().__init__(config)
            self._state = state

        def handle_exit(self, sig: int, frame: Any) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._state.drain()))
            super().handle_exit(sig, frame)

    return DrainingServer


if __name__ == "__main__":
    sys.exit(main())
