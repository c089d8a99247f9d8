"""Next-token choice, stopping and streaming detokenisation against transformers' processors and TGI's behaviour."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from serving.sampling import HeterogeneousNextTokenChooser, IncrementalDetokenizer, StoppingCriteria, top_n_tokens
from serving.types import MAX_SEED, SamplingParameters, StoppingParameters

VOCAB = 64


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _ids(rows: int, seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3 + 4 * r,), generator=gen).tolist() for r in range(rows)]


# --------------------------------------------------------------------------------------------------------------------
# Greedy and the processors, one by one
# --------------------------------------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_logprobs_are_log_softmax() -> None:
    explicit_neutral = SamplingParameters(
        temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, frequency_penalty=0.0, seed=5
    )
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(), explicit_neutral, SamplingParameters()])
    logits = _logits(3)
    next_ids, logprobs = chooser(_ids(3), logits)
    assert torch.equal(next_ids, logits.argmax(-1))
    assert torch.equal(logprobs, torch.log_softmax(logits, -1))
    assert chooser.do_sample == [False, False, False]
    assert chooser.seeds[1] == 5


def test_neutral_rows_cost_nothing_once_the_others_leave() -> None:
    chooser = HeterogeneousNextTokenChooser(
        [SamplingParameters(), SamplingParameters(top_k=3, repetition_penalty=2.0)]
    )
    logits = _logits(2)
    neutral = chooser.filter([0])
    assert neutral.process([[1]], logits[:1]).data_ptr() == logits[:1].data_ptr()  # no copy, no processor
    assert neutral.do_sample == [False]


def test_low_precision_dtype_keeps_its_dtype() -> None:
    params = [SamplingParameters(repetition_penalty=1.3, frequency_penalty=0.2, top_k=5, top_p=0.9, seed=1)]
    params.append(SamplingParameters(temperature=0.7, typical_p=0.9, seed=2))
    chooser = HeterogeneousNextTokenChooser(params, dtype=torch.bfloat16)
    next_ids, logprobs = chooser(_ids(2), _logits(2))
    assert logprobs.dtype == torch.bfloat16 and next_ids.dtype == torch.long
    assert torch.isfinite(logprobs.gather(1, next_ids.unsqueeze(1))).all()


def test_repetition_penalty_matches_transformers() -> None:
    penalties = [1.3, None, 0.7, 2.0]
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(repetition_penalty=p) for p in penalties])
    logits, ids = _logits(4), _ids(4)
    scores = chooser.process(ids, logits)
    for row, penalty in enumerate(penalties):
        expected = logits[row : row + 1]
        if penalty is not None:
            expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids[row]]), expected.clone())
        assert torch.equal(scores[row], expected[0]), row
    assert torch.equal(logits, _logits(4)), "the caller's logits must not be modified"


def test_greedy_with_repetition_penalty_takes_argmax_of_penalised_scores() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 0.0, -1.0]])
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(repetition_penalty=2.0)])
    next_ids, _ = chooser([[1, 1]], logits)
    assert chooser.do_sample == [False]
    assert next_ids.tolist() == [2]  # 4 / 2 = 2 < 3


def test_penalties_by_hand_on_a_tiny_vocab() -> None:
    logits = torch.tensor([[-1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    chooser = HeterogeneousNextTokenChooser(
        [
            SamplingParameters(repetition_penalty=2.0, frequency_penalty=0.5),
            SamplingParameters(frequency_penalty=0.5),
        ]
    )
    scores = chooser.process([[0, 1], [0, 0, 3]], logits)
    # row 0: repetition -1*2=-2, 2/2=1; then frequency subtracts 0.5 per occurrence
    assert scores[0].tolist() == [-2.5, 0.5, 3.0, 4.0, 5.0]
    # row 1: OpenAI frequency penalty only, proportional to the count
    assert scores[1].tolist() == [0.0, 2.0, 3.0, 3.5, 5.0]


def test_padded_tensor_with_lengths_equals_ragged_lists() -> None:
    ids = _ids(3)
    width = max(len(r) for r in ids)
    padded = torch.tensor([r + [7] * (width - len(r)) for r in ids])  # pad with a real token id on purpose
    lengths = torch.tensor([len(r) for r in ids])
    chooser = HeterogeneousNextTokenChooser(
        [SamplingParameters(repetition_penalty=1.5, frequency_penalty=0.3 * i) for i in range(3)]
    )
    logits = _logits(3)
    assert torch.equal(chooser.process(padded, logits, lengths), chooser.process(ids, logits))
    assert torch.equal(chooser.process(padded, logits, lengths.tolist()), chooser.process(ids, logits))


@pytest.mark.parametrize(
    ("params", "warper"),
    [
        (SamplingParameters(temperature=0.7), TemperatureLogitsWarper(0.7)),
        (SamplingParameters(temperature=1.9), TemperatureLogitsWarper(1.9)),
        (SamplingParameters(top_k=5), TopKLogitsWarper(5)),
        (SamplingParameters(top_k=1), TopKLogitsWarper(1)),
        (SamplingParameters(top_k=10_000), TopKLogitsWarper(10_000)),
        (SamplingParameters(top_p=0.9), TopPLogitsWarper(0.9)),
        (SamplingParameters(top_p=0.3), TopPLogitsWarper(0.3)),
        (SamplingParameters(typical_p=0.9), TypicalLogitsWarper(0.9)),
        (SamplingParameters(typical_p=0.2), TypicalLogitsWarper(0.2)),
    ],
)
def test_each_warper_matches_transformers_and_leaves_other_rows_alone(params: SamplingParameters, warper) -> None:
    # rows: neutral, the warper, neutral, the warper: each warped row alone through transformers
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(), params, SamplingParameters(seed=3), params])
    logits = _logits(4)
    scores = chooser.process(_ids(4), logits)
    for row in (0, 2):
        assert torch.equal(scores[row], logits[row])
    for row in (1, 3):
        torch.testing.assert_close(scores[row], warper(None, logits[row : row + 1].clone())[0])
    assert chooser.do_sample == [False, True, False, True]


def test_mixed_rows_match_transformers_chain() -> None:
    params = [
        SamplingParameters(temperature=0.8, top_k=12, top_p=0.85, repetition_penalty=1.2, seed=1),
        SamplingParameters(top_k=3, typical_p=0.7, seed=2),
        SamplingParameters(do_sample=True, seed=3),
        SamplingParameters(temperature=1.3, top_p=0.5, typical_p=0.95, seed=4),
    ]
    chooser = HeterogeneousNextTokenChooser(params)
    logits, ids = _logits(4), _ids(4)
    scores = chooser.process(ids, logits)
    for row, p in enumerate(params):
        chain = LogitsProcessorList()
        if p.repetition_penalty:
            chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        if p.temperature:
            chain.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            chain.append(TopKLogitsWarper(p.top_k))
        if p.top_p:
            chain.append(TopPLogitsWarper(p.top_p))
        if p.typical_p:
            chain.append(TypicalLogitsWarper(p.typical_p))
        expected = chain(torch.tensor([ids[row]]), logits[row : row + 1].clone())[0]
        torch.testing.assert_close(scores[row], expected)


def test_top_k_and_top_p_by_hand() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 0.0], [1.0, 5.0, 3.0, 5.0, 0.0]])
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(top_k=2), SamplingParameters(top_k=3)])
    kept = torch.isfinite(chooser.process([[], []], logits)).tolist()
    assert kept == [[False, True, False, True, False], [False, True, True, True, False]]

    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(top_p=0.75)])
    scores = chooser.process([[]], probs.log())
    assert torch.isfinite(scores).tolist() == [[True, True, False, False, False]]


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="temperature"):
        HeterogeneousNextTokenChooser([SamplingParameters(temperature=0.0)])
    with pytest.raises(ValueError, match="repetition_penalty"):
        HeterogeneousNextTokenChooser([SamplingParameters(repetition_penalty=-1.0)])


# --------------------------------------------------------------------------------------------------------------------
# Seeded sampling: reproducible, and each row independent of the batch it is in
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """A request whose logits at step t depend only on the request itself, never on the batch."""

    params: SamplingParameters
    prompt: list[int]
    logit_seed: int
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def logits(self) -> torch.Tensor:
        return _logits(1, seed=self.logit_seed * 1000 + len(self.generated))[0]

    def fresh(self, params: SamplingParameters | None = None) -> _Request:
        return _Request(params or self.params, self.prompt, self.logit_seed)


def _step(chooser: HeterogeneousNextTokenChooser, batch: list[_Request]) -> None:
    ids = [r.prompt + r.generated for r in batch]
    next_ids, logprobs = chooser(ids, torch.stack([r.logits() for r in batch]))
    for row, request in enumerate(batch):
        request.generated.append(int(next_ids[row]))
        request.logprobs.append(float(logprobs[row, next_ids[row]]))


def _requests() -> list[_Request]:
    return [
        _Request(SamplingParameters(temperature=0.8, top_k=10, seed=11), [1, 2, 3], 1),
        _Request(SamplingParameters(top_p=0.9, frequency_penalty=0.4, seed=12), [4, 5], 2),
        _Request(SamplingParameters(typical_p=0.9, repetition_penalty=1.2, seed=13), [6], 3),
        _Request(SamplingParameters(repetition_penalty=1.1), [7, 8, 9, 10], 4),  # greedy
        _Request(SamplingParameters(do_sample=True, temperature=1.5), [2], 5),  # random seed
    ]


def _alone(request: _Request, steps: int, seed: int) -> _Request:
    """The reference: the request in a batch of its own, with the seed the batched run reported."""
    params = SamplingParameters(**{**request.params.__dict__, "seed": seed})
    solo = request.fresh(params)
    chooser = HeterogeneousNextTokenChooser([solo.params])
    for _ in range(steps):
        _step(chooser, [solo])
    return solo


def test_seeded_sampling_is_reproducible() -> None:
    def run() -> list[list[int]]:
        batch = [r.fresh() for r in _requests()[:4]]
        chooser = HeterogeneousNextTokenChooser([r.params for r in batch])
        for _ in range(6):
            _step(chooser, batch)
        return [r.generated for r in batch]

    assert run() == run()


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4]])
def test_rows_do_not_depend_on_batch_composition_or_order(order: list[int]) -> None:
    requests = _requests()
    batch = [requests[i].fresh() for i in order]
    chooser = HeterogeneousNextTokenChooser([r.params for r in batch])
    for _ in range(8):
        _step(chooser, batch)
    for request, seed, do_sample in zip(batch, chooser.seeds, chooser.do_sample):
        solo = _alone(request, 8, seed)
        assert request.generated == solo.generated
        assert request.logprobs == solo.logprobs
        if request.params.seed is not None:
            assert seed == request.params.seed
        assert do_sample == (not request.params.is_greedy)


def test_state_follows_rows_through_filter_and_concatenate() -> None:
    a, b, c, d, e = _requests()
    batch = [a, b, c]
    chooser = HeterogeneousNextTokenChooser([r.params for r in batch])
    for _ in range(3):
        _step(chooser, batch)
    # a new batch (d, e) joins the running one
    newcomers = [d, e]
    joining = HeterogeneousNextTokenChooser([r.params for r in newcomers])
    _step(joining, newcomers)  # their prefill step
    chooser = HeterogeneousNextTokenChooser.concatenate([chooser, joining])
    batch = batch + newcomers
    for _ in range(2):
        _step(chooser, batch)
    # b and d finish; the rest are reordered
    keep = [4, 2, 0]
    seeds = chooser.seeds
    chooser = chooser.filter(keep)
    batch = [batch[i] for i in keep]
    assert chooser.seeds == [seeds[i] for i in keep]
    for _ in range(3):
        _step(chooser, batch)
    assert [len(r.generated) for r in (a, b, c, d, e)] == [8, 5, 8, 3, 6]
    for request, seed in zip((e, c, a), chooser.seeds):
        assert request.generated == _alone(request, len(request.generated), seed).generated
    assert b.generated == _alone(b, 5, 12).generated
    assert d.generated == _alone(d, 3, 0).generated


def test_filter_copies_generator_state() -> None:
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(do_sample=True, seed=1)] * 2)
    logits = torch.zeros(2, 1000)
    history: list[list[int]] = [[], []]
    chooser(history, logits)
    copy = chooser.filter([1])
    first, _ = copy([[]], logits[:1])
    again, _ = chooser(history, logits)  # the original is not advanced by the copy
    assert int(again[1]) == int(first[0])
    assert int(again[0]) == int(again[1])  # same seed, same number of draws


def test_random_seed_is_reported_and_reproduces() -> None:
    params = SamplingParameters(do_sample=True)
    first = HeterogeneousNextTokenChooser([params, params])
    assert first.seeds[0] != first.seeds[1]
    replay = HeterogeneousNextTokenChooser([SamplingParameters(do_sample=True, seed=first.seeds[1])])
    logits = torch.zeros(2, 1000)
    draws = [int(first([[], []], logits)[0][1]) for _ in range(5)]
    assert draws == [int(replay([[]], logits[1:])[0][0]) for _ in range(5)]


def test_both_ends_of_the_seed_range_seed_a_generator() -> None:
    """torch.Generator.manual_seed takes every u64: seeds 0 and MAX_SEED sample, are reported and reproduce."""
    ends = [SamplingParameters(do_sample=True, seed=seed) for seed in (0, MAX_SEED)]
    chooser, replay = HeterogeneousNextTokenChooser(ends), HeterogeneousNextTokenChooser(ends)
    assert chooser.seeds == [0, MAX_SEED]
    logits = torch.zeros(2, 1000)
    draws = [chooser([[], []], logits)[0].tolist() for _ in range(3)]
    assert draws == [replay([[], []], logits)[0].tolist() for _ in range(3)]
    assert all(0 <= seed <= MAX_SEED for seed in HeterogeneousNextTokenChooser([SamplingParameters()] * 8).seeds)


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 3000
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(do_sample=True, seed=s) for s in range(rows)])
    next_ids, _ = chooser([[]] * rows, probs.log().expand(rows, -1))
    frequencies = torch.bincount(next_ids, minlength=4).float() / rows
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)
    # top_k=1 sampling is greedy whatever the seed
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(top_k=1, seed=s) for s in range(50)])
    assert chooser([[]] * 50, probs.log().expand(50, -1))[0].eq(3).all()


def test_empty_batch() -> None:
    chooser = HeterogeneousNextTokenChooser([SamplingParameters(top_k=3, seed=1)]).filter([])
    next_ids, logprobs = chooser([], torch.zeros(0, VOCAB))
    assert next_ids.shape == (0,) and logprobs.shape == (0, VOCAB)


# --------------------------------------------------------------------------------------------------------------------
# Top tokens
# --------------------------------------------------------------------------------------------------------------------


def test_top_n_tokens_keeps_ties_and_skips_impossible_tokens() -> None:
    inf = math.inf
    logprobs = torch.tensor(
        [
            [-1.0, -2.0, -2.0, -3.0, -inf],
            [-1.0, -2.0, -2.0, -3.0, -inf],
            [-inf, -inf, -inf, -inf, 0.0],
            [-1.0, -2.0, -2.0, -3.0, -inf],
            [-0.5, -4.0, -1.0, -3.0, -2.0],
        ]
    )
    top = top_n_tokens(logprobs, [2, 0, 3, 10, 2])
    assert top[0][0] == (0, -1.0) and sorted(top[0][1:]) == [(1, -2.0), (2, -2.0)]
    assert top[1] == []
    assert top[2] == [(4, 0.0)]
    assert [i for i, _ in top[3]][0] == 0 and len(top[3]) == 4
    assert top[4] == [(0, -0.5), (2, -1.0)]
    assert top_n_tokens(logprobs, [0] * 5) == [[]] * 5


# --------------------------------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------------------------------


def test_stopping_on_length() -> None:
    stop = StoppingCriteria(StoppingParameters(max_new_tokens=3), eos_token_ids=0)
    assert stop(5, "a") == (False, None)
    assert stop(6, "ab") == (False, None)
    assert stop(7, "abc") == (True, "length")
    assert stop.current_tokens == 3


def test_stopping_on_eos_and_ignore_eos() -> None:
    stop = StoppingCriteria(StoppingParameters(max_new_tokens=10), eos_token_ids=[0, 7])
    assert stop(3, "x") == (False, None)
    assert stop(torch.tensor(7), "x") == (True, "eos_token")
    ignoring = StoppingCriteria(StoppingParameters(max_new_tokens=10, ignore_eos_token=True), eos_token_ids={0, 7})
    assert ignoring(7, "x") == (False, None)
    assert StoppingCriteria(StoppingParameters(max_new_tokens=10))(7, "x") == (False, None)


def test_length_takes_precedence_over_eos_as_in_tgi() -> None:
    stop = StoppingCriteria(StoppingParameters(max_new_tokens=1, stop_sequences=["x"]), eos_token_ids=0)
    assert stop(0, "x") == (True, "length")


def test_stopping_on_stop_sequences() -> None:
    params = StoppingParameters(max_new_tokens=100, stop_sequences=["\n\n", "END", ""])
    stop = StoppingCriteria(params, eos_token_ids=0)
    assert stop(1, "Hello") == (False, None)
    assert stop(2, "Hello\n") == (False, None)
    # across the token boundary, followed by more text of the same token
    assert stop(3, "Hello\n\nmore") == (True, "stop_sequence")

    stop = StoppingCriteria(params, eos_token_ids=0)
    assert stop(1, "the E") == (False, None)
    assert stop(2, "the EN") == (False, None)
    assert stop(3, "the END") == (True, "stop_sequence")

    stop = StoppingCriteria(params, eos_token_ids=0)
    for i, text in enumerate(["a", "ab", "abc", "abc"]):  # a token that added no text
        assert stop(i + 1, text) == (False, None)


# --------------------------------------------------------------------------------------------------------------------
# Streaming detokenisation
# --------------------------------------------------------------------------------------------------------------------

_CORPUS = [
    "Hello world, this is a small corpus for a byte-level tokenizer.",
    "Café crème brûlée, s'il vous plaît. Déjà vu à l'école.",
    "日本語のテキストです。日本は島国です。",
    "Emoji time 🎉🚀 and 👍🏽 thumbs up!",
    "The quick brown fox jumps over the lazy dog.",
]
# rare characters (not in the corpus) are split into single bytes, so streaming must wait for the rest
_GENERATED = " Café 日本 🎉🚀 👍🏽 über 語 🦀 naïve — done."


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 3, trainer)
    return tokenizer


@pytest.fixture(params=["tokenizers", "transformers"])
def tokenizer(request: pytest.FixtureRequest, raw_tokenizer: Tokenizer):
    if request.param == "tokenizers":
        return raw_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, eos_token="<eos>")


def test_streamed_pieces_add_up_to_the_full_decode(tokenizer, raw_tokenizer: Tokenizer) -> None:
    eos = raw_tokenizer.token_to_id("<eos>")
    prompt = raw_tokenizer.encode("Hello world, déjà").ids
    generated = raw_tokenizer.encode(_GENERATED).ids + [eos]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(token) for token in generated]

    assert "" in pieces, "the test text should contain characters split over several tokens"
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == raw_tokenizer.decode(generated, skip_special_tokens=False) == _GENERATED + "<eos>"
    full = raw_tokenizer.decode(prompt + generated, skip_special_tokens=False)
    assert "".join(pieces) == full[len(raw_tokenizer.decode(prompt)) :]
    assert detok.generated_ids == generated
    assert detok.generated_text == _GENERATED  # special tokens dropped, as TGI's generated_text
    assert detok.token_text(eos) == "<eos>" and detok.is_special(eos)
    assert not detok.is_special(generated[0])
    assert detok.token_text(generated[0]) == raw_tokenizer.decode([generated[0]])


def test_streaming_without_a_prompt(raw_tokenizer: Tokenizer) -> None:
    generated = raw_tokenizer.encode("🦀日本").ids
    detok = IncrementalDetokenizer(raw_tokenizer, [])
    assert "".join(detok.step(t) for t in generated) == "🦀日本" == detok.generated_text


def test_unfinished_character_is_withheld(raw_tokenizer: Tokenizer) -> None:
    crab = raw_tokenizer.encode("🦀").ids
    assert len(crab) > 1  # its four UTF-8 bytes need several tokens
    detok = IncrementalDetokenizer(raw_tokenizer, raw_tokenizer.encode("Hi").ids)
    assert [detok.step(t) for t in crab] == [""] * (len(crab) - 1) + ["🦀"]
