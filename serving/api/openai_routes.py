"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

``model`` names the adapter (``tgi``, ``dummy``, the model id or ``""`` mean the base model); ``n`` > 1 is served as
independently seeded choices; ``top_p == 1.0`` means "off".
"""

from __future__ import annotations

import time
from typing import Any, Optional

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from serving.api.auth import require_api_key
from serving.api.errors import ApiError
from serving.api.generation import (
    Generation,
    Opened,
    Render,
    collect_all,
    finish_reason,
    merge_streams,
    open_all,
    step_events,
)
from serving.api.openapi_docs import GENERATION_ERRORS, JSON_OR_EVENTS, errors
from serving.api.sse import EventStream
from serving.api.state import AppContext, State, Timing
from serving.api.tgi_routes import tokens_with_offsets
from serving.schemas import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionComplete,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    ChatTokenizeResponse,
    CompletionChunk,
    CompletionComplete,
    CompletionFinal,
    CompletionRequest,
    GenerateParameters,
    LogprobEntry,
    ModelInfo,
    ModelsInfo,
    OutputMessage,
    TopLogprob,
    Usage,
)
from serving.types import MAX_SEED, GenerationRequest, StepOutput, TokenInfo, ValidationError
from serving.validation import fork

router = APIRouter()
_guarded = [Depends(require_api_key)]

# `model` values meaning "the base model": TGI's documented "tgi", and "dummy", which huggingface_hub sends when the
# client was built from a URL. The model id and "" are handled by the validator like `adapter_id`.
OPENAI_BASE_MODEL_NAMES = frozenset({"tgi", "dummy"})


# ----------------------------------------------------------------------------------------------- conversions


def _sampling_from_openai(body: Any, *, top_n_tokens: Optional[int] = None) -> GenerateParameters:
    """TGI's mapping: temperature 0 means greedy, anything else (or nothing) samples; 100 new tokens by default."""
    greedy = body.temperature is not None and body.temperature == 0.0
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:  # OpenAI's range; 1.0 keeps every token ("off")
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    refuse_unsupported(body)
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


def refuse_unsupported(body: Any) -> None:
    """OpenAI fields this server cannot honour are refused, not silently ignored (a client relying on one would
    get different output than it asked for without knowing)."""
    if getattr(body, "logit_bias", None):
        raise ValidationError("`logit_bias` is not supported")
    if getattr(body, "presence_penalty", None):
        raise ValidationError("`presence_penalty` is not supported; use `frequency_penalty` or `repetition_penalty`")
    if isinstance(body, CompletionRequest) and body.logprobs:
        raise ValidationError("`logprobs` is not supported on /v1/completions; use /v1/chat/completions")


def _choices(state: AppContext, request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` sequences of one prompt, seeded ``seed``, ``seed + 1``... (wrapping round past ``MAX_SEED``)."""
    if n > state.settings.max_client_batch_size:
        raise ValidationError(f"`n` must be <= {state.settings.max_client_batch_size}. Given: {n}")
    seed = request.sampling.seed if request.sampling.seed is not None else 0
    return [request] + [fork(request, seed=(seed + i) & MAX_SEED) for i in range(1, n)]


def openai_finish(step: StepOutput) -> str:
    """TGI's ``FinishReason::format(true)``: ``eos_token`` reads ``stop`` on the OpenAI routes."""
    return "stop" if step.finish_reason == "eos_token" else finish_reason(step)


def _piece(step: StepOutput) -> str:
    """The text of one step's token (nothing for a special token)."""
    return "" if step.token.special else step.token.text


class StreamedText:
    """What each choice of a stream has sent, so the pieces always add up to the final text: the detokenizer holds
    back the bytes of an unfinished UTF-8 character, and the last step flushes whatever the pieces left out."""

    def __init__(self) -> None:
        self._sent: dict[int, int] = {}

    def piece(self, index: int, step: StepOutput) -> str:
        sent = self._sent.get(index, 0)
        text = _piece(step)
        if step.finished and step.generated_text is not None:
            text = step.generated_text[sent:]
        self._sent[index] = sent + len(text)
        return text


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


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _choice_usage(gen: Generation) -> Usage:
    return _usage(len(gen.request.input_ids), gen.generated_tokens)


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


# ----------------------------------------------------------------------------- choices, streamed or collected


def _stream_choices(
    state: AppContext, timing: Timing, requests: list[GenerationRequest], opened: list[Opened], render: Render
) -> EventStream:
    """The choices' chunks as they come (``render(index, step, gen)`` makes each), then ``[DONE]``."""
    started = [(r, first) for r, (first, _) in zip(requests, opened)]
    events = step_events(
        started,
        merge_streams(opened),
        render,
        succeeded=lambda gen: state.requests.succeeded(timing, gen),
        failed=state.requests.failed,
    )
    return state.event_stream(events, space=True, done=True)


async def _collect_choices(state: AppContext, timing: Timing, requests: list[GenerationRequest]) -> list[Generation]:
    with state.requests.track_failures():
        gens = await collect_all(state.engine, requests)
    state.requests.succeeded(timing, gens[0])  # one HTTP request, one success (as TGI counts a best_of request)
    return gens


async def chat_completions(state: AppContext, body: ChatRequest) -> Response:
    timing = state.requests.start()
    with state.requests.track_failures():
        _reject_unsupported(body)
        prompt, special = chat_prompt(state.engine.tokenizer, body)
        top_n = body.top_logprobs if body.logprobs else None
        request = await state.validate(
            prompt, _sampling_from_openai(body, top_n_tokens=top_n), add_special_tokens=special
        )
        timing.validated = time.monotonic()
        requests = _choices(state, request, body.n or 1)
        if body.stream:
            opened = await open_all(state.engine, requests)
    model = state.served_model(request)
    if body.stream:
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        streamed = StreamedText()

        def render(index: int, step: StepOutput, gen: Generation) -> ChatCompletionChunk:
            choice = ChatCompletionChoice(
                index=index,
                delta=ChatDelta(content=streamed.piece(index, step)),
                logprobs=_logprobs([step.token], [list(step.top_tokens)]) if body.logprobs else None,
                finish_reason=openai_finish(step) if step.finished else None,
            )
            usage = _choice_usage(gen) if step.finished and include_usage else None
            return ChatCompletionChunk(
                created=created,
                model=model,
                system_fingerprint=state.system_fingerprint,
                choices=[choice],
                usage=usage,
            )

        return _stream_choices(state, timing, requests, opened, render)
    gens = await _collect_choices(state, timing, requests)
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
        usage=_usage(len(request.input_ids), sum(g.generated_tokens for g in gens)),
    )
    return JSONResponse(answer.model_dump(), headers=state.requests.timing_headers(timing, gens[0], prompt))


async def completions(state: AppContext, body: CompletionRequest) -> Response:
    timing = state.requests.start()
    with state.requests.track_failures():
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
        validated = [await state.validate(p, params) for p in prompts]
        requests = [r for v in validated for r in _choices(state, v, body.n or 1)]
        timing.validated = time.monotonic()
        if body.stream:
            opened = await open_all(state.engine, requests)
    model = state.served_model(requests[0])
    created = int(time.time())
    fields = {"created": created, "model": model, "system_fingerprint": state.system_fingerprint}
    if body.stream:
        streamed = StreamedText()

        def render(index: int, step: StepOutput, gen: Generation) -> Any:
            finish = openai_finish(step) if step.finished else ""
            choice = CompletionComplete(index=index, text=streamed.piece(index, step), finish_reason=finish)
            if step.finished:
                return CompletionFinal(choices=[choice], usage=_choice_usage(gen), **fields)
            return CompletionChunk(choices=[choice], **fields)

        return _stream_choices(state, timing, requests, opened, render)
    gens = await _collect_choices(state, timing, requests)
    prompt_tokens = sum(len(r.input_ids) for r in requests[:: body.n or 1])
    answer = CompletionFinal(
        choices=[
            CompletionComplete(
                index=i, text=(g.request.inputs if body.echo else "") + g.text, finish_reason=openai_finish(g.final)
            )
            for i, g in enumerate(gens)
        ],
        usage=_usage(prompt_tokens, sum(g.generated_tokens for g in gens)),
        **fields,
    )
    return JSONResponse(answer.model_dump(), headers=state.requests.timing_headers(timing, gens[0], prompts[0]))


# -------------------------------------------------------------------------------------------------- routes


@router.post(
    "/chat_tokenize",
    dependencies=_guarded,
    response_model=ChatTokenizeResponse,
    responses=errors(400, 401, 404, 413, 422),
)
async def chat_tokenize_route(body: ChatRequest, state: State) -> Response:
    """TGI's ``/chat_tokenize``: the prompt the chat template makes of ``messages``, and its tokens."""
    prompt, special = chat_prompt(state.engine.tokenizer, body)
    tokens = await tokens_with_offsets(state, prompt, add_special_tokens=special)
    return JSONResponse(ChatTokenizeResponse(tokenize_response=tokens, templated_text=prompt).model_dump())


@router.get("/v1/models", response_model=ModelsInfo)
async def models_route(state: State) -> Response:
    data = [ModelInfo(id=state.model_id, owned_by=state.model_id)]
    data += [ModelInfo(id=name, owned_by=state.model_id) for name in sorted(state.engine.adapter_names())]
    return JSONResponse(ModelsInfo(data=data).model_dump())


@router.post(
    "/v1/chat/completions",
    dependencies=_guarded,
    response_model=ChatCompletion,
    responses={**JSON_OR_EVENTS, **GENERATION_ERRORS},
)
async def chat_route(body: ChatRequest, state: State) -> Response:
    return await chat_completions(state, body)


@router.post(
    "/v1/completions",
    dependencies=_guarded,
    response_model=CompletionFinal,
    responses={**JSON_OR_EVENTS, **GENERATION_ERRORS},
)
async def completions_route(body: CompletionRequest, state: State) -> Response:
    return await completions(state, body)
