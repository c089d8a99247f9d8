"""Second half of ``make demo``: serve the demo's adapters with ``flora-serve`` and query them concurrently.

Starts the real server process on loopback with the tiny code model and every adapter the first half saved, sends
a burst of concurrent requests whose ``adapter_id`` differ (several adapters and the base model in one batch),
prints each answer and the throughput, then shows the two everyday failures: an unknown adapter and a stream.

    python -m trainers.demo.serve_demo [--adapters-dir out/demo-adapters] [--requests 24]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx
from huggingface_hub import AsyncInferenceClient, InferenceClient
from rich.console import Console
from rich.table import Table

from trainers import REPO_ROOT
from trainers.offline.tiny_code_model import default_cache_dir

from .code_demo import PROMPTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_adapters(folder: Path) -> dict[str, Path]:
    """Every PEFT adapter folder directly under ``folder``, by name."""
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "adapter_config.json").is_file()}


def start_server(model_dir: Path, adapters: dict[str, Path], port: int) -> subprocess.Popen:
    spec = ",".join(f"{name}={path}" for name, path in adapters.items())
    cmd = [sys.executable, "-m", "serving.cli", "--model-id", str(model_dir), "--lora-adapters", spec]
    cmd += ["--hostname", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            out = server.stdout.read().decode(errors="replace") if server.stdout else ""
            raise SystemExit(f"flora-serve exited with {server.returncode}:\n{out[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"flora-serve did not become healthy within {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # graceful: in-flight requests finish
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


async def burst(url: str, jobs: list[tuple[Optional[str], str]], max_new_tokens: int) -> tuple[list, float]:
    """All requests at once; the server batches them, one adapter per row."""
    client = AsyncInferenceClient(url, timeout=300)

    async def one(adapter: Optional[str], prompt: str):
        start = time.perf_counter()
        out = await client.text_generation(
            prompt, adapter_id=adapter, max_new_tokens=max_new_tokens, details=True, return_full_text=False
        )
        return out, time.perf_counter() - start

    start = time.perf_counter()
    results = await asyncio.gather(*(one(a, p) for a, p in jobs))
    return results, time.perf_counter() - start


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.demo.serve_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=default_cache_dir())
    p.add_argument("--adapters-dir", type=Path, default=REPO_ROOT / "out" / "demo-adapters")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=24)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    console = Console()
    if not (args.model_dir / "config.json").is_file() or not args.adapters_dir.is_dir():
        raise SystemExit("run `python -m trainers.demo` first: it builds the tiny model and saves the adapters")
    adapters = find_adapters(args.adapters_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    console.rule(f"flora-serve on {url} with adapters {', '.join(adapters)}")
    server = start_server(args.model_dir, adapters, port)
    try:
        wait_healthy(url, server)
        names: list[Optional[str]] = [*adapters, None]
        jobs = [
            (names[i % len(names)], PROMPTS.get(names[i % len(names)] or "", "def main():\n"))
            for i in range(args.requests)
        ]
        results, wall = asyncio.run(burst(url, jobs, args.max_new_tokens))

        table = Table(title=f"{len(jobs)} concurrent requests, mixed adapter_id, greedy")
        for column in ("adapter_id", "tokens", "latency s", "completion"):
            table.add_column(column)
        for (adapter, _), (out, latency) in zip(jobs, results):
            text = out.generated_text.replace("\n", "⏎")[:60]
            table.add_row(adapter or "(base)", str(out.details.generated_tokens), f"{latency:.2f}", text)
        console.print(table)
        tokens = sum(out.details.generated_tokens for out, _ in results)
        console.print(f"throughput: {tokens} tokens in {wall:.2f} s = [bold]{tokens / wall:.1f} tokens/s[/]")

        client = InferenceClient(url, timeout=60)
        first = next(iter(adapters))
        streamed = "".join(
            client.text_generation(PROMPTS.get(first, "x"), adapter_id=first, max_new_tokens=12, stream=True)
        )
        console.print(f"streamed from {first!r}: {streamed!r}")
        try:
            client.text_generation("x", adapter_id="no-such-adapter", max_new_tokens=2)
        except Exception as exc:  # the server answers 422 and keeps serving
            console.print(f"unknown adapter -> {type(exc).__name__}: {exc}")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
