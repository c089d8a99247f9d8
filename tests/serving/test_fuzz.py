"""Schema fuzzing of the running server: every operation of ``/openapi.json``, the admin routes with their token.

Hypothesis-generated requests (schemathesis) must never get a 5xx or hang, and answers must match the schema; after
the run the server still answers ``/health`` and a normal request. The engine is the fake one: this exercises the
HTTP layer (validation, routing, error shapes), which the real engine shares.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving.fake_engine import FakeEngine
from tests.serving.live_server import TIMEOUT, LiveServer
from tests.serving.live_server import settings as server_settings

TOKEN = "fuzz-admin"
EXAMPLES = 30  # per operation: the whole run stays well under two minutes on two cores
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance,
          allow_header_conformance]  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-adapters")
    engine = FakeEngine(adapters={"perl": str(root / "perl")})
    with LiveServer(engine, server_settings(admin_token=TOKEN, adapter_roots=[str(root)])) as server:
        yield server


def fuzz_operation(operation, failures: list[str]) -> int:
    """Run hypothesis over one operation's generated requests; returns how many were sent."""
    sent = 0

    strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(
        generation_mode=GenerationMode.NEGATIVE  # invalid bodies, parameters and types: must be 4xx, never 5xx
    )

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)  # fmt: skip
    def run(case) -> None:
        nonlocal sent
        sent += 1
        try:
            response = case.call(headers={"authorization": f"Bearer {TOKEN}"}, timeout=15)
            case.validate_response(response, checks=CHECKS)
        except BaseException as failure:  # collected per operation (schemathesis raises exception groups)
            if isinstance(failure, (KeyboardInterrupt, SystemExit)):
                raise
            parts = getattr(failure, "exceptions", None) or [failure]
            for part in parts:
                title = getattr(part, "title", "") or str(part).splitlines()[0][:200]
                failures.append(f"{operation.label}: {type(part).__name__}: {title} <- {case.as_curl_command()}")
            raise

    try:
        run()
    except BaseException as failure:  # recorded in failures (hypothesis re-raises the shrunk example)
        if isinstance(failure, (KeyboardInterrupt, SystemExit)):
            raise
    return sent


def test_no_server_errors_on_any_operation(live) -> None:
    """The schemathesis pytest plugin does not support pytest 9 yet, so its Python API drives hypothesis here."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # TGI, OpenAI and admin routes
    failures: list[str] = []
    sent = sum(fuzz_operation(op, failures) for op in operations)
    print(f"fuzz: {sent} requests over {len(operations)} operations")
    assert sent >= len(operations) * 5
    assert not failures, "\n".join(dict.fromkeys(failures))


def test_the_server_still_serves_after_the_fuzzing(live) -> None:
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        assert http.get("/health").status_code == 200
        r = http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.json()["generated_text"]
