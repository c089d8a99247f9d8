"""Run a real app under uvicorn on 127.0.0.1 in a background thread, so tests use real clients over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional

import uvicorn

from serving.api import create_app
from serving.settings import ServerSettings
from tests.serving.fake_engine import MODEL_ID, FakeEngine

TIMEOUT = 10.0  # seconds, for every client call in these tests


def settings(**overrides) -> ServerSettings:
    values = dict(model_id=MODEL_ID, max_input_tokens=256, max_total_tokens=512, keep_alive_interval=15.0)
    values.update(overrides)
    return ServerSettings(**values)


class LiveServer:
    """``with LiveServer(engine, settings) as server: server.url``; the lifespan (and engine.shutdown) runs."""

    def __init__(self, engine: Optional[FakeEngine] = None, server_settings: Optional[ServerSettings] = None) -> None:
        self.engine = engine if engine is not None else FakeEngine(adapters={"perl": "/adapters/perl"})
        self.settings = server_settings or settings()
        self.app = create_app(self.engine, self.settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(TIMEOUT)
        self._sock.close()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
