"""Where each setting comes from: TGI's flags and variable names (one declaration per setting), flag over variable
over default, a bad value reported with the flag or variable it came from, and the model-loading settings reaching
the engine (``--revision``, ``--trust-remote-code``, ``--max-batch-size``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import serving.engine as engine_module
from serving.settings import _TGI_LAUNCHER_ONLY, ServerSettings, build_parser, parse_args
from tests.serving.tiny_serving import tiny_causal_lm, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]

# (variable, raw value, field, parsed value): every name flora-serve reads, as before pydantic-settings
ENV_CASES = [
    ("MODEL_ID", "owner/model", "model_id", "owner/model"),
    ("REVISION", "v1.0", "revision", "v1.0"),
    ("LORA_ADAPTERS", "perl=/adapters/perl", "lora_adapters", {"perl": "/adapters/perl"}),
    ("HOSTNAME", "127.0.0.1", "hostname", "127.0.0.1"),
    ("PORT", "80", "port", 80),
    ("MAX_CONCURRENT_REQUESTS", "7", "max_concurrent_requests", 7),
    ("MAX_BEST_OF", "3", "max_best_of", 3),
    ("MAX_STOP_SEQUENCES", "6", "max_stop_sequences", 6),
    ("MAX_TOP_N_TOKENS", "9", "max_top_n_tokens", 9),
    ("MAX_INPUT_TOKENS", "100", "max_input_tokens", 100),
    ("MAX_INPUT_LENGTH", "101", "max_input_tokens", 101),
    ("MAX_TOTAL_TOKENS", "2048", "max_total_tokens", 2048),
    ("MAX_BATCH_TOTAL_TOKENS", "9000", "max_batch_total_tokens", 9000),
    ("MAX_BATCH_PREFILL_TOKENS", "5000", "max_batch_prefill_tokens", 5000),
    ("WAITING_SERVED_RATIO", "0.5", "waiting_served_ratio", 0.5),
    ("MAX_WAITING_TOKENS", "11", "max_waiting_tokens", 11),
    ("MAX_CLIENT_BATCH_SIZE", "8", "max_client_batch_size", 8),
    ("MAX_BATCH_SIZE", "16", "max_batch_size", 16),
    ("HUGGINGFACE_HUB_CACHE", "/cache/a", "huggingface_hub_cache", "/cache/a"),
    ("HF_HUB_CACHE", "/cache/b", "huggingface_hub_cache", "/cache/b"),
    ("VALIDATION_WORKERS", "3", "validation_workers", 3),
    ("DTYPE", "bfloat16", "dtype", "bfloat16"),
    ("QUANTIZE", "bitsandbytes", "quantize", "bitsandbytes"),
    ("TRUST_REMOTE_CODE", "true", "trust_remote_code", True),
    ("FLORA_DEVICE", "cpu", "device", "cpu"),
    ("FLORA_ENGINE", "vllm", "engine", "vllm"),
    ("FLORA_KV_CACHE_MEMORY_BYTES", "268435456", "kv_cache_memory_bytes", 268435456),
    ("NUM_SHARD", "1", "num_shard", 1),
    ("DEVICE", "cuda:1", "device", "cuda:1"),
    ("FLORA_ADAPTER_ROOTS", "/a,/b", "adapter_roots", ["/a", "/b"]),
    ("FLORA_MAX_LOADED_ADAPTERS", "5", "max_loaded_adapters", 5),
    ("MAX_LOADED_ADAPTERS", "6", "max_loaded_adapters", 6),
    ("FLORA_MAX_ADAPTER_RANK", "32", "max_adapter_rank", 32),
    ("MAX_ADAPTER_RANK", "8", "max_adapter_rank", 8),
    ("FLORA_ADMIN_TOKEN", "s3cret", "admin_token", "s3cret"),
    ("API_KEY", "k3y", "api_key", "k3y"),
    ("CORS_ALLOW_ORIGIN", "https://a.example, https://b.example", "cors_allow_origin",
     ["https://a.example", "https://b.example"]),
    ("PAYLOAD_LIMIT", "1000", "payload_limit", 1000),
    ("FLORA_COMPAT_RETURN_FULL_TEXT", "false", "compat_return_full_text", False),
    ("LOG_LEVEL", "debug", "log_level", "debug"),
    ("FLORA_GRACEFUL_SHUTDOWN_TIMEOUT", "3.5", "graceful_shutdown_timeout", 3.5),
    ("GRACEFUL_TERMINATION_TIMEOUT", "4", "graceful_shutdown_timeout", 4.0),
]  # fmt: skip

FLAGS = {
    "--model-id", "--revision", "--lora-adapters", "--hostname", "--port", "-p", "--max-concurrent-requests",
    "--max-best-of", "--max-stop-sequences", "--max-top-n-tokens", "--max-input-tokens", "--max-input-length",
    "--max-total-tokens", "--max-batch-total-tokens", "--max-batch-prefill-tokens", "--waiting-served-ratio",
    "--max-waiting-tokens", "--max-client-batch-size", "--max-batch-size", "--huggingface-hub-cache",
    "--json-output", "--validation-workers", "--dtype", "--quantize", "--trust-remote-code", "--device",
    "--adapter-roots", "--max-loaded-adapters", "--max-adapter-rank", "--api-key", "--cors-allow-origin",
    "--payload-limit", "--log-level", "--graceful-shutdown-timeout", "--graceful-termination-timeout",
    "--no-compat-return-full-text", "--engine", "--num-shard", "--kv-cache-memory-bytes",
}  # fmt: skip
LAUNCHER_ONLY_FLAGS = {
    "--sharded", "--speculate", "--rope-scaling", "--rope-factor", "--cuda-graphs",
    "--cuda-memory-fraction", "--kv-cache-dtype", "--otlp-endpoint", "--otlp-service-name", "--watermark-gamma",
    "--watermark-delta", "--tokenizer-config-path", "--weights-cache-override", "--disable-grammar-support",
    "--disable-custom-kernels", "--enable-prefill-logprobs", "--usage-stats",
}  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "field", "value"), ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_every_tgi_variable_name_still_works(name, raw, field, value):
    env = {"MODEL_ID": "m", name: raw}
    assert getattr(parse_args([], env=env), field) == value


def test_exactly_todays_flags_and_variables():
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    assert flags == FLAGS | LAUNCHER_ONLY_FLAGS
    declared = {
        env
        for field in ServerSettings.model_fields.values()
        if field.validation_alias is not None
        for env in field.validation_alias.choices
    }
    assert declared == {c[0] for c in ENV_CASES}
    help_text = parser.format_help()
    for name in declared - {"FLORA_ADMIN_TOKEN"}:  # the admin token has no flag: the epilog names it
        assert name in help_text, name
    assert "FLORA_ADMIN_TOKEN" in help_text


def test_undeclared_and_empty_variables_are_not_read():
    env = {"MODEL_ID": "m", "port": "1", "KEEP_ALIVE_INTERVAL": "1", "keep_alive_interval": "1", "PORT": ""}
    s = parse_args([], env=env)
    assert (s.port, s.keep_alive_interval) == (3000, 15.0)
    # the first of a setting's names that is set wins, as listed in --help
    s = parse_args([], env={"MODEL_ID": "m", "MAX_INPUT_LENGTH": "5", "MAX_INPUT_TOKENS": "6", "DEVICE": "cuda",
                            "FLORA_DEVICE": "cpu", "HF_HUB_CACHE": "/b", "HUGGINGFACE_HUB_CACHE": "/a"})  # fmt: skip
    assert (s.max_input_tokens, s.device, s.huggingface_hub_cache) == (6, "cpu", "/a")


def test_flag_beats_variable_beats_default(tmp_path):
    env = {
        "MODEL_ID": "env-model",
        "PORT": "80",
        "MAX_INPUT_LENGTH": "100",
        "FLORA_DEVICE": "cuda",
        "LORA_ADAPTERS": f"env={tmp_path}/env",
        "GRACEFUL_TERMINATION_TIMEOUT": "7",
        "FLORA_COMPAT_RETURN_FULL_TEXT": "true",
        "CORS_ALLOW_ORIGIN": "https://env.example",
    }
    argv = ["--model-id", "cli-model", "-p", "8080", "--max-input-tokens", "200", "--device", "cpu",
            "--lora-adapters", f"cli={tmp_path}/cli", "--graceful-shutdown-timeout", "2",
            "--no-compat-return-full-text", "--cors-allow-origin", "https://cli.example"]  # fmt: skip
    s = parse_args(argv, env=env)
    assert (s.model_id, s.port, s.max_input_tokens, s.device) == ("cli-model", 8080, 200, "cpu")
    assert s.lora_adapters == {"cli": f"{tmp_path}/cli"} and s.adapter_roots == [str(tmp_path)]
    assert (s.graceful_shutdown_timeout, s.compat_return_full_text) == (2.0, False)
    assert s.cors_allow_origin == ["https://cli.example"]
    s = parse_args([], env=env)
    assert (s.model_id, s.port, s.max_input_tokens, s.device, s.graceful_shutdown_timeout) == (
        "env-model", 80, 100, "cuda", 7.0)  # fmt: skip
    s = parse_args(["--model-id", "m"], env={})
    assert (s.port, s.max_input_tokens, s.device, s.compat_return_full_text) == (3000, None, "auto", True)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {"PORT": "abc"}, "PORT='abc'"),
        ([], {"MAX_INPUT_LENGTH": "long"}, "MAX_INPUT_LENGTH='long'"),
        ([], {"TRUST_REMOTE_CODE": "maybe"}, "TRUST_REMOTE_CODE='maybe'"),
        ([], {"DEVICE": "tpu"}, "DEVICE='tpu'"),
        ([], {"DTYPE": "fp8"}, "DTYPE='fp8'"),
        ([], {"MAX_BEST_OF": "0"}, "MAX_BEST_OF='0'"),
        ([], {"LORA_ADAPTERS": "a=/x,a=/y"}, "LORA_ADAPTERS="),
        ([], {"NUM_SHARD": "two"}, "NUM_SHARD='two'"),
        (["--port", "eighty"], {}, "--port='eighty'"),
        (["--port", "eighty"], {"PORT": "80"}, "--port='eighty'"),  # the flag's value is the one in use
        (["--max-batch-size", "0"], {}, "--max-batch-size='0'"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_flag_or_variable(argv, env, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-id", "m", *argv], env=env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and err.startswith("flora-serve: error: "), err


def test_missing_model_id_says_both_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([], env={})
    assert exit_info.value.code == 2
    assert "--model-id or MODEL_ID is required" in capsys.readouterr().err


def test_the_cli_reports_a_bad_variable_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "--model-id", "m"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PORT": "abc", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "flora-serve: error: PORT='abc': Input should be a valid integer, unable to parse string as an integer"
    ]


def test_parse_args_reads_os_environ_and_a_settings_object_built_in_code_reads_none(monkeypatch):
    monkeypatch.setenv("MODEL_ID", "from-os-environ")
    monkeypatch.setenv("API_KEY", "k3y")
    monkeypatch.setenv("PORT", "81")
    assert parse_args([]).model_id == "from-os-environ"
    s = ServerSettings(model_id="m")
    assert (s.api_key, s.port) == (None, 3000)


def test_launcher_only_table_is_unchanged_but_for_json_output():
    assert {f"--{name.replace('_', '-')}" for name, *_ in _TGI_LAUNCHER_ONLY} == LAUNCHER_ONLY_FLAGS | {
        "--json-output"
    }
    assert parse_args(["--model-id", "m"], env={"JSON_OUTPUT": "false"}).model_id == "m"


# ------------------------------------------------------------------------------- settings that reach the engine


class _Fake:
    def to(self, device):
        return self

    def eval(self):
        return self


def test_revision_and_trust_remote_code_reach_both_from_pretrained(monkeypatch):
    import transformers

    calls = {}

    def recorder(kind):
        def from_pretrained(model_id, **kwargs):
            calls[kind] = (model_id, kwargs)
            return _Fake()

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder("model"))
    engine_module.load_model_and_tokenizer(
        "owner/model", torch.device("cpu"), cache_dir="/cache", revision="abc123", trust_remote_code=True
    )
    for kind in ("tokenizer", "model"):
        model_id, kwargs = calls[kind]
        assert model_id == "owner/model"
        assert (kwargs["revision"], kwargs["trust_remote_code"], kwargs["cache_dir"]) == ("abc123", True, "/cache")
    engine_module.load_model_and_tokenizer("owner/model", torch.device("cpu"))
    assert all((kw["revision"], kw["trust_remote_code"]) == (None, False) for _, kw in calls.values())


def test_build_engine_passes_revision_trust_remote_code_and_max_batch_size(monkeypatch):
    seen = {}

    def load(model_id, device, dtype=None, quantize=None, cache_dir=None, revision=None, trust_remote_code=False):
        seen.update(model_id=model_id, revision=revision, trust_remote_code=trust_remote_code)
        return tiny_causal_lm().eval(), tiny_tokenizer()

    monkeypatch.setattr(engine_module, "load_model_and_tokenizer", load)
    argv = ["--model-id", "owner/model", "--revision", "v2", "--trust-remote-code", "--device", "cpu"]
    engine = engine_module.build_engine(parse_args(argv, env={"MAX_BATCH_SIZE": "2"}))
    assert seen == {"model_id": "owner/model", "revision": "v2", "trust_remote_code": True}
    assert engine.limits.max_batch_size == 2
    rows: list[int] = []
    engine.step_observer = lambda method, n, seconds, ok: rows.append(n)
    tokenizer = tiny_tokenizer()

    from serving.types import GenerationRequest, SamplingParameters, StoppingParameters

    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(
            inputs=prompt,
            input_ids=tokenizer(prompt)["input_ids"],
            sampling=SamplingParameters(),
            stopping=StoppingParameters(max_new_tokens=4),
        )

    async def main():
        async def collect(req):
            return [out async for out in engine.generate(req)]

        outs = await asyncio.gather(*(collect(request(p)) for p in ["def a(", "def b(", "x = 1", "print(", "y"]))
        await engine.shutdown()
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert len(outs) == 5 and all(outs)
    assert rows and max(rows) <= 2  # --max-batch-size caps the running batch (EngineLimits -> _admit)
