"""The vLLM engine's mapping between TGI requests and vLLM results, against a stand-in for vLLM's ``AsyncLLM``.

vLLM itself runs in tests/vllm (inside .venv-vllm); what is tested here needs no vLLM: how results become TGI step
outputs, errors, cancellation and adapters.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import serving.vllm_engine as vllm_engine
from serving.types import GenerationError, GenerationRequest, SamplingParameters, StoppingParameters, ValidationError
from serving.vllm_engine import VLLMEngine, finish_reason
from tests.serving.tiny_serving import tiny_tokenizer


class FakeLLM:
    """Yields ``script`` (lists of token ids per delta) as vLLM's DELTA outputs; records aborts and adapters."""

    def __init__(self, script, reason="length", stop_reason=None, fail_after=None):
        self.script, self.reason, self.stop_reason, self.fail_after = script, reason, stop_reason, fail_after
        self.aborted, self.loras, self.calls = [], {}, []

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.calls.append((prompt, request_id, lora_request))
        for k, ids in enumerate(self.script):
            if self.fail_after is not None and k == self.fail_after:
                raise RuntimeError("engine core died")
            last = k == len(self.script) - 1
            logprobs = [
                {i: SimpleNamespace(logprob=-0.5, rank=1), 7: SimpleNamespace(logprob=-2.0, rank=2)} for i in ids
            ]
            out = SimpleNamespace(
                token_ids=ids, logprobs=logprobs, finish_reason=self.reason if last else None,
                stop_reason=self.stop_reason if last else None,
            )  # fmt: skip
            yield SimpleNamespace(outputs=[out], prompt_logprobs=None)
            await asyncio.sleep(0.005)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def add_lora(self, request):
        if "bad" in request.lora_path:
            raise ValueError("FLoRA rank 32 is greater than max_lora_rank 16")
        self.loras[request.lora_int_id] = request

    async def remove_lora(self, lora_id):
        self.loras.pop(lora_id)

    def shutdown(self):
        pass


def request(adapter=None, max_new_tokens=3, **sampling) -> GenerationRequest:
    tok = tiny_tokenizer()
    return GenerationRequest(
        inputs="def add(",
        input_ids=tok("def add(")["input_ids"],
        sampling=SamplingParameters(**sampling),
        stopping=StoppingParameters(max_new_tokens=max_new_tokens),
        adapter_id=adapter,
        top_n_tokens=2,
    )


@pytest.fixture(autouse=True)
def _no_vllm_params(monkeypatch):
    monkeypatch.setattr(vllm_engine, "sampling_params", lambda req: SimpleNamespace(max_tokens=req.stopping))


async def collect(engine, req):
    return [out async for out in engine.generate(req)]


def test_each_token_of_each_delta_is_one_step_with_its_text_and_the_finish_on_the_last():
    tok = tiny_tokenizer()
    ids = tok("return a + b")["input_ids"][:4]
    engine = VLLMEngine(FakeLLM([ids[:1], ids[1:3], ids[3:]]), tok, model_id="tiny")
    steps = asyncio.run(collect(engine, request(max_new_tokens=4)))
    assert [s.token.id for s in steps] == ids
    assert [s.generated_tokens for s in steps] == [1, 2, 3, 4]
    assert [s.finish_reason for s in steps] == [None, None, None, "length"]
    assert "".join(s.token.text for s in steps) == steps[-1].generated_text == tok.decode(ids)
    assert steps[0].token.logprob == -0.5 and [t.id for t in steps[0].top_tokens] == [ids[0], 7]


@pytest.mark.parametrize(
    ("reason", "stop", "tgi"), [("length", None, "length"), ("stop", None, "eos_token"), ("stop", 0, "eos_token"),
                                ("stop", "\n", "stop_sequence"), (None, None, None)],
)  # fmt: skip
def test_finish_reasons_are_tgis(reason, stop, tgi):
    assert finish_reason(reason, stop) == tgi


def test_an_aborted_result_is_a_generation_error():
    with pytest.raises(GenerationError):
        finish_reason("abort", None)


def test_a_sampling_request_reports_its_seed_and_a_greedy_one_none():
    tok = tiny_tokenizer()
    engine = VLLMEngine(FakeLLM([[5]]), tok, model_id="tiny")
    sampled = asyncio.run(collect(engine, request(do_sample=True)))
    greedy = asyncio.run(collect(engine, request()))
    assert isinstance(sampled[-1].seed, int) and greedy[-1].seed is None


def test_an_engine_failure_fails_the_request_and_the_engine_serves_the_next():
    tok = tiny_tokenizer()
    llm = FakeLLM([[5], [6]], fail_after=1)
    engine = VLLMEngine(llm, tok, model_id="tiny")
    with pytest.raises(GenerationError, match="engine core died"):
        asyncio.run(collect(engine, request()))
    llm.fail_after = None
    assert [s.token.id for s in asyncio.run(collect(engine, request()))] == [5, 6]
    assert engine.stats()["in_flight"] == 0


def test_a_client_that_goes_away_aborts_its_vllm_request():
    tok = tiny_tokenizer()
    llm = FakeLLM([[5]] * 50)
    engine = VLLMEngine(llm, tok, model_id="tiny")

    async def main():
        req = request(max_new_tokens=50)
        task = asyncio.create_task(collect(engine, req))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return req

    req = asyncio.run(main())
    assert llm.aborted == [str(req.id)] and engine.stats()["in_flight"] == 0


def test_a_closed_stream_aborts_its_vllm_request():
    """What the HTTP layer does when a client disconnects: close the iterator (``aclose``)."""
    llm = FakeLLM([[5]] * 50)
    engine = VLLMEngine(llm, tiny_tokenizer(), model_id="tiny")

    async def main():
        req = request(max_new_tokens=50)
        stream = engine.generate(req)
        await stream.__anext__()
        await stream.aclose()
        return req

    req = asyncio.run(main())
    assert llm.aborted == [str(req.id)] and engine.stats()["in_flight"] == 0


def test_an_unknown_adapter_is_a_422_naming_it():
    engine = VLLMEngine(FakeLLM([[5]]), tiny_tokenizer(), model_id="tiny")
    with pytest.raises(ValidationError, match="unknown adapter_id 'perl'"):
        asyncio.run(collect(engine, request(adapter="perl")))
