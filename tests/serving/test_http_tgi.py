"""TGI routes over real HTTP with the real clients (huggingface_hub, text-generation) and raw httpx."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import GenerationError as HubGenerationError
from huggingface_hub.errors import OverloadedError as HubOverloadedError
from huggingface_hub.errors import ValidationError as HubValidationError

from tests.serving.live_server import TIMEOUT, LiveServer


@pytest.fixture(scope="module")
def server():
    with LiveServer() as live:
        yield live


@pytest.fixture(scope="module")
def hub(server) -> InferenceClient:
    return InferenceClient(server.url, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


def echo(server, prompt: str, n: int, adapter: bool = False) -> str:
    """What the fake engine answers greedily: the prompt's tokens again (reversed with an adapter)."""
    tok = server.engine.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = ids[::-1] if adapter else ids
    return tok.decode([ids[i % len(ids)] for i in range(n)])


def n_tokens(server, prompt: str) -> int:
    return len(server.engine.tokenizer(prompt)["input_ids"])


def sse_events(body: bytes, prefix: bytes = b"data:") -> list[dict]:
    """Split a body into events, checking TGI's framing byte by byte on the way."""
    assert body.endswith(b"\n\n")
    events = []
    for raw in body.split(b"\n\n")[:-1]:
        assert raw.startswith(prefix) and not raw.startswith(prefix + b" "), raw
        assert b"\n" not in raw
        events.append(json.loads(raw[len(prefix) :]))
    return events


# ------------------------------------------------------------------------------------------ huggingface_hub


def test_hub_plain_and_full_text(server, hub):
    # POST / without return_full_text prepends the prompt, as TGI does for models without a pipeline tag.
    assert hub.text_generation("hello world", max_new_tokens=3) == "hello world" + echo(server, "hello world", 3)
    assert hub.text_generation("hello world", max_new_tokens=3, return_full_text=False) == echo(
        server, "hello world", 3
    )
    assert server.engine.requests[-1].stopping.max_new_tokens == 3


def test_hub_details(server, hub):
    out = hub.text_generation("hello world", max_new_tokens=4, details=True, return_full_text=False)
    assert out.generated_text == echo(server, "hello world", 4)
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 4
    assert len(out.details.tokens) == 4 and out.details.tokens[0].logprob == pytest.approx(-0.1)
    assert out.details.seed is None and out.details.best_of_sequences is None


def test_hub_stream(server, hub):
    tokens = list(hub.text_generation("hello world", max_new_tokens=5, stream=True))
    assert "".join(tokens) == echo(server, "hello world", 5)
    outs = list(hub.text_generation("hello world", max_new_tokens=5, stream=True, details=True))
    assert [o.index for o in outs] == [1, 2, 3, 4, 5]
    assert all(o.details is None and o.generated_text is None for o in outs[:-1])
    assert outs[-1].details.finish_reason == "length" and outs[-1].details.input_length == n_tokens(
        server, "hello world"
    )
    assert outs[-1].generated_text.endswith(echo(server, "hello world", 5))


def test_hub_adapter_id(server, hub):
    out = hub.text_generation("hello world", max_new_tokens=3, adapter_id="perl", return_full_text=False)
    assert out == echo(server, "hello world", 3, adapter=True)
    assert server.engine.requests[-1].adapter_id == "perl"
    tokens = list(hub.text_generation("hello world", max_new_tokens=3, adapter_id="perl", stream=True))
    assert "".join(tokens) == out


def test_hub_unknown_adapter_is_a_validation_error(hub):
    with pytest.raises(HubValidationError, match=r"adapter `cobol` is not loaded.*`perl`"):
        hub.text_generation("hello", max_new_tokens=2, adapter_id="cobol")
    with pytest.raises(HubValidationError, match="cobol"):
        list(hub.text_generation("hello", max_new_tokens=2, adapter_id="cobol", stream=True))


def test_hub_errors(hub):
    with pytest.raises(HubValidationError, match="`temperature` must be strictly positive"):
        hub.text_generation("hello", temperature=-1.0)
    with pytest.raises(HubGenerationError, match="Request failed during generation"):
        hub.text_generation("hello FAILNOW", max_new_tokens=3)
    with pytest.raises(HubOverloadedError, match="Model is overloaded"):
        hub.text_generation("hello OVERLOAD", max_new_tokens=3)
    with pytest.raises(HubGenerationError, match="failed while decoding"):
        list(hub.text_generation("hello FAIL", max_new_tokens=6, stream=True))


def test_hub_best_of(server, hub):
    out = hub.text_generation("hello world again", best_of=2, do_sample=True, details=True, max_new_tokens=3)
    assert len(out.details.best_of_sequences) == 1
    assert out.details.seed is not None and out.details.best_of_sequences[0].seed is not None
    assert len({r.id for r in server.engine.requests[-2:]}) == 2


def test_hub_prefill_top_tokens_and_stop(server, hub):
    out = hub.text_generation(
        "hello world", max_new_tokens=4, details=True, decoder_input_details=True, top_n_tokens=2
    )
    assert [t.id for t in out.details.prefill] == server.engine.requests[-1].input_ids
    assert out.details.prefill[0].logprob is None
    assert len(out.details.top_tokens) == 4 and all(len(t) == 2 for t in out.details.top_tokens)
    out = hub.text_generation("hello world", max_new_tokens=10, stop=["wor"], details=True, return_full_text=False)
    assert out.details.finish_reason == "stop_sequence" and out.generated_text.endswith("wor")


# ------------------------------------------------------------------------------------------ text-generation


def test_text_generation_client(server):
    # installed with `pip install --no-deps text-generation==0.7.0`: it pins huggingface-hub<1.0
    text_generation = pytest.importorskip("text_generation")
    client = text_generation.Client(server.url, timeout=int(TIMEOUT))
    response = client.generate("hello world", max_new_tokens=3)
    assert response.generated_text == echo(server, "hello world", 3)
    assert response.details.generated_tokens == 3
    stream = list(client.generate_stream("hello world", max_new_tokens=3))
    assert "".join(s.token.text for s in stream) == response.generated_text
    assert stream[-1].details.finish_reason == "length"
    with pytest.raises(text_generation.errors.ValidationError, match="must be <= 512"):
        client.generate("hello world", max_new_tokens=3000)
    with pytest.raises(text_generation.errors.OverloadedError):
        client.generate("OVERLOAD", max_new_tokens=3)
    with pytest.raises(text_generation.errors.GenerationError):
        list(client.generate_stream("hello FAIL", max_new_tokens=6))


# --------------------------------------------------------------------------------------------------- raw HTTP


def test_generate_json_shape_and_headers(server, http):
    r = http.post("/generate", json={"inputs": "hello world", "parameters": {"max_new_tokens": 2, "details": True}})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"generated_text", "details"}
    assert set(body["details"]) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert set(body["details"]["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert r.headers["x-prompt-tokens"] == str(n_tokens(server, "hello world"))
    assert r.headers["x-generated-tokens"] == "2"
    for name in ("x-compute-type", "x-compute-time", "x-total-time", "x-queue-time", "x-inference-time"):
        assert name in r.headers
    r = http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    assert set(r.json()) == {"generated_text"}
    r = http.post("/", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    assert isinstance(r.json(), list) and set(r.json()[0]) == {"generated_text"}


def test_sse_framing(server, http):
    payload = {"inputs": "hello world", "parameters": {"max_new_tokens": 3, "details": True}}
    for path, extra in (("/generate_stream", {}), ("/", {"stream": True})):
        with http.stream("POST", path, json={**payload, **extra}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            body = r.read()
        events = sse_events(body)
        assert [e["index"] for e in events] == [1, 2, 3]
        for event in events[:-1]:
            assert event["generated_text"] is None and event["details"] is None and "top_tokens" not in event
        n = n_tokens(server, "hello world")
        assert events[-1]["details"] == {
            "finish_reason": "length",
            "generated_tokens": 3,
            "seed": None,
            "input_length": n,
        }
    assert events[-1]["generated_text"] == "hello world" + echo(server, "hello world", 3)  # compat: full text


def test_stream_error_after_start_is_a_final_event(http):
    payload = {"inputs": "hello FAIL world", "parameters": {"max_new_tokens": 8}}
    with http.stream("POST", "/generate_stream", json=payload) as r:
        assert r.status_code == 200
        events = sse_events(r.read())
    assert len(events) == 3 and "token" in events[0]
    assert events[-1] == {
        "error": "Request failed during generation: the fake model failed while decoding",
        "error_type": "generation",
    }


@pytest.mark.parametrize(
    ("path", "payload", "status", "error", "error_type"),
    [
        ("/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422,
         "Input validation error: `temperature` must be strictly positive", "validation"),
        ("/generate", {"inputs": "", "parameters": {}}, 422, "Input validation error: `inputs` cannot be empty",
         "validation"),
        ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": {}}}}, 422,
         "Input validation error: grammar is not supported", "validation"),
        ("/generate", {"inputs": "hi FAILNOW", "parameters": {}}, 424,
         "Request failed during generation: the fake model failed at prefill", "generation"),
        ("/generate", {"inputs": "hi OVERLOAD", "parameters": {}}, 429, "Model is overloaded", "overloaded"),
        ("/generate_stream", {"inputs": "hi OVERLOAD", "parameters": {}}, 429, "Model is overloaded", "overloaded"),
        ("/generate_stream", {"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True}}, 422,
         "Input validation error: `best_of` != 1 is not supported when streaming tokens", "validation"),
        ("/generate", {"inputs": "hi", "parameters": {"best_of": 3, "do_sample": True}}, 422,
         "Input validation error: `best_of` must be > 0 and <= 2. Given: 3", "validation"),
        ("/", {"inputs": "hi", "stream": True, "parameters": {"adapter_id": "cobol"}}, 422, None, "validation"),
    ],
)  # fmt: skip
def test_error_bodies(http, path, payload, status, error, error_type):
    r = http.post(path, json=payload)
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    assert error is None or body["error"] == error


def test_request_body_errors(http):
    r = http.post("/generate", json={"inputs": "hi", "parameters": {"temperature": "hot"}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Failed to deserialize the JSON body into the target type: parameters.temp")
    r = http.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": -1}})
    assert r.status_code == 422
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error_type"] == "validation"


def test_truncate_and_default_max_new_tokens(server, http):
    text = "hello world " * 4
    ids = server.engine.tokenizer(text)["input_ids"]
    http.post("/generate", json={"inputs": text, "parameters": {"truncate": 3, "max_new_tokens": 1}})
    assert server.engine.requests[-1].input_ids == ids[-3:]
    http.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": None}})
    assert server.engine.requests[-1].stopping.max_new_tokens == 512 - len(ids)
    http.post("/generate", json={"inputs": text, "parameters": {}})
    assert server.engine.requests[-1].stopping.max_new_tokens == 100
    assert server.engine.requests[-1].sampling.do_sample is False
    http.post("/generate", json={"inputs": text})  # no parameters at all: TGI samples
    assert server.engine.requests[-1].sampling.do_sample is True


def test_info_health_tokenize_models(server, http):
    info = http.get("/info").json()
    assert info["model_id"] == "fake/tiny-model" and info["max_input_tokens"] == 256
    assert info["max_total_tokens"] == 512 and info["max_best_of"] == 2 and info["adapters"] == ["perl"]
    assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
    tokens = http.post("/tokenize", json={"inputs": "hello world"}).json()
    assert [t["id"] for t in tokens] == server.engine.tokenizer("hello world")["input_ids"]
    assert all("hello world"[t["start"] : t["stop"]] == t["text"] for t in tokens)
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake/tiny-model", "perl"]


@pytest.mark.parametrize(
    "parameters",
    [{"top_k": 2**63}, {"top_k": True}, {"top_k": 1.5}, {"do_sample": "yes"}, {"details": 1},
     {"max_new_tokens": 2**32}, {"seed": 2**64}, {"top_n_tokens": -1}, {"best_of": "2"}],
)  # fmt: skip
def test_values_tgi_refuses_at_the_door_are_422(http, parameters):
    r = http.post("/generate", json={"inputs": "hi", "parameters": parameters})
    assert r.status_code == 422 and r.json()["error_type"] == "validation", (parameters, r.text)


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"])
def test_nan_and_infinite_floats_are_422(http, name):
    for value in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"inputs": "hi", "parameters": {"%s": %s}}' % (name.encode(), value)
        r = http.post("/generate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error_type"] == "validation", (name, value, r.text)


def test_a_huge_prompt_is_refused_before_tokenizing_and_validation_runs_off_the_loop(monkeypatch):
    """A 1.9 MB prompt (under the payload limit) is a 422 from a length check, without a tokenizer call; every
    request is validated in the validation pool, so the event loop (/health, other streams) never waits on it."""
    from serving.validation import Validator

    threads, encoded = [], []
    real_validate, real_encode = Validator.validate, Validator.encode

    def spy_validate(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_validate(self, *args, **kwargs)

    def spy_encode(self, inputs, *args, **kwargs):
        encoded.append(len(inputs))
        return real_encode(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Validator, "validate", spy_validate)
    monkeypatch.setattr(Validator, "encode", spy_encode)
    with LiveServer() as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        r = http.post("/generate", json={"inputs": "ab" * 950_000, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 422 and "must have less than 256 tokens" in r.json()["error"]
        assert encoded == []  # refused by length alone
        r = http.post("/generate", json={"inputs": "ab " * 10_000, "parameters": {"truncate": 8, "max_new_tokens": 2}})
        assert r.status_code == 200 and encoded and encoded[-1] < 30_000  # truncate: only a suffix is tokenized
        r = http.post("/tokenize", json={"inputs": "ab" * 950_000})
        assert r.status_code == 422
        assert http.get("/health").status_code == 200
    assert threads and all(name.startswith("validation") for name in threads)


@pytest.mark.parametrize(
    ("path", "raw"),
    [("/generate", b'{"inputs": "\\ud800 lone", "parameters": {}}'),
     ("/tokenize", b'{"inputs": "\\ud800 lone"}'),
     ("/generate", b'{"inputs": "ok", "parameters": {"adapter_id": "\\udfff"}}'),
     ("/generate_stream", b'{"inputs": "ok", "parameters": {"adapter_id": "\\ud800"}}'),
     ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
     ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
     ("/generate", b'{"inputs": "\xff\xfe not utf-8", "parameters": {}}')],
)  # fmt: skip
def test_hostile_strings_are_4xx_and_the_server_keeps_serving(http, path, raw):
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "error_type"}, r.text
    assert http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_a_prompt_of_only_special_tokens_is_served(http):
    r = http.post("/generate", json={"inputs": "<s></s><pad><s>", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and "generated_text" in r.json()
