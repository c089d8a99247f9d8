"""Wire formats of the HTTP API: TGI's routes field for field, plus the OpenAI-compatible ones.

Field names, defaults and which keys are omitted when empty follow TGI's router (``router/src/lib.rs``), so
``huggingface_hub.InferenceClient``, the ``text-generation`` client and ``openai`` parse our answers unchanged.
Requests are lenient where TGI's serde is strict only by accident (``null`` for a list or a flag means "default"),
and strict where TGI is (unsigned integers reject negatives with a 422).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictInt,
    field_validator,
    model_serializer,
)

from serving.types import MAX_SEED

FinishReasonStr = Literal["length", "eos_token", "stop_sequence"]


class _Wire(BaseModel):
    """Base of every response model: drops the keys TGI leaves out when they are empty (``skip_serializing_if``)."""

    omit_if_empty: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_if_empty:
            if data.get(key) in (None, []):
                data.pop(key, None)
        return data


def _finite(value: Optional[float]) -> Optional[float]:
    """NaN/inf logprobs become null, as serde_json writes them (json.dumps would emit invalid JSON)."""
    return None if value is None or not math.isfinite(value) else value


Logprob = Annotated[Optional[float], AfterValidator(_finite)]


# --------------------------------------------------------------------------------------------------- TGI requests
# TGI's serde types, so a value TGI would refuse at the door is a 422 here too, never a failure inside a batch:
# integers are integers (not true, not 1.5), within the Rust type's range; floats are finite; flags are booleans.
I32 = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
U32 = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]
USize = U64
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]  # a u64, as TGI's
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Grammar(BaseModel):
    """TGI's ``GrammarType``; accepted so the request parses, then rejected by validation (not supported here)."""

    type: Literal["json", "json_object", "regex"]
    value: Any = None


class GenerateParameters(BaseModel):
    """``parameters`` of a generate request; defaults are TGI's (``max_new_tokens`` 100 when absent)."""

    model_config = ConfigDict(extra="ignore")

    best_of: Optional[USize] = None
    temperature: Optional[Finite] = None
    repetition_penalty: Optional[Finite] = None
    frequency_penalty: Optional[Finite] = None
    top_k: Optional[I32] = None
    top_p: Optional[Finite] = None
    typical_p: Optional[Finite] = None
    do_sample: StrictBool = False
    max_new_tokens: Optional[U32] = 100
    return_full_text: Optional[StrictBool] = None
    stop: list[str] = Field(default_factory=list)
    truncate: Optional[USize] = None
    watermark: StrictBool = False
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    seed: Optional[Seed] = None
    top_n_tokens: Optional[U32] = None
    grammar: Optional[Grammar] = None
    adapter_id: Optional[str] = None

    @field_validator("do_sample", "watermark", "details", "decoder_input_details", mode="before")
    @classmethod
    def _null_flag(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("stop", mode="before")
    @classmethod
    def _null_stop(cls, value: Any) -> Any:
        return [] if value is None else value


def _default_parameters() -> GenerateParameters:
    # TGI quirk kept on purpose: a request with no `parameters` object at all samples (`default_parameters()`).
    return GenerateParameters(do_sample=True)


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: Any) -> Any:
        return _default_parameters() if value is None else value


class CompatGenerateRequest(GenerateRequest):
    """Body of ``POST /``: the Python clients post here, with ``stream`` choosing JSON list or SSE."""

    stream: bool = False

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        return False if value is None else value


# -------------------------------------------------------------------------------------------------- TGI responses


class PrefillToken(_Wire):
    id: int
    text: str
    logprob: Logprob = None


class Token(_Wire):
    id: int
    text: str
    logprob: Logprob = None
    special: bool = False


class BestOfSequence(_Wire):
    omit_if_empty = frozenset({"top_tokens"})

    generated_text: str
    finish_reason: FinishReasonStr
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(_Wire):
    omit_if_empty = frozenset({"best_of_sequences", "top_tokens"})

    finish_reason: FinishReasonStr
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    best_of_sequences: Optional[list[BestOfSequence]] = None
    top_tokens: list[list[Token]] = Field(default_factory=list)


class GenerateResponse(_Wire):
    omit_if_empty = frozenset({"details"})

    generated_text: str
    details: Optional[Details] = None


class StreamDetails(_Wire):
    finish_reason: FinishReasonStr
    generated_tokens: int
    seed: Optional[int] = None
    input_length: int


class StreamResponse(_Wire):
    """One SSE event of ``/generate_stream``; only the last one carries ``generated_text`` and ``details``."""

    omit_if_empty = frozenset({"top_tokens"})

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


class ErrorResponse(_Wire):
    error: str
    error_type: str


class SimpleToken(_Wire):
    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(RootModel[list[SimpleToken]]):
    pass


class ChatTokenizeResponse(_Wire):
    """TGI's ``/chat_tokenize`` answer."""

    tokenize_response: TokenizeResponse
    templated_text: str


class Info(_Wire):
    """``GET /info``: TGI's fields (current and legacy names) plus flora's adapter limits."""

    model_id: str
    model_sha: Optional[str] = None
    model_dtype: Optional[str] = None
    model_device_type: Optional[str] = None
    model_pipeline_tag: Optional[str] = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int
    max_total_tokens: int
    max_batch_total_tokens: Optional[int] = None
    validation_workers: int = 1
    max_client_batch_size: int
    router: str = "flora-serve"
    version: str
    sha: Optional[str] = None
    docker_label: Optional[str] = None
    max_loaded_adapters: int
    max_adapter_rank: int
    adapters: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------- OpenAI requests


class TextChunk(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None
    image_url: Optional[dict[str, Any]] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[TextChunk], None] = None
    name: Optional[str] = None

    def flat_text(self) -> str:
        """Flatten multi-part content the way TGI does (images become markdown links)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for chunk in self.content:
            if chunk.text is not None:
                parts.append(chunk.text)
            elif chunk.image_url is not None:
                parts.append(f"![]({chunk.image_url.get('url', '')})")
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _OpenAIRequest(BaseModel):
    """TGI's OpenAI-compatible request fields, with the same serde types as the TGI routes (a value that cannot be
    a u32 / finite float / boolean is a 422 at the door)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[U32] = None
    max_completion_tokens: Optional[U32] = None
    n: Optional[Annotated[StrictInt, Field(ge=1, le=2**32 - 1)]] = None
    temperature: Optional[Finite] = None
    top_p: Optional[Finite] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[Seed] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[Finite] = None
    presence_penalty: Optional[Finite] = None
    repetition_penalty: Optional[Finite] = None
    logit_bias: Optional[dict[str, Finite]] = None  # parsed so it can be refused, not dropped

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        return False if value is None else value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage]
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[U32] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    response_format: Optional[Any] = None


class CompletionRequest(_OpenAIRequest):
    prompt: Union[str, list[str]]
    suffix: Optional[str] = None
    logprobs: Optional[U32] = None
    echo: StrictBool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# --------------------------------------------------------------------------------------------- OpenAI responses


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Wire):
    token: str
    logprob: Logprob = None


class LogprobEntry(_Wire):
    token: str
    logprob: Logprob = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Wire):
    content: list[LogprobEntry]


class OutputMessage(_Wire):
    role: str = "assistant"
    content: str


class ChatCompletionComplete(_Wire):
    index: int
    message: OutputMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: str


class ChatCompletion(_Wire):
    object: str = "chat.completion"
    id: str = ""
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionComplete]
    usage: Usage


class ChatDelta(_Wire):
    role: str = "assistant"
    content: str


class ChatCompletionChoice(_Wire):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Wire):
    object: str = "chat.completion.chunk"
    id: str = ""
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: Optional[Usage] = None


class CompletionComplete(_Wire):
    index: int
    text: str
    logprobs: Optional[list[float]] = None
    finish_reason: str


class CompletionFinal(_Wire):
    """Both the non-streamed answer and the last streamed chunk of ``/v1/completions`` (TGI sends usage there)."""

    object: str = "text_completion"
    id: str = ""
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionComplete]
    usage: Usage


class CompletionChunk(_Wire):
    object: str = "text_completion"
    id: str = ""
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionComplete]


class ModelInfo(_Wire):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str


class ModelsInfo(_Wire):
    object: str = "list"
    data: list[ModelInfo]


# ------------------------------------------------------------------------------------------------------ admin


class AdapterLoadRequest(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    path: str = Field(min_length=1)


class AdapterList(_Wire):
    adapters: list[str]
    max_loaded_adapters: int
