"""The engine: a queue, a continuous-batching scheduler thread, the model runner and the adapter store.

The scheduler thread owns the model. Each loop iteration admits waiting requests whose adapters are on the device
(prefilled together, then concatenated into the running batch), runs one decode step for the running batch, sends
every token to its request's asyncio queue, and drops finished or cancelled rows. Requests for a cold adapter stay
queued while the store copies it into a slot, so they never stall the rows already decoding. MiLoRA rows are
routed during their prefill only; their gates then travel with the running batch (see :mod:`serving.batch`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

import torch

from flora_hf.loading import ModelLoadError, load_causal_lm

from .adapters.hub import adapter_folder
from .adapters.store import AdapterStore
from .batch import Batch, RowAdapter
from .model_runner import CausalLMRunner
from .settings import default_adapter_roots
from .step_metadata import AdapterContext
from .types import (
    AdapterError,
    GenerationError,
    GenerationRequest,
    OverloadedError,
    StepOutput,
    ValidationError,
)

logger = logging.getLogger(__name__)


StepObserver = Callable[[str, int, float, bool], None]

COLD_ADAPTER_WAIT_S = 0.5
"""The longest the scheduler waits for a cold adapter before it looks again; a safety net only, as the adapter store
wakes it (``store.load_finished``) the moment a device load ends."""


@dataclass
class EngineLimits:
    max_concurrent_requests: int = 128
    max_batch_total_tokens: int = 16384  # prompt + new tokens summed over the running batch
    max_batch_size: Optional[int] = None
    # TGI's --max-batch-prefill-tokens: tokens one prefill may hold. Rows are left-padded to the longest prompt, so
    # a prefill of n prompts costs n x the longest; None: no limit beyond max_batch_total_tokens.
    max_batch_prefill_tokens: Optional[int] = None
    # TGI's router policy for joining a running batch: new requests are prefilled only when at least
    # ``waiting_served_ratio`` x the running batch size are waiting, or after ``max_waiting_tokens`` decoding steps
    # without admitting anyone; fewer, larger prefills interrupt decoding less.
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20


@dataclass
class _Entry:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    adapter: RowAdapter = field(default_factory=RowAdapter)
    enqueued_at: float = field(default_factory=time.monotonic)

    def send(self, item: StepOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    @property
    def budget(self) -> int:
        return len(self.request.input_ids) + self.request.stopping.max_new_tokens


class LLMEngine:
    """Implements :class:`serving.types.Engine` for a transformers causal LM with slot adapters."""

    def __init__(
        self,
        model,
        tokenizer,
        store: AdapterStore,
        *,
        model_id: str,
        limits: Optional[EngineLimits] = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.model_id = model_id
        self.limits = limits or EngineLimits()
        self.runner = CausalLMRunner(model, tokenizer, store.context)
        self.device = self.runner.device
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        self._waiting: deque[_Entry] = deque()
        self._entries: dict[int, _Entry] = {}
        self._cancelled: set[int] = set()
        self._running: Optional[Batch] = None
        self._cond = threading.Condition()
        store.load_finished = self._cond  # a finished device load wakes the scheduler (see _loop)
        self._accepting = True
        self._stop = False
        self.steps = 0
        self._steps_since_admit = 0
        self.step_observer: Optional[StepObserver] = None
        """Called after every prefill and decode step from the scheduler thread: ``(method, rows, seconds, ok)``
        with method ``"prefill"`` or ``"decode"`` (the server's ``tgi_batch_*`` metrics)."""
        self._thread = threading.Thread(target=self._loop, name="flora-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- public
    def adapter_names(self) -> list[str]:
        return self.store.names()

    def has_adapter(self, name: str) -> bool:
        """Whether ``name`` is a loaded adapter: the adapter store answers for the validator (through the HTTP
        layer) and :meth:`generate`; a queued request whose adapter was unloaded since fails at admission, where
        ``store.acquire`` checks again under the store's lock."""
        return self.store.has(name)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "queue_size": len(self._waiting),
                "batch_size": len(self._running) if self._running is not None else 0,
                "in_flight": len(self._entries),
                "batch_current_max_tokens": self._running_budget(),
                # every MiLoRA layer routes each prompt once: any layer's count is the number of prompts
                "milora_prompts_routed": max(self.store.router_counts().values(), default=0),
            }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        if request.adapter_id and not self.has_adapter(request.adapter_id):
            raise ValidationError(f"unknown adapter_id {request.adapter_id!r}; loaded adapters: {self.store.names()}")
        entry = _Entry(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if not self._accepting:
                raise OverloadedError("the server is shutting down")
            if request.id in self._entries:  # entries are keyed by id: a second one would take the first's place
                raise ValueError(f"request id {request.id} is already in flight")
            if len(self._entries) >= self.limits.max_concurrent_requests:
                raise OverloadedError("Model is overloaded")
            if entry.budget > self.limits.max_batch_total_tokens:
                raise ValidationError(
                    f"`inputs` tokens + `max_new_tokens` must be <= {self.limits.max_batch_total_tokens} "
                    "(max_batch_total_tokens)"
                )
            self._entries[request.id] = entry
            self._waiting.append(entry)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await entry.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                with self._cond:
                    self._cancelled.add(request.id)
                    self._cond.notify()

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self.store.register, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self.store.unregister, name)

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self.stats()["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._cond:
            self._stop = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, 30)
        for entry in list(self._entries.values()):
            entry.send(GenerationError("the server shut down before this request finished"))
        self._entries.clear()
        self.store.close()

    # -------------------------------------------------------------------------------------- scheduler
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and self._running is None:
                    self._cond.wait()
                if self._stop:
                    return
                self._drop_cancelled()
                admitted = self._admit()
                if not admitted and self._running is None and self._waiting:
                    # every waiting request waits on a cold adapter's device load: the store notifies this
                    # condition when one ends (as do new requests, cancellations and shutdown); wait, not spin
                    self._cond.wait(COLD_ADAPTER_WAIT_S)
                    continue
            if admitted:
                self._prefill(admitted)
            if self._running is not None:
                self._decode()

    def _running_budget(self) -> int:
        if self._running is None:
            return 0
        return sum(self._entries[r.id].budget for r in self._running.requests if r.id in self._entries)

    def _admit(self) -> list[_Entry]:
        """Waiting requests that fit the token budgets and whose adapter is on the device (FIFO, skipping cold).

        The first request of a prefill is always admitted when the running batch has room for it, so a prompt
        longer than ``max_batch_prefill_tokens`` still runs (alone).
        """
        budget = self.limits.max_batch_total_tokens - self._running_budget()
        size = len(self._running) if self._running is not None else 0
        # TGI counts the queued requests that fit; the waiting count is that bound before adapters are bound
        recent = self._steps_since_admit < self.limits.max_waiting_tokens
        if size and recent and len(self._waiting) < math.floor(size * self.limits.waiting_served_ratio):
            return []
        prefill_limit = self.limits.max_batch_prefill_tokens
        admitted, still_waiting = [], deque()
        longest = 0
        while self._waiting:
            entry = self._waiting.popleft()
            full = self.limits.max_batch_size is not None and size + len(admitted) >= self.limits.max_batch_size
            length = max(longest, len(entry.request.input_ids))
            over_prefill = prefill_limit is not None and admitted and (len(admitted) + 1) * length > prefill_limit
            if full or entry.budget > budget or over_prefill:
                still_waiting.append(entry)
                continue
            try:
                ready = self._bind_adapter(entry)
            except AdapterError as exc:  # unloaded while queued: store.acquire's check, under the store's lock
                self._fail([entry], ValidationError(str(exc)))
                continue
            if not ready:
                still_waiting.append(entry)
                continue
            admitted.append(entry)
            budget -= entry.budget
            longest = length
        self._waiting = still_waiting
        return admitted

    def _bind_adapter(self, entry: _Entry) -> bool:
        name = entry.request.adapter_id
        if not name:
            return True
        slot = self.store.acquire(name)
        if slot is None:
            return False
        weights = self.store.get(name)
        entry.adapter = RowAdapter(name=name, slot=slot, method=weights.method, rank=weights.rank)
        return True

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        self._waiting = deque(e for e in self._waiting if e.request.id not in self._cancelled)
        if self._running is not None:
            gone = [r.id for r in self._running.requests if r.id in self._cancelled]
            if gone:
                keep = [r.id for r in self._running.requests if r.id not in self._cancelled]
                self._running = self._running.filter(keep)
                self._finish(gone)
        for rid in self._cancelled:
            self._entries.pop(rid, None)
        self._cancelled.clear()

    def _observe(self, method: str, rows: int, start: float, ok: bool) -> None:
        if self.step_observer is not None:
            self.step_observer(method, rows, time.perf_counter() - start, ok)

    def _prefill(self, admitted: list[_Entry]) -> None:
        start = time.perf_counter()
        try:
            batch = Batch.from_requests(
                [e.request for e in admitted],
                [e.adapter for e in admitted],
                self.tokenizer,
                self.eos_token_ids,
                self.device,
                pad_token_id=self.pad_token_id,
            )
            outputs, batch = self.runner.generate_token(batch)
        except Exception as exc:  # one bad batch must not take the server down
            self._observe("prefill", len(admitted), start, False)
            if len(admitted) > 1:
                # one row's failure must not fail the rows beside it: prefill each alone, so only the culprit fails
                logger.warning("prefill of %d rows failed (%s); retrying each row alone", len(admitted), exc)
                for entry in admitted:
                    self._prefill([entry])
                return
            logger.exception("prefill failed")
            with self._cond:
                self._fail(admitted, GenerationError(f"generation failed: {exc}"))
            return
        self._observe("prefill", len(admitted), start, True)
        self._steps_since_admit = 0
        self._dispatch(outputs)
        if batch is not None:
            with self._cond:
                self._running = batch if self._running is None else Batch.concatenate([self._running, batch])

    def _decode(self) -> None:
        start, rows = time.perf_counter(), len(self._running)
        outputs, batch, failures = self._isolating_step(self._running)
        self._observe("decode", rows, start, not failures)
        with self._cond:
            for request_id, exc in failures:
                entry = self._entries.get(request_id)
                if entry is not None:
                    self._fail([entry], GenerationError(f"generation failed: {exc}"))
        self.steps += 1
        self._steps_since_admit += 1
        self._dispatch(outputs)
        with self._cond:
            self._running = batch

    def _isolating_step(self, batch: Batch) -> tuple[list[StepOutput], Optional[Batch], list[tuple[int, Exception]]]:
        """One decode step; when it raises, the batch is put back as it was and split in halves, each stepped on
        its own, down to the row that fails. Only that row fails; every other row gets the token it would have
        got in the whole batch (its KV cache, sampling generator and counters are restored before the retry)."""
        snapshot = batch.snapshot()
        try:
            outputs, rest = self.runner.generate_token(batch)
            return outputs, rest, []
        except Exception as exc:  # one row's failure must not fail the rows beside it
            if len(batch) == 1:
                logger.exception("decode step failed for request %d", batch.requests[0].id)
                return [], None, [(batch.requests[0].id, exc)]
            logger.warning("decode step of %d rows failed (%s); retrying the rows in halves", len(batch), exc)
            batch.restore(snapshot)
        ids = [r.id for r in batch.requests]
        halves = [batch.filter(ids[: len(ids) // 2]), batch.filter(ids[len(ids) // 2 :])]
        outputs, running, failures = [], [], []
        for half in halves:
            half_outputs, half_rest, half_failures = self._isolating_step(half)
            outputs += half_outputs
            failures += half_failures
            if half_rest is not None:
                running.append(half_rest)
        return outputs, (Batch.concatenate(running) if len(running) > 1 else next(iter(running), None)), failures

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        """Send each output to its request; finished requests are let go first, so that a client that has seen
        its last token finds its request id and adapter slot free."""
        receivers = [(self._entries.get(out.request_id), out) for out in outputs]
        done = [out.request_id for out in outputs if out.finished]
        if done:
            with self._cond:
                self._finish(done)
        for entry, out in receivers:
            if entry is not None:
                entry.send(out)

    def _finish(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            entry = self._entries.pop(rid, None)
            if entry is not None and entry.adapter.name:
                self.store.release(entry.adapter.name, entry.adapter.slot)

    def _fail(self, entries: list[_Entry], error: Exception) -> None:
        self._finish([e.request.id for e in entries])
        for entry in entries:
            entry.send(error)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_tokenizer(
    model_id: str,
    device: torch.device,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    cache_dir: Optional[str] = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM from a local folder or the hub, with a message that says what to do offline. ``revision``
    and ``trust_remote_code`` are TGI's ``--revision`` (a hub branch, tag or commit; a local folder has none) and
    ``--trust-remote-code`` (run the model's and tokenizer's own Python code), for both the model and tokenizer."""
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    extra = {}
    if quantize:
        if quantize not in ("bitsandbytes", "bitsandbytes-8bit"):
            raise SystemExit(f"--quantize {quantize} is not supported; use bitsandbytes (8-bit)")
        from transformers import BitsAndBytesConfig  # needs bitsandbytes' CUDA build only when asked for

        extra = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": str(device)}}
    try:
        model, tokenizer = load_causal_lm(
            model_id, dtype=torch_dtype, cache_dir=cache_dir, revision=revision, trust_remote_code=trust_remote_code,
            hint="Without network access, pass --model-id a local folder holding config.json, the weights and the "
            "tokenizer (e.g. one written by save_pretrained).",
            **extra,
        )  # fmt: skip
    except ModelLoadError as exc:
        raise SystemExit(str(exc)) from exc
    return (model if quantize else model.to(device)).eval(), tokenizer


def build_engine_from_parts(
    model,
    tokenizer,
    *,
    model_id: str,
    adapters: dict[str, str],
    adapter_roots: list[str],
    num_slots: int = 64,
    max_rank: int = 16,
    limits: Optional[EngineLimits] = None,
    hub_cache: Optional[str] = None,
) -> LLMEngine:
    """An engine over an already loaded model; start-up adapters (folders or hub ids) are registered (and
    validated) here."""
    store = AdapterStore(model, AdapterContext(), num_slots=num_slots, max_rank=max_rank, roots=adapter_roots)
    adapters = {name: adapter_folder(spec, hub_cache) for name, spec in adapters.items()}  # hub ids -> folders
    for name, path in adapters.items():
        store.register(name, path, check_root=False)
    store.warm(adapters)
    return LLMEngine(model, tokenizer, store, model_id=model_id, limits=limits)


def build_engine(settings) -> LLMEngine:
    """The engine ``flora-serve`` runs: model and tokenizer from ``settings.model_id``, start-up adapters loaded."""
    device = resolve_device(settings.device)
    model, tokenizer = load_model_and_tokenizer(  # TGI's --huggingface-hub-cache: where hub files are read/written
        settings.model_id,
        device,
        settings.dtype,
        settings.quantize,
        cache_dir=settings.huggingface_hub_cache,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )
    _, max_total = settings.token_limits(getattr(model.config, "max_position_embeddings", None))
    roots = settings.adapter_roots or default_adapter_roots(settings.lora_adapters)
    limits = EngineLimits(
        max_concurrent_requests=settings.max_concurrent_requests,
        max_batch_total_tokens=settings.max_batch_total_tokens or max(16384, max_total),
        max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
        max_batch_size=settings.max_batch_size,
        waiting_served_ratio=settings.waiting_served_ratio,
        max_waiting_tokens=settings.max_waiting_tokens,
    )
    return build_engine_from_parts(
        model,
        tokenizer,
        model_id=settings.model_id,
        adapters=settings.lora_adapters,
        adapter_roots=roots,
        num_slots=settings.max_loaded_adapters,
        max_rank=settings.max_adapter_rank,
        limits=limits,
        hub_cache=settings.huggingface_hub_cache,
    )
