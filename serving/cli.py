"""``flora-serve``: parse TGI-style flags, build the engine, serve the HTTP API with uvicorn.

The engine comes from ``serving.engine.build_engine(settings)``; ``FLORA_ENGINE_FACTORY=module:function`` swaps in
another factory (the tests use a fake engine, other backends can plug in the same way).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from serving.settings import ServerSettings, parse_args

logger = logging.getLogger("serving")


def load_engine_factory(spec: Optional[str] = None) -> Callable[[ServerSettings], Any]:
    """``module:function``; imported lazily so ``--help`` works without torch or a model."""
    spec = spec or os.environ.get("FLORA_ENGINE_FACTORY") or "serving.engine:build_engine"
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

    engine = load_engine_factory()(settings)
    app = create_app(engine, settings)
    logger.info("serving %s on %s:%d", settings.model_id, settings.hostname, settings.port)
    uvicorn.run(
        app,
        host=settings.hostname,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=max(int(settings.graceful_shutdown_timeout), 1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
