"""Admin routes, metrics, client disconnects, keep-alives, API key, payload limit, and the flora-serve CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.fake_engine import FakeEngine
from tests.serving.live_server import TIMEOUT, LiveServer, settings, wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin"


def adapter_dir(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "FLORA", "r": 1}))
    return folder


# ------------------------------------------------------------------------------------------------------ admin


def test_admin_disabled_without_token():
    with LiveServer() as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        auth = {"authorization": "Bearer anything"}
        for method, path in (("GET", "/admin/adapters"), ("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/x")):
            r = http.request(method, path, headers=auth, json={"name": "x", "path": "/tmp"})
            assert r.status_code == 403 and r.json()["error_type"] == "forbidden"


def test_admin_adapters(tmp_path):
    root = tmp_path / "adapters"
    engine = FakeEngine(adapters={"perl": str(adapter_dir(root, "perl"))})
    live_settings = settings(admin_token=TOKEN, adapter_roots=[str(root)])
    with LiveServer(engine, live_settings) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        assert http.get("/admin/adapters").status_code == 401
        assert http.get("/admin/adapters", headers={"authorization": "Bearer nope"}).status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert http.get("/admin/adapters", headers=auth).json() == {"adapters": ["perl"], "max_loaded_adapters": 64}

        rust = adapter_dir(root, "rust")
        r = http.post("/admin/adapters", headers=auth, json={"name": "rust", "path": str(rust)})
        assert r.status_code == 201 and r.json()["adapters"] == ["perl", "rust"]
        hub = InferenceClient(live.url, timeout=TIMEOUT)
        assert hub.text_generation("hello", max_new_tokens=2, adapter_id="rust")
        assert engine.requests[-1].adapter_id == "rust"

        outside = adapter_dir(tmp_path / "elsewhere", "evil")
        r = http.post("/admin/adapters", headers=auth, json={"name": "evil", "path": str(outside)})
        assert r.status_code == 422 and "outside the allowed adapter roots" in r.json()["error"]
        sneaky = f"{root}/../elsewhere/evil"
        assert http.post("/admin/adapters", headers=auth, json={"name": "evil", "path": sneaky}).status_code == 422
        r = http.post("/admin/adapters", headers=auth, json={"name": "empty", "path": str(root)})
        assert r.status_code == 422 and "adapter_config.json" in r.json()["error"]  # the engine's AdapterError
        r = http.post("/admin/adapters", headers=auth, json={"name": "fake/tiny-model", "path": str(rust)})
        assert r.status_code == 422
        for name, path in (("a/../../b", str(rust)), ("x", "~nosuchuser-flora/x"), ("x", f"{rust}\u0000")):
            r = http.post("/admin/adapters", headers=auth, json={"name": name, "path": path})
            assert r.status_code == 422 and "error" in r.json(), (name, path, r.text)

        assert http.delete("/admin/adapters/rust", headers=auth).json()["adapters"] == ["perl"]
        assert http.delete("/admin/adapters/rust", headers=auth).status_code == 404
        r = http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "rust"}})
        assert r.status_code == 422 and "`rust` is not loaded" in r.json()["error"]


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics():
    with LiveServer() as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2, "adapter_id": "perl"}})
        http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
        http.post("/generate", json={"inputs": "hello", "parameters": {"temperature": -1}})
        http.post("/generate", json={"inputs": "OVERLOAD", "parameters": {}})
        http.post("/generate", json={"inputs": "FAILNOW", "parameters": {}})
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    # exact TGI names, typed counter (prometheus-client's parser reads them back with `_total` appended)
    assert "# TYPE tgi_request_count counter\ntgi_request_count 5.0\n" in r.text
    samples = {
        (
            s.name.removesuffix("_total") if family.type == "counter" else s.name,
            tuple(sorted(s.labels.items())),
        ): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert samples[("tgi_request_count", ())] == 5
    assert samples[("tgi_request_success", ())] == 2
    for err in ("validation", "overloaded", "generation"):
        assert samples[("tgi_request_failure", (("err", err),))] == 1
    assert samples[("flora_adapter_requests", (("adapter", "perl"),))] == 1
    assert samples[("tgi_request_generated_tokens_count", ())] == 2
    assert ("tgi_queue_size", ()) in samples and ("tgi_batch_current_size", ()) in samples
    assert ("tgi_request_input_length_count", ()) in samples


# --------------------------------------------------------------------------------------- streams and clients


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "hello SLOW world", "parameters": {"max_new_tokens": 100}}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 100, "stream": True},
        ),
    ],
)
def test_client_disconnect_closes_the_engine_iterator(path, body):
    with LiveServer() as live:
        engine = live.engine
        started = time.monotonic()
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http, http.stream("POST", path, json=body) as r:
            chunks = r.iter_raw()  # keep a reference: a dropped iterator closes the connection
            assert next(chunks).startswith(b"data:")
            time.sleep(0.1)
            assert engine.in_flight == 1 and engine.cancelled == []
        # 100 tokens take 5 s; the row must be freed right after the client leaves
        assert wait_for(lambda: engine.in_flight == 0 and engine.cancelled == [engine.requests[-1].id], 3.0)
        assert time.monotonic() - started < 3.0


def test_keep_alive_comments_are_ignored_by_clients():
    with LiveServer(server_settings=settings(keep_alive_interval=0.01)) as live:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
            payload = {"inputs": "SLOW hello", "parameters": {"max_new_tokens": 3}}
            raw = http.post("/generate_stream", json=payload).content
        assert b":\n\n" in raw and raw.count(b"data:") == 3
        hub = InferenceClient(live.url, timeout=TIMEOUT)
        assert len(list(hub.text_generation("SLOW hello", max_new_tokens=3, stream=True))) == 3


def test_api_key_and_payload_limit():
    live = LiveServer(server_settings=settings(api_key="k3y", payload_limit=2000))
    with live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 1}}
        assert http.post("/generate", json=body).status_code == 401
        assert http.post("/generate", json=body, headers={"authorization": "Bearer K3Y"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/info").status_code == 200
        big = {"inputs": "x" * 5000}
        r = http.post("/generate", json=big, headers={"authorization": "Bearer k3y"})
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

        def chunks(payload: bytes, size: int = 500):
            for i in range(0, len(payload), size):
                yield payload[i : i + size]

        auth = {"authorization": "Bearer k3y", "content-type": "application/json"}
        chunked = json.dumps(big).encode()  # no Content-Length: Transfer-Encoding chunked
        r = http.post("/generate", content=chunks(chunked), headers=auth)
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        small = json.dumps(body).encode()
        r = http.post("/generate", content=chunks(small, 7), headers=auth)  # under the limit, in chunks: served
        assert r.status_code == 200 and r.json()["generated_text"]
        r = http.post("/generate_stream", content=chunks(small, 7), headers=auth)
        assert r.status_code == 200 and b"generated_text" in r.content


def test_lifespan_shuts_the_engine_down():
    live = LiveServer(server_settings=settings(graceful_shutdown_timeout=2.5))
    with live:
        assert live.engine.shutdown_calls == []
    assert live.engine.shutdown_calls == [2.5]


# -------------------------------------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entrypoint() -> list[str]:
    """The Docker ENTRYPOINT (``flora-serve``) when installed, else the same ``main`` through ``-m``."""
    script = shutil.which("flora-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "serving.cli"]


def test_cli_serves_and_shuts_down_gracefully(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "FLORA_ENGINE_FACTORY": "tests.serving.fake_engine:build_engine",
        "PYTHONPATH": str(REPO),
        "MODEL_ID": "fake/cli-model",
        "LORA_ADAPTERS": f"perl={tmp_path}/perl",
        "PORT": str(port),
        "HOSTNAME": "127.0.0.1",
    }
    cmd = [*_entrypoint(), "--graceful-shutdown-timeout", "3", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:

            def healthy() -> bool:
                try:
                    return http.get("/health").status_code == 200
                except httpx.TransportError:
                    return proc.poll() is not None

            assert wait_for(healthy, 30.0) and proc.poll() is None
            info = http.get("/info").json()
            assert info["model_id"] == "fake/cli-model" and info["adapters"] == ["perl"]
            r = http.post(
                "/generate", json={"inputs": "hello", "parameters": {"adapter_id": "perl", "max_new_tokens": 2}}
            )
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn re-raises the signal once it has shut down, so the exit status is "terminated by SIGTERM"
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "fake engine shutdown grace=3.0" in stderr  # the lifespan ran: a graceful shutdown, not a kill


def test_sigterm_fails_what_outlives_the_grace_with_proper_errors(tmp_path):
    """Requests still running when the grace ends get TGI's error shape: a JSON 424 for a plain request, a final
    error event for a stream (uvicorn alone would cut them: a plain-text 500 and a stream with no end)."""
    import threading

    port = _free_port()
    env = {**os.environ, "FLORA_ENGINE_FACTORY": "tests.serving.fake_engine:build_engine", "PYTHONPATH": str(REPO),
           "MODEL_ID": "fake/cli-model", "PORT": str(port), "HOSTNAME": "127.0.0.1"}  # fmt: skip
    cmd = [*_entrypoint(), "--graceful-shutdown-timeout", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {}
    slow = {"inputs": "SLOW hello", "parameters": {"max_new_tokens": 200}}  # 10 s of tokens, far past the grace

    def plain() -> None:
        r = httpx.post(f"{url}/generate", json=slow, timeout=TIMEOUT)
        results["plain"] = (r.status_code, r.headers.get("content-type"), r.text)

    def stream() -> None:
        with httpx.stream("POST", f"{url}/generate_stream", json=slow, timeout=TIMEOUT) as r:
            results["stream"] = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]

    try:
        assert wait_for(lambda: _answers(url), 30.0)
        threads = [threading.Thread(target=f) for f in (plain, stream)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    status, content_type, text = results["plain"]
    assert status == 424 and content_type.startswith("application/json"), text
    assert json.loads(text)["error_type"] == "generation"
    events = results["stream"]
    assert len(events) > 2 and set(events[-1]) == {"error", "error_type"}, events[-1]


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_cli_help_needs_no_engine():
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "--lora-adapters" in out.stdout and "MAX_TOTAL_TOKENS" in out.stdout


def test_metadata_says_what_is_enforced_and_where_it_runs():
    with LiveServer() as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
        r = http.put("/generate", json={})
        assert r.status_code == 405 and "POST" in r.headers.get("allow", "")
        assert http.get("/docs").status_code == 404  # no page that needs a CDN
        assert http.get("/openapi.json").status_code == 200
        r = http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        assert r.headers["x-compute-type"] == "cpu"  # the fake engine has no device: not "gpu+optimized"
