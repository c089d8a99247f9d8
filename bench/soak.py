"""Soak: many concurrent clients against a real ``flora-serve`` while adapters are hot-loaded and unloaded.

Why: the error paths are tested one by one, but a server in production sees everything at once: mixed adapter
kinds (FLoRA, LoRA, IA3, MiLoRA, base), streams and plain requests, clients that hang up mid-stream, and an
operator replacing an adapter that requests are using at that moment. This runs all of that for a bounded time and
then SIGTERMs the server with requests in flight, and reports:

- requests sent / succeeded / failed by status; 5xx must be 0;
- greedy outputs that differ from the same request served alone before the load (must be 0; for the adapter being
  replaced, either of its two versions counts as right);
- server RSS at start, middle and end (flat within ``--rss-bound-mib``);
- queue and total latency percentiles;
- at SIGTERM: requests that finished or got a clean error (JSON error body or a final SSE error event) and requests
  that hung (must be 0).

    python bench/soak.py                      # 64 clients for 60 s on the tiny code model (CPU)
    python bench/soak.py --clients 16 --duration 8 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (bench/serve.py: server process, adapters, tiny model)

TOKEN = "soak-admin"
PROMPTS = ["def add(a, b):", "sub fib {", "import os\n", "for i in range(", "my $n =", "int main() {"]
STABLE = ["flora-a", "flora-b", "lora", "ia3", "milora", None]  # None: the base model
HOT = "hot"  # the adapter replaced over and over while requests use it


def build_adapters(model_dir: str, folder: Path) -> dict[str, Path]:
    """Random, non-identity adapters of every kind, plus two versions of the hot one."""
    import copy

    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flora_hf import FLoRAConfig, MiLoRAConfig

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    configs = {
        "flora-a": FLoRAConfig(r=1),
        "flora-b": FLoRAConfig(r=4),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
        "ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
        "milora": MiLoRAConfig(r=4, top_k=2, init_weights=False),
        "hot-v1": FLoRAConfig(r=1),
        "hot-v2": FLoRAConfig(r=1),
    }
    paths = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = get_peft_model(copy.deepcopy(base), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if any(k in pname for k in ("flora_", "lora_", "ia3_", "milora_")):
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        model.save_pretrained(folder / name)
        saved = folder / name
        nested = saved / "default"  # PEFT writes non-default adapter names into sub-folders
        paths[name] = nested if nested.is_dir() else saved
    return paths


def rss_mib(pid: int) -> float:
    """Resident memory of the server process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def body(prompt: str, adapter: Optional[str], max_new_tokens: int) -> dict:
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    return {"inputs": prompt, "parameters": params}


async def generate(client: httpx.AsyncClient, payload: dict, stream: bool, hang_up_after: Optional[int]) -> dict:
    """One request: its status, text (None when it hung up on purpose), a clean error or not, and timings."""
    start = time.perf_counter()
    if not stream:
        r = await client.post("/generate", json=payload)
        record = {"status": r.status_code, "seconds": time.perf_counter() - start}
        try:
            data = r.json()
        except ValueError:
            return record | {"clean": False}
        if r.status_code == 200:
            return record | {"text": data["generated_text"], "clean": True, "queue_ms": r.headers.get("x-queue-time")}
        return record | {"clean": set(data) >= {"error", "error_type"}}
    async with client.stream("POST", "/generate_stream", json=payload) as r:
        if r.status_code != 200:
            data = json.loads(await r.aread() or b"{}")
            return {"status": r.status_code, "clean": set(data) >= {"error", "error_type"}}
        tokens, text, clean = 0, None, True
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return {"status": "stream-error", "clean": True, "seconds": time.perf_counter() - start}
            tokens += 1
            if hang_up_after is not None and tokens >= hang_up_after:
                return {"status": "hung-up", "clean": True}
            if event.get("generated_text") is not None:
                text = event["generated_text"]
        if text is None:
            clean = False  # the stream ended with neither a final event nor an error event
        return {"status": 200, "text": text, "clean": clean, "seconds": time.perf_counter() - start}


async def reference_outputs(url: str, max_new_tokens: int, hot: dict[str, Path]) -> dict:
    """Every (prompt, adapter) served alone, and the hot adapter's two versions (loaded in turn)."""
    refs: dict[tuple, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as client:
        for version, path in hot.items():
            await admin(client, "load", path)
            for prompt in PROMPTS:
                r = await client.post("/generate", json=body(prompt, HOT, max_new_tokens))
                refs[(prompt, HOT, version)] = r.json()["generated_text"]
            await admin(client, "unload")
        for prompt in PROMPTS:
            for adapter in STABLE:
                r = await client.post("/generate", json=body(prompt, adapter, max_new_tokens))
                r.raise_for_status()
                refs[(prompt, adapter)] = r.json()["generated_text"]
    return refs


async def admin(client: httpx.AsyncClient, action: str, path: Optional[Path] = None) -> int:
    auth = {"authorization": f"Bearer {TOKEN}"}
    if action == "load":
        r = await client.post("/admin/adapters", json={"name": HOT, "path": str(path)}, headers=auth)
    else:
        r = await client.delete(f"/admin/adapters/{HOT}", headers=auth)
    return r.status_code


async def soak(url: str, args: argparse.Namespace, refs: dict, hot: dict[str, Path], pid: int) -> dict:
    rng = random.Random(args.seed)
    records: list[dict] = []
    intervals: list[tuple[float, float, str]] = []  # (loaded, about to unload, version) of the hot adapter
    admin_statuses: Counter = Counter()
    rss = {"start": rss_mib(pid)}
    deadline = time.perf_counter() + args.duration
    # idle connections close on our side first (uvicorn closes them after 5 s): no keep-alive race on reuse
    limits = httpx.Limits(max_connections=args.clients + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits, trust_env=False) as client:

        async def client_loop(index: int) -> None:
            local = random.Random(args.seed * 1000 + index)
            while time.perf_counter() < deadline:
                prompt = local.choice(PROMPTS)
                adapter = local.choice([*STABLE, HOT])
                stream = local.random() < 0.5
                hang_up = 2 if stream and local.random() < 0.15 else None
                t0 = time.perf_counter()
                try:
                    record = await generate(client, body(prompt, adapter, args.max_new_tokens), stream, hang_up)
                except httpx.TimeoutException:
                    record = {"status": "timeout", "clean": False}
                except httpx.HTTPError as err:
                    record = {"status": f"transport:{type(err).__name__}", "clean": False}
                records.append(record | {"prompt": prompt, "adapter": adapter, "t0": t0, "t1": time.perf_counter()})

        async def hot_loop() -> None:
            names = list(hot)
            k = 0
            await admin(client, "load", hot[names[0]])
            loaded_at = time.perf_counter()
            while time.perf_counter() < deadline:
                await asyncio.sleep(args.hot_interval)
                intervals.append((loaded_at, time.perf_counter(), names[k % 2]))  # this version served throughout
                admin_statuses[("unload", await admin(client, "unload"))] += 1
                k += 1
                status = await admin(client, "load", hot[names[k % 2]])
                admin_statuses[("load", status)] += 1
                loaded_at = time.perf_counter()

        async def sample_rss() -> None:
            await asyncio.sleep(args.duration / 2)
            rss["middle"] = rss_mib(pid)

        await asyncio.gather(hot_loop(), sample_rss(), *(client_loop(i) for i in range(args.clients)))
    rss["end"] = rss_mib(pid)
    del rng
    return {"records": records, "admin": dict(admin_statuses), "rss_mib": rss, "hot_intervals": intervals}


def check_outputs(records: list[dict], refs: dict, intervals: list[tuple[float, float, str]]) -> int:
    """Requests whose greedy text differs from serving them alone. A request on the hot adapter that ran wholly
    while one version was loaded must match that version (a name means the weights last loaded); one that
    overlapped a swap may match either."""
    wrong = 0
    for r in records:
        if r.get("status") != 200 or r.get("text") is None:
            continue
        if r["adapter"] == HOT:
            inside = [v for start, end, v in intervals if start <= r["t0"] and r["t1"] <= end]
            allowed = {refs[(r["prompt"], HOT, v)] for v in inside} or {
                text for (p, a, *_), text in refs.items() if p == r["prompt"] and a == HOT
            }
            wrong += r["text"] not in allowed
        elif r["text"] != refs[(r["prompt"], r["adapter"])]:
            wrong += 1
    return wrong


async def sigterm_in_flight(url: str, pid: int, args: argparse.Namespace) -> dict:
    """SIGTERM with streams and plain requests running: each must finish or end with a clean error."""
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, trust_env=False) as client:
        tasks = [
            asyncio.ensure_future(
                generate(
                    client,
                    body(PROMPTS[i % len(PROMPTS)], STABLE[i % len(STABLE)], args.sigterm_tokens),
                    stream=i % 2 == 0,
                    hang_up_after=None,
                )  # fmt: skip
            )
            for i in range(args.sigterm_requests)
        ]
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        done, pending = await asyncio.wait(tasks, timeout=args.request_timeout + 5)
    results = []
    for task in done:
        try:
            results.append(task.result())
        except httpx.HTTPError as err:  # the server closed the connection after answering what it could
            results.append({"status": f"transport:{type(err).__name__}", "clean": False})
    return {
        "sent": len(tasks),
        "finished": sum(1 for r in results if r.get("status") == 200 and r.get("clean")),
        "clean_errors": sum(1 for r in results if r.get("status") != 200 and r.get("clean")),
        "unclean": [r.get("status") for r in results if not r.get("clean")],
        "hung": len(pending),
    }


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def summarize(run: dict, refs: dict, sigterm: dict, args: argparse.Namespace) -> dict:
    records = run["records"]
    statuses = Counter(str(r["status"]) for r in records)
    seconds = [r["seconds"] for r in records if r.get("status") == 200 and "seconds" in r]
    queue = [float(r["queue_ms"]) for r in records if r.get("queue_ms")]
    rss = run["rss_mib"]
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "sent": len(records),
        "succeeded": statuses.get("200", 0),
        "by_status": dict(statuses),
        "server_errors": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500),
        "unclean": sum(1 for r in records if not r.get("clean")),
        "wrong_outputs": check_outputs(records, refs, run["hot_intervals"]),
        "hot_checked_strictly": sum(
            1
            for r in records
            if r["adapter"] == HOT
            and r.get("status") == 200
            and any(s <= r["t0"] and r["t1"] <= e for s, e, _ in run["hot_intervals"])
        ),  # fmt: skip
        "admin": {f"{a} {s}": n for (a, s), n in run["admin"].items()},
        "rss_mib": rss,
        "rss_growth_mib": rss["end"] - rss["start"],
        "latency_s": {q: percentile(seconds, q) for q in (0.5, 0.9, 0.99)},
        "queue_ms": {q: percentile(queue, q) for q in (0.5, 0.9, 0.99)},
        "sigterm": sigterm,
    }


def print_report(report: dict, rss_bound: float) -> None:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    rows = [
        ("requests sent", report["sent"]),
        ("succeeded (200)", report["succeeded"]),
        ("by status", ", ".join(f"{k}: {v}" for k, v in sorted(report["by_status"].items()))),
        ("5xx (must be 0)", report["server_errors"]),
        ("unclean endings (must be 0)", report["unclean"]),
        ("outputs differing from alone (must be 0)", report["wrong_outputs"]),
        ("hot-adapter requests checked against one version", report["hot_checked_strictly"]),
        ("admin calls", ", ".join(f"{k}: {v}" for k, v in sorted(report["admin"].items()))),
        (
            "server RSS MiB start / middle / end",
            " / ".join(fmt(report["rss_mib"].get(k)) for k in ("start", "middle", "end")),
        ),  # fmt: skip
        (f"RSS growth MiB (bound {rss_bound:g})", fmt(report["rss_growth_mib"])),
        ("latency s p50 / p90 / p99", " / ".join(fmt(v) for v in report["latency_s"].values())),
        ("queue ms p50 / p90 / p99", " / ".join(fmt(v) for v in report["queue_ms"].values())),
        (
            "SIGTERM: sent / finished / clean errors / hung",
            "{sent} / {finished} / {clean_errors} / {hung}".format(**report["sigterm"]),
        ),  # fmt: skip
        ("SIGTERM: unclean endings (must be none)", report["sigterm"]["unclean"] or "none"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def verdict(report: dict, rss_bound: float) -> list[str]:
    """What broke the soak's promises (empty: it held)."""
    problems = []
    for key in ("server_errors", "unclean", "wrong_outputs"):
        if report[key]:
            problems.append(f"{key}: {report[key]}")
    if report["rss_growth_mib"] > rss_bound:
        problems.append(f"RSS grew {report['rss_growth_mib']:.0f} MiB (bound {rss_bound:g})")
    if report["sigterm"]["hung"] or report["sigterm"]["unclean"]:
        problems.append(f"SIGTERM: {report['sigterm']}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", help="model folder (default: the tiny code model, built on first use)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--hot-interval", type=float, default=0.5, help="seconds between hot unload/load of one adapter")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--sigterm-requests", type=int, default=16)
    p.add_argument("--sigterm-tokens", type=int, default=64)
    p.add_argument("--graceful-shutdown-timeout", type=float, default=10.0)
    p.add_argument("--rss-bound-mib", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def run(args: argparse.Namespace) -> dict:
    model_dir = args.model_id or str(serve_bench.default_model_dir())
    with tempfile.TemporaryDirectory(prefix="flora-soak-") as tmp:
        root = Path(tmp)
        paths = build_adapters(model_dir, root / "adapters")
        hot = {"v1": paths.pop("hot-v1"), "v2": paths.pop("hot-v2")}
        port = serve_bench.free_port()
        command = [sys.executable, "-m", "serving.cli", "--model-id", model_dir, "--hostname", "127.0.0.1",
                   "--port", str(port), "--device", "cpu", "--log-level", "warning",
                   "--max-concurrent-requests", str(4 * args.clients), "--max-loaded-adapters", "4",
                   "--graceful-shutdown-timeout", str(args.graceful_shutdown_timeout),
                   "--adapter-roots", str(root / "adapters"),
                   "--lora-adapters", ",".join(f"{n}={p}" for n, p in paths.items())]  # fmt: skip
        os.environ["FLORA_ADMIN_TOKEN"] = TOKEN
        server = serve_bench.ServerProcess(serve_bench.Scenario("soak"), command, port, root / "server.log")
        server.start()
        try:
            server.wait_healthy(time.perf_counter() + 300)
            refs = asyncio.run(reference_outputs(server.url, args.max_new_tokens, hot))
            result = asyncio.run(soak(server.url, args, refs, hot, server.proc.pid))
            sigterm = asyncio.run(sigterm_in_flight(server.url, server.proc.pid, args))
            server.proc.wait(timeout=args.graceful_shutdown_timeout + 30)
        except BaseException:
            print(server.tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
    return summarize(result, refs, sigterm, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import flora_hf  # noqa: F401  (first: it quiets bitsandbytes' CPU-kernel warning before peft imports it)

    args = build_parser().parse_args(argv)
    report = run(args)
    print_report(report, args.rss_bound_mib)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    problems = verdict(report, args.rss_bound_mib)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
