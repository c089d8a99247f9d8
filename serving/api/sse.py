"""Server-sent events: framing, the keep-alive response, and the loop that turns engine steps into events."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from serving.api.errors import error_payload, failure_label
from serving.api.generation import Generation, aclose, cancel_all
from serving.types import FloraServeError, GenerationRequest, StepOutput

if TYPE_CHECKING:
    from serving.api.state import AppState, Timing

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b":\n\n"
_END = object()


def sse(payload: Any, *, space: bool = False) -> bytes:
    """One server-sent event. TGI (axum ``json_data``) writes ``data:{json}``; the OpenAI routes ``data: {json}``."""
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return (b"data: " if space else b"data:") + body.encode() + b"\n\n"


Render = Callable[[int, StepOutput, Generation], Any]  # (choice index, step, its sequence so far) -> event payload


async def step_events(
    state: AppState,
    timing: Timing,
    started: list[tuple[GenerationRequest, StepOutput]],
    steps: AsyncIterator[tuple[int, StepOutput]],
    render: Render,
    *,
    space: bool = False,
    done: bool = False,
) -> AsyncIterator[bytes]:
    """The event loop of every stream: one event per step, success counted when the last sequence finishes.

    ``started`` holds each sequence's request and first step, ``steps`` yields ``(sequence index, step)`` from that
    first step on. An error after the first byte ends the stream with TGI's ``{"error", "error_type"}`` event;
    ``done`` adds the OpenAI routes' ``[DONE]`` after the last event either way.
    """
    gens = [Generation.begin(request, first) for request, first in started]
    remaining = len(gens)
    try:
        async for index, step in steps:
            gen = gens[index]
            if gen.add(step):
                remaining -= 1
                if not remaining:
                    state.succeeded(timing, gen)
            yield sse(render(index, step, gen), space=space)
    except FloraServeError as exc:
        state.metrics.request_failed(failure_label(exc))
        yield sse(error_payload(exc), space=space)
    finally:
        await aclose(steps)
    if done:
        yield DONE


class EventStream(Response):
    """Server-sent events with TGI's keep-alive comments that stop as soon as the client goes away.

    The producer (our event generator, which holds the engine iterator) runs as its own task; a second task
    watches for ``http.disconnect``. When the client leaves, the producer is cancelled and the event generator
    closes the engine iterator, so the engine frees the row at its next step whatever the ASGI server does.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str], keep_alive: float = 15.0) -> None:
        self.events = events
        self.keep_alive = keep_alive
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
            async for chunk in self.events:
                queue.put_nowait(chunk)
        except Exception:
            logger.exception("event stream failed")
        queue.put_nowait(_END)

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
