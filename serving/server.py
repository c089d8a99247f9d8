"""The HTTP layer of ``flora-serve``: TGI's routes and wire format, OpenAI-compatible routes, admin routes.

Behaviour follows TGI's router (``router/src/server.rs``) except where noted:

- Errors known before the first byte of a stream (validation, 429, unknown adapter, a failing prefill) get a real
  HTTP status and a JSON body; TGI answers 200 and sends them as the first SSE event. Every client handles both,
  and a status code is what load balancers and retries look at. Errors after the stream started are a final
  ``data:{"error": ..., "error_type": ...}`` event, as in TGI.
- An unknown ``adapter_id`` is a 422 naming it and the loaded adapters (TGI silently uses the base model).
- OpenAI routes: ``model`` names the adapter; ``top_p == 1.0`` means "off" (TGI answers 422); ``n`` > 1 is
  served (TGI ignores it); ``presence_penalty`` is accepted and ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.schemas import (
    AdapterList,
    AdapterLoadRequest,
    BestOfSequence,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionComplete,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    CompatGenerateRequest,
    CompletionChunk,
    CompletionComplete,
    CompletionFinal,
    CompletionRequest,
    Details,
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    LogprobEntry,
    ModelInfo,
    ModelsInfo,
    OutputMessage,
    PrefillToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeResponse,
    TopLogprob,
    Usage,
)
from serving.settings import ServerSettings
from serving.types import (
    AdapterError,
    Engine,
    FloraServeError,
    GenerationError,
    GenerationRequest,
    OverloadedError,
    StepOutput,
    TokenInfo,
    ValidationError,
)
from serving.validation import Validator, fork

logger = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("flora-hf")
    except metadata.PackageNotFoundError:
        return "0.0.0"


VERSION = _version()


# ------------------------------------------------------------------------------------------------------ errors


class IncompleteGenerationError(FloraServeError):
    """The engine's iterator ended without a finished token (TGI's ``IncompleteGeneration``)."""

    status_code = 500
    error_type = "incomplete_generation"


class ApiError(FloraServeError):
    """An HTTP-layer error with its own status (auth, not found, batch size...)."""

    def __init__(self, message: str, status_code: int, error_type: str, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.headers = headers


def error_message(exc: FloraServeError) -> str:
    """TGI's wording: its ``InferError`` wraps every cause with a fixed prefix."""
    text = str(exc)
    if isinstance(exc, OverloadedError):
        return "Model is overloaded"
    if isinstance(exc, IncompleteGenerationError):
        return "Incomplete generation"
    prefix = {ValidationError: "Input validation error: ", GenerationError: "Request failed during generation: "}
    for cls, head in prefix.items():
        if isinstance(exc, cls) and not text.startswith(head):
            return head + text
    return text


def failure_label(exc: FloraServeError) -> str:
    """The ``err`` label of ``tgi_request_failure``, as TGI spells it."""
    if isinstance(exc, (ValidationError, AdapterError)):
        return "validation"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, IncompleteGenerationError):
        return "incomplete"
    return "generation"


def error_body(exc: FloraServeError) -> bytes:
    return ErrorResponse(error=error_message(exc), error_type=exc.error_type).model_dump_json().encode()


def error_response(exc: FloraServeError) -> JSONResponse:
    payload = ErrorResponse(error=error_message(exc), error_type=exc.error_type).model_dump()
    return JSONResponse(payload, status_code=exc.status_code, headers=getattr(exc, "headers", None))


# ------------------------------------------------------------------------------------------- engine iteration


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


def _as_serve_error(exc: Exception) -> FloraServeError:
    if isinstance(exc, FloraServeError):
        return exc
    logger.exception("engine failure", exc_info=exc)
    return GenerationError(str(exc) or type(exc).__name__)


async def open_stream(engine: Engine, request: GenerationRequest) -> tuple[StepOutput, AsyncIterator[StepOutput]]:
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
            raise _as_serve_error(exc) from exc
        raise
    return first, iterator


async def next_step(iterator: AsyncIterator[StepOutput]) -> StepOutput:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        raise IncompleteGenerationError("Incomplete generation") from None
    except FloraServeError:
        raise
    except Exception as exc:
        raise _as_serve_error(exc) from exc


@dataclass
class Generation:
    """One finished sequence, with the times the HTTP headers and metrics report."""

    request: GenerationRequest
    final: StepOutput
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    first_token: float = 0.0
    finished: float = 0.0

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


async def collect(engine: Engine, request: GenerationRequest) -> Generation:
    step, iterator = await open_stream(engine, request)
    result = Generation(request=request, final=step, first_token=time.monotonic())
    result.prefill = list(step.prefill_tokens or [])
    try:
        while True:
            result.tokens.append(step.token)
            result.top_tokens.append(list(step.top_tokens))
            if step.finished:
                result.final, result.finished = step, time.monotonic()
                return result
            step = await next_step(iterator)
    finally:
        await aclose(iterator)


async def collect_all(engine: Engine, requests: list[GenerationRequest]) -> list[Generation]:
    """Run sequences concurrently (``best_of``, ``n``); the first failure cancels the others."""
    tasks = [asyncio.ensure_future(collect(engine, r)) for r in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge_streams(
    opened: list[tuple[StepOutput, AsyncIterator[StepOutput]]],
) -> AsyncIterator[tuple[int, StepOutput]]:
    """Interleave the token streams of several sequences as ``(choice index, step)``; closes all on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: StepOutput, iterator: AsyncIterator[StepOutput]) -> None:
        try:
            step = first
            queue.put_nowait((index, step, None))
            while not step.finished:
                step = await next_step(iterator)
                queue.put_nowait((index, step, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:
            queue.put_nowait((index, None, _as_serve_error(exc)))
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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def open_all(
    engine: Engine, requests: list[GenerationRequest]
) -> list[tuple[StepOutput, AsyncIterator[StepOutput]]]:
    results = await asyncio.gather(*(open_stream(engine, r) for r in requests), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for result in results:
            if not isinstance(result, BaseException):
                await aclose(result[1])
        raise errors[0]
    return list(results)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- SSE


def sse(payload: Any, *, space: bool = False) -> bytes:
    """One server-sent event. TGI (axum ``json_data``) writes ``data:{json}``; the OpenAI routes ``data: {json}``."""
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return (b"data: " if space else b"data:") + body.encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b":\n\n"
_END = object()


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
            producer.cancel()
            watcher.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
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


# ------------------------------------------------------------------------------------------------ app state


@dataclass
class Timing:
    start: float
    validated: float = 0.0


class AppState:
    """What the routes share; one per app so tests can run many apps in one process."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_id = getattr(engine, "model_id", None) or settings.model_id
        max_positions = getattr(engine, "max_position_embeddings", None) or _config_positions(engine)
        self.max_input_tokens, self.max_total_tokens = settings.token_limits(max_positions)
        self.validator = Validator(
            engine.tokenizer,
            self.max_input_tokens,
            self.max_total_tokens,
            adapter_exists=lambda name: name in engine.adapter_names(),
            max_top_n_tokens=settings.max_top_n_tokens,
            max_stop_sequences=settings.max_stop_sequences,
            max_best_of=settings.max_best_of,
            adapter_names=engine.adapter_names,
            model_id=self.model_id,
        )
        self.metrics = ServerMetrics(self.max_input_tokens, self.max_total_tokens, engine.stats)
        self.compute_type = os.environ.get("COMPUTE_TYPE", "gpu+optimized")
        self.docker_label = os.environ.get("DOCKER_LABEL") or None
        self.system_fingerprint = f"{VERSION}-{self.docker_label or 'native'}"
        self.shutting_down = False

    def validate(
        self, inputs: str, params: GenerateParameters, *, add_special_tokens: bool = True
    ) -> GenerationRequest:
        request = self.validator.validate(inputs, params, add_special_tokens=add_special_tokens)
        self.metrics.request_validated(len(request.input_ids), request.stopping.max_new_tokens, request.adapter_id)
        return request

    @contextmanager
    def track_failures(self) -> Iterator[None]:
        try:
            yield
        except FloraServeError as exc:
            self.metrics.request_failed(failure_label(exc))
            raise

    def succeeded(self, timing: Timing, gen: Generation) -> None:
        self.metrics.request_succeeded(
            total=time.monotonic() - timing.start,
            validation=timing.validated - timing.start,
            queue=gen.first_token - timing.validated,
            inference=gen.finished - gen.first_token,
            generated_tokens=gen.generated_tokens,
        )

    def info(self) -> Info:
        model = getattr(self.engine, "model", None)
        dtype = getattr(self.engine, "dtype", None) or getattr(model, "dtype", None) or self.settings.dtype
        device = getattr(self.engine, "device", None) or self.settings.device
        return Info(
            model_id=self.model_id,
            model_dtype=None if dtype is None else str(dtype),
            model_device_type=str(device).split(":")[0],
            max_concurrent_requests=self.settings.max_concurrent_requests,
            max_best_of=self.settings.max_best_of,
            max_stop_sequences=self.settings.max_stop_sequences,
            max_input_tokens=self.max_input_tokens,
            max_input_length=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            max_batch_total_tokens=self.settings.max_batch_total_tokens,
            max_client_batch_size=self.settings.max_client_batch_size,
            version=VERSION,
            docker_label=self.docker_label,
            max_loaded_adapters=self.settings.max_loaded_adapters,
            max_adapter_rank=self.settings.max_adapter_rank,
            adapters=sorted(self.engine.adapter_names()),
        )

    def served_model(self, request: GenerationRequest) -> str:
        return request.adapter_id or self.model_id


def _config_positions(engine: Engine) -> Optional[int]:
    """The context length from ``engine.model.config``, when the engine exposes its model (as LLMEngine does)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) else None


def _state(request: Request) -> AppState:
    return request.app.state.flora


# ---------------------------------------------------------------------------------------- TGI conversions


def _token(t: TokenInfo) -> Token:
    return Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def _prefill(tokens: list[TokenInfo]) -> list[PrefillToken]:
    return [PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in tokens]


def _top_tokens(gen: Generation) -> list[list[Token]]:
    return [[_token(t) for t in step] for step in gen.top_tokens] if gen.request.top_n_tokens > 0 else []


def _finish(step: StepOutput) -> str:
    return step.finish_reason or "length"


def openai_finish(step: StepOutput) -> str:
    """TGI's ``FinishReason::format(true)``: ``eos_token`` reads ``stop`` on the OpenAI routes."""
    return "stop" if step.finish_reason == "eos_token" else _finish(step)


def _full_text(params: GenerateParameters, default: bool) -> bool:
    return default if params.return_full_text is None else params.return_full_text


def timing_headers(state: AppState, timing: Timing, gen: Generation, inputs: str) -> dict[str, str]:
    total = time.monotonic() - timing.start
    inference = gen.finished - gen.first_token
    ms = lambda seconds: str(int(seconds * 1000))  # noqa: E731
    return {
        "x-compute-type": state.compute_type,
        "x-compute-time": str(total),
        "x-compute-characters": str(len(inputs)),
        "x-total-time": ms(total),
        "x-validation-time": ms(timing.validated - timing.start),
        "x-queue-time": ms(gen.first_token - timing.validated),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(inference / max(gen.generated_tokens, 1)),
        "x-prompt-tokens": str(len(gen.request.input_ids)),
        "x-generated-tokens": str(gen.generated_tokens),
    }


async def generate(
    state: AppState, req: GenerateRequest, return_full_text: bool = False
) -> tuple[GenerateResponse, dict[str, str]]:
    """``/generate``: one sequence, or ``best_of`` sampled ones with the best (mean logprob) first."""
    timing = Timing(start=time.monotonic())
    state.metrics.request_started()
    params = req.parameters
    with state.track_failures():
        best_of = params.best_of if params.best_of is not None else 1
        if best_of > 1:
            state.validator.validate_best_of(best_of)
        request = state.validate(req.inputs, params)
        timing.validated = time.monotonic()
        gens = await collect_all(state.engine, [request] + [fork(request) for _ in range(best_of - 1)])
    best = max(range(len(gens)), key=lambda i: (gens[i].mean_logprob(), -i))
    prefix = req.inputs if _full_text(params, return_full_text) else ""
    details = None
    if params.details or params.decoder_input_details:
        details = _details(gens[best], [g for i, g in enumerate(gens) if i != best] if best_of > 1 else None, prefix)
    state.succeeded(timing, gens[best])
    headers = timing_headers(state, timing, gens[best], req.inputs)
    return GenerateResponse(generated_text=prefix + gens[best].text, details=details), headers


def _details(best: Generation, others: Optional[list[Generation]], prefix: str) -> Details:
    """TGI's ``Details``; ``best_of_sequences`` holds the sequences that lost (absent without ``best_of``)."""
    return Details(
        finish_reason=_finish(best.final),
        generated_tokens=best.generated_tokens,
        seed=best.final.seed,
        prefill=_prefill(best.prefill),
        tokens=[_token(t) for t in best.tokens],
        top_tokens=_top_tokens(best),
        best_of_sequences=None
        if others is None
        else [
            BestOfSequence(
                generated_text=prefix + g.text,
                finish_reason=_finish(g.final),
                generated_tokens=g.generated_tokens,
                seed=g.final.seed,
                prefill=_prefill(g.prefill),
                tokens=[_token(t) for t in g.tokens],
                top_tokens=_top_tokens(g),
            )
            for g in others
        ],
    )


async def generate_stream(state: AppState, req: GenerateRequest, return_full_text: bool = False) -> EventStream:
    timing = Timing(start=time.monotonic())
    state.metrics.request_started()
    params = req.parameters
    with state.track_failures():
        state.validator.validate_stream(params)
        request = state.validate(req.inputs, params)
        timing.validated = time.monotonic()
        first, iterator = await open_stream(state.engine, request)
    prefix = req.inputs if _full_text(params, return_full_text) else ""
    events = _tgi_events(state, timing, request, first, iterator, prefix, params.details)
    headers = {"x-compute-type": state.compute_type, "x-compute-characters": str(len(req.inputs))}
    return EventStream(events, headers, keep_alive=state.settings.keep_alive_interval)


async def _tgi_events(
    state: AppState,
    timing: Timing,
    request: GenerationRequest,
    step: StepOutput,
    iterator: AsyncIterator[StepOutput],
    prefix: str,
    details: bool,
) -> AsyncIterator[bytes]:
    gen = Generation(request=request, final=step, first_token=time.monotonic())
    index = 0
    try:
        while True:
            index += 1
            gen.tokens.append(step.token)
            tops = [_token(t) for t in step.top_tokens] if request.top_n_tokens > 0 else []
            if not step.finished:
                yield sse(StreamResponse(index=index, token=_token(step.token), top_tokens=tops))
                step = await next_step(iterator)
                continue
            gen.final, gen.finished = step, time.monotonic()
            stream_details = None
            if details:
                stream_details = StreamDetails(
                    finish_reason=_finish(step),
                    generated_tokens=gen.generated_tokens,
                    seed=step.seed,
                    input_length=len(request.input_ids),
                )
            state.succeeded(timing, gen)
            yield sse(
                StreamResponse(
                    index=index,
                    token=_token(step.token),
                    top_tokens=tops,
                    generated_text=prefix + gen.text,
                    details=stream_details,
                )
            )
            return
    except FloraServeError as exc:
        state.metrics.request_failed(failure_label(exc))
        yield b"data:" + error_body(exc) + b"\n\n"
    finally:
        await aclose(iterator)


# ------------------------------------------------------------------------------------- OpenAI conversions


# `model` values meaning "the base model": TGI's documented "tgi", and "dummy", which huggingface_hub sends when the
# client was built from a URL. The model id and "" are handled by the validator like `adapter_id`.
OPENAI_BASE_MODEL_NAMES = frozenset({"tgi", "dummy"})


def _sampling_from_openai(body: Any, *, top_n_tokens: Optional[int] = None) -> GenerateParameters:
    """TGI's mapping: temperature 0 means greedy, anything else (or nothing) samples; 100 new tokens by default."""
    greedy = body.temperature is not None and body.temperature == 0.0
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    return GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else body.temperature,
        top_p=body.top_p if body.top_p is not None and body.top_p < 1.0 else None,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        max_new_tokens=100 if max_tokens is None else max_tokens,
        stop=body.stop_list(),
        seed=body.seed,
        top_n_tokens=top_n_tokens,
        adapter_id=None if body.model in OPENAI_BASE_MODEL_NAMES else body.model,
    )


def _choices(state: AppState, request: GenerationRequest, n: int) -> list[GenerationRequest]:
    if n > state.settings.max_client_batch_size:
        raise ValidationError(f"`n` must be <= {state.settings.max_client_batch_size}. Given: {n}")
    seed = request.sampling.seed if request.sampling.seed is not None else 0
    return [request] + [fork(request, seed=seed + i) for i in range(1, n)]


def _logprobs(tokens: list[TokenInfo], tops: list[list[TokenInfo]]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            LogprobEntry(
                token=t.text,
                logprob=t.logprob,
                top_logprobs=[TopLogprob(token=x.text, logprob=x.logprob) for x in top],
            )
            for t, top in zip(tokens, tops + [[]] * (len(tokens) - len(tops)))
        ]
    )


def chat_prompt(tokenizer: Any, body: ChatRequest) -> tuple[str, bool]:
    """The prompt and whether to add special tokens: the tokenizer's chat template, or a plain transcript.

    Without a template, messages become ``"{role}: {content}\\n"`` lines followed by ``"assistant:"``; the
    template path does not add special tokens again (the template already has them), as TGI.
    """
    messages = [{"role": m.role, "content": m.flat_text()} for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        except Exception as err:
            raise ApiError(f"Template error: {err}", 422, "template_error") from err
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant:", True


def _reject_unsupported(body: ChatRequest) -> None:
    if body.tools:
        raise ValidationError("`tools` are not supported")
    if body.response_format is not None:
        raise ValidationError("grammar is not supported")


async def chat_completions(state: AppState, body: ChatRequest) -> Response:
    timing = Timing(start=time.monotonic())
    state.metrics.request_started()
    with state.track_failures():
        _reject_unsupported(body)
        prompt, special = chat_prompt(state.engine.tokenizer, body)
        top_n = body.top_logprobs if body.logprobs else None
        request = state.validate(prompt, _sampling_from_openai(body, top_n_tokens=top_n), add_special_tokens=special)
        timing.validated = time.monotonic()
        requests = _choices(state, request, body.n or 1)
        if body.stream:
            opened = await open_all(state.engine, requests)
    model = state.served_model(request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events(state, timing, request, opened, model, bool(body.logprobs), include_usage)
        return EventStream(events, {"x-compute-type": state.compute_type}, state.settings.keep_alive_interval)
    with state.track_failures():
        gens = await collect_all(state.engine, requests)
    state.succeeded(timing, gens[0])  # one HTTP request, one success (as TGI counts a best_of request)
    completion_tokens = sum(g.generated_tokens for g in gens)
    answer = ChatCompletion(
        created=int(time.time()),
        model=model,
        system_fingerprint=state.system_fingerprint,
        choices=[
            ChatCompletionComplete(
                index=i,
                message=OutputMessage(content=g.text),
                logprobs=_logprobs(g.tokens, g.top_tokens) if body.logprobs else None,
                finish_reason=openai_finish(g.final),
            )
            for i, g in enumerate(gens)
        ],
        usage=_usage(len(request.input_ids), completion_tokens),
    )
    return JSONResponse(answer.model_dump(), headers=timing_headers(state, timing, gens[0], prompt))


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def _openai_events(
    state: AppState,
    timing: Timing,
    requests: list[GenerationRequest],
    opened: list[tuple[StepOutput, AsyncIterator[StepOutput]]],
    render: Any,
) -> AsyncIterator[bytes]:
    """Shared loop of the OpenAI streams: ``render(index, step, gen)`` makes each chunk; errors end the stream."""
    gens = [
        Generation(request=r, final=first, first_token=time.monotonic()) for r, (first, _) in zip(requests, opened)
    ]
    remaining = len(gens)
    merged = merge_streams(opened)
    try:
        async for index, step in merged:
            gen = gens[index]
            gen.tokens.append(step.token)
            gen.top_tokens.append(list(step.top_tokens))
            if step.finished:
                gen.final, gen.finished = step, time.monotonic()
                remaining -= 1
                if not remaining:
                    state.succeeded(timing, gen)
            yield sse(render(index, step, gen), space=True)
    except FloraServeError as exc:
        state.metrics.request_failed(failure_label(exc))
        yield b"data: " + error_body(exc) + b"\n\n"
    finally:
        await aclose(merged)  # cancels the pumps first: an iterator cannot be closed while a pump awaits it
        for _, iterator in opened:
            await aclose(iterator)
    yield DONE


def _chat_events(
    state: AppState,
    timing: Timing,
    request: GenerationRequest,
    opened: list[tuple[StepOutput, AsyncIterator[StepOutput]]],
    model: str,
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def render(index: int, step: StepOutput, gen: Generation) -> ChatCompletionChunk:
        usage = None
        if step.finished and include_usage:
            usage = _usage(len(request.input_ids), gen.generated_tokens)
        return ChatCompletionChunk(
            created=created,
            model=model,
            system_fingerprint=state.system_fingerprint,
            choices=[
                ChatCompletionChoice(
                    index=index,
                    delta=ChatDelta(content="" if step.token.special else step.token.text),
                    logprobs=_logprobs([step.token], [list(step.top_tokens)]) if logprobs else None,
                    finish_reason=openai_finish(step) if step.finished else None,
                )
            ],
            usage=usage,
        )

    requests = [request] * len(opened)
    return _openai_events(state, timing, requests, opened, render)


async def completions(state: AppState, body: CompletionRequest) -> Response:
    timing = Timing(start=time.monotonic())
    state.metrics.request_started()
    with state.track_failures():
        if body.suffix is not None:
            raise ApiError(
                "Suffix is not supported and can be achieved by preprocessing the prompt.", 422, "suffix not supported"
            )
        prompts = body.prompts()
        if not prompts:
            raise ValidationError("Empty array detected. Do not use an empty array for the prompt.")
        if len(prompts) > state.settings.max_client_batch_size:
            raise ApiError(
                f"Number of prompts exceeds the maximum allowed batch size of {state.settings.max_client_batch_size}",
                422,
                "batch size exceeded",
            )
        params = _sampling_from_openai(body)
        requests = [r for p in prompts for r in _choices(state, state.validate(p, params), body.n or 1)]
        timing.validated = time.monotonic()
        if body.stream:
            opened = await open_all(state.engine, requests)
    model = state.served_model(requests[0])
    created = int(time.time())
    if body.stream:

        def render(index: int, step: StepOutput, gen: Generation) -> Any:
            text = "" if step.token.special else step.token.text
            choice = CompletionComplete(
                index=index, text=text, finish_reason=openai_finish(step) if step.finished else ""
            )
            fields = {"created": created, "model": model, "system_fingerprint": state.system_fingerprint}
            if step.finished:
                usage = _usage(len(gen.request.input_ids), gen.generated_tokens)
                return CompletionFinal(choices=[choice], usage=usage, **fields)
            return CompletionChunk(choices=[choice], **fields)

        events = _openai_events(state, timing, requests, opened, render)
        return EventStream(events, {"x-compute-type": state.compute_type}, state.settings.keep_alive_interval)
    with state.track_failures():
        gens = await collect_all(state.engine, requests)
    state.succeeded(timing, gens[0])  # one HTTP request, one success (as TGI counts a best_of request)
    prompt_tokens = sum(len(r.input_ids) for r in requests[:: body.n or 1])
    answer = CompletionFinal(
        created=created,
        model=model,
        system_fingerprint=state.system_fingerprint,
        choices=[
            CompletionComplete(
                index=i, text=(g.request.inputs if body.echo else "") + g.text, finish_reason=openai_finish(g.final)
            )
            for i, g in enumerate(gens)
        ],
        usage=_usage(prompt_tokens, sum(g.generated_tokens for g in gens)),
    )
    return JSONResponse(answer.model_dump(), headers=timing_headers(state, timing, gens[0], prompts[0]))


# ----------------------------------------------------------------------------------------------- security


def require_api_key(request: Request) -> None:
    """TGI's ``--api-key``: a bearer token on the generation routes (compared case-insensitively, as TGI)."""
    key = _state(request).settings.api_key
    if key and request.headers.get("authorization", "").lower() != f"bearer {key}".lower():
        raise ApiError("Unauthorized", 401, "unauthorized", {"www-authenticate": "Bearer"})


def require_admin(request: Request) -> None:
    token = _state(request).settings.admin_token
    if not token:
        raise ApiError("the admin API is disabled: set FLORA_ADMIN_TOKEN to enable it", 403, "forbidden")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError("invalid or missing admin token", 401, "unauthorized", {"www-authenticate": "Bearer"})


def allowed_adapter_path(settings: ServerSettings, path: str) -> str:
    """The resolved folder, if it lies under one of the adapter roots (symlinks resolved first)."""
    if not settings.adapter_roots:
        raise AdapterError("hot-loading is disabled: no adapter roots are configured (FLORA_ADAPTER_ROOTS)")
    resolved = Path(path).expanduser().resolve()
    for root in settings.adapter_roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return str(resolved)
    roots = ", ".join(settings.adapter_roots)
    raise AdapterError(f"adapter path `{path}` is outside the allowed adapter roots ({roots})")


class PayloadLimit:
    """TGI's ``--payload-limit``: refuse bodies over the limit before reading them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                exc = ApiError(f"Payload too large (limit {self.limit} bytes)", 413, "payload_too_large")
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------------ app


def _request_error(exc: RequestValidationError) -> JSONResponse:
    """Body errors in TGI's shape; malformed JSON is a 400 as in axum, a wrong field a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        error = ApiError("Failed to parse the request body as JSON", 400, "validation")
        return error_response(error)
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    message = "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)
    return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The ASGI app; ``engine.shutdown`` runs when the server stops (graceful shutdown)."""
    state = AppState(engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.shutting_down = True
        await engine.shutdown(grace_seconds=settings.graceful_shutdown_timeout)

    app = FastAPI(title="flora-serve", version=VERSION, lifespan=lifespan)
    app.state.flora = state
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allow_origin or ["*"],
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["content-type", "authorization"],
    )
    app.add_middleware(PayloadLimit, limit=settings.payload_limit)

    @app.exception_handler(FloraServeError)
    async def _serve_error(_: Request, exc: FloraServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _body_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _request_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "http"
        return JSONResponse({"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code)

    _tgi_routes(app, state)
    _openai_routes(app, state)
    _admin_routes(app, state)
    return app


def _tgi_routes(app: FastAPI, state: AppState) -> None:
    guarded = [Depends(require_api_key)]

    @app.post("/generate", dependencies=guarded)
    async def generate_route(req: GenerateRequest) -> Response:
        answer, headers = await generate(state, req)
        return JSONResponse(answer.model_dump(), headers=headers)

    @app.post("/generate_stream", dependencies=guarded)
    async def generate_stream_route(req: GenerateRequest) -> Response:
        return await generate_stream(state, req)

    @app.post("/", dependencies=guarded)
    async def compat_route(req: CompatGenerateRequest) -> Response:
        """TGI's compat route: ``[GenerateResponse]``, or the token stream when ``stream`` is true."""
        default_full_text = state.settings.compat_return_full_text
        if req.stream:
            return await generate_stream(state, req, return_full_text=default_full_text)
        answer, headers = await generate(state, req, return_full_text=default_full_text)
        return JSONResponse([answer.model_dump()], headers=headers)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize_route(req: GenerateRequest) -> Response:
        tokenizer = state.engine.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ApiError("No fast tokenizer available", 404, "tokenizer")
        encoding = tokenizer(req.inputs, return_offsets_mapping=True)
        tokens = [
            SimpleToken(id=i, text=req.inputs[start:stop], start=start, stop=stop)
            for i, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])
        ]
        return JSONResponse(TokenizeResponse(tokens).model_dump())

    @app.get("/info")
    async def info_route() -> Response:
        return JSONResponse(state.info().model_dump())

    async def health() -> Response:
        healthy = not state.shutting_down
        if healthy:
            try:
                state.engine.stats()
            except Exception:
                logger.exception("health check failed")
                healthy = False
        if not healthy:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    for path in ("/health", "/ping", "/"):
        app.add_api_route(path, health, methods=["GET"])

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _openai_routes(app: FastAPI, state: AppState) -> None:
    guarded = [Depends(require_api_key)]

    @app.get("/v1/models")
    async def models_route() -> Response:
        data = [ModelInfo(id=state.model_id, owned_by=state.model_id)]
        data += [ModelInfo(id=name, owned_by=state.model_id) for name in sorted(state.engine.adapter_names())]
        return JSONResponse(ModelsInfo(data=data).model_dump())

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_route(body: ChatRequest) -> Response:
        return await chat_completions(state, body)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions_route(body: CompletionRequest) -> Response:
        return await completions(state, body)


def _admin_routes(app: FastAPI, state: AppState) -> None:
    admin = [Depends(require_admin)]

    @app.get("/admin/adapters", dependencies=admin)
    async def list_adapters() -> Response:
        names = sorted(state.engine.adapter_names())
        return JSONResponse(
            AdapterList(adapters=names, max_loaded_adapters=state.settings.max_loaded_adapters).model_dump()
        )

    @app.post("/admin/adapters", dependencies=admin)
    async def load_adapter(body: AdapterLoadRequest) -> Response:
        if body.name in ("tgi", state.model_id):
            raise AdapterError(f"`{body.name}` names the base model and cannot be an adapter name")
        path = allowed_adapter_path(state.settings, body.path)
        await state.engine.load_adapter(body.name, path)
        names = sorted(state.engine.adapter_names())
        return JSONResponse({"name": body.name, "path": path, "adapters": names}, status_code=201)

    @app.delete("/admin/adapters/{name:path}", dependencies=admin)
    async def unload_adapter(name: str) -> Response:
        if name not in state.engine.adapter_names():
            raise ApiError(f"adapter `{name}` is not loaded", 404, "not_found")
        await state.engine.unload_adapter(name)
        return JSONResponse({"name": name, "adapters": sorted(state.engine.adapter_names())})
