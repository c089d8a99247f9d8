"""Prometheus metrics under TGI's names, one registry per app so tests can build many apps in one process.

Counters keep TGI's exact names (``tgi_request_count``, not ``tgi_request_count_total``): prometheus-client's own
``Counter`` always appends ``_total``, which would break dashboards written for TGI, so counters are served by a
small collector with the exact name and typed ``counter`` in the exposition (the Prometheus text format does not
require the suffix; TGI's own exporter writes the same lines). Histogram buckets follow TGI's router.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "tgi_request_count": ("Total number of requests", ()),
    "tgi_request_success": ("Number of successful requests", ()),
    "tgi_request_failure": ("Number of failed requests", ("err",)),
    "tgi_batch_inference_count": ("Inference calls per method (prefill or decode)", ("method",)),
    "tgi_batch_inference_success": (
        "Number of successful inference calls per method (prefill or decode)",
        ("method",),
    ),
    "tgi_batch_inference_failure": ("Number of failed inference calls per method (prefill or decode)", ("method",)),
    "flora_adapter_requests": ("Requests per adapter (`base` for the base model)", ("adapter",)),
    "flora_milora_prompts_routed": ("Prompts MiLoRA routers routed (once per prompt, never per decoding step)", ()),
}


class _Counters(Collector):
    """Thread-safe labelled counters exposed with their exact names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = {name: defaultdict(float) for name in _COUNTERS}

    def inc(self, name: str, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[name][labels] += amount

    def set(self, name: str, value: float, *labels: str) -> None:
        """For counters another component keeps (read at scrape time)."""
        with self._lock:
            self._values[name][labels] = value

    def value(self, name: str, *labels: str) -> float:
        with self._lock:
            return self._values[name].get(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {name: dict(values) for name, values in self._values.items()}
        for name, (doc, label_names) in _COUNTERS.items():
            metric = Metric(name, doc, "unknown")
            values = snapshot[name] or ({(): 0.0} if not label_names else {})
            for labels, value in values.items():
                metric.add_sample(name, dict(zip(label_names, labels)), value)
            yield metric


def _duration_buckets() -> list[float]:
    # TGI: 35 geometric buckets starting at 0.1 ms, ratio 1.5.
    return [0.0001 * 1.5**k for k in range(1, 36)]


def _linear_buckets(top: int) -> list[float]:
    return [top / 100 * (x + 1) for x in range(100)]


class ServerMetrics:
    """Everything ``/metrics`` shows; ``stats`` is polled at scrape time for the queue and batch gauges."""

    def __init__(self, max_input_tokens: int, max_total_tokens: int, stats: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.counters = _Counters()
        self.registry.register(self.counters)
        self._stats = stats
        reg = self.registry
        self.duration = Histogram(
            "tgi_request_duration", "Total time spent processing the request", registry=reg,
            buckets=_duration_buckets(),
        )  # fmt: skip
        self.validation_duration = Histogram(
            "tgi_request_validation_duration", "Time spent validating the request", registry=reg,
            buckets=_duration_buckets(),
        )  # fmt: skip
        self.queue_duration = Histogram(
            "tgi_request_queue_duration", "Time from validation to the first token (queue and prefill)",
            registry=reg, buckets=_duration_buckets(),
        )  # fmt: skip
        self.inference_duration = Histogram(
            "tgi_request_inference_duration", "Time from the first to the last token", registry=reg,
            buckets=_duration_buckets(),
        )  # fmt: skip
        self.time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration", "Mean time per token per request", registry=reg,
            buckets=_duration_buckets(),
        )  # fmt: skip
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", registry=reg,
            buckets=_linear_buckets(max_total_tokens),
        )  # fmt: skip
        self.input_length = Histogram(
            "tgi_request_input_length", "Input token length per request", registry=reg,
            buckets=_linear_buckets(max_input_tokens),
        )  # fmt: skip
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "Maximum new tokens per request", registry=reg,
            buckets=_linear_buckets(max_total_tokens),
        )  # fmt: skip
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=reg)
        self.batch_size = Gauge("tgi_batch_current_size", "Current batch size", registry=reg)
        self.batch_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Maximum tokens the current batch will grow to", registry=reg
        )
        self.batch_inference_duration = Histogram(
            "tgi_batch_inference_duration", "Batch inference duration", ("method",), registry=reg,
            buckets=_duration_buckets(),
        )  # fmt: skip
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Batch size of the next batch (each prefill)", registry=reg,
            buckets=[2.0**k for k in range(11)],
        )  # fmt: skip
        self.in_flight = Gauge("flora_requests_in_flight", "Requests admitted and not finished", registry=reg)

    # ------------------------------------------------------------------------------------------------ events

    def request_started(self) -> None:
        self.counters.inc("tgi_request_count")

    def request_failed(self, err: str) -> None:
        self.counters.inc("tgi_request_failure", err)

    def request_validated(self, input_length: int, max_new_tokens: int, adapter: Optional[str]) -> None:
        self.input_length.observe(input_length)
        self.max_new_tokens.observe(max_new_tokens)
        self.counters.inc("flora_adapter_requests", adapter or "base")

    def request_succeeded(
        self, *, total: float, validation: float, queue: float, inference: float, generated_tokens: int
    ) -> None:
        self.counters.inc("tgi_request_success")
        self.duration.observe(total)
        self.validation_duration.observe(validation)
        self.queue_duration.observe(queue)
        self.inference_duration.observe(inference)
        self.time_per_token.observe(inference / max(generated_tokens, 1))
        self.generated_tokens.observe(generated_tokens)

    def batch_step(self, method: str, rows: int, seconds: float, ok: bool) -> None:
        """One engine step (the engine's ``step_observer``), as TGI's router records each inference call."""
        self.counters.inc("tgi_batch_inference_count", method)
        self.counters.inc("tgi_batch_inference_success" if ok else "tgi_batch_inference_failure", method)
        if ok:
            self.batch_inference_duration.labels(method).observe(seconds)
        if method == "prefill":
            self.batch_next_size.observe(rows)

    # ------------------------------------------------------------------------------------------------ scrape

    def render(self) -> bytes:
        try:
            stats = self._stats() or {}
        except Exception:  # a failing engine must not take /metrics down with it
            stats = {}
        self.queue_size.set(stats.get("queue_size", 0))
        self.batch_size.set(stats.get("batch_current_size", stats.get("batch_size", 0)))
        self.in_flight.set(stats.get("in_flight", 0))
        self.batch_max_tokens.set(stats.get("batch_current_max_tokens", 0))
        self.counters.set("flora_milora_prompts_routed", stats.get("milora_prompts_routed", 0))
        text = generate_latest(self.registry)
        for name in _COUNTERS:  # Metric(..., "unknown") is written `untyped`; these are counters
            text = text.replace(f"# TYPE {name} untyped\n".encode(), f"# TYPE {name} counter\n".encode())
        return text
