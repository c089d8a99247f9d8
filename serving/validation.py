"""Request validation with TGI's rules and messages (``router/src/validation.rs``), plus adapter checks.

Messages are TGI's bare ``ValidationError`` texts; the HTTP layer adds TGI's ``"Input validation error: "``
prefix, so ``str(exc)`` here matches TGI's error enum and the body matches TGI's response. The order of the checks
is TGI's, so a request with several faults gets the same message from both servers.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Callable, Optional

from serving.schemas import GenerateParameters
from serving.types import (
    GenerationRequest,
    SamplingParameters,
    StoppingParameters,
    ValidationError,
    next_request_id,
    random_seed,
)

# TGI caps the implicit `max_new_tokens` (when the client sends null) at this many tokens.
DEFAULT_GENERATION_LENGTH = 1024
BASE_MODEL_ALIASES = frozenset({"", "tgi"})


class Validator:
    """Turns a TGI ``GenerateParameters`` into a ``GenerationRequest`` or raises ``ValidationError``."""

    def __init__(
        self,
        tokenizer: Any,
        max_input_tokens: int,
        max_total_tokens: int,
        adapter_exists: Callable[[str], bool],
        max_top_n_tokens: int = 5,
        max_stop_sequences: int = 4,
        max_best_of: int = 2,
        *,
        adapter_names: Optional[Callable[[], list[str]]] = None,
        model_id: Optional[str] = None,
    ) -> None:
        if max_input_tokens >= max_total_tokens:
            raise ValueError(f"max_input_tokens ({max_input_tokens}) must be < max_total_tokens ({max_total_tokens})")
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.adapter_exists = adapter_exists
        self.adapter_names = adapter_names or (lambda: [])
        self.model_id = model_id
        self.max_top_n_tokens = max_top_n_tokens
        self.max_stop_sequences = max_stop_sequences
        self.max_best_of = max_best_of

    # ------------------------------------------------------------------------------------------------ adapters

    def resolve_adapter(self, adapter_id: Optional[str]) -> Optional[str]:
        """None for the base model; the adapter name otherwise. Unknown names are a 422, never a silent fallback."""
        if adapter_id is None or adapter_id in BASE_MODEL_ALIASES or adapter_id == self.model_id:
            return None
        if not self.adapter_exists(adapter_id):
            known = sorted(self.adapter_names())
            listing = ", ".join(f"`{name}`" for name in known) if known else "none"
            raise ValidationError(
                f"adapter `{adapter_id}` is not loaded (loaded adapters: {listing}); "
                "omit `adapter_id` or use the model id for the base model"
            )
        return adapter_id

    # ---------------------------------------------------------------------------------------------- tokenizing

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no token covers more of a prompt (with a margin of 2 for
        normalizers that drop characters)."""
        try:
            vocab = self.tokenizer.get_vocab()
        except Exception:  # a tokenizer without a vocabulary listing: no bound
            return 0
        return 2 * max((len(token) for token in vocab), default=0)

    def bound_before_tokenizing(self, inputs: str, truncate: Optional[int]) -> str:
        """Refuse (or, with ``truncate``, cut) a prompt too long for its token budget before tokenizing it, so one
        huge prompt costs a length check rather than seconds of tokenizer time."""
        longest = self.longest_token_chars
        if not longest:
            return inputs
        if truncate is not None:
            keep = (truncate + 16) * longest  # the last ``truncate`` tokens lie well inside this suffix
            return inputs if len(inputs) <= keep else inputs[-keep:]
        if len(inputs) > self.max_input_tokens * longest:
            raise ValidationError(
                f"`inputs` must have less than {self.max_input_tokens} tokens. Given: more than that "
                f"({len(inputs)} characters)"
            )
        return inputs

    def _tokenize(self, inputs: str, **kwargs: Any) -> Any:
        try:
            return self.tokenizer(inputs, **kwargs)
        except Exception as err:  # tokenizers raise many types; TGI reports them all the same way
            raise ValidationError(f"tokenizer error {err}") from err

    def encode(self, inputs: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenize(inputs, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_with_offsets(
        self, inputs: str, truncate: Optional[int] = None, add_special_tokens: bool = True
    ) -> tuple[str, Any]:
        """The (length-bounded) text and its encoding with character offsets, as ``/tokenize`` reports them."""
        inputs = self.bound_before_tokenizing(inputs, truncate)
        return inputs, self._tokenize(inputs, return_offsets_mapping=True, add_special_tokens=add_special_tokens)

    # ----------------------------------------------------------------------------------------------- the rules

    def validate_best_of(self, best_of: int) -> int:
        if self.max_best_of == 1 and best_of != 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > self.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {self.max_best_of}. Given: {best_of}")
        return best_of

    @staticmethod
    def validate_stream(params: GenerateParameters) -> None:
        """Options TGI refuses on streaming routes."""
        if (params.best_of if params.best_of is not None else 1) != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if params.decoder_input_details:
            raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")

    def validate(
        self, inputs: str, params: GenerateParameters, *, add_special_tokens: bool = True
    ) -> GenerationRequest:
        best_of = params.best_of if params.best_of is not None else 1
        sampling = params.do_sample or any(
            v is not None for v in (params.temperature, params.top_k, params.top_p, params.typical_p)
        )
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if params.temperature is not None and params.temperature <= 0.0:
            raise ValidationError("`temperature` must be strictly positive")
        if params.repetition_penalty is not None and params.repetition_penalty <= 0.0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        if params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if params.top_p is not None and not 0.0 < params.top_p < 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        if params.typical_p is not None and not 0.0 < params.typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        if params.top_k is not None and params.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if params.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(params.stop) > self.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {self.max_stop_sequences} stop sequences. Given: {len(params.stop)}"
            )
        if params.seed is not None and best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        seed = params.seed if params.seed is not None else random_seed()
        top_n_tokens = params.top_n_tokens or 0
        if top_n_tokens > self.max_top_n_tokens:
            raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {self.max_top_n_tokens}. Given: {top_n_tokens}")
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        if params.truncate is not None and not 0 < params.truncate <= self.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {self.max_input_tokens}. Given: {params.truncate}"
            )
        if params.watermark:
            raise ValidationError("`watermark` is not supported")
        adapter_id = self.resolve_adapter(params.adapter_id)

        input_ids, max_new_tokens = self._validate_input(inputs, add_special_tokens, params)
        if params.grammar is not None:
            raise ValidationError("grammar is not supported")

        return GenerationRequest(
            inputs=inputs,
            input_ids=input_ids,
            sampling=SamplingParameters(
                do_sample=params.do_sample,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                typical_p=params.typical_p,
                repetition_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty,
                seed=seed,
            ),
            stopping=StoppingParameters(max_new_tokens=max_new_tokens, stop_sequences=list(params.stop)),
            adapter_id=adapter_id,
            top_n_tokens=top_n_tokens,
            decoder_input_details=params.decoder_input_details,
        )

    def _validate_input(
        self, inputs: str, add_special_tokens: bool, params: GenerateParameters
    ) -> tuple[list[int], int]:
        """Tokenize, truncate from the left (keep the last ``truncate`` tokens) and check the token budget."""
        ids = self.encode(self.bound_before_tokenizing(inputs, params.truncate), add_special_tokens)
        input_length = min(len(ids), params.truncate) if params.truncate is not None else len(ids)
        if params.max_new_tokens is not None:
            max_new_tokens = params.max_new_tokens
        else:
            max_new_tokens = min(max(self.max_total_tokens - input_length, 0), DEFAULT_GENERATION_LENGTH)
        if input_length + max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > self.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {input_length}"
            )
        return ids[len(ids) - input_length :], max_new_tokens


def fork(request: GenerationRequest, seed: Optional[int] = None) -> GenerationRequest:
    """A copy with a new id and seed: one sequence of ``best_of`` / ``n``, sampled independently."""
    sampling = replace(request.sampling, seed=random_seed() if seed is None else seed)
    return replace(request, sampling=sampling, id=next_request_id())
