"""OpenAI-compatible routes with the real ``openai`` client and huggingface_hub's chat_completion."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from tests.serving.fake_engine import FakeEngine, make_tokenizer
from tests.serving.live_server import TIMEOUT, LiveServer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server():
    with LiveServer() as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def test_chat(server, client):
    out = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, temperature=0)
    request = server.engine.requests[-1]
    assert request.adapter_id is None and request.sampling.do_sample is False
    assert request.inputs == "<|system|>be brief\n<|user|>hello world\n<|assistant|>"
    assert request.input_ids[0] != server.engine.tokenizer.bos_token_id  # the template path adds no specials
    assert out.object == "chat.completion" and out.model == "fake/tiny-model"
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(request.input_ids) and out.usage.completion_tokens == 4
    assert out.usage.total_tokens == out.usage.prompt_tokens + 4


def test_chat_model_names_the_adapter(server, client):
    out = client.chat.completions.create(model="perl", messages=MESSAGES, max_tokens=3, temperature=0)
    assert server.engine.requests[-1].adapter_id == "perl" and out.model == "perl"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="cobol", messages=MESSAGES, max_tokens=3)
    assert "cobol" in str(err.value.body) and "`perl`" in str(err.value.body)  # openai unwraps "error"


def test_chat_stream_matches_non_stream(server, client):
    kwargs = dict(model="perl", messages=MESSAGES, max_tokens=5, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].delta.content for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert chunks[-1].usage.completion_tokens == 5 and chunks[0].usage is None
    assert chunks[0].object == "chat.completion.chunk"


def test_chat_n_logprobs_and_sampling(server, client):
    out = client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=3, n=2, seed=5, logprobs=True, top_logprobs=2, top_p=1.0
    )
    assert [c.index for c in out.choices] == [0, 1]
    seeds = [r.sampling.seed for r in server.engine.requests[-2:]]
    assert seeds == [5, 6] and server.engine.requests[-1].sampling.top_p is None
    client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=1, n=2, seed=2**64 - 1)
    assert [r.sampling.seed for r in server.engine.requests[-2:]] == [2**64 - 1, 0]  # u64 seeds wrap round
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=2, n=2, stream=True))
    assert sorted(c.choices[0].index for c in chunks) == [0, 0, 1, 1]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=MESSAGES, n=9)


def test_chat_stream_error_event(client):
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "FAIL"}], stream=True))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "OVERLOAD"}])


def test_completions(server, client):
    out = client.completions.create(model="tgi", prompt="hello world", max_tokens=3, temperature=0)
    tok = server.engine.tokenizer
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    assert out.choices[0].text == tok.decode(ids[:3]) and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(server.engine.requests[-1].input_ids)
    out = client.completions.create(model="perl", prompt=["hello", "world"], max_tokens=2, temperature=0)
    assert [c.index for c in out.choices] == [0, 1] and out.model == "perl"
    chunks = list(
        client.completions.create(model="tgi", prompt="hello world", max_tokens=3, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == tok.decode(ids[:3])
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.UnprocessableEntityError, match="422"):
        client.completions.create(model="tgi", prompt="hi", suffix="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tgi", prompt=["a"] * 5)


def test_openai_sse_framing(server):
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    with (
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        raw = r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {")
        assert set(json.loads(event[6:])) == {
            "object",
            "id",
            "created",
            "model",
            "system_fingerprint",
            "choices",
            "usage",
        }


def test_hub_chat_completion(server):
    hub = InferenceClient(server.url, timeout=TIMEOUT)  # sends model="dummy": the base model
    out = hub.chat_completion(MESSAGES, max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and server.engine.requests[-1].adapter_id is None
    chunks = list(hub.chat_completion(MESSAGES, max_tokens=3, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks) == out.choices[0].message.content
    out = hub.chat_completion(MESSAGES, model="perl", max_tokens=3)
    assert server.engine.requests[-1].adapter_id == "perl"


def test_chat_without_template_uses_plain_transcript():
    engine = FakeEngine(tokenizer=make_tokenizer(chat_template=None))
    with LiveServer(engine) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=2)
    request = engine.requests[-1]
    assert request.inputs == "system: be brief\nuser: hello world\nassistant:"
    assert request.input_ids[0] == engine.tokenizer.bos_token_id


def test_streamed_pieces_add_up_to_the_final_text_when_bytes_were_held_back():
    """The engine's detokenizer holds back an unfinished UTF-8 character ('é' over two byte tokens); the stream's
    last chunk must carry it, or the client's text misses it."""
    from serving.api.openai_routes import StreamedText
    from serving.types import StepOutput, TokenInfo

    def step(text: str, n: int, final: str | None = None) -> StepOutput:
        token = TokenInfo(id=n, text=text, logprob=-0.1, special=False)
        return StepOutput(request_id=1, token=token, generated_tokens=n, generated_text=final,
                          finish_reason="length" if final is not None else None)  # fmt: skip

    streamed = StreamedText()
    steps = [step("print('h", 1), step("", 2), step("llo", 3, final="print('héllo")]
    assert "".join(streamed.piece(0, s) for s in steps) == "print('héllo"
    other = StreamedText()  # choices are tracked apart
    assert other.piece(1, step("x", 1)) == "x" and other.piece(0, step("y", 1, final="y")) == "y"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("key", "value"), [("max_tokens", 2**63), ("max_completion_tokens", 2**70), ("n", True),
                                            ("stream", "yes"), ("seed", -1), ("temperature", "hot")])  # fmt: skip
def test_openai_values_out_of_type_are_422(route, key, value):
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with LiveServer() as live:
        r = httpx.post(live.url + route, json=body | {key: value}, timeout=TIMEOUT)
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text


@pytest.mark.parametrize(
    ("route", "extra", "message"),
    [("/v1/chat/completions", {"top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
     ("/v1/chat/completions", {"logit_bias": {"12": 5.0}}, "`logit_bias` is not supported"),
     ("/v1/chat/completions", {"presence_penalty": 0.5}, "`presence_penalty` is not supported"),
     ("/v1/completions", {"logprobs": 2}, "`logprobs` is not supported"),
     ("/v1/completions", {"suffix": "end"}, "Suffix is not supported")],
)  # fmt: skip
def test_openai_fields_it_cannot_honour_are_refused(route, extra, message):
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with LiveServer() as live:
        r = httpx.post(live.url + route, json=body | extra, timeout=TIMEOUT)
        ok = httpx.post(live.url + route, json=body | {"top_p": 1.0, "presence_penalty": 0}, timeout=TIMEOUT)
    assert r.status_code == 422 and message in r.json()["error"], r.text
    assert ok.status_code == 200  # 1.0 is OpenAI's "off", a zero penalty changes nothing


def test_chat_tokenize_and_invocations_routes():
    """TGI's /chat_tokenize (the templated prompt and its tokens) and SageMaker's /invocations (= POST /)."""
    with LiveServer() as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        r = http.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200
        body = r.json()
        assert "hello" in body["templated_text"] and body["tokenize_response"]
        assert "".join(t["text"] for t in body["tokenize_response"]) == body["templated_text"]
        r = http.post("/invocations", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        same = http.post("/", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200 and r.json() == same.json()
