"""Server settings: TGI's launcher flags and environment variables, plus flora's adapter options.

Each setting is declared once, as a field of :class:`ServerSettings`: its default, its environment variable names
(TGI's launcher names; the first one set wins), its help text and any constraint. :func:`build_parser` makes the
flags from the fields (``--max-total-tokens`` for ``max_total_tokens``, plus TGI's other names for some), the
environment is read by pydantic-settings' environment source, and pydantic validates both, so a bad value is
reported with the flag or the variable it came from. As in TGI (clap ``#[clap(long, env)]``) a flag on the command
line wins over its variable, which wins over the default. The admin token is read from ``FLORA_ADMIN_TOKEN`` only,
so it never shows in ``ps``.

A ``ServerSettings(...)`` built in code (the tests, an embedding application) reads no environment: only
:func:`parse_args` (``flora-serve``) does.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .adapters.hub import is_hub_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_POSITIONS = 4096  # TGI's fallback when the model config does not say


def _setting(default: Any, *env: str, help: str, flags: Optional[Sequence[str]] = (), **constraints: Any) -> Any:
    """One setting. ``env``: its environment variables, the first one set wins (none: not read from the
    environment); ``flags``: TGI's other names for its flag, beside ``--<field-name>`` (``None``: no flag). A boolean
    is a switch: ``--<name>`` sets a default False, ``--no-<name>`` clears a default True."""
    return Field(
        default,
        validation_alias=AliasChoices(*env) if env else None,
        description=help,
        json_schema_extra={"flags": None if flags is None else list(flags)},
        **constraints,
    )


class ServerSettings(BaseSettings):
    """Everything ``create_app`` and ``build_engine`` need; the defaults are TGI's launcher defaults."""

    model_config = SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, validate_by_name=True, validate_by_alias=True, extra="forbid"
    )

    model_id: str = _setting(..., "MODEL_ID", help="model folder or hub id (required)")
    revision: Optional[str] = _setting(
        None, "REVISION", help="hub revision (branch, tag or commit) of the model and its tokenizer"
    )
    lora_adapters: Annotated[dict[str, str], NoDecode] = _setting(
        {}, "LORA_ADAPTERS",
        help="adapters loaded at startup (PEFT folders: FLoRA, LoRA, IA3 or MiLoRA): `name=path,...` or folder paths",
    )  # fmt: skip
    hostname: str = _setting("0.0.0.0", "HOSTNAME", help="address to listen on (default 0.0.0.0)")
    port: int = _setting(
        3000, "PORT", flags=["-p"], help="port to listen on (default 3000; the container sets PORT=80)"
    )
    max_concurrent_requests: int = _setting(
        128, "MAX_CONCURRENT_REQUESTS", ge=1, help="requests in flight before 429 (128)"
    )
    max_best_of: int = _setting(2, "MAX_BEST_OF", ge=1, help="largest `best_of` a client may ask for (2)")
    max_stop_sequences: int = _setting(4, "MAX_STOP_SEQUENCES", help="most `stop` sequences per request (4)")
    max_top_n_tokens: int = _setting(5, "MAX_TOP_N_TOKENS", help="largest `top_n_tokens` (5)")
    max_input_tokens: Optional[int] = _setting(  # None: from the model config (see resolve_token_limits)
        None, "MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH", flags=["--max-input-length"],
        help="longest prompt in tokens (default: max_total_tokens - 1)",
    )  # fmt: skip
    max_total_tokens: Optional[int] = _setting(
        None, "MAX_TOTAL_TOKENS", help="prompt + new tokens budget (default: model context)"
    )
    max_batch_total_tokens: Optional[int] = _setting(
        None, "MAX_BATCH_TOTAL_TOKENS", help="token budget of one running batch"
    )
    max_batch_prefill_tokens: Optional[int] = _setting(
        None, "MAX_BATCH_PREFILL_TOKENS",
        help="tokens one prefill may hold, prompts left-padded to the longest (default: no limit)",
    )  # fmt: skip
    waiting_served_ratio: float = _setting(
        1.2, "WAITING_SERVED_RATIO", ge=0,
        help="prefill new requests into a running batch once this many times its size are waiting (1.2)",
    )  # fmt: skip
    max_waiting_tokens: int = _setting(
        20, "MAX_WAITING_TOKENS", ge=1, help="...or after this many decoding steps without admitting any (20)"
    )
    max_client_batch_size: int = _setting(
        4, "MAX_CLIENT_BATCH_SIZE", ge=1, help="most prompts or `n` per OpenAI request (4)"
    )
    max_batch_size: Optional[int] = _setting(
        None, "MAX_BATCH_SIZE", ge=1, help="most rows in the running batch (default: token budgets only)"
    )
    huggingface_hub_cache: Optional[str] = _setting(
        None, "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE",
        help="hub cache folder models and adapters are read from and downloaded to",
    )  # fmt: skip
    validation_workers: int = _setting(
        2, "VALIDATION_WORKERS", ge=1,
        help="threads that tokenize and validate requests, off the event loop (2, as TGI)",
    )  # fmt: skip
    dtype: Optional[Literal["float16", "bfloat16", "float32"]] = _setting(
        None, "DTYPE", help="float16, bfloat16 or float32"
    )
    quantize: Optional[str] = _setting(None, "QUANTIZE", help="bitsandbytes (8-bit base model)")
    trust_remote_code: bool = _setting(
        False, "TRUST_REMOTE_CODE", help="allow the model's and tokenizer's own code from the hub"
    )
    device: str = _setting("auto", "FLORA_DEVICE", "DEVICE", help="auto, cpu or cuda")
    engine: Literal["native", "vllm"] = _setting(
        "native", "FLORA_ENGINE",
        help="native: flora-serve's own engine (one device); vllm: vLLM underneath (paged KV cache, tensor parallel "
        "with --num-shard; pip install 'flora-hf[vllm]')",
    )  # fmt: skip
    kv_cache_memory_bytes: Optional[int] = _setting(
        None, "FLORA_KV_CACHE_MEMORY_BYTES", ge=1,
        help="--engine vllm: bytes of KV cache to reserve (default: vLLM's share of device memory, 90%%; on a CPU that "
        "is host memory)",
    )  # fmt: skip
    num_shard: int = _setting(
        1, "NUM_SHARD", ge=1, help="devices the model is split over, tensor parallel (TGI's flag; needs --engine vllm)"
    )
    adapter_roots: Annotated[list[str], NoDecode] = _setting(
        [], "FLORA_ADAPTER_ROOTS",
        help="comma-separated folders adapters may be hot-loaded from (default: parents of --lora-adapters)",
    )  # fmt: skip
    max_loaded_adapters: int = _setting(
        64, "FLORA_MAX_LOADED_ADAPTERS", "MAX_LOADED_ADAPTERS", ge=1, help="adapter slots on the device (64)"
    )
    max_adapter_rank: int = _setting(
        16, "FLORA_MAX_ADAPTER_RANK", "MAX_ADAPTER_RANK", help="largest adapter rank (16)"
    )
    admin_token: Optional[str] = _setting(
        None, "FLORA_ADMIN_TOKEN", flags=None, help="enables the /admin routes (environment only)"
    )
    api_key: Optional[str] = _setting(
        None, "API_KEY", help="bearer token required on the generation routes, as TGI's --api-key"
    )
    cors_allow_origin: Annotated[list[str], NoDecode] = _setting(
        [], "CORS_ALLOW_ORIGIN", help="comma-separated allowed origins (default: any)"
    )
    payload_limit: int = _setting(2_000_000, "PAYLOAD_LIMIT", help="largest request body in bytes (2000000)")
    compat_return_full_text: bool = _setting(
        True, "FLORA_COMPAT_RETURN_FULL_TEXT",
        help="POST / returns only the new text when `return_full_text` is unset (TGI prepends the prompt)",
    )  # fmt: skip
    log_level: str = _setting("info", "LOG_LEVEL", help="debug, info, warning or error")
    graceful_shutdown_timeout: float = _setting(
        10.0, "FLORA_GRACEFUL_SHUTDOWN_TIMEOUT", "GRACEFUL_TERMINATION_TIMEOUT",
        flags=["--graceful-termination-timeout"], help="seconds in-flight requests get to finish on SIGTERM (10)",
    )  # fmt: skip
    keep_alive_interval: float = _setting(15.0, flags=None, help="seconds between SSE keep-alive comments")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values passed in: :func:`parse_args` reads the environment itself (a given mapping, not
        necessarily ``os.environ``) and passes the command line over it."""
        return (init_settings,)

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _adapter_spec(cls, value: Any) -> Any:
        return parse_lora_adapters(value) if isinstance(value, str) else value

    @field_validator("adapter_roots", "cors_allow_origin", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value) if isinstance(value, str) else value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return _listen_address(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu or cuda[:N]")
        return value

    @model_validator(mode="after")
    def _one_device_unless_vllm(self) -> ServerSettings:
        if self.num_shard > 1 and self.engine != "vllm":
            raise ValueError(f"--num-shard={self.num_shard} (NUM_SHARD) is not supported: {_ONE_DEVICE}")
        return self

    @model_validator(mode="after")
    def _token_budgets(self) -> ServerSettings:
        if self.max_input_tokens is not None and self.max_total_tokens is not None:
            resolve_token_limits(self.max_input_tokens, self.max_total_tokens)
        prefill, max_input = self.max_batch_prefill_tokens, self.max_input_tokens
        if prefill is not None and (prefill < 1 or (max_input is not None and prefill < max_input)):
            # TGI's launcher refuses this too: a prompt of max_input_tokens must fit one prefill
            raise ValueError(
                f"`max_batch_prefill_tokens` ({prefill}) must be >= 1 and >= `max_input_tokens` ({max_input})"
            )
        return self

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


_ONE_DEVICE = "flora-serve's own engine runs the model on one device; --engine vllm runs tensor parallel"
_WATERMARK = "watermarking is not supported (requests with `watermark: true` are refused)"

# TGI launcher options that flora-serve has no use for: (flag, env, type, accepted(value), why). A value that asks for
# nothing beyond what flora-serve does is accepted; any other is refused at start, never silently ignored.
_TGI_LAUNCHER_ONLY: list[tuple[str, str, Any, Callable[[Any], bool], str]] = [
    ("sharded", "SHARDED", _bool, lambda v: not v, f"{_ONE_DEVICE} (give its size with --num-shard)"),
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
    ("json_output", "JSON_OUTPUT", _bool, lambda v: not v, "flora-serve logs plain text lines"),
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
        try:
            value = kind(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"{source}={value!r} is not a valid {getattr(kind, '__name__', 'value')}") from None
        if not accepted(value):
            raise ValueError(f"{source}={value} is not supported: {why}")


# ------------------------------------------------------------------------------------ environment and command line


def _env_names(field: FieldInfo) -> list[str]:
    alias = field.validation_alias
    return [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else []


def _flags(name: str, field: FieldInfo) -> list[str]:
    """The field's flags, its own first: ``--max-total-tokens``; a switch is ``--<name>`` or ``--no-<name>``."""
    extra = (field.json_schema_extra or {}).get("flags", [])  # type: ignore[union-attr]
    if extra is None:
        return []
    kebab = name.replace("_", "-")
    own = (f"--no-{kebab}" if field.default else f"--{kebab}") if field.annotation is bool else f"--{kebab}"
    return [own, *extra]


_FIELDS = ServerSettings.model_fields
_BY_ENV_NAME = {env: name for name, field in _FIELDS.items() for env in _env_names(field)}


class TgiEnvironment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``os.environ`` in ``flora-serve``), reading only
    the variables the settings declare, with an empty value counting as unset. ``origin`` records which variable
    gave each field, so an error can name it (``MAX_INPUT_LENGTH``, not the field)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.origin: dict[str, str] = {}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, Optional[str]]:
        return {k: v for k, v in self._environ.items() if k in _BY_ENV_NAME and v not in (None, "")}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        for env_name in _env_names(field):
            if (value := self.env_vars.get(env_name)) is not None:
                self.origin[field_name] = env_name
                return value, field_name, False  # keyed by field name, as the command line's values
        return None, field_name, False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flora-serve",
        description="Serve a model with many adapters behind Text Generation Inference's HTTP API.",
        epilog="Every flag can also be set by the environment variable named in its help text; a flag wins over its "
        "variable. FLORA_ADMIN_TOKEN enables the /admin routes.",
    )
    for name, field in _FIELDS.items():
        if not (flags := _flags(name, field)):
            continue
        envs = _env_names(field)
        help_text = f"{field.description} [env: {', '.join(envs)}]" if envs else field.description
        if field.annotation is bool:
            parser.add_argument(*flags, dest=name, action="store_const", const=not field.default, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, help=help_text)
    for name, env_name, kind, _accepted, why in _TGI_LAUNCHER_ONLY:
        flag = f"--{name.replace('_', '-')}"
        help_text = f"TGI's flag; {why or 'accepted, nothing to do here'} [env: {env_name}]"
        if kind is _bool:
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> ServerSettings:
    """Command line over environment over defaults; exits with status 2 and a one-line message naming the flag or
    the variable on a bad value."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    env = os.environ if env is None else env
    try:
        _check_launcher_only(args, env)
        return load_settings({name: args[name] for name in _FIELDS if args.get(name) is not None}, env)
    except ValueError as err:  # one line, no usage dump: the message names the flag or variable to fix
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    raise AssertionError("unreachable")  # parser.exit exits


def load_settings(cli: Mapping[str, Any], env: Mapping[str, str]) -> ServerSettings:
    """``cli`` (field name -> raw value) over the variables of ``env`` over the defaults; then the launcher's
    defaults that depend on other settings (adapter roots: the parents of the startup adapters). A bad value raises
    ValueError naming where it came from."""
    environment = TgiEnvironment(ServerSettings, env)
    try:
        values = {**environment(), **cli}
        settings = ServerSettings(**values)
    except SettingsError as err:
        raise ValueError(str(err)) from None
    except ValidationError as err:
        origin = {**environment.origin, **{name: _flags(name, _FIELDS[name])[0] for name in cli}}
        raise ValueError(_describe(err, origin)) from None
    roots = settings.adapter_roots or default_adapter_roots(settings.lora_adapters)
    return settings.model_copy(update={"adapter_roots": [str(Path(r).expanduser().resolve()) for r in roots]})


def _describe(err: ValidationError, origin: Mapping[str, str]) -> str:
    """One line: each bad value with the flag or variable it came from."""
    problems = []
    for error in err.errors(include_url=False):
        name = error["loc"][0] if error["loc"] else None
        name = _BY_ENV_NAME.get(name, name)  # pydantic names a missing field by its first alias
        ctx = error.get("ctx") or {}
        message = str(ctx["error"]) if error["type"] == "value_error" and "error" in ctx else error["msg"]
        if not isinstance(name, str) or name not in _FIELDS:
            problems.append(message)
        elif error["type"] == "missing":
            flags, envs = _flags(name, _FIELDS[name]), _env_names(_FIELDS[name])
            problems.append(f"{' or '.join([*flags[:1], *envs])} is required")
        else:
            problems.append(f"{origin.get(name, name)}={error['input']!r}: {message}")
    return "; ".join(problems)
