"""What passes between the HTTP layer and the engine: validated requests in, per-step token events out.

Field names follow TGI's router (``router/src/lib.rs``) so the HTTP layer maps them one to one.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Protocol

FinishReason = Literal["length", "eos_token", "stop_sequence"]

_request_ids = itertools.count()


def next_request_id() -> int:
    return next(_request_ids)


SEED_BITS = 64
MAX_SEED = (1 << SEED_BITS) - 1
"""Sampling seeds are TGI's ``u64``: 0 to ``MAX_SEED`` (2**64 - 1), the range ``torch.Generator.manual_seed`` takes;
requests are validated against it and the seeds the server draws lie in it."""


def random_seed() -> int:
    """A fresh sampling seed, anywhere in 0..``MAX_SEED``."""
    return secrets.randbits(SEED_BITS)


@dataclass
class SamplingParameters:
    """Validated sampling settings of one request (None / 1.0 / 0 mean "off", as in TGI)."""

    do_sample: bool = False
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None

    @property
    def is_greedy(self) -> bool:
        """TGI samples when do_sample is set or any warper is active; otherwise it takes the argmax."""
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )
        return not (self.do_sample or warped)


@dataclass
class StoppingParameters:
    max_new_tokens: int
    stop_sequences: list[str] = field(default_factory=list)
    ignore_eos_token: bool = False


@dataclass
class GenerationRequest:
    """One validated request, ready for the scheduler."""

    inputs: str
    input_ids: list[int]
    sampling: SamplingParameters
    stopping: StoppingParameters
    adapter_id: Optional[str] = None
    top_n_tokens: int = 0
    decoder_input_details: bool = False
    id: int = field(default_factory=next_request_id)


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: Optional[float]
    special: bool = False


@dataclass
class StepOutput:
    """One generated token of one request; the last one carries the whole text and why it stopped."""

    request_id: int
    token: TokenInfo
    top_tokens: list[TokenInfo] = field(default_factory=list)
    prefill_tokens: Optional[list[TokenInfo]] = None  # first step only, when decoder_input_details
    generated_tokens: int = 0
    generated_text: Optional[str] = None
    finish_reason: Optional[FinishReason] = None
    seed: Optional[int] = None  # only for sampling rows, as TGI reports it

    # token.text is the streamed piece for this step (may be "" mid-character); top and prefill tokens carry
    # each token's own text.

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FloraServeError(Exception):
    """Base of errors the HTTP layer turns into TGI's ``{"error", "error_type"}`` bodies."""

    status_code = 500
    error_type = "generation"


class ValidationError(FloraServeError):
    status_code = 422
    error_type = "validation"


class OverloadedError(FloraServeError):
    status_code = 429
    error_type = "overloaded"


class GenerationError(FloraServeError):
    status_code = 424
    error_type = "generation"


class AdapterError(ValidationError):
    """An adapter could not be loaded (corrupt, mismatched, non-finite, outside the allowed roots).

    A ``ValidationError`` (422, ``validation``) whose message the HTTP layer sends as it is, without TGI's
    ``"Input validation error: "`` prefix.
    """

    status_code = 422
    error_type = "validation"


class IncompleteGenerationError(FloraServeError):
    """The engine's iterator ended without a finished token (TGI's ``IncompleteGeneration``)."""

    status_code = 500
    error_type = "incomplete_generation"


class Engine(Protocol):
    """What the HTTP layer needs from the engine (``serving.engine.LLMEngine`` implements it).

    Error messages are bare (``"`temperature` must be strictly positive"``, ``"the model failed at prefill"``):
    the HTTP layer adds TGI's prefixes (``"Input validation error: "``, ``"Request failed during generation: "``).
    """

    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    model_id: str

    def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Queue the request and yield its tokens as they are produced; the last output has ``finish_reason``.

        Raises OverloadedError when more than ``max_concurrent_requests`` are in flight, ValidationError for an
        unknown adapter, GenerationError if the model fails. Closing the iterator early (client gone) cancels the
        request: its batch row is freed at the next step.
        """
        ...

    def adapter_names(self) -> list[str]: ...

    # Optional: ``has_adapter(name) -> bool``, the engine's own adapter check (LLMEngine's asks its adapter store);
    # the validator then calls it instead of looking the name up in ``adapter_names()``.
    # Optional: ``async start() -> None``, awaited on the server's event loop before it serves (the vLLM engine loads
    # its start-up adapters there); an exception stops the server from starting.

    async def load_adapter(self, name: str, path: str) -> None:
        """Hot-load a PEFT-format folder under the configured roots; raises AdapterError with a clear message."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters for /metrics and /health (which calls it to check the engine answers).

        Keys: ``queue_size`` (requests waiting to join the batch), ``batch_size`` (rows in the running batch),
        ``in_flight`` (requests admitted and not finished: queued plus running).
        """
        ...

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Stop admitting requests, let in-flight ones finish within the grace period, cancel the rest."""
        ...
