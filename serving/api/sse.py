"""Server-sent events: framing (``data:`` lines, ``[DONE]``, keep-alive comments) and the response that sends them."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from serving.api.generation import aclose, cancel_all

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b":\n\n"
_END = object()


def sse(payload: Any, *, space: bool = False) -> bytes:
    """One server-sent event. TGI (axum ``json_data``) writes ``data:{json}``; the OpenAI routes ``data: {json}``."""
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return (b"data: " if space else b"data:") + body.encode() + b"\n\n"


class EventStream(Response):
    """Server-sent events with TGI's keep-alive comments that stop as soon as the client goes away.

    ``events`` yields payloads, each sent as one ``data:`` event (``data: `` with ``space``, as the OpenAI routes);
    ``done`` adds OpenAI's ``[DONE]`` once they have all been sent. The producer (our event generator, which holds
    the engine iterator) runs as its own task; a second task watches for ``http.disconnect``. When the client
    leaves, the producer is cancelled and the event generator closes the engine iterator, so the engine frees the
    row at its next step whatever the ASGI server does.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[Any],
        headers: dict[str, str],
        keep_alive: float = 15.0,
        *,
        space: bool = False,
        done: bool = False,
    ) -> None:
        self.events = events
        self.keep_alive = keep_alive
        self.space = space
        self.done = done
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.ensure_future(self._produce(queue))
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if await self._pump(queue, watcher, send):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were writing
        finally:
            await cancel_all([producer, watcher])
            await aclose(self.events)

    async def _pump(self, queue: asyncio.Queue, watcher: asyncio.Future, send: Send) -> bool:
        """Forward events until the end (True) or a disconnect (False)."""
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {getter, watcher}, timeout=self.keep_alive, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
                if watcher in done:
                    return False
                await send({"type": "http.response.body", "body": KEEP_ALIVE, "more_body": True})
                continue
            chunk = getter.result()
            if chunk is _END:
                return True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _produce(self, queue: asyncio.Queue) -> None:
        try:
            async for payload in self.events:
                queue.put_nowait(sse(payload, space=self.space))
            if self.done:
                queue.put_nowait(DONE)
        except Exception:
            logger.exception("event stream failed")
        queue.put_nowait(_END)

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
