"""TGI's routes, with TGI's response shapes (``Details``, ``best_of_sequences``, ``StreamResponse``).

``/generate``, ``/generate_stream``, the compat ``POST /``, ``/tokenize``, ``/info``, ``/health`` (also ``/ping``
and ``GET /``), ``/metrics``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from serving.api.auth import require_api_key
from serving.api.errors import ApiError
from serving.api.generation import (
    Generation,
    collect_all,
    finish_reason,
    open_stream,
    sequence_steps,
    step_events,
)
from serving.api.openapi_docs import EVENTS, GENERATION_ERRORS, JSON_OR_EVENTS, NO_BODY, PROMETHEUS, errors
from serving.api.sse import EventStream
from serving.api.state import AppContext, State
from serving.metrics import CONTENT_TYPE
from serving.schemas import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    PrefillToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeResponse,
)
from serving.types import StepOutput, TokenInfo
from serving.validation import fork

logger = logging.getLogger(__name__)

router = APIRouter()
_guarded = [Depends(require_api_key)]


# ----------------------------------------------------------------------------------------------- conversions


def _token(t: TokenInfo) -> Token:
    return Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def _top_tokens(gen: Generation) -> list[list[Token]]:
    return [[_token(t) for t in step] for step in gen.top_tokens] if gen.request.top_n_tokens > 0 else []


def _sequence(gen: Generation) -> dict[str, Any]:
    """The fields ``Details`` and ``BestOfSequence`` share."""
    return dict(
        finish_reason=finish_reason(gen.final),
        generated_tokens=gen.generated_tokens,
        seed=gen.final.seed,
        prefill=[PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in gen.prefill],
        tokens=[_token(t) for t in gen.tokens],
        top_tokens=_top_tokens(gen),
    )


def _details(best: Generation, others: Optional[list[Generation]], prefix: str) -> Details:
    """TGI's ``Details``; ``best_of_sequences`` holds the sequences that lost (absent without ``best_of``)."""
    losers = None
    if others is not None:
        losers = [BestOfSequence(generated_text=prefix + g.text, **_sequence(g)) for g in others]
    return Details(**_sequence(best), best_of_sequences=losers)


def _prefix(req: GenerateRequest, default_full_text: bool) -> str:
    """The prompt when the answer repeats it (``return_full_text``), else nothing."""
    params: GenerateParameters = req.parameters
    full_text = default_full_text if params.return_full_text is None else params.return_full_text
    return req.inputs if full_text else ""


# ---------------------------------------------------------------------------------------------- generation


async def generate(
    state: AppContext, req: GenerateRequest, return_full_text: bool = False
) -> tuple[GenerateResponse, dict[str, str]]:
    """``/generate``: one sequence, or ``best_of`` sampled ones with the best (mean logprob) first."""
    timing = state.requests.start()
    params = req.parameters
    with state.requests.track_failures():
        best_of = params.best_of if params.best_of is not None else 1
        if best_of > 1:
            state.validator.validate_best_of(best_of)
        request = await state.validate(req.inputs, params)
        timing.validated = time.monotonic()
        gens = await collect_all(state.engine, [request] + [fork(request) for _ in range(best_of - 1)])
    best = max(range(len(gens)), key=lambda i: (gens[i].mean_logprob(), -i))
    prefix = _prefix(req, return_full_text)
    details = None
    if params.details or params.decoder_input_details:
        details = _details(gens[best], [g for i, g in enumerate(gens) if i != best] if best_of > 1 else None, prefix)
    state.requests.succeeded(timing, gens[best])
    headers = state.requests.timing_headers(timing, gens[best], req.inputs)
    return GenerateResponse(generated_text=prefix + gens[best].text, details=details), headers


async def generate_stream(state: AppContext, req: GenerateRequest, return_full_text: bool = False) -> EventStream:
    """``/generate_stream``: one ``StreamResponse`` event a token; the last has the text and ``details``."""
    timing = state.requests.start()
    params = req.parameters
    with state.requests.track_failures():
        state.validator.validate_stream(params)
        request = await state.validate(req.inputs, params)
        timing.validated = time.monotonic()
        first, iterator = await open_stream(state.engine, request)
    prefix = _prefix(req, return_full_text)

    def render(_: int, step: StepOutput, gen: Generation) -> StreamResponse:
        token = _token(step.token)
        tops = [_token(t) for t in step.top_tokens] if request.top_n_tokens > 0 else []
        if not step.finished:
            return StreamResponse(index=len(gen.tokens), token=token, top_tokens=tops)
        details = None
        if params.details:
            details = StreamDetails(
                finish_reason=finish_reason(step),
                generated_tokens=gen.generated_tokens,
                seed=step.seed,
                input_length=len(request.input_ids),
            )
        return StreamResponse(
            index=len(gen.tokens), token=token, top_tokens=tops, generated_text=prefix + gen.text, details=details
        )

    events = step_events(
        [(request, first)],
        sequence_steps(first, iterator),
        render,
        succeeded=lambda gen: state.requests.succeeded(timing, gen),
        failed=state.requests.failed,
    )
    return state.event_stream(events, {"x-compute-characters": str(len(req.inputs))})


# -------------------------------------------------------------------------------------------------- routes


@router.post("/generate", dependencies=_guarded, response_model=GenerateResponse, responses=GENERATION_ERRORS)
async def generate_route(req: GenerateRequest, state: State) -> Response:
    answer, headers = await generate(state, req)
    return JSONResponse(answer.model_dump(), headers=headers)


@router.post(
    "/generate_stream", dependencies=_guarded, response_class=Response, responses={**EVENTS, **GENERATION_ERRORS}
)
async def generate_stream_route(req: GenerateRequest, state: State) -> Response:
    return await generate_stream(state, req)


_COMPAT = {
    "dependencies": _guarded,
    "response_model": list[GenerateResponse],
    "responses": {**JSON_OR_EVENTS, **GENERATION_ERRORS},
}


@router.post("/", **_COMPAT)
@router.post("/invocations", **_COMPAT)  # SageMaker's route, which TGI serves too: the same as POST /
async def compat_route(req: CompatGenerateRequest, state: State) -> Response:
    """TGI's compat route: ``[GenerateResponse]``, or the token stream when ``stream`` is true."""
    default_full_text = state.settings.compat_return_full_text
    if req.stream:
        return await generate_stream(state, req, return_full_text=default_full_text)
    answer, headers = await generate(state, req, return_full_text=default_full_text)
    return JSONResponse([answer.model_dump()], headers=headers)


async def tokens_with_offsets(
    state: AppContext, text: str, truncate: Optional[int] = None, add_special_tokens: bool = True
) -> TokenizeResponse:
    """``text``'s tokens with their character spans (TGI's ``/tokenize``), tokenized in the validation pool."""
    tokenizer = state.engine.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ApiError("No fast tokenizer available", 404, "tokenizer")
    inputs, encoding = await state.in_validation_pool(
        state.validator.encode_with_offsets, text, truncate, add_special_tokens
    )
    return TokenizeResponse(
        [
            SimpleToken(id=i, text=inputs[start:stop], start=start, stop=stop)
            for i, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])
        ]
    )


@router.post(
    "/tokenize", dependencies=_guarded, response_model=TokenizeResponse, responses=errors(400, 401, 404, 413, 422)
)
async def tokenize_route(req: GenerateRequest, state: State) -> Response:
    tokens = await tokens_with_offsets(state, req.inputs, req.parameters.truncate)
    return JSONResponse(tokens.model_dump())


@router.get("/info", response_model=Info)
async def info_route(state: State) -> Response:
    return JSONResponse(state.info().model_dump())


async def health(state: State) -> Response:
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


for _path in ("/health", "/ping", "/"):
    router.add_api_route(_path, health, methods=["GET"], response_class=Response, responses={**NO_BODY, **errors(503)})


@router.get("/metrics", response_class=Response, responses=PROMETHEUS)
async def metrics_route(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
