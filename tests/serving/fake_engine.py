"""A deterministic engine behind the real HTTP app, so the HTTP tests need no model.

It echoes the prompt's tokens (reversed when an adapter is used, rotated by the seed when sampling) and reacts to
words in the prompt: ``OVERLOAD`` (429 before the first token), ``FAILNOW`` (424 before the first token),
``FAIL`` (error after the second token), ``SLOW`` (50 ms per token, for disconnect tests).
The tokenizer is a byte-level BPE trained here in milliseconds: no hub access.
"""

from __future__ import annotations

import asyncio
import sys
from functools import lru_cache
from pathlib import Path
from typing import AsyncIterator, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from serving.types import (
    AdapterError,
    GenerationError,
    GenerationRequest,
    OverloadedError,
    StepOutput,
    TokenInfo,
    ValidationError,
)

MODEL_ID = "fake/tiny-model"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b",
    "serving many low rank adapters on one base model",
    "My name is Olivier and I like text generation inference",
] * 4


@lru_cache(maxsize=1)
def _trained() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok.to_str()


def make_tokenizer(chat_template: Optional[str] = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained()), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


class FakeEngine:
    """Implements ``serving.types.Engine``; records what it was asked so tests can check the HTTP layer."""

    def __init__(self, tokenizer=None, adapters: Optional[dict[str, str]] = None, model_id: str = MODEL_ID) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
        self.model_id = model_id
        self.adapters = dict(adapters or {})
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[int] = []
        self.in_flight = 0
        self.shutdown_calls: list[float] = []
        self.stopped = False

    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    async def load_adapter(self, name: str, path: str) -> None:
        if not (Path(path) / "adapter_config.json").is_file():
            raise AdapterError(f"`{path}` is not a PEFT adapter folder (no adapter_config.json)")
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name)

    def stats(self) -> dict[str, int]:
        return {"queue_size": 0, "batch_size": self.in_flight, "in_flight": self.in_flight}

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """As the real engine: in-flight requests get ``grace_seconds`` to finish, then fail with an error."""
        self.shutdown_calls.append(grace_seconds)
        print(f"fake engine shutdown grace={grace_seconds}", file=sys.stderr, flush=True)
        deadline = asyncio.get_running_loop().time() + grace_seconds
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        self.stopped = True

    def _info(self, token_id: int, logprob: Optional[float]) -> TokenInfo:
        special = token_id in self.tokenizer.all_special_ids
        return TokenInfo(id=token_id, text=self.tokenizer.decode([token_id]), logprob=logprob, special=special)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        self.requests.append(request)
        if "OVERLOAD" in request.inputs:
            raise OverloadedError("too many requests in flight")
        if request.adapter_id is not None and request.adapter_id not in self.adapters:
            raise ValidationError(f"adapter `{request.adapter_id}` is not loaded")
        if "FAILNOW" in request.inputs:
            raise GenerationError("the fake model failed at prefill")
        self.in_flight += 1
        finished = False
        try:
            async for step in self._steps(request):
                finished = step.finished
                yield step
        finally:
            self.in_flight -= 1
            if not finished:
                self.cancelled.append(request.id)

    async def _steps(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        tok = self.tokenizer
        ids = [i for i in request.input_ids if i != tok.bos_token_id] or [tok.eos_token_id]
        if request.adapter_id is not None:
            ids = ids[::-1]
        seed = request.sampling.seed or 0
        shift = 0 if request.sampling.is_greedy else seed % len(ids)
        ids = ids[shift:] + ids[:shift]
        prefill = None
        if request.decoder_input_details:
            prefill = [self._info(i, None if n == 0 else -0.5) for n, i in enumerate(request.input_ids)]
        generated: list[int] = []
        for step in range(request.stopping.max_new_tokens):
            token_id = ids[step % len(ids)]
            generated.append(token_id)
            logprob = -0.1 * ((step + shift) % 5 + 1)
            text = tok.decode(generated, skip_special_tokens=True)
            finish = None
            if token_id == tok.eos_token_id:
                finish = "eos_token"
            elif any(s and text.endswith(s) for s in request.stopping.stop_sequences):
                finish = "stop_sequence"
            elif step + 1 == request.stopping.max_new_tokens:
                finish = "length"
            if "FAIL" in request.inputs and step == 2:
                raise GenerationError("the fake model failed while decoding")
            if self.stopped:
                raise GenerationError("the server shut down before this request finished")
            await asyncio.sleep(0.05 if "SLOW" in request.inputs else 0)
            top = [self._info(ids[(step + k) % len(ids)], logprob - k) for k in range(request.top_n_tokens)]
            yield StepOutput(
                request_id=request.id,
                token=self._info(token_id, logprob),
                top_tokens=top,
                prefill_tokens=prefill if step == 0 else None,
                generated_tokens=step + 1,
                generated_text=text if finish else None,
                finish_reason=finish,
                seed=None if request.sampling.is_greedy else seed,
            )
            if finish:
                return


def build_engine(settings) -> FakeEngine:
    """``FLORA_ENGINE_FACTORY=tests.serving.fake_engine:build_engine`` for the CLI tests."""
    return FakeEngine(adapters=settings.lora_adapters, model_id=settings.model_id)
