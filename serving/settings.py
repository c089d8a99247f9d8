"""Server settings: TGI's launcher flags and environment variables, plus flora's adapter options.

As in TGI (clap ``#[clap(long, env)]``) every flag ``--max-total-tokens`` can also come from the environment
variable ``MAX_TOTAL_TOKENS``; a flag on the command line wins over the variable. The admin token is read from
``FLORA_ADMIN_TOKEN`` only, so it never shows in ``ps``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .adapters.hub import is_hub_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_POSITIONS = 4096  # TGI's fallback when the model config does not say


@dataclass
class ServerSettings:
    """Everything ``create_app`` and ``build_engine`` need; the defaults are TGI's launcher defaults."""

    model_id: str
    revision: Optional[str] = None
    lora_adapters: dict[str, str] = field(default_factory=dict)  # name -> folder
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: Optional[int] = None  # None: from the model config (see resolve_token_limits)
    max_total_tokens: Optional[int] = None
    max_batch_total_tokens: Optional[int] = None
    max_batch_prefill_tokens: Optional[int] = None
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20
    max_client_batch_size: int = 4
    max_batch_size: Optional[int] = None
    huggingface_hub_cache: Optional[str] = None
    validation_workers: int = 2
    dtype: Optional[str] = None
    quantize: Optional[str] = None
    trust_remote_code: bool = False
    device: str = "auto"
    adapter_roots: list[str] = field(default_factory=list)
    max_loaded_adapters: int = 64
    max_adapter_rank: int = 16
    admin_token: Optional[str] = None
    api_key: Optional[str] = None
    cors_allow_origin: list[str] = field(default_factory=list)
    payload_limit: int = 2_000_000
    compat_return_full_text: bool = True
    log_level: str = "info"
    graceful_shutdown_timeout: float = 10.0
    keep_alive_interval: float = 15.0

    def token_limits(self, max_position_embeddings: Optional[int] = None) -> tuple[int, int]:
        """``(max_input_tokens, max_total_tokens)``, filling what is unset the way TGI's launcher does."""
        return resolve_token_limits(self.max_input_tokens, self.max_total_tokens, max_position_embeddings)


def resolve_token_limits(
    max_input: Optional[int], max_total: Optional[int], max_positions: Optional[int] = None
) -> tuple[int, int]:
    if max_input is not None and max_total is not None:
        pass
    elif max_input is not None:
        max_total = max_input + 1
    elif max_total is not None:
        max_input = max_total - 1
    else:
        max_total = max_positions or DEFAULT_MAX_POSITIONS
        max_input = max_total - 1
    if max_input >= max_total:
        raise ValueError(f"`max_input_tokens` must be < `max_total_tokens` (got {max_input} and {max_total})")
    return max_input, max_total


# --------------------------------------------------------------------------------------------- parsing helpers


def parse_lora_adapters(spec: Optional[str]) -> dict[str, str]:
    """``name=path,other=/p/q,/adapters/perl,owner/repo``: a bare path is named after its folder, a bare hub id
    after itself (see :mod:`serving.adapters.hub`)."""
    adapters: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:  # a folder is named after itself; a hub id (TGI's form) keeps its whole id as the name
            path = name
            name = name.partition("@")[0] if is_hub_id(name) else Path(path.rstrip("/")).name
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"invalid LORA_ADAPTERS entry {item!r}: expected `name=path` or a folder path")
        if name in adapters:
            raise ValueError(f"adapter name {name!r} is given twice in LORA_ADAPTERS")
        adapters[name] = path
    return adapters


def default_adapter_roots(adapters: Mapping[str, str]) -> list[str]:
    """The parent folders of the startup adapters: what may be hot-loaded when no roots are configured."""
    roots: list[str] = []
    for path in (p for p in adapters.values() if not is_hub_id(p)):  # hub snapshots are not hot-load roots
        parent = str(Path(path).expanduser().resolve().parent)
        if parent not in roots:
            roots.append(parent)
    return roots


def _split(value: Optional[str]) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _listen_address(hostname: str) -> str:
    """TGI falls back to 0.0.0.0 when HOSTNAME is not an IP: Docker sets HOSTNAME to the container id."""
    if hostname == "localhost":
        return hostname
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        logger.warning("Invalid hostname %r, defaulting to 0.0.0.0", hostname)
        return "0.0.0.0"
    return hostname


# (flag, extra flag aliases, env names, type, help). A None type is a boolean switch.
_OPTIONS: list[tuple[str, tuple[str, ...], tuple[str, ...], Any, str]] = [
    ("model_id", (), ("MODEL_ID",), str, "model folder or hub id (required)"),
    ("revision", (), ("REVISION",), str, "hub revision of the model"),
    ("lora_adapters", (), ("LORA_ADAPTERS",), str, "adapters loaded at startup (PEFT folders: FLoRA, LoRA, IA3 or MiLoRA): `name=path,...` or folder paths"),
    ("hostname", (), ("HOSTNAME",), str, "address to listen on (default 0.0.0.0)"),
    ("port", ("-p",), ("PORT",), int, "port to listen on (default 3000; the container sets PORT=80)"),
    ("max_concurrent_requests", (), ("MAX_CONCURRENT_REQUESTS",), int, "requests in flight before 429 (128)"),
    ("max_best_of", (), ("MAX_BEST_OF",), int, "largest `best_of` a client may ask for (2)"),
    ("max_stop_sequences", (), ("MAX_STOP_SEQUENCES",), int, "most `stop` sequences per request (4)"),
    ("max_top_n_tokens", (), ("MAX_TOP_N_TOKENS",), int, "largest `top_n_tokens` (5)"),
    ("max_input_tokens", ("--max-input-length",), ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), int,
     "longest prompt in tokens (default: max_total_tokens - 1)"),
    ("max_total_tokens", (), ("MAX_TOTAL_TOKENS",), int, "prompt + new tokens budget (default: model context)"),
    ("max_batch_total_tokens", (), ("MAX_BATCH_TOTAL_TOKENS",), int, "token budget of one running batch"),
    ("max_batch_prefill_tokens", (), ("MAX_BATCH_PREFILL_TOKENS",), int,
     "tokens one prefill may hold, prompts left-padded to the longest (default: no limit)"),
    ("waiting_served_ratio", (), ("WAITING_SERVED_RATIO",), float,
     "prefill new requests into a running batch once this many times its size are waiting (1.2)"),
    ("max_waiting_tokens", (), ("MAX_WAITING_TOKENS",), int,
     "...or after this many decoding steps without admitting any (20)"),
    ("max_client_batch_size", (), ("MAX_CLIENT_BATCH_SIZE",), int, "most prompts or `n` per OpenAI request (4)"),
    ("max_batch_size", (), ("MAX_BATCH_SIZE",), int, "most rows in the running batch (default: token budgets only)"),
    ("huggingface_hub_cache", (), ("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"), str,
     "hub cache folder models and adapters are read from and downloaded to"),
    ("json_output", (), ("JSON_OUTPUT",), None, "TGI's JSON log lines: not supported (refused, not ignored)"),
    ("validation_workers", (), ("VALIDATION_WORKERS",), int,
     "threads that tokenize and validate requests, off the event loop (2, as TGI)"),
    ("dtype", (), ("DTYPE",), str, "float16, bfloat16 or float32"),
    ("quantize", (), ("QUANTIZE",), str, "bitsandbytes (8-bit base model)"),
    ("trust_remote_code", (), ("TRUST_REMOTE_CODE",), None, "allow the model's own code from the hub"),
    ("device", (), ("FLORA_DEVICE", "DEVICE"), str, "auto, cpu or cuda"),
    ("adapter_roots", (), ("FLORA_ADAPTER_ROOTS",), str,
     "comma-separated folders adapters may be hot-loaded from (default: parents of --lora-adapters)"),
    ("max_loaded_adapters", (), ("FLORA_MAX_LOADED_ADAPTERS", "MAX_LOADED_ADAPTERS"), int,
     "adapter slots on the device (64)"),
    ("max_adapter_rank", (), ("FLORA_MAX_ADAPTER_RANK", "MAX_ADAPTER_RANK"), int, "largest adapter rank (16)"),
    ("api_key", (), ("API_KEY",), str, "bearer token required on the generation routes, as TGI's --api-key"),
    ("cors_allow_origin", (), ("CORS_ALLOW_ORIGIN",), str, "comma-separated allowed origins (default: any)"),
    ("payload_limit", (), ("PAYLOAD_LIMIT",), int, "largest request body in bytes (2000000)"),
    ("log_level", (), ("LOG_LEVEL",), str, "debug, info, warning or error"),
    ("graceful_shutdown_timeout", ("--graceful-termination-timeout",),
     ("FLORA_GRACEFUL_SHUTDOWN_TIMEOUT", "GRACEFUL_TERMINATION_TIMEOUT"), float,
     "seconds in-flight requests get to finish on SIGTERM (10)"),
]  # fmt: skip


_ONE_DEVICE = "flora-serve's own engine runs the model on one device (tensor parallel is not supported)"
_WATERMARK = "watermarking is not supported (requests with `watermark: true` are refused)"

# TGI launcher options that flora-serve has no use for: (flag, env, type, accepted(value), why). A value that asks for
# nothing beyond what flora-serve does is accepted; any other is refused at start, never silently ignored.
_TGI_LAUNCHER_ONLY: list[tuple[str, str, Any, Callable[[Any], bool], str]] = [
    ("num_shard", "NUM_SHARD", int, lambda v: v == 1, _ONE_DEVICE),
    ("sharded", "SHARDED", _bool, lambda v: not v, _ONE_DEVICE),
    ("speculate", "SPECULATE", int, lambda v: v == 0, "speculative decoding is not supported"),
    ("rope_scaling", "ROPE_SCALING", str, lambda v: False, "set RoPE scaling in the model's config.json"),
    ("rope_factor", "ROPE_FACTOR", float, lambda v: False, "set RoPE scaling in the model's config.json"),
    ("cuda_graphs", "CUDA_GRAPHS", str, lambda v: v.strip() in ("0", ""), "CUDA graphs are not used"),
    ("cuda_memory_fraction", "CUDA_MEMORY_FRACTION", float, lambda v: v == 1.0,
     "the KV cache grows with the batch; no memory is reserved up front"),
    ("kv_cache_dtype", "KV_CACHE_DTYPE", str, lambda v: False, "the KV cache is kept in the model's --dtype"),
    ("otlp_endpoint", "OTLP_ENDPOINT", str, lambda v: False,
     "OpenTelemetry export is not built in; scrape /metrics instead"),
    ("otlp_service_name", "OTLP_SERVICE_NAME", str, lambda v: True, ""),
    ("watermark_gamma", "WATERMARK_GAMMA", float, lambda v: False, _WATERMARK),
    ("watermark_delta", "WATERMARK_DELTA", float, lambda v: False, _WATERMARK),
    ("tokenizer_config_path", "TOKENIZER_CONFIG_PATH", str, lambda v: False,
     "the tokenizer is read from the model folder"),
    ("weights_cache_override", "WEIGHTS_CACHE_OVERRIDE", str, lambda v: False, "use --huggingface-hub-cache"),
    ("disable_grammar_support", "DISABLE_GRAMMAR_SUPPORT", _bool, lambda v: True, ""),
    ("disable_custom_kernels", "DISABLE_CUSTOM_KERNELS", _bool, lambda v: True, ""),
    ("enable_prefill_logprobs", "ENABLE_PREFILL_LOGPROBS", _bool, lambda v: True, ""),
    ("usage_stats", "USAGE_STATS", str, lambda v: True, ""),
]  # fmt: skip
"""Accepted values need nothing: no grammar support to disable, no custom kernels, prefill logprobs always on
(``decoder_input_details``), no usage statistics sent, a service name with no exporter."""


def _check_launcher_only(args: Mapping[str, Any], env: Mapping[str, str]) -> None:
    for name, env_name, kind, accepted, why in _TGI_LAUNCHER_ONLY:
        value, source = args.get(name), f"--{name.replace('_', '-')}"
        if value is None and env.get(env_name) not in (None, ""):
            value, source = env[env_name], env_name
        if value is None:
            continue
        value = kind(value) if isinstance(value, str) else value
        if not accepted(value):
            raise ValueError(f"{source}={value} is not supported: {why}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flora-serve",
        description="Serve a model with many adapters behind Text Generation Inference's HTTP API.",
        epilog="Every flag can also be set by the environment variable named in its help text. "
        "FLORA_ADMIN_TOKEN enables the /admin routes.",
    )
    for name, aliases, envs, kind, text in _OPTIONS:
        flags = [f"--{name.replace('_', '-')}", *aliases]
        help_text = f"{text} [env: {', '.join(envs)}]"
        if kind is None:
            parser.add_argument(*flags, dest=name, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=kind, default=None, help=help_text)
    for name, env_name, kind, _accepted, why in _TGI_LAUNCHER_ONLY:
        flag = f"--{name.replace('_', '-')}"
        help_text = f"TGI's flag; {why or 'accepted, nothing to do here'} [env: {env_name}]"
        if kind is _bool:
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    parser.add_argument(
        "--no-compat-return-full-text",
        dest="compat_return_full_text",
        action="store_const",
        const=False,
        default=None,
        help="POST / returns only the new text when `return_full_text` is unset (TGI prepends the prompt) "
        "[env: FLORA_COMPAT_RETURN_FULL_TEXT]",
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> ServerSettings:
    """Command line over environment over defaults; exits with status 2 and a message on a bad value."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    try:
        _check_launcher_only(args, env)
        for name, _aliases, envs, kind, _text in _OPTIONS:
            value = args[name]
            if value is None:
                raw = next((env[e] for e in envs if env.get(e) not in (None, "")), None)
                if raw is not None:
                    value = _bool(raw) if kind is None else kind(raw)
            if value is not None:
                values[name] = value
        full_text = args["compat_return_full_text"]
        if full_text is None and env.get("FLORA_COMPAT_RETURN_FULL_TEXT"):
            full_text = _bool(env["FLORA_COMPAT_RETURN_FULL_TEXT"])
        if full_text is not None:
            values["compat_return_full_text"] = full_text
        return _settings_from(values, env)
    except ValueError as err:
        parser.error(str(err))
    raise AssertionError("unreachable")  # parser.error exits


def _settings_from(values: dict[str, Any], env: Mapping[str, str]) -> ServerSettings:
    if not values.get("model_id"):
        raise ValueError("--model-id (or MODEL_ID) is required")
    if values.pop("json_output", None):
        raise ValueError("--json-output (JSON_OUTPUT) is not supported: flora-serve logs plain text lines")
    adapters = parse_lora_adapters(values.pop("lora_adapters", None))
    roots = _split(values.pop("adapter_roots", None)) or default_adapter_roots(adapters)
    values["cors_allow_origin"] = _split(values.pop("cors_allow_origin", None))
    if "hostname" in values:
        values["hostname"] = _listen_address(values["hostname"])
    if values.get("device", "auto") not in ("auto", "cpu", "cuda") and not str(values["device"]).startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], not {values['device']!r}")
    if values.get("dtype") not in (None, "float16", "bfloat16", "float32"):
        raise ValueError(f"--dtype must be float16, bfloat16 or float32, not {values['dtype']!r}")
    if values.get("waiting_served_ratio", 1.0) < 0:
        raise ValueError("--waiting-served-ratio must be >= 0")
    for name in (
        "max_concurrent_requests",
        "max_best_of",
        "max_client_batch_size",
        "max_loaded_adapters",
        "max_waiting_tokens",
        "validation_workers",
        "max_batch_size",
    ):
        if name in values and values[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    settings = ServerSettings(
        lora_adapters=adapters,
        adapter_roots=[str(Path(r).expanduser().resolve()) for r in roots],
        admin_token=env.get("FLORA_ADMIN_TOKEN") or None,
        **values,
    )
    if settings.max_input_tokens is not None and settings.max_total_tokens is not None:
        resolve_token_limits(settings.max_input_tokens, settings.max_total_tokens)
    prefill, max_input = settings.max_batch_prefill_tokens, settings.max_input_tokens
    if prefill is not None and (prefill < 1 or (max_input is not None and prefill < max_input)):
        # TGI's launcher refuses this too: a prompt of max_input_tokens must fit one prefill
        raise ValueError(
            f"`max_batch_prefill_tokens` ({prefill}) must be >= 1 and >= `max_input_tokens` ({max_input})"
        )
    return settings
