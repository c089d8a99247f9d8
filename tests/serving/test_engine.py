"""The engine in-process: continuous batching, batch invariance over mixed adapters, cancellation, hot (un)load."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import pytest
from peft import IA3Config, LoraConfig

from flora_hf import FLoRAConfig
from serving.engine import EngineLimits, build_engine_from_parts
from serving.types import (
    GenerationRequest,
    OverloadedError,
    SamplingParameters,
    StoppingParameters,
    ValidationError,
    next_request_id,
)
from tests.serving.tiny_serving import save_random_adapter, tiny_causal_lm, tiny_tokenizer

PROMPTS = ["def add(", "sub fib {", "print('h", "local function", "return a", "my $n ="]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_causal_lm()
    configs = {
        "flora-a": FLoRAConfig(r=1),
        "flora-b": FLoRAConfig(r=1),
        "flora-r4": FLoRAConfig(r=4, target_modules=["c_attn", "c_fc"]),
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
        "ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    }
    for i, (name, config) in enumerate(configs.items()):
        save_random_adapter(base, config, root / name, seed=i, scale=0.5)
    return root


def make_engine(adapter_dir, names=(), **kwargs):
    limits = EngineLimits(**{k: kwargs.pop(k) for k in list(kwargs) if hasattr(EngineLimits, k)})
    return build_engine_from_parts(
        tiny_causal_lm(),
        tiny_tokenizer(),
        model_id="tiny",
        adapters={n: str(adapter_dir / n) for n in names},
        adapter_roots=[str(adapter_dir)],
        limits=limits,
        **kwargs,
    )


def request(prompt: str, adapter: str | None = None, max_new_tokens: int = 12, **sampling) -> GenerationRequest:
    return GenerationRequest(
        inputs=prompt,
        input_ids=tiny_tokenizer()(prompt)["input_ids"],
        sampling=SamplingParameters(**sampling),
        stopping=StoppingParameters(max_new_tokens=max_new_tokens),
        adapter_id=adapter,
    )


async def collect(engine, req: GenerationRequest) -> list:
    return [out async for out in engine.generate(req)]


def fresh(req: GenerationRequest) -> GenerationRequest:
    """The same request again, under a new id (as a client's retry reaches the engine)."""
    return dataclasses.replace(copy.deepcopy(req), id=next_request_id())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


ALL = ["flora-a", "flora-b", "flora-r4", "lora", "ia3"]


def test_batch_invariance_over_mixed_adapters(adapter_dir) -> None:
    """Greedy output of every request is what it gets alone, whatever shares its batch."""
    engine = make_engine(adapter_dir, ALL, num_slots=8)
    cases = [(p, a) for p in PROMPTS for a in [None, *ALL]][:24]

    async def main():
        alone = [[o.token.id for o in await collect(engine, request(p, a))] for p, a in cases]
        together = await asyncio.gather(*[collect(engine, request(p, a)) for p, a in cases])
        await engine.shutdown()
        return alone, [[o.token.id for o in outs] for outs in together]

    alone, together = run(main())
    assert together == alone
    # adapters really change the output: not every adapter produces the base model's tokens
    by_adapter = {a: alone[i] for i, (p, a) in enumerate(cases) if p == PROMPTS[0]}
    assert len({tuple(v) for v in by_adapter.values()}) > 1


def test_more_adapters_than_slots_still_serve_correctly(adapter_dir) -> None:
    engine = make_engine(adapter_dir, ALL, num_slots=2)
    cases = [(p, a) for p in PROMPTS[:3] for a in ALL]

    async def main():
        alone = [[o.token.id for o in await collect(engine, request(p, a))] for p, a in cases]
        together = await asyncio.gather(*[collect(engine, request(p, a)) for p, a in cases])
        await engine.shutdown()
        return alone, [[o.token.id for o in outs] for outs in together]

    alone, together = run(main())
    assert together == alone
    assert engine.store.evictions > 0 and len(engine.store.resident()) <= 2


def test_stream_outputs_and_finish(adapter_dir) -> None:
    engine = make_engine(adapter_dir, ["lora"])

    async def main():
        outs = await collect(engine, request("def add(", "lora", max_new_tokens=5, do_sample=True, seed=7))
        again = await collect(engine, request("def add(", "lora", max_new_tokens=5, do_sample=True, seed=7))
        await engine.shutdown()
        return outs, again

    outs, again = run(main())
    assert [o.generated_tokens for o in outs] == [1, 2, 3, 4, 5]
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert outs[-1].generated_text == "".join(o.token.text for o in outs)
    assert outs[-1].seed == 7 and [o.token.id for o in outs] == [o.token.id for o in again]


def test_cancelled_request_frees_its_row(adapter_dir) -> None:
    engine = make_engine(adapter_dir, ["flora-a"])

    async def main():
        stream = engine.generate(request("def add(", "flora-a", max_new_tokens=200))
        for _ in range(2):
            await stream.__anext__()
        await stream.aclose()  # the client went away
        other = await collect(engine, request("sub fib {", max_new_tokens=4))
        for _ in range(100):
            if engine.stats()["in_flight"] == 0 and engine.stats()["batch_size"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.shutdown()
        return other, stats

    other, stats = run(main())
    assert len(other) == 4
    assert stats == {
        "queue_size": 0, "batch_size": 0, "in_flight": 0, "batch_current_max_tokens": 0, "milora_prompts_routed": 0
    }  # fmt: skip
    assert engine.store._pins == {}


def test_overload_and_unknown_adapter(adapter_dir) -> None:
    engine = make_engine(adapter_dir, ["lora"], max_concurrent_requests=1)

    async def main():
        first = engine.generate(request("def add(", max_new_tokens=50))
        await first.__anext__()
        with pytest.raises(OverloadedError):
            await collect(engine, request("sub", max_new_tokens=2))
        await first.aclose()
        with pytest.raises(ValidationError, match="unknown adapter_id 'nope'; loaded adapters: \\['lora'\\]"):
            await collect(engine, request("sub", "nope"))
        await engine.shutdown()

    run(main())


def test_hot_load_and_unload_while_requests_run(adapter_dir) -> None:
    engine = make_engine(adapter_dir, ["flora-a"])
    reference = make_engine(adapter_dir, ["flora-a", "flora-r4"])

    async def main():
        expected = [o.token.id for o in await collect(reference, request("def add(", "flora-r4"))]
        long_running = asyncio.create_task(collect(engine, request("sub fib {", "flora-a", max_new_tokens=40)))
        await asyncio.sleep(0.05)
        await engine.load_adapter("flora-r4", str(adapter_dir / "flora-r4"))
        got = [o.token.id for o in await collect(engine, request("def add(", "flora-r4"))]
        await engine.unload_adapter("flora-a")  # still in use by the long request
        with pytest.raises(ValidationError):
            await collect(engine, request("x", "flora-a"))
        finished = await long_running
        await engine.shutdown()
        await reference.shutdown()
        return expected, got, finished

    expected, got, finished = run(main())
    assert got == expected
    assert finished[-1].finish_reason == "length" and len(finished) == 40
    assert "flora-a" not in engine.store.resident()


def test_graceful_shutdown_finishes_in_flight_requests(adapter_dir) -> None:
    engine = make_engine(adapter_dir)

    async def main():
        task = asyncio.create_task(collect(engine, request("def add(", max_new_tokens=10)))
        await asyncio.sleep(0.01)
        await engine.shutdown(grace_seconds=30)
        with pytest.raises(OverloadedError, match="shutting down"):
            await collect(engine, request("x"))
        return await task

    outs = run(main())
    assert outs[-1].finish_reason == "length"


def test_engine_does_not_mutate_shared_model(adapter_dir) -> None:
    """Adapters are only reachable through slots: the base model's weights stay untouched."""
    engine = make_engine(adapter_dir, ALL)
    model = engine.model
    before = copy.deepcopy({k: v for k, v in model.state_dict().items() if "banks" not in k})
    run(collect(engine, request("def add(", "flora-r4")))
    run(engine.shutdown())
    after = model.state_dict()
    assert all((after[k] == v).all() for k, v in before.items())


def test_max_batch_prefill_tokens_bounds_every_prefill(adapter_dir, monkeypatch) -> None:
    """TGI's --max-batch-prefill-tokens: a prefill holds at most that many (left-padded) tokens; outputs unchanged."""
    from serving.batch import Batch

    shapes: list[tuple[int, int]] = []
    original = Batch.from_requests.__func__

    def spy(cls, requests, *args, **kwargs):
        batch = original(cls, requests, *args, **kwargs)
        shapes.append(tuple(batch.input_ids.shape))
        return batch

    monkeypatch.setattr(Batch, "from_requests", classmethod(spy))
    longest = max(len(tiny_tokenizer()(p)["input_ids"]) for p in PROMPTS)
    limit = 2 * longest
    cases = [(p, a) for p in PROMPTS for a in (None, "flora-a")]

    async def main(engine):
        outs = await asyncio.gather(*[collect(engine, request(p, a, max_new_tokens=4)) for p, a in cases])
        await engine.shutdown()
        return [[o.token.id for o in out] for out in outs]

    unlimited = run(main(make_engine(adapter_dir, ["flora-a"])))
    shapes.clear()
    limited = run(main(make_engine(adapter_dir, ["flora-a"], max_batch_prefill_tokens=limit)))
    assert limited == unlimited
    assert sum(rows for rows, _ in shapes) == len(cases) and len(shapes) > 1
    assert all(rows * width <= limit for rows, width in shapes), (limit, shapes)
    # a prompt longer than the limit still runs, alone
    engine = make_engine(adapter_dir, max_batch_prefill_tokens=1)
    shapes.clear()
    assert len(run(main_one(engine))) == 3
    assert shapes and all(rows == 1 for rows, _ in shapes)


async def main_one(engine) -> list:
    out = await collect(engine, request(PROMPTS[1], max_new_tokens=3))
    await engine.shutdown()
    return out


@pytest.mark.parametrize("ratio, max_waiting, joins_after", [(1.2, 20, 0), (100.0, 5, 5)])
def test_new_requests_join_a_running_batch_by_tgis_policy(adapter_dir, ratio, max_waiting, joins_after) -> None:
    """waiting_served_ratio / max_waiting_tokens: a lone newcomer joins a running batch of one with TGI's defaults,
    and only after max_waiting_tokens decoding steps when the ratio asks for more waiting requests than that."""
    engine = make_engine(adapter_dir, waiting_served_ratio=ratio, max_waiting_tokens=max_waiting)
    prefills: list[tuple[int, int]] = []  # (decoding steps so far, rows)
    original = engine._prefill

    def spy(admitted):
        prefills.append((engine.steps, len(admitted)))
        return original(admitted)

    engine._prefill = spy

    async def main():
        first = engine.generate(request(PROMPTS[0], max_new_tokens=30))
        outs = [await first.__anext__()]  # the first request is decoding
        second = asyncio.ensure_future(collect(engine, request(PROMPTS[1], max_new_tokens=3)))
        outs += [o async for o in first]
        await second
        await engine.shutdown()
        return outs

    run(main())
    assert [rows for _, rows in prefills] == [1, 1]
    assert prefills[1][0] - prefills[0][0] >= joins_after


def test_one_failing_row_does_not_fail_the_rows_beside_it(adapter_dir) -> None:
    """A row whose prefill raises (a value validation did not foresee) fails alone; its batch-mates finish with
    the output they get alone."""
    engine = make_engine(adapter_dir, ["flora-a"], num_slots=2)
    runner = engine.runner
    real = runner.generate_token

    def poisoned(batch):
        if any(r.inputs == "POISON" for r in batch.requests):
            raise RuntimeError("a row-specific failure")
        return real(batch)

    runner.generate_token = poisoned
    prompts = [("def add(", None), ("POISON", None), ("sub fib {", "flora-a"), ("print('h", None)]

    async def main():
        alone = [await collect(engine, request(p, a)) for p, a in prompts if p != "POISON"]
        together = await asyncio.gather(*(collect(engine, request(p, a)) for p, a in prompts), return_exceptions=True)
        await engine.shutdown()
        return alone, together

    alone, together = run(main())
    assert isinstance(together[1], Exception) and "row-specific" in str(together[1])
    survivors = [t for i, t in enumerate(together) if i != 1]
    assert [[o.token.id for o in t] for t in survivors] == [[o.token.id for o in a] for a in alone]


def test_a_request_id_already_in_flight_is_refused(adapter_dir) -> None:
    """Entries are keyed by request id: a second request under a live id would replace the first's entry (whose
    finish would then drop the second, which then never got an answer)."""
    engine = make_engine(adapter_dir)
    first = request("def add(", max_new_tokens=30)

    async def main():
        stream = engine.generate(first)
        await stream.__anext__()  # in flight
        with pytest.raises(ValueError, match="already in flight"):
            await collect(engine, copy.deepcopy(first))
        rest = [out async for out in stream]
        again = await collect(engine, copy.deepcopy(first))  # the id is free once the first finished
        await engine.shutdown()
        return rest, again

    rest, again = run(main())
    assert rest[-1].finished and again[-1].finished


@pytest.mark.parametrize("where", ["forward", "row_loop"])
def test_a_row_failing_mid_decode_fails_alone_and_the_others_continue_exactly(adapter_dir, where) -> None:
    """A decode step that raises part-way, after the model extended the KV cache of every row ("forward") or after
    the sampling generators advanced and earlier rows took their token ("row_loop"): the batch is put back and
    split, only the culprit fails, and every other row, seeded sampling included, gets what it gets alone."""
    import serving.sampling as sampling

    engine = make_engine(adapter_dir, ["flora-a", "lora"], num_slots=2)
    poison_budget = 11  # the poisoned request is the one with 11 new tokens; it fails at its 4th
    runner = engine.runner
    real_forward, real_call = runner.forward, sampling.StoppingCriteria.__call__

    def poisoned_row(batch):
        return any(c.max_new_tokens == poison_budget and c.current_tokens >= 3 for c in batch.stopping)

    def forward(batch):
        out = real_forward(batch)  # the cache of every row already grew
        if batch.past_prefill and poisoned_row(batch):
            raise RuntimeError("a row-specific failure in the model")
        return out

    def call(self, token_id, text):
        if self.max_new_tokens == poison_budget and self.current_tokens >= 3:
            raise RuntimeError("a row-specific failure in the row loop")
        return real_call(self, token_id, text)

    if where == "forward":
        runner.forward = forward
    else:
        sampling.StoppingCriteria.__call__ = call
    cases = [
        request("def add(", None),
        request("sub fib {", "flora-a", do_sample=True, seed=7, temperature=0.9),
        request("POISON", "lora", max_new_tokens=poison_budget),
        request("print('h", "lora", do_sample=True, seed=3, top_k=20),
        request("my $n =", None, max_new_tokens=16),
    ]

    async def main():
        # fresh copies, each with its own request id (a copy keeps the id, and ids are unique while in flight)
        alone = [await collect(engine, fresh(r)) for i, r in enumerate(cases) if i != 2]
        together = await asyncio.gather(*(collect(engine, fresh(r)) for r in cases), return_exceptions=True)
        after = await collect(engine, fresh(cases[0]))  # and the engine keeps serving
        await engine.shutdown()
        return alone, together, after

    try:
        alone, together, after = run(main())
    finally:
        sampling.StoppingCriteria.__call__ = real_call
    assert isinstance(together[2], Exception) and "row-specific" in str(together[2])
    survivors = [t for i, t in enumerate(together) if i != 2]
    assert [[o.token.id for o in t] for t in survivors] == [[o.token.id for o in a] for a in alone]
    assert [o.token.text for o in after] == [o.token.text for o in alone[0]]


def test_batch_metrics_count_every_prefill_and_decode_step_under_tgis_names(adapter_dir) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import ServerMetrics

    engine = make_engine(adapter_dir, ["flora-a"], num_slots=2)
    metrics = ServerMetrics(64, 128, engine.stats)
    engine.step_observer = metrics.batch_step

    async def main():
        await asyncio.gather(*(collect(engine, request(p, "flora-a", max_new_tokens=4)) for p in PROMPTS[:3]))
        await engine.shutdown()

    run(main())
    text = metrics.render().decode()
    assert "# TYPE tgi_batch_inference_count counter\n" in text and "# TYPE tgi_request_count counter\n" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert 'tgi_batch_inference_count{method="decode"}' in text  # the exact name, no `_total`
    counts = {s.labels["method"]: s.value for s in families["tgi_batch_inference_count"].samples}
    success = {s.labels["method"]: s.value for s in families["tgi_batch_inference_success"].samples}
    assert counts == success and counts["prefill"] >= 1 and counts["decode"] >= 3
    assert counts["decode"] == engine.steps
    sizes = [s for s in families["tgi_batch_next_size"].samples if s.name.endswith("_sum")]
    assert sizes[0].value == 3  # three prompts went through prefills


def test_startup_adapters_may_be_hub_ids_read_from_the_hub_cache(adapter_dir, tmp_path) -> None:
    import shutil

    from serving.adapters.store import AdapterError
    from serving.settings import parse_lora_adapters

    # the hub cache as `hf download owner/flora-a` leaves it (no network here: it is read from the cache)
    repo = tmp_path / "hub" / "models--owner--flora-a"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(adapter_dir / "flora-a", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    adapters = parse_lora_adapters("owner/flora-a,local=" + str(adapter_dir / "flora-a"))
    assert adapters == {"owner/flora-a": "owner/flora-a", "local": str(adapter_dir / "flora-a")}
    engine = build_engine_from_parts(
        tiny_causal_lm(), tiny_tokenizer(), model_id="tiny", adapters=adapters, adapter_roots=[],
        hub_cache=str(tmp_path / "hub"), num_slots=2,
    )  # fmt: skip

    async def main():
        hub = await collect(engine, request("def add(", "owner/flora-a"))
        local = await collect(engine, request("def add(", "local"))
        await engine.shutdown()
        return hub, local

    hub, local = run(main())
    assert [o.token.id for o in hub] == [o.token.id for o in local]
    with pytest.raises(AdapterError, match="not a folder here, and as a hub id"):
        build_engine_from_parts(
            tiny_causal_lm(), tiny_tokenizer(), model_id="tiny", adapters={"owner/missing": "owner/missing"},
            adapter_roots=[], hub_cache=str(tmp_path / "hub"),
        )  # fmt: skip


def test_a_prompt_of_only_special_tokens_is_served_and_an_empty_one_refused(adapter_dir) -> None:
    import httpx

    from tests.serving.live_server import LiveServer

    engine = make_engine(adapter_dir, ["flora-a"], num_slots=2)
    special = "".join(tiny_tokenizer().all_special_tokens) * 3
    with LiveServer(engine) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        r = http.post(
            "/generate", json={"inputs": special, "parameters": {"max_new_tokens": 3, "adapter_id": "flora-a"}}
        )
        assert r.status_code == 200 and isinstance(r.json()["generated_text"], str), r.text
        empty = http.post("/generate", json={"inputs": "", "parameters": {"max_new_tokens": 3}})
        assert empty.status_code == 422 and empty.json()["error_type"] == "validation", empty.text
        assert http.get("/health").status_code == 200
        assert (
            http.post("/generate", json={"inputs": "def f(", "parameters": {"max_new_tokens": 2}}).status_code == 200
        )


# ------------------------------------------------------------------------------------- cold adapters, no busy wait


def slow_device_loads(engine, monkeypatch, seconds: float = 0.3, fail_first: bool = False) -> dict:
    """Device loads that take ``seconds`` (the first one failing, with ``fail_first``), and the scheduler's calls
    to ``_admit`` (one a loop iteration) timed; the safety-net timeout is made long, so only a wake-up helps."""
    import threading
    import time

    import serving.engine as engine_module

    monkeypatch.setattr(engine_module, "COLD_ADAPTER_WAIT_S", 60.0)
    store, seen = engine.store, {"admits": [], "loads": [], "started": threading.Event()}
    load, slot_layers, admit = store._load, store._slot_layers, engine._admit

    def failing_slot_layers():
        if fail_first and len(seen["loads"]) == 1:
            raise RuntimeError("the device refused the copy")
        return slot_layers()

    def slow_load(name, slot, weights):
        start = time.monotonic()
        seen["loads"].append([start, None])
        seen["started"].set()
        time.sleep(seconds)
        try:
            return load(name, slot, weights)
        finally:
            seen["loads"][-1][1] = time.monotonic()

    def counted_admit():
        seen["admits"].append(time.monotonic())
        return admit()

    monkeypatch.setattr(store, "_load", slow_load)
    monkeypatch.setattr(store, "_slot_layers", failing_slot_layers)
    monkeypatch.setattr(engine, "_admit", counted_admit)
    return seen


def admits_during_loads(seen: dict) -> int:
    return sum(1 for t in seen["admits"] for start, end in seen["loads"] if start <= t <= end)


def test_a_request_for_a_cold_adapter_is_served_without_a_busy_wait(adapter_dir, monkeypatch) -> None:
    """The scheduler waits on its condition while the adapter's device load runs; the store wakes it when the load
    ends (the loop spun every 2 ms before: some 150 iterations in a 0.3 s load)."""
    engine = make_engine(adapter_dir)
    reference = make_engine(adapter_dir, ["lora"])  # the adapter warm from the start

    async def main():
        expected = [o.token.id for o in await collect(reference, request("def add(", "lora", max_new_tokens=6))]
        await engine.load_adapter("lora", str(adapter_dir / "lora"))  # registered, not on the device: cold
        seen = slow_device_loads(engine, monkeypatch)
        outs = await asyncio.wait_for(collect(engine, request("def add(", "lora", max_new_tokens=6)), 10)
        await engine.shutdown()
        await reference.shutdown()
        return expected, outs, seen

    expected, outs, seen = run(main())
    assert [o.token.id for o in outs] == expected and outs[-1].finish_reason == "length"
    assert len(seen["loads"]) == 1 and engine.store.loads == 1
    assert admits_during_loads(seen) <= 3, seen


def test_a_failed_device_load_wakes_the_scheduler_to_try_again(adapter_dir, monkeypatch) -> None:
    engine = make_engine(adapter_dir)

    async def main():
        await engine.load_adapter("lora", str(adapter_dir / "lora"))
        seen = slow_device_loads(engine, monkeypatch, seconds=0.2, fail_first=True)
        outs = await asyncio.wait_for(collect(engine, request("def add(", "lora", max_new_tokens=3)), 10)
        await engine.shutdown()
        return outs, seen

    outs, seen = run(main())
    assert len(outs) == 3 and outs[-1].finish_reason == "length"
    assert len(seen["loads"]) == 2 and engine.store.loads == 1  # the first copy failed, the second served it
    assert admits_during_loads(seen) <= 5, seen


def test_a_queued_request_whose_adapter_is_unloaded_during_its_load_fails(adapter_dir, monkeypatch) -> None:
    """Admission fails it with the store's error (a 422 ``ValidationError``), woken by the aborted load."""
    engine = make_engine(adapter_dir)

    async def main():
        await engine.load_adapter("lora", str(adapter_dir / "lora"))
        seen = slow_device_loads(engine, monkeypatch)
        waiting = asyncio.ensure_future(collect(engine, request("def add(", "lora")))
        assert await asyncio.to_thread(seen["started"].wait, 10)
        await engine.unload_adapter("lora")
        with pytest.raises(ValidationError, match=r"^unknown adapter 'lora'; loaded adapters: \[\]$"):
            await asyncio.wait_for(waiting, 10)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = run(main())
    assert stats["in_flight"] == 0 and stats["queue_size"] == 0
    assert engine.store.resident() == {} and engine.store._pins == {}
