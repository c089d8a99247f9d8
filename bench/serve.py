"""Serving benchmark: a Poisson load generator against real ``flora-serve`` processes, as the FLoRA paper's Fig. 2.

Why: ``bench/layer.py`` times one adapted linear layer; users get a server's throughput and latency, with continuous
batching, HTTP and a different adapter for every request. This script starts one ``flora-serve`` per scenario on
127.0.0.1 and measures, side by side in one run:

- ``none``: the base model, no adapters;
- ``flora-r1-x32`` / ``flora-r1-x256``: every request names a different FLoRA rank-1 adapter (round-robin over 32 or
  256 adapters, all resident on the device), and ``flora-r4-x256``: FLoRA rank 4 with 256 adapters;
- ``lora-r1-x256`` / ``lora-r8-x256``: PEFT LoRA adapters on the same target modules (``c_attn``).

Adapters are real PEFT folders (``get_peft_model``, random non-identity weights, ``save_pretrained``) in a temporary
folder. Requests arrive as a Poisson process at each ``--rates`` value (``inf``: all at once, the paper's maximum
throughput setting); prompt and output lengths are lognormal like the paper's ShareGPT subset, scaled down for a CPU.
Greedy decoding with ``max_new_tokens`` = the drawn output length; TGI has no ``ignore_eos``, so a request that meets
EOS early counts the tokens it really generated (``details.generated_tokens``). Scenarios are interleaved (rotated
order for every (repeat, rate)) so machine noise hits all alike; throughput ratios are paired per repeat.

    python bench/serve.py --quick      # a short sweep, about 2 minutes on a 2-core CPU
    python bench/serve.py              # the default sweep, under 10 minutes on CPU (the first run also builds the tiny model)
    python bench/serve.py --model-id /models/starcoderbase-1b --device cuda --dtype float16 \\
        --rates 2,4,8,16,inf --num-requests 400 --prompt-mean 512 --prompt-max 2000 --output-mean 256 --output-max 1024

Writes ``serve_<device>[_quick].json`` (settings, command line, versions, every request) and two PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.85  # FLoRA r=1 with 256 distinct adapters keeps >= 0.85x the no-adapter throughput
TARGET_ADAPTERS = 256
SCENARIO_RE = re.compile(r"^(flora|lora)-r(\d+)-x(\d+)$")
ENGINES = ("native", "vllm")
PROMPT_SOURCES = ("flora_hf", "serving", "trainers")  # local code the prompts are cut from
TINY_LLAMA = "tiny-llama"
QUICK = {"num_requests": 40, "rates": "20,inf", "repeats": 2}
DEFAULT = {"num_requests": 80, "rates": "10,40,inf", "repeats": 5}
NOISY_SPREAD = 0.25  # (max - min) / median of a throughput over repeats above which the verdict is flagged


class BenchError(RuntimeError):
    """A failure the user must act on (server did not start, adapters missing); printed without a traceback."""


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Scenario:
    """One server configuration: no adapters, or ``num_adapters`` adapters of one method and rank, on one engine
    (``vllm:`` before the name: ``flora-serve --engine vllm``; none: flora-serve's own engine)."""

    name: str
    method: Optional[str] = None  # "flora" | "lora" | None
    rank: int = 0
    num_adapters: int = 0
    engine: str = "native"

    @classmethod
    def parse(cls, name: str, default_engine: str = "native") -> Scenario:
        engine, _, rest = name.rpartition(":")
        engine = engine or default_engine
        if engine not in ENGINES:
            raise argparse.ArgumentTypeError(f"scenario {name!r}: unknown engine {engine!r} (one of {ENGINES})")
        full = rest if engine == "native" else f"{engine}:{rest}"
        if rest == "none":
            return cls(full, engine=engine)
        match = SCENARIO_RE.match(rest)
        if not match or int(match[2]) < 1 or int(match[3]) < 1:
            raise argparse.ArgumentTypeError(f"scenario {name!r}: expected `none` or `flora|lora-r<rank>-x<count>`")
        return cls(full, match[1], int(match[2]), int(match[3]), engine)

    @property
    def baseline(self) -> str:
        """The no-adapter scenario of the same engine, which this one's throughput is a ratio to."""
        return "none" if self.engine == "native" else f"{self.engine}:none"

    def label(self) -> str:
        where = "" if self.engine == "native" else f" ({self.engine})"
        if self.method is None:
            return f"no adapters{where}"
        return f"{'FLoRA' if self.method == 'flora' else 'LoRA'} r={self.rank}, {self.num_adapters} adapters{where}"


def parse_rates(text: str) -> list[float]:
    """``4,8,inf``: request rates in requests/s; ``inf`` sends every request at once."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        rate = math.inf if part in ("inf", "infinity") else float(part)
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"request rates must be > 0, got {part!r}")
        rates.append(rate)
    return sorted(set(rates))


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add(
        "--model-id",
        default=None,
        help=f"model folder for flora-serve (default: the tiny code model, built once; `{TINY_LLAMA}`: a random "
        "Llama wide enough for vLLM's CPU attention, built once)",
    )
    add("--device", default="auto", help="flora-serve --device: auto, cpu or cuda")
    add("--dtype", default=None, help="flora-serve --dtype (default: the server's: float16 on cuda, else float32)")
    add(
        "--scenarios",
        default=None,
        help="comma list of `none` and `flora|lora-r<rank>-x<count>`, each optionally prefixed `vllm:` (run on "
        "flora-serve --engine vllm; needs vLLM installed, make setup-vllm) "
        "(default: none, flora-r1-x<few>, flora-r1-x<many>, flora-r4-x<many>, lora-r1-x<many>, lora-r8-x<many>)",
    )
    add("--engine", choices=ENGINES, default="native", help="the engine of scenarios without an engine prefix")
    add(
        "--kv-cache-memory-bytes",
        type=int,
        default=1 << 30,
        help="flora-serve --kv-cache-memory-bytes for vLLM servers (vLLM otherwise reserves 90%% of the memory)",
    )
    add("--many-adapters", type=int, default=TARGET_ADAPTERS, help="adapter count of the big scenarios")
    add("--few-adapters", type=int, default=32, help="adapter count of the small FLoRA r=1 scenario")
    add("--target-modules", default="c_attn", help="comma list of modules both FLoRA and LoRA adapt")
    add("--adapter-scale", type=float, default=0.3, help="std of the noise added to every adapter weight")
    add(
        "--rates",
        default=None,
        help=f"request rates (req/s; `inf` = all at once) [default {DEFAULT['rates']}, --quick {QUICK['rates']}]",
    )
    add(
        "--num-requests",
        type=int,
        default=None,
        help=f"requests per (scenario, rate, repeat) "
        f"[default {DEFAULT['num_requests']}, --quick {QUICK['num_requests']}]",
    )
    add(
        "--repeats",
        type=int,
        default=None,
        help=f"rounds over every (rate, scenario) [default {DEFAULT['repeats']}, --quick {QUICK['repeats']}]",
    )
    add("--quick", action="store_true", help="a short run: fewer requests, rates and repeats")
    add("--prompt-mean", type=float, default=64, help="mean prompt length (tokens, lognormal)")
    add("--prompt-sigma", type=float, default=0.7, help="sigma of log prompt length")
    add("--prompt-min", type=int, default=8, help="shortest prompt (tokens)")
    add("--prompt-max", type=int, default=160, help="longest prompt (tokens)")
    add("--output-mean", type=float, default=32, help="mean output length (tokens, lognormal)")
    add("--output-sigma", type=float, default=0.7, help="sigma of log output length")
    add("--output-min", type=int, default=4, help="shortest output (tokens)")
    add("--output-max", type=int, default=64, help="longest output (tokens)")
    add("--seed", type=int, default=0, help="seeds lengths, prompts, arrivals and adapter weights")
    add("--request-timeout", type=float, default=120.0, help="seconds one request may take before it counts failed")
    add("--startup-timeout", type=float, default=600.0, help="seconds a server may take to answer /health")
    add("--warmup-requests", type=int, default=32, help="warm-up requests per server (at least one per adapter)")
    add("--max-batch-total-tokens", type=int, default=None, help="flora-serve --max-batch-total-tokens")
    add(
        "--one-server-at-a-time",
        action="store_true",
        help="run one server at a time (big models on one GPU); "
        "scenarios then alternate per repeat instead of per rate",
    )
    add("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON and PNGs")
    return parser


def resolve_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Fill --quick/default sizes, parse rates and scenarios, and refuse settings that cannot run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.rate_values = parse_rates(args.rates)
        names = args.scenarios or default_scenarios(args.few_adapters, args.many_adapters)
        args.scenario_list = list(
            dict.fromkeys(Scenario.parse(n.strip(), args.engine) for n in names.split(",") if n.strip())
        )
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    names = {s.name for s in args.scenario_list}
    for missing in sorted({s.baseline for s in args.scenario_list} - names):
        parser.error(f"--scenarios must include `{missing}`: every throughput is reported as a ratio to it")
    if args.num_requests < 1 or args.repeats < 1:
        parser.error("--num-requests and --repeats must be >= 1")
    if not 1 <= args.prompt_min <= args.prompt_max or not 1 <= args.output_min <= args.output_max:
        parser.error("length bounds must satisfy 1 <= min <= max")
    return args


def default_scenarios(few: int, many: int) -> str:
    return f"none,flora-r1-x{few},flora-r1-x{many},flora-r4-x{many},lora-r1-x{many},lora-r8-x{many}"


# ---------------------------------------------------------------------------------------------- model, adapters
def default_model_dir() -> Path:
    """The tiny code model's cache folder (save_pretrained model + tokenizer), built on first use.

    A folder already there is used as is, even if its corpus fingerprint is stale (the corpus is sampled from
    system files, so installing a package invalidates it): only the model's shape matters for speed, and a rebuild
    takes many minutes on a CPU.
    """
    from trainers.offline.tiny_code_model import default_cache_dir, load_or_build_tiny_code_model

    folder = default_cache_dir()
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        load_or_build_tiny_code_model()
    return folder


def tiny_llama_dir() -> Path:
    """A random Llama (width 128, 2 layers, 4 heads of 32, 2 kv heads) over a BPE tokenizer trained on this repo's
    code, built once under the model cache. vLLM's CPU attention needs heads of 32 or more, which the tiny code model
    does not have; only the shape matters for speed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.offline.model_cache import cache_root
    from trainers.offline.tiny_code_model import train_tokenizer

    folder = cache_root() / "bench-tiny-llama"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    texts = [p.read_text() for src in PROMPT_SOURCES for p in sorted((REPO / src).rglob("*.py"))]
    tok = train_tokenizer(texts, vocab_size=512, block_size=2048)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def resolve_model_dir(model_id: Optional[str]) -> str:
    if model_id == TINY_LLAMA:
        return str(tiny_llama_dir())
    return str(Path(model_id).expanduser()) if model_id else str(default_model_dir())


def peft_config(method: str, rank: int, target_modules: list[str]) -> Any:
    """FLoRA or LoRA on the same modules; LoRA's alpha = 2r, a common choice (its value does not change speed)."""
    if method == "flora":
        from flora_hf import FLoRAConfig

        return FLoRAConfig(r=rank, target_modules=target_modules)
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules, lora_dropout=0.0)


def make_adapters(
    base: Any, method: str, rank: int, count: int, folder: Path, target_modules: list[str], seed: int, scale: float
) -> list[tuple[str, Path]]:
    """``count`` PEFT adapter folders with random, non-identity weights: one PEFT model, re-randomised per save."""
    import copy

    import torch
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), peft_config(method, rank, target_modules))
    marker = "flora_" if method == "flora" else "lora_"
    params = [p for name, p in model.named_parameters() if marker in name]
    if not params:
        raise BenchError(f"{method} found none of the target modules {target_modules} in the model")
    initial = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    with torch.no_grad():
        for i in range(count):
            for p, p0 in zip(params, initial):
                p.copy_(p0 + torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
            name = f"{method}-r{rank}-{i:03d}"
            model.save_pretrained(folder / name)
            adapters.append((name, folder / name))
    return adapters


def build_adapter_sets(
    args: argparse.Namespace, model_dir: str, folder: Path
) -> dict[tuple[str, int], list[tuple[str, Path]]]:
    """One adapter set per (method, rank), as big as its largest scenario; smaller scenarios use its first ones."""
    from transformers import AutoModelForCausalLM

    needed: dict[tuple[str, int], int] = {}
    for sc in args.scenario_list:
        if sc.method:
            needed[(sc.method, sc.rank)] = max(needed.get((sc.method, sc.rank), 0), sc.num_adapters)
    if not needed:
        return {}
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    sets = {}
    for k, ((method, rank), count) in enumerate(sorted(needed.items())):
        sets[(method, rank)] = make_adapters(
            base, method, rank, count, folder, targets, args.seed * 100 + k, args.adapter_scale
        )
    return sets


# ------------------------------------------------------------------------------------------------------ workload
@dataclass
class Workload:
    """The requests of one repeat: same prompts, lengths and arrival pattern for every scenario and rate."""

    prompts: list[str]
    prompt_lengths: list[int]  # as drawn; the server's count comes back in x-prompt-tokens
    output_lengths: list[int]
    unit_arrivals: list[float]  # Poisson arrival times at 1 request/s; divided by the rate

    def arrivals(self, rate: float) -> list[float]:
        return [0.0 if math.isinf(rate) else t / rate for t in self.unit_arrivals]


def lognormal_lengths(rng: random.Random, mean: float, sigma: float, low: int, high: int, n: int) -> list[int]:
    """ShareGPT-like heavy-tailed lengths with the given mean (before clipping to [low, high])."""
    mu = math.log(mean) - sigma**2 / 2
    return [min(high, max(low, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def prompt_token_ids(tokenizer: Any, needed: int) -> list[int]:
    """Token ids of the project's own source files: real code, always present, no download."""
    ids: list[int] = []
    files = sorted(p for d in PROMPT_SOURCES for p in (REPO / d).rglob("*.py"))
    for path in files:
        ids += tokenizer(path.read_text(errors="replace"), add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > 50 * needed:
            break
    if len(ids) <= needed:
        raise BenchError(f"only {len(ids)} prompt tokens in {PROMPT_SOURCES}; need more than {needed}")
    return ids


@dataclass
class PromptSource:
    """The tokenizer and the token stream prompts are cut from (decoded, so the server tokenizes real text)."""

    tokenizer: Any
    ids: list[int]


def build_workload(args: argparse.Namespace, source: PromptSource, seed: int, n: int) -> Workload:
    rng = random.Random(seed)
    prompt_lengths = lognormal_lengths(rng, args.prompt_mean, args.prompt_sigma, args.prompt_min, args.prompt_max, n)
    output_lengths = lognormal_lengths(rng, args.output_mean, args.output_sigma, args.output_min, args.output_max, n)
    prompts = []
    for length in prompt_lengths:
        start = rng.randrange(len(source.ids) - length)
        prompts.append(source.tokenizer.decode(source.ids[start : start + length]))
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(1.0)
    return Workload(prompts, prompt_lengths, output_lengths, arrivals)


# -------------------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the benchmark is killed before its finally blocks run (SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ServerProcess:
    """One ``flora-serve`` in its own process group, logging to a file (a pipe could fill up and stall it)."""

    scenario: Scenario
    command: list[str]
    port: int
    log_path: Path
    proc: Optional[subprocess.Popen] = None
    info: dict = field(default_factory=dict)
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        env.pop("FLORA_ENGINE_FACTORY", None)  # the real engine, whatever the caller's environment says
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals the server and its children
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        self.startup_s = time.perf_counter()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, deadline: float) -> None:
        """Poll /health until 200; fail with the server's log tail if it exits or the deadline passes."""
        assert self.proc is not None
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"flora-serve for {self.scenario.name} exited with status {self.proc.returncode} before "
                        f"answering /health.\ncommand: {short_command(self.command)}\n--- log tail ---\n{self.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.info = client.get(f"{self.url}/info").json()
                        self.startup_s = time.perf_counter() - self.startup_s
                        return
                if time.perf_counter() > deadline:
                    raise BenchError(
                        f"flora-serve for {self.scenario.name} did not answer /health on {self.url} within "
                        f"--startup-timeout.\n--- log tail ---\n{self.tail()}"
                    )
                time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def short_command(command: list[str]) -> str:
    """The command with the (long) adapter list abbreviated, for messages."""
    shown = [c if len(c) < 200 else c[:120] + f"...({c.count(',') + 1} entries)" for c in command]
    return shlex.join(shown)


def server_command(args: argparse.Namespace, model_dir: str, sc: Scenario, adapters: list[tuple[str, Path]]) -> list:
    """``flora-serve`` flags as TGI's launcher: every adapter resident (slots >= adapters), no 429 from our load."""
    in_flight = max(args.num_requests, args.warmup_requests, len(adapters))
    flags: dict[str, Any] = {
        "--model-id": model_dir,
        "--hostname": "127.0.0.1",
        "--port": free_port(),
        "--device": args.device,
        "--dtype": args.dtype,
        "--log-level": "warning",  # no access log line per request
        "--graceful-shutdown-timeout": 2,
        "--max-concurrent-requests": max(128, 2 * in_flight),
        "--max-batch-total-tokens": args.max_batch_total_tokens,
        "--max-loaded-adapters": max(1, len(adapters)),
        "--max-adapter-rank": max(16, sc.rank),
        "--lora-adapters": ",".join(f"{name}={path}" for name, path in adapters) or None,
    }
    if sc.engine == "vllm":
        flags |= {"--engine": "vllm", "--kv-cache-memory-bytes": args.kv_cache_memory_bytes}
    command = [sys.executable, "-m", "serving.cli"]
    for flag, value in flags.items():
        if value is not None:
            command += [flag, str(value)]
    return command


class ServerPool:
    """The running servers, at most ``max_live`` at once; every one is stopped by ``close`` whatever happens."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: str,
        adapters: dict[str, list[tuple[str, Path]]],
        source: PromptSource,
        log_dir: Path,
    ) -> None:
        self.args, self.model_dir, self.adapters, self.log_dir = args, model_dir, adapters, log_dir
        self.source = source
        self.max_live = 1 if args.one_server_at_a_time else len(args.scenario_list)
        self.live: dict[str, ServerProcess] = {}
        self.started: list[ServerProcess] = []  # every server ever started, for the JSON

    def ensure(self, wanted: list[Scenario]) -> None:
        """Start the wanted servers that are not running (all at once), then wait for each and warm it up."""
        missing = [sc for sc in wanted if sc.name not in self.live]
        for name in [n for n in self.live if n not in {sc.name for sc in wanted}]:
            if len(self.live) + len(missing) <= self.max_live:
                break
            self.live.pop(name).stop()
        fresh = []
        for sc in missing:
            command = server_command(self.args, self.model_dir, sc, self.adapters[sc.name])
            server = ServerProcess(sc, command, int(command[command.index("--port") + 1]), self.log_path(sc))
            self.live[sc.name] = server
            self.started.append(server)
            server.start()
            fresh.append(server)
        deadline = time.perf_counter() + self.args.startup_timeout
        for server in fresh:
            server.wait_healthy(deadline)
            self.check_adapters(server)
        for server in fresh:
            warm_up(self.args, server, [name for name, _ in self.adapters[server.scenario.name]], self.source)

    def log_path(self, sc: Scenario) -> Path:
        return self.log_dir / f"{sc.name}-{len(self.started)}.log"

    def check_adapters(self, server: ServerProcess) -> None:
        want = sorted(name for name, _ in self.adapters[server.scenario.name])
        have = sorted(server.info.get("adapters", []))
        if have != want:
            raise BenchError(f"{server.scenario.name}: the server loaded {len(have)} adapters, expected {len(want)}")

    def close(self) -> None:
        for server in list(self.live.values()):
            server.stop()
        self.live.clear()


# -------------------------------------------------------------------------------------------------------- client
def request_body(prompt: str, max_new_tokens: int, adapter: Optional[str]) -> dict:
    """Greedy, ``details`` on to read the generated token count (TGI has no ignore_eos)."""
    parameters: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True}
    if adapter:
        parameters["adapter_id"] = adapter
    return {"inputs": prompt, "parameters": parameters}


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict, arrival: float, t0: float, timeout: float
) -> dict:
    """Wait for the arrival time, POST /generate, return the per-request record."""
    delay = t0 + arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    record: dict[str, Any] = {
        "adapter": body["parameters"].get("adapter_id"),
        "arrival_s": round(arrival, 6),
        "sent_s": round(sent - t0, 6),
        "max_new_tokens": body["parameters"]["max_new_tokens"],
        "ok": False,
    }
    try:
        response = await asyncio.wait_for(client.post(f"{url}/generate", json=body), timeout)
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        record.update(latency_s=time.perf_counter() - sent, error=f"{type(exc).__name__}: {exc}")
        return record
    done = time.perf_counter()
    record.update(done_s=round(done - t0, 6), latency_s=round(done - sent, 6), status=response.status_code)
    if response.status_code != 200:
        record["error"] = response.text[:300]
        return record
    details = response.json().get("details") or {}
    record.update(
        ok=True,
        output_tokens=int(details.get("generated_tokens", 0)),
        finish_reason=details.get("finish_reason"),
        prompt_tokens=int(response.headers.get("x-prompt-tokens", -1)),
        queue_ms=int(response.headers.get("x-queue-time", -1)),
    )
    return record


async def run_load(
    url: str, workload: Workload, rate: float, adapters: list[Optional[str]], timeout: float
) -> list[dict]:
    """All requests of one (scenario, rate, repeat), each waiting for its Poisson arrival time."""
    limits = httpx.Limits(max_connections=len(adapters) + 8, max_keepalive_connections=len(adapters) + 8)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks = [
            one_request(client, url, request_body(prompt, out, adapter), arrival, t0, timeout)
            for prompt, out, adapter, arrival in zip(
                workload.prompts, workload.output_lengths, adapters, workload.arrivals(rate)
            )
        ]
        return await asyncio.gather(*tasks)


def warm_up(args: argparse.Namespace, server: ServerProcess, adapter_names: list[str], source: PromptSource) -> None:
    """Every adapter once (into its device slot), all at once like the timed load; any failure stops the run."""
    n = max(args.warmup_requests, len(adapter_names))
    workload = build_workload(args, source, args.seed + 999_983, n)
    names: list[Optional[str]] = [adapter_names[i % len(adapter_names)] for i in range(n)] if adapter_names else []
    names = names or [None] * n
    workload.output_lengths = [min(4, o) for o in workload.output_lengths]
    records = asyncio.run(run_load(server.url, workload, math.inf, names, args.request_timeout))
    failed = [r for r in records if not r["ok"]]
    if failed:
        raise BenchError(
            f"{len(failed)} of {n} warm-up requests to {server.scenario.name} failed, e.g. {failed[0].get('error')}"
            f"\n--- server log tail ---\n{server.tail()}"
        )


# ------------------------------------------------------------------------------------------------------ summaries
def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear interpolation, as numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def seconds_per_token(records: list[dict]) -> list[float]:
    """Per request: latency / output tokens, the paper's "seconds per output token"."""
    return [r["latency_s"] / r["output_tokens"] for r in records if r["ok"] and r["output_tokens"] > 0]


def summarize(records: list[dict]) -> dict:
    """Throughput over the run's span (first send to last answer) and latency percentiles."""
    ok = [r for r in records if r["ok"]]
    span = max((r["done_s"] for r in ok), default=0.0) - min((r["sent_s"] for r in records), default=0.0)
    tokens = sum(r["output_tokens"] for r in ok)
    spt = seconds_per_token(records)
    latency = [r["latency_s"] for r in ok]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "duration_s": round(span, 4),
        "output_tokens": tokens,
        "prompt_tokens": sum(max(r["prompt_tokens"], 0) for r in ok),
        "throughput_tok_s": tokens / span if span > 0 else 0.0,
        "throughput_req_s": len(ok) / span if span > 0 else 0.0,
        "mean_output_tokens": tokens / len(ok) if ok else 0.0,
        "stopped_early": sum(1 for r in ok if r["output_tokens"] < r["max_new_tokens"]),
        "s_per_token_p50": percentile(spt, 50),
        "s_per_token_p90": percentile(spt, 90),
        "latency_p50_s": percentile(latency, 50),
        "latency_p90_s": percentile(latency, 90),
    }


def aggregate(runs: list[dict], scenarios: list[Scenario], rates: list[float]) -> dict[str, dict[str, dict]]:
    """Per (scenario, rate): throughput over repeats, ratio to `none` paired per repeat, pooled latency."""
    table: dict[str, dict[str, dict]] = {}
    for sc in scenarios:
        for rate in rates:
            label = rate_label(rate)
            mine = [r for r in runs if r["scenario"] == sc.name and r["rate"] == label]
            base = {
                r["repeat"]: r["summary"]["throughput_tok_s"]
                for r in runs
                if r["scenario"] == sc.baseline and r["rate"] == label
            }
            throughputs = [r["summary"]["throughput_tok_s"] for r in mine]
            ratios = [r["summary"]["throughput_tok_s"] / base[r["repeat"]] for r in mine if base.get(r["repeat"])]
            records = [q for r in mine for q in r["requests"]]
            spt = seconds_per_token(records)
            table.setdefault(sc.name, {})[label] = {
                "throughput_tok_s": percentile(throughputs, 50),
                "throughput_min": min(throughputs, default=None),
                "throughput_max": max(throughputs, default=None),
                "throughput_per_repeat": throughputs,
                "ratio_to_none": percentile(ratios, 50),
                "ratios_per_repeat": ratios,
                "s_per_token_p50": percentile(spt, 50),
                "s_per_token_p90": percentile(spt, 90),
                "latency_p50_s": percentile([q["latency_s"] for q in records if q["ok"]], 50),
                "latency_p90_s": percentile([q["latency_s"] for q in records if q["ok"]], 90),
                "mean_output_tokens": percentile([r["summary"]["mean_output_tokens"] for r in mine], 50),
                "errors": sum(r["summary"]["errors"] for r in mine),
                "load_average_1m": percentile(
                    [r["summary"]["load_average_1m"] for r in mine if r["summary"].get("load_average_1m") is not None],
                    50,
                ),
                "requests": len(records),
            }
    return table


def result_load(agg: dict[str, dict[str, dict]], label: str) -> Optional[float]:
    """Median load average over the runs at one rate."""
    loads = [row[label]["load_average_1m"] for row in agg.values() if row[label].get("load_average_1m") is not None]
    return percentile(loads, 50)


def throughput_spread(values: list[float]) -> float:
    """(max - min) / median: how much the same scenario varied between repeats."""
    middle = percentile(values, 50)
    return (max(values) - min(values)) / middle if values and middle else 0.0


def verdict(agg: dict[str, dict[str, dict]], scenarios: list[Scenario], rates: list[float]) -> dict:
    """The target at the highest rate (``inf`` saturates the server: the paper's maximum throughput)."""
    label = rate_label(max(rates))
    target = f"FLoRA r=1 with {TARGET_ADAPTERS} distinct adapters keeps >= {TARGET_RATIO}x the no-adapter throughput"
    candidates = [sc for sc in scenarios if sc.method == "flora" and sc.rank == 1 and sc.engine == "native"]
    if not candidates:
        return {"target": target, "status": "N/A", "reason": "no FLoRA r=1 scenario was run"}
    sc = max(candidates, key=lambda s: s.num_adapters)
    row, base = agg[sc.name][label], agg["none"][label]
    ratio = row["ratio_to_none"]
    notes = []
    if sc.num_adapters != TARGET_ADAPTERS:
        notes.append(f"measured with {sc.num_adapters} adapters, not {TARGET_ADAPTERS}")
    if not math.isinf(max(rates)):
        notes.append(f"highest rate {label} req/s may not saturate the server; add `inf` to --rates")
    spread = max(throughput_spread(base["throughput_per_repeat"]), throughput_spread(row["throughput_per_repeat"]))
    if spread > NOISY_SPREAD:
        notes.append(
            f"machine noise: over repeats, `none` ranged {fmt(base['throughput_min'])}-{fmt(base['throughput_max'])} "
            f"and {sc.name} {fmt(row['throughput_min'])}-{fmt(row['throughput_max'])} tok/s (up to {spread:.0%} of "
            f"the median), as large as the margin tested; the verdict is unreliable: rerun on a quiet machine or with "
            "more --repeats"
        )
    load = result_load(agg, label)
    if load is not None and load > (os.cpu_count() or 1):
        notes.append(f"the machine was busy: median 1-minute load average {load:.1f} on {os.cpu_count()} CPUs")
    if row["errors"] or base["errors"]:
        notes.append(f"failed requests: {row['errors']} ({sc.name}), {base['errors']} (none)")
    passed = ratio is not None and ratio >= TARGET_RATIO and not row["errors"]
    return {
        "target": target,
        "status": "PASS" if passed else "FAIL",
        "scenario": sc.name,
        "rate": label,
        "throughput_tok_s": row["throughput_tok_s"],
        "baseline_tok_s": base["throughput_tok_s"],
        "ratio": ratio,
        "ratios_per_repeat": row["ratios_per_repeat"],
        "baseline_spread": spread,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------------ measuring
def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): recorded so a noisy machine shows in the JSON."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def plan(scenarios: list[Scenario], rates: list[float], repeats: int, one_at_a_time: bool) -> list[tuple]:
    """(repeat, rate, scenario) in the order they run; the scenario order rotates so none is always first."""
    order = []
    for repeat in range(repeats):
        if one_at_a_time:  # servers restart per scenario, so keep a scenario's rates together
            k = repeat % len(scenarios)
            for sc in scenarios[k:] + scenarios[:k]:
                order += [(repeat, rate, sc) for rate in rates]
        else:
            for i, rate in enumerate(rates):
                k = (repeat * len(rates) + i) % len(scenarios)
                order += [(repeat, rate, sc) for sc in scenarios[k:] + scenarios[:k]]
    return order


def measure(args: argparse.Namespace, pool: ServerPool, workloads: list[Workload], console: Any) -> list[dict]:
    """Run the plan; each adapter scenario walks round-robin over its adapters across all its requests."""
    if not args.one_server_at_a_time:
        pool.ensure(args.scenario_list)
    cursors = {sc.name: 0 for sc in args.scenario_list}
    runs = []
    steps = plan(args.scenario_list, args.rate_values, args.repeats, args.one_server_at_a_time)
    for step, (repeat, rate, sc) in enumerate(steps, 1):
        pool.ensure([sc])
        names = [name for name, _ in pool.adapters[sc.name]]
        n = args.num_requests
        chosen = [names[(cursors[sc.name] + i) % len(names)] for i in range(n)] if names else [None] * n
        cursors[sc.name] += n
        load = load_average()  # other processes on the machine: the noise every scenario shares
        records = asyncio.run(run_load(pool.live[sc.name].url, workloads[repeat], rate, chosen, args.request_timeout))
        summary = summarize(records)
        summary["load_average_1m"] = load
        runs.append(
            {
                "scenario": sc.name,
                "rate": rate_label(rate),
                "repeat": repeat,
                "order": step,
                "summary": summary,
                "requests": records,
            }
        )
        console.print(
            f"[{step}/{len(steps)}] repeat {repeat} rate {rate_label(rate):>4} {sc.name:<14} "
            f"{summary['throughput_tok_s']:8.1f} tok/s  {summary['duration_s']:6.2f} s  "
            f"p50 {fmt(summary['s_per_token_p50'], 4)} s/tok  errors {summary['errors']}  load {fmt(load, 1)}"
        )
    return runs


# ------------------------------------------------------------------------------------------------------ reporting
def fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(console: Any, agg: dict, scenarios: list[Scenario], rates: list[float], repeats: int) -> None:
    from rich.table import Table

    table = Table(title=f"flora-serve: output tokens/s (median of {repeats} repeats) and seconds per output token")
    for col in (
        "rate req/s",
        "scenario",
        "tok/s",
        "min-max",
        "x none*",
        "s/tok p50",
        "s/tok p90",
        "lat p50 s",
        "lat p90 s",
        "out tok",
        "errors",
    ):
        table.add_column(col, justify="left" if col in ("scenario", "rate req/s") else "right")
    for i, rate in enumerate(rates):
        label = rate_label(rate)
        if i:
            table.add_section()
        for sc in scenarios:
            row = agg[sc.name][label]
            table.add_row(
                label,
                sc.name,
                fmt(row["throughput_tok_s"]),
                f"{fmt(row['throughput_min'])}-{fmt(row['throughput_max'])}",
                fmt(row["ratio_to_none"], 3),
                fmt(row["s_per_token_p50"], 4),
                fmt(row["s_per_token_p90"], 4),
                fmt(row["latency_p50_s"], 3),
                fmt(row["latency_p90_s"], 3),
                fmt(row["mean_output_tokens"]),
                str(row["errors"]),
            )
    console.print(table)
    console.print("* median over repeats of (scenario tok/s / its engine's none tok/s) in the same repeat and rate")


def print_verdict(console: Any, result: dict) -> None:
    if result["status"] == "N/A":
        console.print(f"[bold]Target[/]: {result['target']}: N/A ({result['reason']})")
        return
    colour = "green" if result["status"] == "PASS" else "red"
    ratios = ", ".join(f"{r:.3f}" for r in result["ratios_per_repeat"])
    console.print(
        f"[bold]Target[/]: {result['target']}\n[bold {colour}]{result['status']}[/]: {result['scenario']} at rate "
        f"{result['rate']}: throughput / no-adapter throughput = {fmt(result['ratio'], 3)} (median of the paired "
        f"per-repeat ratios {ratios}; threshold {TARGET_RATIO}); median throughputs "
        f"{fmt(result['throughput_tok_s'])} vs {fmt(result['baseline_tok_s'])} tok/s"
    )
    for note in result["notes"]:
        console.print(f"  note: {note}")


def plot_throughput(path: Path, agg: dict, scenarios: list[Scenario], rates: list[float]) -> None:
    """Paper Fig. 2 left: throughput vs rank, FLoRA vs LoRA, at the highest rate; base model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = rate_label(max(rates))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups = sorted({(sc.engine, sc.method, sc.num_adapters) for sc in scenarios if sc.method})
    colours = {("native", "flora"): "tab:blue", ("native", "lora"): "tab:orange"}
    colours |= {("vllm", "flora"): "tab:green", ("vllm", "lora"): "tab:red"}
    for engine, method, count in groups:
        colour = colours[(engine, method)]
        points = sorted(
            (sc.rank, sc.name)
            for sc in scenarios
            if (sc.engine, sc.method, sc.num_adapters) == (engine, method, count)
        )
        points = [(rank, agg[name][label]) for rank, name in points]
        ranks = [r for r, _ in points]
        mids = [row["throughput_tok_s"] or 0.0 for _, row in points]
        lows = [m - (row["throughput_min"] or 0.0) for m, (_, row) in zip(mids, points)]
        highs = [(row["throughput_max"] or 0.0) - m for m, (_, row) in zip(mids, points)]
        style = "-o" if count == max(sc.num_adapters for sc in scenarios) else "--s"
        name = ("FLoRA" if method == "flora" else "LoRA") + ("" if engine == "native" else f" ({engine})")
        ax.errorbar(
            ranks, mids, yerr=[lows, highs], fmt=style, color=colour, capsize=3, label=f"{name}, {count} adapters"
        )
    for engine in sorted({sc.engine for sc in scenarios} - {"native"}):
        if (other := agg[f"{engine}:none"][label]["throughput_tok_s"]) is not None:
            ax.axhline(other, color="black", ls="--", lw=0.8, label=f"no adapters ({engine})")
    base = agg["none"][label]["throughput_tok_s"] if "none" in agg else None
    if base:
        ax.axhline(base, color="gray", ls=":", label="no adapters")
        ax.axhline(base * TARGET_RATIO, color="red", ls=":", lw=0.8, label=f"{TARGET_RATIO}x no adapters")
    ax.set_xlabel("Rank")
    ax.set_ylabel("Throughput (output tokens/s)")
    ax.set_title(f"flora-serve throughput vs rank (rate {label} req/s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(path: Path, agg: dict, scenarios: list[Scenario], rates: list[float]) -> None:
    """Paper Fig. 2 right, per request rate: seconds per output token (p50 and p90) for every scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [rate_label(r) for r in rates]
    xs = list(range(len(labels)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, title in zip(axes, ("s_per_token_p50", "s_per_token_p90"), ("p50", "p90")):
        for sc in scenarios:
            ys = [agg[sc.name][label][key] for label in labels]
            style = "--" if sc.method == "lora" else "-"
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", linestyle=style, label=sc.name)
        ax.set_xticks(xs, labels)
        ax.set_yscale("log")  # saturation (inf) is an order of magnitude above light load
        ax.set_xlabel("Request rate (req/s)")
        ax.set_title(f"Seconds per output token, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Seconds per output token")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(servers: list[ServerProcess]) -> dict:
    import peft
    import torch
    import transformers

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "httpx": httpx.__version__,
        "device": device,
        "server_device": sorted({s.info.get("model_device_type") or "?" for s in servers}),
        "server_dtype": sorted({str(s.info.get("model_dtype")) for s in servers}),
    }


def write_outputs(args: argparse.Namespace, result: dict, console: Any) -> list[Path]:
    args.out.mkdir(parents=True, exist_ok=True)
    device = (result["environment"]["server_device"] or ["cpu"])[0]
    stem = f"serve_{device}" + ("_quick" if args.quick else "")
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    agg, scenarios, rates = result["aggregate"], args.scenario_list, args.rate_values
    throughput_png = args.out / f"{stem}_throughput_vs_rank.png"
    latency_png = args.out / f"{stem}_latency_vs_rate.png"
    plot_throughput(throughput_png, agg, scenarios, rates)
    plot_latency(latency_png, agg, scenarios, rates)
    for path in (json_path, throughput_png, latency_png):
        console.print(f"wrote {path}")
    return [json_path, throughput_png, latency_png]


def settings_dict(args: argparse.Namespace, model_dir: str) -> dict:
    values = {k: v for k, v in vars(args).items() if k not in ("rate_values", "scenario_list")}
    values.update(model_id=model_dir, out=str(args.out), rates=[rate_label(r) for r in args.rate_values])
    values["scenarios"] = [asdict(sc) for sc in args.scenario_list]
    return values


# ------------------------------------------------------------------------------------------------------------ main
@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit so the finally blocks stop every server."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_lengths(args: argparse.Namespace, model_dir: str) -> None:
    """Fail before starting servers when the longest request cannot fit the model's context (the server's 422)."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    margin = 8  # a decoded prompt may re-tokenize a few tokens longer
    if context and args.prompt_max + args.output_max + margin > context:
        raise BenchError(
            f"--prompt-max {args.prompt_max} + --output-max {args.output_max} (+{margin}) exceeds the model's "
            f"context of {context} tokens; lower them"
        )


def run(args: argparse.Namespace, console: Any, command: list[str]) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model_dir = resolve_model_dir(args.model_id)
    check_lengths(args, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = PromptSource(tokenizer, prompt_token_ids(tokenizer, args.prompt_max))
    workloads = [build_workload(args, source, args.seed * 1000 + r, args.num_requests) for r in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="flora-serve-bench-") as tmp:
        console.print(f"model {model_dir}; writing adapters to {tmp}")
        sets = build_adapter_sets(args, model_dir, Path(tmp))
        adapters = {
            sc.name: sets[(sc.method, sc.rank)][: sc.num_adapters] if sc.method else [] for sc in args.scenario_list
        }
        setup_s = time.perf_counter() - started
        pool = ServerPool(args, model_dir, adapters, source, Path(tmp))
        try:
            runs = measure(args, pool, workloads, console)
        finally:
            pool.close()
        servers = [
            {
                "scenario": s.scenario.name,
                "command": short_command(s.command),
                "startup_s": s.startup_s,
                "info": s.info,
            }
            for s in pool.started
        ]
        env = environment(pool.started)
    agg = aggregate(runs, args.scenario_list, args.rate_values)
    return {
        "benchmark": "bench/serve.py",
        "command": shlex.join(command),
        "settings": settings_dict(args, model_dir),
        "environment": env,
        "servers": servers,
        "setup_s": round(setup_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "aggregate": agg,
        "verdict": verdict(agg, args.scenario_list, args.rate_values),
        "runs": runs,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from rich.console import Console

    args = resolve_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not wrap the table at 80 columns
        console = Console(width=160)
    try:
        with terminate_on_sigterm():
            command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
            result = run(args, console, command)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(console, result["aggregate"], args.scenario_list, args.rate_values, args.repeats)
    print_verdict(console, result["verdict"])
    write_outputs(args, result, console)
    console.print(f"total {result['total_s']:.0f} s (setup {result['setup_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
