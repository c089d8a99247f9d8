"""Driving ``engine.generate``: open a request, read its steps, run several sequences (``best_of``, ``n``) at once,
and turn a stream's steps into event payloads (``step_events``; :mod:`serving.api.sse` frames them).

Shared by the TGI and OpenAI routes. Every iterator is closed on the way out, so the engine frees the batch row
of a request whose client went away; failures come out as ``FloraServeError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from serving.api.errors import error_payload
from serving.types import (
    Engine,
    FloraServeError,
    GenerationError,
    GenerationRequest,
    IncompleteGenerationError,
    StepOutput,
    TokenInfo,
)

logger = logging.getLogger(__name__)

Opened = tuple[StepOutput, AsyncIterator[StepOutput]]  # a request's first step and the iterator of the rest


async def aclose(iterator: Any) -> None:
    """Close an engine iterator so the engine frees its batch row; shielded so a cancelled caller still does it."""
    close = getattr(iterator, "aclose", None)
    if close is None:
        return
    task = asyncio.ensure_future(close())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.gather(task, return_exceptions=True)
        raise
    except Exception:  # the request is over either way; the engine logs its own failures
        logger.exception("closing an engine iterator failed")


async def cancel_all(tasks: list[asyncio.Future]) -> None:
    """Cancel tasks and wait until they have all ended (their own errors are theirs to log)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def as_serve_error(exc: Exception) -> FloraServeError:
    if isinstance(exc, FloraServeError):
        return exc
    logger.exception("engine failure", exc_info=exc)
    return GenerationError(str(exc) or type(exc).__name__)


async def open_stream(engine: Engine, request: GenerationRequest) -> Opened:
    """Start a request and wait for its first token, so errors before it still get an HTTP status."""
    iterator: Any = None
    try:
        iterator = engine.generate(request).__aiter__()
        first = await iterator.__anext__()
    except StopAsyncIteration:
        await aclose(iterator)
        raise IncompleteGenerationError("Incomplete generation") from None
    except BaseException as exc:
        await aclose(iterator)
        if isinstance(exc, Exception):
            raise as_serve_error(exc) from exc
        raise
    return first, iterator


async def open_all(engine: Engine, requests: list[GenerationRequest]) -> list[Opened]:
    """Open every sequence of a request; if one fails, close the others and raise the first failure."""
    results = await asyncio.gather(*(open_stream(engine, r) for r in requests), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for result in results:
            if not isinstance(result, BaseException):
                await aclose(result[1])
        raise errors[0]
    return list(results)  # type: ignore[arg-type]


async def next_step(iterator: AsyncIterator[StepOutput]) -> StepOutput:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        raise IncompleteGenerationError("Incomplete generation") from None
    except FloraServeError:
        raise
    except Exception as exc:
        raise as_serve_error(exc) from exc


async def sequence_steps(
    first: StepOutput, iterator: AsyncIterator[StepOutput]
) -> AsyncIterator[tuple[int, StepOutput]]:
    """One sequence's steps up to the finished one, as ``(0, step)`` like ``merge_streams``; closes the iterator."""
    step = first
    try:
        yield 0, step
        while not step.finished:
            step = await next_step(iterator)
            yield 0, step
    finally:
        await aclose(iterator)


async def merge_streams(opened: list[Opened]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Interleave the token streams of several sequences as ``(choice index, step)``; closes all on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: StepOutput, iterator: AsyncIterator[StepOutput]) -> None:
        try:  # not `sequence_steps`: the end or error is queued before the iterator closes, as other pumps run on
            step = first
            queue.put_nowait((index, step, None))
            while not step.finished:
                step = await next_step(iterator)
                queue.put_nowait((index, step, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:
            queue.put_nowait((index, None, as_serve_error(exc)))
        finally:
            await aclose(iterator)

    tasks = [asyncio.ensure_future(pump(i, first, it)) for i, (first, it) in enumerate(opened)]
    running = len(tasks)
    try:
        while running:
            index, step, error = await queue.get()
            if error is not None:
                raise error
            if step is None:
                running -= 1
            else:
                yield index, step
    finally:
        await cancel_all(tasks)
        for _, iterator in opened:  # a pump cancelled before it ran never closed its iterator
            await aclose(iterator)


@dataclass
class Generation:
    """One sequence as it comes in, with the times the HTTP headers and metrics report."""

    request: GenerationRequest
    final: StepOutput
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    first_token: float = 0.0
    finished: float = 0.0

    @classmethod
    def begin(cls, request: GenerationRequest, first: StepOutput) -> Generation:
        """A sequence whose first step just arrived (``add`` it next)."""
        return cls(
            request=request, final=first, prefill=list(first.prefill_tokens or []), first_token=time.monotonic()
        )

    def add(self, step: StepOutput) -> bool:
        """Record one step; True when it is the last one."""
        self.tokens.append(step.token)
        self.top_tokens.append(list(step.top_tokens))
        if step.finished:
            self.final, self.finished = step, time.monotonic()
        return step.finished

    @property
    def generated_tokens(self) -> int:
        return self.final.generated_tokens or len(self.tokens)

    @property
    def text(self) -> str:
        if self.final.generated_text is not None:
            return self.final.generated_text
        return "".join(t.text for t in self.tokens if not t.special)

    def mean_logprob(self) -> float:
        return sum(t.logprob or 0.0 for t in self.tokens) / max(len(self.tokens), 1)


def finish_reason(step: StepOutput) -> str:
    """TGI's finish reason; a step that ended without one reads ``length``."""
    return step.finish_reason or "length"


Render = Callable[[int, StepOutput, Generation], Any]  # (choice index, step, its sequence so far) -> event payload


async def step_events(
    started: list[tuple[GenerationRequest, StepOutput]],
    steps: AsyncIterator[tuple[int, StepOutput]],
    render: Render,
    *,
    succeeded: Callable[[Generation], None],
    failed: Callable[[FloraServeError], None],
) -> AsyncIterator[Any]:
    """The event loop of every stream: one event payload per step, ``succeeded`` called when the last sequence
    finishes.

    ``started`` holds each sequence's request and first step, ``steps`` yields ``(sequence index, step)`` from that
    first step on. An error after the first byte is reported to ``failed`` and ends the stream with TGI's
    ``{"error", "error_type"}`` payload. :class:`serving.api.sse.EventStream` frames the payloads.
    """
    gens = [Generation.begin(request, first) for request, first in started]
    remaining = len(gens)
    try:
        async for index, step in steps:
            gen = gens[index]
            if gen.add(step):
                remaining -= 1
                if not remaining:
                    succeeded(gen)
            yield render(index, step, gen)
    except FloraServeError as exc:
        failed(exc)
        yield error_payload(exc)
    finally:
        await aclose(steps)


async def collect(engine: Engine, request: GenerationRequest) -> Generation:
    """Run one sequence to its end."""
    step, iterator = await open_stream(engine, request)
    result = Generation.begin(request, step)
    try:
        while not result.add(step):
            step = await next_step(iterator)
        return result
    finally:
        await aclose(iterator)


async def collect_all(engine: Engine, requests: list[GenerationRequest]) -> list[Generation]:
    """Run sequences concurrently (``best_of``, ``n``); the first failure cancels the others."""
    tasks = [asyncio.ensure_future(collect(engine, r)) for r in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await cancel_all(tasks)
