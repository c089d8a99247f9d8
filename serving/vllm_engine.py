"""``flora-serve --engine vllm``: TGI's HTTP API over vLLM's async engine, for deployments past one device.

vLLM brings what the embedded engine does not: a paged KV cache, tensor parallel (TGI's ``--num-shard``), prefix
caching. FLoRA adapters reach vLLM's LoRA slots through flora-hf's vLLM plugin (:mod:`flora_hf.vllm_plugin`,
installed as a ``vllm.general_plugins`` entry point); LoRA adapters take vLLM's own path. This module only maps
requests and results between :mod:`serving.types` and vLLM's public API (``AsyncLLM``, ``SamplingParams``,
``LoRARequest``); tokens are detokenized by the same :class:`~serving.sampling.IncrementalDetokenizer` as the
embedded engine, so streamed text is identical.

vLLM is imported only when an engine is built: the module imports without it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from .adapters.hub import adapter_folder
from .adapters.store import check_adapter_name
from .sampling import IncrementalDetokenizer
from .types import (
    AdapterError,
    GenerationError,
    GenerationRequest,
    OverloadedError,
    StepOutput,
    TokenInfo,
    ValidationError,
    random_seed,
)

logger = logging.getLogger(__name__)


class SchedulerCounts:
    """The last queue and batch sizes vLLM's scheduler reported (its stat loggers are the public seam for them)."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0

    def logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        counts = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    counts.waiting = getattr(scheduler_stats, "num_waiting_reqs", counts.waiting)
                    counts.running = getattr(scheduler_stats, "num_running_reqs", counts.running)

            def log_engine_initialized(self) -> None:
                pass

        return _Recorder


def sampling_params(request: GenerationRequest) -> Any:
    """vLLM's ``SamplingParams`` for a validated TGI request (greedy unless it samples, as TGI decides)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = request.sampling
    if s.typical_p is not None and s.typical_p < 1.0:
        raise ValidationError("`typical_p` is not supported by the vLLM engine (vLLM has no typical sampling)")
    greedy = s.is_greedy
    return SamplingParams(
        temperature=0.0 if greedy else (s.temperature if s.temperature is not None else 1.0),
        top_k=0 if greedy or not s.top_k else s.top_k,
        top_p=1.0 if greedy or s.top_p is None else s.top_p,
        repetition_penalty=s.repetition_penalty or 1.0,
        frequency_penalty=s.frequency_penalty or 0.0,
        seed=None if greedy else request.sampling.seed,
        max_tokens=request.stopping.max_new_tokens,
        stop=[x for x in request.stopping.stop_sequences if x] or None,
        include_stop_str_in_output=True,  # TGI's generated_text keeps the stop sequence
        ignore_eos=request.stopping.ignore_eos_token,
        logprobs=request.top_n_tokens,  # 0: the chosen token's own logprob only
        prompt_logprobs=0 if request.decoder_input_details else None,
        output_kind=RequestOutputKind.DELTA,
    )


def request_seed(request: GenerationRequest) -> int:
    """The request's seed, drawn once when it has none, so the response can report it (as TGI does)."""
    if request.sampling.seed is None:
        request.sampling.seed = random_seed()
    return request.sampling.seed


def finish_reason(reason: Optional[str], stop_reason: Any) -> Optional[str]:
    """vLLM's (finish_reason, stop_reason) as TGI's: a matched stop string is a stop sequence, else EOS."""
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    raise GenerationError(f"generation ended early ({reason})")


class VLLMEngine:
    """Implements :class:`serving.types.Engine` over a vLLM ``AsyncLLM``; adapters are vLLM ``LoRARequest``s."""

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        *,
        model_id: str,
        max_concurrent_requests: int = 128,
        counts: Optional[SchedulerCounts] = None,
        startup_adapters: Optional[dict[str, str]] = None,
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_concurrent_requests = max_concurrent_requests
        self.counts = counts or SchedulerCounts()
        self._adapters: dict[str, Any] = {}  # name -> LoRARequest
        self._adapter_ids = itertools.count(1)
        self._in_flight = 0
        self._accepting = True
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self._startup_adapters = dict(startup_adapters or {})

    async def start(self) -> None:
        """Load the start-up adapters on the server's event loop (vLLM's client lives on it); a bad one stops the
        server from starting, with its reason."""
        for name, path in self._startup_adapters.items():
            await self.load_adapter(name, path)
        logger.info("adapters loaded into vLLM: %s", self.adapter_names())

    # ---------------------------------------------------------------------------------------------- adapters
    def adapter_names(self) -> list[str]:
        return sorted(self._adapters)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    async def load_adapter(self, name: str, path: str) -> None:
        """Register ``path`` under ``name`` and load it into vLLM's adapter cache now, so a bad folder fails here
        (with vLLM's or the plugin's reason) rather than at its first request."""
        from vllm.lora.request import LoRARequest

        check_adapter_name(name)
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise AdapterError(f"adapter {name!r}: {folder} is not a PEFT adapter folder (no adapter_config.json)")
        request = LoRARequest(name, next(self._adapter_ids), str(folder.resolve()))
        try:
            await self.llm.add_lora(request)
        except Exception as exc:  # vLLM raises ValueError / RuntimeError subclasses with the reason
            raise AdapterError(f"adapter {name!r} could not be loaded: {exc}") from None
        self._adapters[name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self._adapters.pop(name, None)
        if request is None:
            raise AdapterError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names()}")
        await self.llm.remove_lora(request.lora_int_id)

    # -------------------------------------------------------------------------------------------- generation
    def _token(self, token_id: int, text: str, logprob: Optional[float]) -> TokenInfo:
        return TokenInfo(id=token_id, text=text, logprob=logprob, special=token_id in self._special_ids)

    def _top_tokens(self, logprobs: Optional[dict], n: int, detok: IncrementalDetokenizer) -> list[TokenInfo]:
        if not n or not logprobs:
            return []
        ranked = sorted(logprobs.items(), key=lambda item: item[1].rank)[:n]
        return [self._token(i, detok.token_text(i), lp.logprob) for i, lp in ranked]

    def _prefill_tokens(self, request: GenerationRequest, prompt_logprobs: Optional[list]) -> list[TokenInfo]:
        ids = request.input_ids
        chosen: list[Optional[float]] = [None] * len(ids)
        for position, entry in enumerate(prompt_logprobs or []):
            if entry and ids[position] in entry:
                chosen[position] = entry[ids[position]].logprob
        return [self._token(i, self.tokenizer.decode([i]), lp) for i, lp in zip(ids, chosen)]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        lora = None
        if request.adapter_id:
            lora = self._adapters.get(request.adapter_id)
            if lora is None:
                raise ValidationError(
                    f"unknown adapter_id {request.adapter_id!r}; loaded adapters: {self.adapter_names()}"
                )
        if not self._accepting:
            raise OverloadedError("the server is shutting down")
        if self._in_flight >= self.max_concurrent_requests:
            raise OverloadedError("Model is overloaded")
        seed = None if request.sampling.is_greedy else request_seed(request)
        params = sampling_params(request)
        detok = IncrementalDetokenizer(self.tokenizer, request.input_ids)
        self._in_flight += 1
        first, finished = True, False
        try:
            stream = self.llm.generate(
                {"prompt_token_ids": list(request.input_ids)},  # vLLM's TokensPrompt (a TypedDict)
                params,
                str(request.id),
                lora_request=lora,
            )
            async for result in stream:
                completion = result.outputs[0]
                ids = list(completion.token_ids)
                for k, token_id in enumerate(ids):
                    last = k == len(ids) - 1
                    logprobs = completion.logprobs[k] if completion.logprobs else None
                    chosen = logprobs.get(token_id) if logprobs else None
                    reason = finish_reason(completion.finish_reason, completion.stop_reason) if last else None
                    piece = detok.step(token_id)
                    yield StepOutput(
                        request_id=request.id,
                        token=self._token(token_id, piece, None if chosen is None else chosen.logprob),
                        top_tokens=self._top_tokens(logprobs, request.top_n_tokens, detok),
                        prefill_tokens=self._prefill_tokens(request, result.prompt_logprobs)
                        if first and request.decoder_input_details
                        else None,
                        generated_tokens=detok.num_generated,
                        generated_text=detok.generated_text if reason else None,
                        finish_reason=reason,
                        seed=seed,
                    )
                    first, finished = False, reason is not None
        except (ValidationError, GenerationError, OverloadedError):
            raise
        except Exception as exc:  # vLLM's engine errors: the request failed, the server keeps serving
            raise GenerationError(f"generation failed: {exc}") from None
        finally:
            self._in_flight -= 1
            if not finished:  # the client went away (iterator closed, task cancelled) or the request failed
                await self.llm.abort(str(request.id))

    # ----------------------------------------------------------------------------------------------- service
    def stats(self) -> dict[str, int]:
        return {
            "queue_size": self.counts.waiting,
            "batch_size": self.counts.running,
            "in_flight": self._in_flight,
        }

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + grace_seconds
        while self._in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.llm.shutdown()


def build_vllm_engine(settings: Any) -> VLLMEngine:
    """The engine ``flora-serve --engine vllm`` runs: vLLM's AsyncLLM with LoRA slots, start-up adapters loaded."""
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    counts = SchedulerCounts()
    _, max_total = settings.token_limits(None)
    args = AsyncEngineArgs(
        model=settings.model_id,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        download_dir=settings.huggingface_hub_cache,
        dtype=settings.dtype or "auto",
        tensor_parallel_size=settings.num_shard,
        enable_lora=True,
        max_loras=settings.max_loaded_adapters,
        max_lora_rank=settings.max_adapter_rank,
        max_model_len=settings.max_total_tokens,
        max_num_seqs=settings.max_batch_size or 256,
        max_num_batched_tokens=settings.max_batch_prefill_tokens,
        seed=0,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        # FLoRA's layers choose their path on the host each step, which torch.compile and CUDA graphs would freeze
        # (the plugin refuses FLoRA in a compiled model): eager, as TGI's --cuda-graphs 0
        enforce_eager=True,
    )
    llm = AsyncLLM.from_engine_args(args, stat_loggers=[counts.logger_factory()])
    tokenizer = AutoTokenizer.from_pretrained(
        settings.model_id, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    startup = {
        name: adapter_folder(spec, settings.huggingface_hub_cache) for name, spec in settings.lora_adapters.items()
    }
    logger.info("vLLM engine built: %s, tensor parallel %d", settings.model_id, settings.num_shard)
    return VLLMEngine(
        llm, tokenizer, model_id=settings.model_id, max_concurrent_requests=settings.max_concurrent_requests,
        counts=counts, startup_adapters=startup,
    )  # fmt: skip
