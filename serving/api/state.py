"""What the routes share: the app's context (``AppContext``: engine, settings, validator, metrics) and the tracking
of each generation request (``RequestTracker``: its clock, outcome metrics and timing headers)."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Optional, TypeVar

from fastapi import Depends, Request

from serving.api.errors import failure_label
from serving.api.generation import Generation
from serving.api.sse import EventStream
from serving.metrics import ServerMetrics
from serving.schemas import GenerateParameters, Info
from serving.settings import ServerSettings
from serving.types import Engine, FloraServeError, GenerationRequest
from serving.validation import Validator

T = TypeVar("T")


def _version() -> str:
    try:
        return metadata.version("flora-hf")
    except metadata.PackageNotFoundError:
        return "0.0.0"


VERSION = _version()


@dataclass
class Timing:
    start: float
    validated: float = 0.0


class RequestTracker:
    """Each generation request's clock and outcome: TGI's ``tgi_request_*`` metrics and ``x-*`` timing headers."""

    def __init__(self, metrics: ServerMetrics, compute_type: str) -> None:
        self.metrics = metrics
        self.compute_type = compute_type

    def start(self) -> Timing:
        """Count a generation request and start its clock."""
        timing = Timing(start=time.monotonic())
        self.metrics.request_started()
        return timing

    def validated(self, request: GenerationRequest) -> None:
        self.metrics.request_validated(len(request.input_ids), request.stopping.max_new_tokens, request.adapter_id)

    def failed(self, exc: FloraServeError) -> None:
        self.metrics.request_failed(failure_label(exc))

    @contextmanager
    def track_failures(self) -> Iterator[None]:
        try:
            yield
        except FloraServeError as exc:
            self.failed(exc)
            raise

    def succeeded(self, timing: Timing, gen: Generation) -> None:
        self.metrics.request_succeeded(
            total=time.monotonic() - timing.start,
            validation=timing.validated - timing.start,
            queue=gen.first_token - timing.validated,
            inference=gen.finished - gen.first_token,
            generated_tokens=gen.generated_tokens,
        )

    def timing_headers(self, timing: Timing, gen: Generation, inputs: str) -> dict[str, str]:
        """TGI's ``x-*`` headers of a non-streamed answer."""
        total = time.monotonic() - timing.start
        inference = gen.finished - gen.first_token
        ms = lambda seconds: str(int(seconds * 1000))  # noqa: E731
        return {
            "x-compute-type": self.compute_type,
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


class AppContext:
    """What the routes share: the engine, settings, validator and metrics of one app, and its ``requests`` tracker;
    one per app so tests can run many apps in one process."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_id = getattr(engine, "model_id", None) or settings.model_id
        max_positions = getattr(engine, "max_position_embeddings", None) or _config_positions(engine)
        self.max_input_tokens, self.max_total_tokens = settings.token_limits(max_positions)
        self.validation_pool = ThreadPoolExecutor(settings.validation_workers, thread_name_prefix="validation")
        self.validator = Validator(
            engine.tokenizer,
            self.max_input_tokens,
            self.max_total_tokens,
            adapter_exists=adapter_check(engine),
            max_top_n_tokens=settings.max_top_n_tokens,
            max_stop_sequences=settings.max_stop_sequences,
            max_best_of=settings.max_best_of,
            adapter_names=engine.adapter_names,
            model_id=self.model_id,
        )
        self.metrics = ServerMetrics(self.max_input_tokens, self.max_total_tokens, engine.stats)
        if hasattr(engine, "step_observer"):  # flora's own engine; another engine reports no batch steps
            engine.step_observer = self.metrics.batch_step
        device = getattr(getattr(engine, "device", None), "type", None)
        default_compute = "cpu" if device in (None, "cpu") else "gpu+optimized"  # TGI's images set COMPUTE_TYPE
        self.compute_type = os.environ.get("COMPUTE_TYPE", default_compute)
        self.docker_label = os.environ.get("DOCKER_LABEL") or None
        self.system_fingerprint = f"{VERSION}-{self.docker_label or 'native'}"
        self.requests = RequestTracker(self.metrics, self.compute_type)
        self.shutting_down = False
        self._drain: Optional[asyncio.Future] = None

    async def drain(self) -> None:
        """Stop taking requests and give those in flight ``--graceful-shutdown-timeout`` to finish; the engine then
        fails the rest with an error their routes send properly (a JSON body, or a stream's final error event).
        Started by SIGTERM itself, while uvicorn still holds the connections open, and awaited again (once) by the
        lifespan."""
        if self._drain is None:
            self.shutting_down = True
            self._drain = asyncio.ensure_future(
                self.engine.shutdown(grace_seconds=self.settings.graceful_shutdown_timeout)
            )
        await asyncio.shield(self._drain)

    async def in_validation_pool(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in the validation pool, off the event loop."""
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.validation_pool, call)

    async def validate(
        self, inputs: str, params: GenerateParameters, *, add_special_tokens: bool = True
    ) -> GenerationRequest:
        """Validate and tokenize in the validation pool (TGI's validation workers): never on the event loop, so a
        long prompt cannot stall /health or other clients' streams."""
        request = await self.in_validation_pool(
            self.validator.validate, inputs, params, add_special_tokens=add_special_tokens
        )
        self.requests.validated(request)
        return request

    def event_stream(
        self,
        events: AsyncIterator[Any],
        headers: Optional[dict[str, str]] = None,
        *,
        space: bool = False,
        done: bool = False,
    ) -> EventStream:
        """A streamed answer of ``events`` (payloads; see ``EventStream`` for ``space`` and ``done``) with the
        server's keep-alive interval and ``x-compute-type``."""
        headers = {"x-compute-type": self.compute_type, **(headers or {})}
        return EventStream(events, headers, keep_alive=self.settings.keep_alive_interval, space=space, done=done)

    def _enforced_batch_tokens(self) -> Optional[int]:
        """The running-batch token budget the engine enforces (its default when the flag is unset)."""
        limits = getattr(self.engine, "limits", None)
        return getattr(limits, "max_batch_total_tokens", None) or self.settings.max_batch_total_tokens

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
            max_batch_total_tokens=self._enforced_batch_tokens(),
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


def adapter_check(engine: Engine) -> Callable[[str], bool]:
    """The engine's own adapter check (``LLMEngine.has_adapter``, which asks its adapter store), or membership in
    ``adapter_names()`` for an engine without one."""
    has_adapter = getattr(engine, "has_adapter", None)
    return has_adapter if callable(has_adapter) else lambda name: name in engine.adapter_names()


def app_state(request: Request) -> AppContext:
    return request.app.state.flora


State = Annotated[AppContext, Depends(app_state)]  # a route parameter that receives the app's AppContext
