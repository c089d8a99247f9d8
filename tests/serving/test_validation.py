"""Validator: TGI's rules, messages and order, truncation, default max_new_tokens, strict adapter ids."""

from __future__ import annotations

import pydantic
import pytest

from serving.schemas import ChatRequest, GenerateParameters, GenerateRequest
from serving.types import MAX_SEED, ValidationError, random_seed
from serving.validation import DEFAULT_GENERATION_LENGTH, Validator, fork
from tests.serving.fake_engine import MODEL_ID, make_tokenizer

ADAPTERS = ["perl", "rust"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def validator(tokenizer) -> Validator:
    return Validator(
        tokenizer, 16, 200, lambda name: name in ADAPTERS, adapter_names=lambda: list(ADAPTERS), model_id=MODEL_ID
    )


def params(**kwargs) -> GenerateParameters:
    return GenerateParameters(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": -1.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"best_of": 2, "do_sample": True, "seed": 3}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 17}, "`truncate` must be strictly positive and less than 16. Given: 17"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 16. Given: 0"),
        (
            {"max_new_tokens": 199},
            "`inputs` tokens + `max_new_tokens` must be <= 200. Given: 7 `inputs` tokens and 199 `max_new_tokens`",
        ),
        ({"grammar": {"type": "regex", "value": "a+"}}, "grammar is not supported"),
        ({"watermark": True}, "`watermark` is not supported"),
    ],
)
def test_tgi_messages(validator, kwargs, message):
    with pytest.raises(ValidationError) as err:
        validator.validate("hello world", params(**kwargs))
    assert str(err.value).startswith(message)


def test_checks_run_in_tgi_order(validator):
    # temperature is checked before top_k in TGI, whatever the field order in the request
    with pytest.raises(ValidationError, match="temperature"):
        validator.validate("hello", params(top_k=-1, temperature=-1.0))


def test_empty_and_too_long_inputs(validator):
    with pytest.raises(ValidationError, match=r"^`inputs` cannot be empty$"):
        validator.validate("", params())
    long = "hello world " * 10
    n = len(validator.encode(long))
    with pytest.raises(ValidationError) as err:
        validator.validate(long, params(max_new_tokens=1))
    assert str(err.value) == f"`inputs` must have less than 16 tokens. Given: {n}"


def test_truncate_keeps_the_last_tokens(validator):
    text = "hello world " * 10
    ids = validator.encode(text)
    request = validator.validate(text, params(truncate=5, max_new_tokens=3))
    assert request.input_ids == ids[-5:]
    assert request.inputs == text


def test_default_max_new_tokens(validator, tokenizer):
    n = len(validator.encode("hello world"))
    assert validator.validate("hello world", params(max_new_tokens=None)).stopping.max_new_tokens == 200 - n
    assert GenerateParameters().max_new_tokens == 100  # field absent: TGI's default
    big = Validator(tokenizer, 10, 5000, lambda _: False)
    request = big.validate("hello world", params(max_new_tokens=None))
    assert request.stopping.max_new_tokens == DEFAULT_GENERATION_LENGTH


def test_missing_parameters_sample_as_tgi():
    assert GenerateRequest(inputs="x").parameters.do_sample is True
    assert GenerateRequest(inputs="x", parameters={}).parameters.do_sample is False


def test_request_fields(validator):
    request = validator.validate(
        "hello world",
        params(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, stop=["x"], top_n_tokens=2, max_new_tokens=4),
    )
    assert request.sampling.temperature == 0.7 and request.sampling.top_k == 5 and request.sampling.top_p == 0.9
    assert request.sampling.seed is not None  # TGI draws a seed when none is given
    assert request.stopping.max_new_tokens == 4 and request.stopping.stop_sequences == ["x"]
    assert request.top_n_tokens == 2 and request.adapter_id is None
    assert validator.validate("hi", params(seed=42)).sampling.seed == 42


@pytest.mark.parametrize("name", [None, "", "tgi", MODEL_ID])
def test_base_model_names(validator, name):
    assert validator.validate("hi", params(adapter_id=name)).adapter_id is None


def test_adapters(validator):
    assert validator.validate("hi", params(adapter_id="rust")).adapter_id == "rust"
    with pytest.raises(ValidationError) as err:
        validator.validate("hi", params(adapter_id="cobol"))
    assert "`cobol`" in str(err.value) and "`perl`, `rust`" in str(err.value)


def test_best_of_and_stream_rules(validator):
    assert validator.validate_best_of(2) == 2
    with pytest.raises(ValidationError, match=r"`best_of` must be > 0 and <= 2. Given: 3"):
        validator.validate_best_of(3)
    one = Validator(validator.tokenizer, 16, 200, lambda _: False, max_best_of=1)
    with pytest.raises(ValidationError, match="not allowed for this endpoint"):
        one.validate_best_of(2)
    with pytest.raises(ValidationError, match="`best_of` != 1 is not supported when streaming tokens"):
        Validator.validate_stream(params(best_of=2))
    with pytest.raises(ValidationError, match="`decoder_input_details` == true is not supported"):
        Validator.validate_stream(params(decoder_input_details=True))


def test_fork_changes_id_and_seed(validator):
    request = validator.validate("hi", params(do_sample=True))
    other = fork(request)
    assert other.id != request.id and other.input_ids == request.input_ids
    assert fork(request, seed=7).sampling.seed == 7


def test_seeds_are_tgis_u64_at_both_ends(validator):
    """One seed range, TGI's u64: both ends are accepted (TGI and OpenAI routes) and the drawn seeds use all of it."""
    assert MAX_SEED == 2**64 - 1
    for seed in (0, MAX_SEED):
        assert validator.validate("hi", params(do_sample=True, seed=seed)).sampling.seed == seed
        assert ChatRequest(messages=[{"role": "user", "content": "hi"}], seed=seed).seed == seed
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(pydantic.ValidationError):
            params(seed=seed)
        with pytest.raises(pydantic.ValidationError):
            ChatRequest(messages=[{"role": "user", "content": "hi"}], seed=seed)
    drawn = [random_seed() for _ in range(64)] + [validator.validate("hi", params(do_sample=True)).sampling.seed]
    assert all(0 <= seed <= MAX_SEED for seed in drawn)
    assert max(drawn) > 2**63  # 64 bits, not 63 (all 65 below 2**63: a chance of 2**-65)
