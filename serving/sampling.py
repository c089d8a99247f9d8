"""Next-token choice, stopping and streaming detokenisation, with the semantics of TGI's server.

Three pieces the engine drives once per decoding step:

* :class:`HeterogeneousNextTokenChooser` turns one row of logits per request into the next token, each row with its
  own penalties, warpers and seeded generator (TGI's ``utils/tokens.py`` + ``utils/logits_process.py``).
* :class:`StoppingCriteria` says whether a request is done and why (``length``, ``eos_token``, ``stop_sequence``).
* :class:`IncrementalDetokenizer` streams text without ever emitting half a UTF-8 character (TGI's ``decode_token``).

A processor only touches the rows that asked for it, so a row's result never depends on the rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Optional, Union

import tokenizers
import torch
from torch import Tensor

from serving.types import FinishReason, SamplingParameters, StoppingParameters, random_seed

__all__ = [
    "HeterogeneousNextTokenChooser",
    "IncrementalDetokenizer",
    "StoppingCriteria",
    "TokenIds",
    "top_n_tokens",
]

TokenIds = Union[Sequence[Sequence[int]], Tensor]
"""Prompt + generated ids of each row: ragged lists, or a padded ``(B, L)`` LongTensor (with ``lengths``)."""

_NEG_INF = -math.inf
_REPLACEMENT_CHAR = "\ufffd"


# --------------------------------------------------------------------------------------------------------------------
# Per-row state
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One request's resolved settings (neutral values when off) and its private random stream."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    do_sample: bool = False
    seed: int = 0
    generator: Optional[torch.Generator] = None

    @classmethod
    def from_params(cls, params: SamplingParameters, device: torch.device) -> _Row:
        _validate(params)
        seed = params.seed if params.seed is not None else random_seed()
        do_sample = not params.is_greedy
        generator = None
        if do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        return cls(
            temperature=_or(params.temperature, 1.0),
            top_k=max(_or(params.top_k, 0), 0),
            top_p=_or(params.top_p, 1.0),
            typical_p=_or(params.typical_p, 1.0),
            repetition_penalty=_or(params.repetition_penalty, 1.0),
            frequency_penalty=_or(params.frequency_penalty, 0.0),
            do_sample=do_sample,
            seed=seed,
            generator=generator,
        )

    def clone(self) -> _Row:
        """A copy whose generator continues from the same state but advances independently."""
        if self.generator is None:
            return replace(self)
        generator = torch.Generator(device=self.generator.device)
        generator.set_state(self.generator.get_state())
        return replace(self, generator=generator)

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _validate(params: SamplingParameters) -> None:
    """Reject values that would turn scores into inf/nan; the HTTP layer should have caught them already."""
    for name in ("temperature", "repetition_penalty"):
        value = getattr(params, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be strictly positive, got {value}")


# --------------------------------------------------------------------------------------------------------------------
# Warpers: pure functions on the dense block of rows that use them (HF warper semantics, min_tokens_to_keep=1)
# --------------------------------------------------------------------------------------------------------------------


def _temperature(scores: Tensor, temperature: Tensor) -> Tensor:
    return scores / temperature


def _top_k(scores: Tensor, top_k: Tensor, max_k: int) -> Tensor:
    """Keep each row's k best scores (ties with the k-th included, as HF)."""
    max_k = min(max_k, scores.size(-1))
    kth = torch.topk(scores, max_k, dim=-1).values.gather(1, top_k.clamp(max=max_k) - 1)
    return scores.masked_fill(scores < kth, _NEG_INF)


def _top_p(scores: Tensor, one_minus_p: Tensor) -> Tensor:
    """Drop the least likely tokens whose cumulative probability stays within 1 - top_p; keep the best one."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= one_minus_p
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), _NEG_INF)


def _typical_p(scores: Tensor, mass: Tensor) -> Tensor:
    """Keep the tokens whose surprisal is closest to the entropy, up to ``mass`` probability; keep at least one."""
    normalized = torch.log_softmax(scores, dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-normalized - entropy)
    sorted_shifted, sorted_indices = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=scores.size(-1) - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last)
    remove[..., :1] = False
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), _NEG_INF)


def _penalise(scores: Tensor, counts: Tensor, repetition: Tensor, frequency: Tensor) -> Tensor:
    """HF repetition penalty on every seen token, then OpenAI's frequency penalty (neutral values are exact no-ops)."""
    penalised = torch.where(scores < 0, scores * repetition, scores / repetition)
    penalised = torch.where(counts > 0, penalised, scores)
    return (penalised - frequency * counts).to(scores.dtype)


def _on_rows(scores: Tensor, rows: Optional[Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to the listed rows only (every row when None), so the others stay bit-for-bit untouched."""
    if rows is None:
        return fn(scores)
    return scores.index_copy_(0, rows, fn(scores.index_select(0, rows)))


@dataclass
class _RowOp:
    """A warper restricted to the rows that asked for it, with their values as a (n_rows, 1) column."""

    rows: Optional[Tensor]
    values: Tensor
    fn: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, scores: Tensor) -> Tensor:
        return _on_rows(scores, self.rows, lambda sub: self.fn(sub, self.values))


def _row_index(rows: list[int], batch: int, device: torch.device) -> Optional[Tensor]:
    return None if len(rows) == batch else torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


# --------------------------------------------------------------------------------------------------------------------
# Token counts for the penalties
# --------------------------------------------------------------------------------------------------------------------


def _padded_rows(
    token_ids: TokenIds, lengths: Optional[Union[Tensor, Sequence[int]]], rows: list[int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """The selected rows' ids as a padded (n, L) tensor and a mask of the real positions."""
    if isinstance(token_ids, Tensor):
        index = torch.tensor(rows, dtype=torch.long, device=token_ids.device)
        ids = token_ids.index_select(0, index).to(device=device, dtype=torch.long)
        if lengths is None:
            return ids, torch.ones_like(ids, dtype=torch.bool)
        row_lengths = torch.as_tensor(lengths, device=device)[index.to(device)]
        return ids, torch.arange(ids.size(1), device=device) < row_lengths.unsqueeze(1)
    selected = [list(token_ids[r]) for r in rows]
    width = max((len(s) for s in selected), default=0)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in selected], dtype=torch.long, device=device)
    valid = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for s in selected], device=device)
    return ids.view(len(rows), width), valid.view(len(rows), width)


def _token_counts(ids: Tensor, valid: Tensor, vocab_size: int) -> Tensor:
    """How often each vocabulary id occurs in each row (float32 so counts stay exact); out-of-range ids are ignored."""
    valid = valid & (ids >= 0) & (ids < vocab_size)
    counts = torch.zeros(ids.size(0), vocab_size, dtype=torch.float32, device=ids.device)
    return counts.scatter_add_(1, ids.masked_fill(~valid, 0), valid.to(torch.float32))


# --------------------------------------------------------------------------------------------------------------------
# The chooser
# --------------------------------------------------------------------------------------------------------------------


class HeterogeneousNextTokenChooser:
    """Chooses the next token of every row of a batch, each row with its own sampling settings.

    Processors run in TGI's order: repetition penalty, frequency penalty, temperature, top-k, top-p, typical-p.
    Each is built only if some row uses it and only touches those rows, so an all-neutral batch costs one
    ``log_softmax`` and one ``argmax``, and a row's scores never depend on its neighbours. Sampling rows draw from
    their own ``torch.Generator`` (seeded by the request, or randomly with the seed kept in :attr:`seeds`); the
    generator state travels with the row through :meth:`filter` and :meth:`concatenate`.

    ``dtype`` is the precision the processors work in: logits are copied into it (float32 is recommended).
    """

    def __init__(
        self,
        params: Sequence[SamplingParameters],
        dtype: torch.dtype = torch.float32,
        device: Union[torch.device, str] = "cpu",
    ) -> None:
        device = torch.device(device)
        self._setup([_Row.from_params(p, device) for p in params], dtype, device)

    def _setup(self, rows: list[_Row], dtype: torch.dtype, device: torch.device) -> None:
        self._rows = rows
        self.dtype = dtype
        self.device = device
        self._penalty_rows = [i for i, r in enumerate(rows) if r.penalised]
        self._penalty_index = _row_index(self._penalty_rows, len(rows), device)
        self._penalty_values = (
            _column([rows[i].repetition_penalty for i in self._penalty_rows], torch.float32, device),
            _column([rows[i].frequency_penalty for i in self._penalty_rows], torch.float32, device),
        )
        self._warpers = self._build_warpers()
        self._samplers = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]

    def _build_warpers(self) -> list[_RowOp]:
        """One op per warper some row uses, restricted to those rows, in TGI's order."""
        rows, batch, device = self._rows, len(self._rows), self.device
        specs: list[tuple[list[int], list[Any], torch.dtype, Callable[[Tensor, Tensor], Tensor]]] = []
        temp = [i for i, r in enumerate(rows) if r.temperature != 1.0]
        specs.append((temp, [rows[i].temperature for i in temp], self.dtype, _temperature))
        top_k = [i for i, r in enumerate(rows) if r.top_k > 0]
        max_k = max((rows[i].top_k for i in top_k), default=1)
        specs.append((top_k, [rows[i].top_k for i in top_k], torch.long, partial(_top_k, max_k=max_k)))
        top_p = [i for i, r in enumerate(rows) if r.top_p < 1.0]
        specs.append((top_p, [1.0 - rows[i].top_p for i in top_p], self.dtype, _top_p))
        typical = [i for i, r in enumerate(rows) if r.typical_p < 1.0]
        specs.append((typical, [rows[i].typical_p for i in typical], self.dtype, _typical_p))
        return [
            _RowOp(_row_index(idx, batch, device), _column(values, dtype, device), fn)
            for idx, values, dtype, fn in specs
            if idx
        ]

    @classmethod
    def _from_rows(cls, rows: list[_Row], dtype: torch.dtype, device: torch.device) -> HeterogeneousNextTokenChooser:
        chooser = cls.__new__(cls)
        chooser._setup(rows, dtype, device)
        return chooser

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seeds(self) -> list[int]:
        """Each row's seed (the request's, or the random one drawn for it); report it when :attr:`do_sample`."""
        return [r.seed for r in self._rows]

    @property
    def do_sample(self) -> list[bool]:
        """Whether each row samples (TGI reports the seed only then) rather than taking the argmax."""
        return [r.do_sample for r in self._rows]

    def process(
        self, token_ids: TokenIds, logits: Tensor, lengths: Optional[Union[Tensor, Sequence[int]]] = None
    ) -> Tensor:
        """The (B, V) scores after every processor, in ``dtype``; ``logits`` is left untouched.

        ``token_ids`` (prompt + generated ids per row) is read only when some row has a penalty. A padded tensor
        needs ``lengths`` unless every position is real.
        """
        if logits.dim() != 2 or logits.size(0) != len(self._rows):
            raise ValueError(f"expected logits of shape ({len(self._rows)}, V), got {tuple(logits.shape)}")
        if not self._penalty_rows and not self._warpers:
            return logits.to(self.dtype)
        scores = logits.to(self.dtype, copy=True)
        if self._penalty_rows:
            scores = self._apply_penalties(scores, token_ids, lengths)
        for warper in self._warpers:
            scores = warper(scores)
        return scores

    def _apply_penalties(
        self, scores: Tensor, token_ids: TokenIds, lengths: Optional[Union[Tensor, Sequence[int]]]
    ) -> Tensor:
        ids, valid = _padded_rows(token_ids, lengths, self._penalty_rows, scores.device)
        counts = _token_counts(ids, valid, scores.size(-1))
        repetition, frequency = self._penalty_values
        return _on_rows(scores, self._penalty_index, lambda sub: _penalise(sub, counts, repetition, frequency))

    def __call__(
        self, token_ids: TokenIds, logits: Tensor, lengths: Optional[Union[Tensor, Sequence[int]]] = None
    ) -> tuple[Tensor, Tensor]:
        """Next id of each row (B,) and the log-softmax of the processed scores (B, V), as TGI reports them."""
        scores = self.process(token_ids, logits, lengths)
        logprobs = torch.log_softmax(scores, dim=-1)
        return self._choose(scores, logprobs), logprobs

    def _choose(self, scores: Tensor, logprobs: Tensor) -> Tensor:
        """Argmax for every row (cheap, vectorised), then overwrite the sampling rows with their own draws."""
        next_ids = scores.argmax(dim=-1)
        for row, generator in self._samplers:
            next_ids[row] = _sample(logprobs[row], generator)
        return next_ids

    def generator_states(self) -> list[tuple[torch.Generator, Tensor]]:
        """Every sampling row's generator with its state now: a step that is undone draws the same numbers again."""
        return [(generator, generator.get_state()) for _, generator in self._samplers]

    @staticmethod
    def restore_generators(states: Sequence[tuple[torch.Generator, Tensor]]) -> None:
        for generator, state in states:
            generator.set_state(state)

    def filter(self, keep: Sequence[int]) -> HeterogeneousNextTokenChooser:
        """A chooser for rows ``keep`` (in that order), e.g. after finished requests leave the batch."""
        return self._from_rows([self._rows[i].clone() for i in keep], self.dtype, self.device)

    @classmethod
    def concatenate(cls, choosers: Sequence[HeterogeneousNextTokenChooser]) -> HeterogeneousNextTokenChooser:
        """One chooser whose rows are those of ``choosers`` in order, e.g. when a new batch joins the running one."""
        if not choosers:
            raise ValueError("concatenate needs at least one chooser")
        rows = [row.clone() for chooser in choosers for row in chooser._rows]
        return cls._from_rows(rows, choosers[0].dtype, choosers[0].device)


def _sample(logprobs: Tensor, generator: torch.Generator) -> Tensor:
    """Draw from softmax via the exponential race (TGI's trick: no multinomial, no host sync)."""
    race = torch.empty_like(logprobs, dtype=torch.float32).exponential_(1.0, generator=generator)
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    return (logprobs.float().exp() / race).argmax()


def top_n_tokens(logprobs: Tensor, n_per_row: Sequence[int]) -> list[list[tuple[int, float]]]:
    """The ``n`` most likely (id, logprob) of each row, best first, as TGI's ``batch_top_tokens``.

    Tokens tied with the n-th are all included (a tie is not broken arbitrarily) and impossible tokens (-inf) are
    never listed, so a row may get more, or fewer, than ``n``.
    """
    batch, vocab = logprobs.shape
    wanted = [min(max(int(n), 0), vocab) for n in n_per_row]
    if len(wanted) != batch:
        raise ValueError(f"n_per_row has {len(wanted)} entries for {batch} rows")
    max_n = max(wanted, default=0)
    if max_n == 0:
        return [[] for _ in wanted]
    n = torch.tensor(wanted, device=logprobs.device)
    top = torch.topk(logprobs, max_n, dim=-1)
    nth = top.values.gather(1, (n - 1).clamp(min=0).unsqueeze(1))
    nth = nth.masked_fill(nth == _NEG_INF, torch.finfo(logprobs.dtype).min)
    counts = torch.where(n > 0, (logprobs >= nth).sum(dim=-1), 0).tolist()
    if max(counts) > max_n:
        top = torch.topk(logprobs, max(counts), dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    return [list(zip(ids[i][:c], values[i][:c])) for i, c in enumerate(counts)]


# --------------------------------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------------------------------


class StoppingCriteria:
    """Whether one request is done, checked after each generated token in TGI's order: length, EOS, stop sequence.

    So when the last allowed token is also EOS the reason is ``"length"``, as TGI reports it. Stop sequences are
    looked for in the generated text only (never the prompt), anywhere in what was added since the last call (also
    across token boundaries): TGI only matches at the very end, which misses a stop string followed by more text in
    the same token. The generated text keeps the stop sequence, as in TGI.
    """

    def __init__(self, params: StoppingParameters, eos_token_ids: Union[int, Iterable[int], None] = None) -> None:
        self.max_new_tokens = params.max_new_tokens
        self.stop_sequences = [s for s in params.stop_sequences if s]
        self.ignore_eos_token = params.ignore_eos_token
        self.eos_token_ids = _id_set(eos_token_ids)
        self.current_tokens = 0
        self._checked_chars = 0

    def __call__(self, last_token_id: Union[int, Tensor], text_so_far: str) -> tuple[bool, Optional[FinishReason]]:
        """Count one more generated token; ``text_so_far`` is all generated text streamed up to and including it."""
        self.current_tokens += 1
        if self.current_tokens >= self.max_new_tokens:
            return True, "length"
        if not self.ignore_eos_token and int(last_token_id) in self.eos_token_ids:
            return True, "eos_token"
        if self._found_stop_sequence(text_so_far):
            return True, "stop_sequence"
        return False, None

    def state(self) -> tuple[int, int]:
        """What a step changes, for :meth:`restore` when the step is undone."""
        return self.current_tokens, self._checked_chars

    def restore(self, state: tuple[int, int]) -> None:
        self.current_tokens, self._checked_chars = state

    def _found_stop_sequence(self, text: str) -> bool:
        """Search only where a new occurrence can be: ending after the text already checked."""
        checked, self._checked_chars = min(self._checked_chars, len(text)), len(text)
        return any(stop in text[max(checked - len(stop) + 1, 0) :] for stop in self.stop_sequences)


def _id_set(ids: Union[int, Iterable[int], None]) -> frozenset[int]:
    if ids is None:
        return frozenset()
    if isinstance(ids, int):
        return frozenset({ids})
    return frozenset(int(i) for i in ids)


# --------------------------------------------------------------------------------------------------------------------
# Streaming detokenisation
# --------------------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Streams one request's text token by token with TGI's ``prefix_offset`` / ``read_offset`` algorithm.

    Each step decodes a short window twice, with and without the new tokens, and emits the difference; decoding a
    few tokens of context defeats tokenizers that add or drop spaces depending on neighbours (SentencePiece). While
    the window's text ends in U+FFFD (an unfinished UTF-8 character of a byte-level or byte-fallback tokenizer)
    nothing is emitted and the tokens wait for the next step. Pieces keep special tokens (``<eos>`` shows in the
    stream, as in TGI); :attr:`generated_text` drops them, as TGI's final ``generated_text`` does.

    Works with a ``transformers`` tokenizer or a raw ``tokenizers.Tokenizer``. Decoding never cleans up
    tokenization spaces, so the streamed pieces add up to the final text.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], context_tokens: int = 5) -> None:
        self._decode = _decoder(tokenizer)
        self._special_ids = _special_ids(tokenizer)
        self._ids = [int(i) for i in prompt_ids]
        self._prompt_len = len(self._ids)
        self._prefix_offset = max(self._prompt_len - context_tokens, 0)
        self._read_offset = self._prompt_len

    def step(self, token_id: Union[int, Tensor]) -> str:
        """Add a generated token and return the text it completes ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset], False)
        new_text = self._decode(self._ids[self._prefix_offset :], False)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def state(self) -> tuple[int, int, int]:
        """What a step changes, for :meth:`restore` when the step is undone."""
        return len(self._ids), self._prefix_offset, self._read_offset

    def restore(self, state: tuple[int, int, int]) -> None:
        length, self._prefix_offset, self._read_offset = state
        del self._ids[length:]

    @property
    def token_ids(self) -> list[int]:
        """Prompt + generated ids: the row's one token history (the list itself, which :meth:`step` extends)."""
        return self._ids

    @property
    def generated_ids(self) -> list[int]:
        return self._ids[self._prompt_len :]

    @property
    def num_generated(self) -> int:
        return len(self._ids) - self._prompt_len

    @property
    def generated_text(self) -> str:
        """All generated tokens decoded without special tokens, after one prompt token of context (as TGI)."""
        start = max(self._prompt_len - 1, 0)
        prefix_text = self._decode(self._ids[start : self._prompt_len], True)
        return self._decode(self._ids[start:], True)[len(prefix_text) :]

    def token_text(self, token_id: Union[int, Tensor]) -> str:
        """One token decoded on its own, special tokens kept (TGI's text for top and prefill tokens)."""
        return self._decode([int(token_id)], False)

    def is_special(self, token_id: Union[int, Tensor]) -> bool:
        """For ``TokenInfo.special``."""
        return int(token_id) in self._special_ids


def _decoder(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """A ``decode(ids, skip_special_tokens)`` for either tokenizer flavour, never cleaning up spaces."""
    if isinstance(tokenizer, tokenizers.Tokenizer):

        def decode_raw(ids: list[int], skip_special: bool) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip_special)

        return decode_raw

    def decode(ids: list[int], skip_special: bool) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    return decode


def _special_ids(tokenizer: Any) -> frozenset[int]:
    if hasattr(tokenizer, "all_special_ids"):
        return frozenset(tokenizer.all_special_ids)
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    return frozenset()
