"""TGI launcher flags and environment variables; the command line wins over the environment."""

from __future__ import annotations

import pytest

from serving.settings import ServerSettings, parse_args, parse_lora_adapters, resolve_token_limits


def test_defaults_are_tgis():
    s = parse_args(["--model-id", "m"], env={})
    assert (s.port, s.hostname, s.max_concurrent_requests) == (3000, "0.0.0.0", 128)
    assert (s.max_best_of, s.max_stop_sequences, s.max_top_n_tokens, s.max_client_batch_size) == (2, 4, 5, 4)
    assert (s.max_loaded_adapters, s.max_adapter_rank, s.device) == (64, 16, "auto")
    assert s.admin_token is None and s.lora_adapters == {} and s.adapter_roots == []


def test_env_and_cli_precedence(tmp_path):
    env = {
        "MODEL_ID": "from-env",
        "PORT": "80",
        "MAX_TOTAL_TOKENS": "2048",
        "MAX_INPUT_LENGTH": "1000",
        "FLORA_ADMIN_TOKEN": "s3cret",
        "TRUST_REMOTE_CODE": "true",
    }
    s = parse_args([], env=env)
    assert (s.model_id, s.port, s.max_total_tokens, s.max_input_tokens) == ("from-env", 80, 2048, 1000)
    assert s.admin_token == "s3cret" and s.trust_remote_code is True
    s = parse_args(["--model-id", "cli", "--port", "8080", "--max-input-tokens", "1500"], env=env)
    assert (s.model_id, s.port, s.max_input_tokens) == ("cli", 8080, 1500)
    assert parse_args(["--max-input-length", "7"], env=env).max_input_tokens == 7


def test_lora_adapters_and_roots(tmp_path):
    spec = f"perl={tmp_path}/a/perl, {tmp_path}/b/rust/"
    assert parse_lora_adapters(spec) == {"perl": f"{tmp_path}/a/perl", "rust": f"{tmp_path}/b/rust/"}
    s = parse_args(["--model-id", "m", "--lora-adapters", spec], env={})
    assert s.adapter_roots == [str(tmp_path / "a"), str(tmp_path / "b")]
    s = parse_args(["--model-id", "m", "--lora-adapters", spec], env={"FLORA_ADAPTER_ROOTS": f"{tmp_path}/x"})
    assert s.adapter_roots == [str(tmp_path / "x")]
    with pytest.raises(ValueError, match="twice"):
        parse_lora_adapters("a=/x,a=/y")


def test_docker_hostname_falls_back_to_any_address():
    assert parse_args(["--model-id", "m"], env={"HOSTNAME": "3f2a9c1b7d6e"}).hostname == "0.0.0.0"
    assert parse_args(["--model-id", "m", "--hostname", "127.0.0.1"], env={}).hostname == "127.0.0.1"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--model-id", "m", "--max-input-tokens", "10", "--max-total-tokens", "10"],
        ["--model-id", "m", "--device", "tpu"],
        ["--model-id", "m", "--port", "eighty"],
    ],
)
def test_bad_settings_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(argv, env={})
    assert err.value.code == 2


def test_token_limits():
    assert resolve_token_limits(None, None, 2048) == (2047, 2048)
    assert resolve_token_limits(None, 512) == (511, 512)
    assert resolve_token_limits(100, None) == (100, 101)
    assert ServerSettings(model_id="m", max_input_tokens=10, max_total_tokens=20).token_limits(4096) == (10, 20)


def test_tgi_flag_names_are_accepted_honoured_or_refused_loudly(capsys):
    s = parse_args(["--model-id", "m", "--graceful-termination-timeout", "90", "--max-batch-size", "8",
                    "--huggingface-hub-cache", "/cache", "--validation-workers", "3"])  # fmt: skip
    assert (s.graceful_shutdown_timeout, s.max_batch_size, s.huggingface_hub_cache, s.validation_workers) == (
        90.0, 8, "/cache", 3)  # fmt: skip
    env = {"MODEL_ID": "m", "GRACEFUL_TERMINATION_TIMEOUT": "7", "MAX_BATCH_SIZE": "2", "HF_HUB_CACHE": "/c"}
    s = parse_args([], env=env)
    assert (s.graceful_shutdown_timeout, s.max_batch_size, s.huggingface_hub_cache) == (7.0, 2, "/c")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-id", "m", "--json-output"])
    assert exit_info.value.code == 2 and "--json-output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], env={"MODEL_ID": "m", "JSON_OUTPUT": "true"})


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--num-shard", "2"], {}, "--num-shard=2"),
        ([], {"SHARDED": "true"}, "SHARDED=True"),
        (["--sharded"], {}, "--sharded=True"),
        (["--speculate", "2"], {}, "speculative decoding"),
        ([], {"ROPE_SCALING": "dynamic"}, "ROPE_SCALING=dynamic"),
        (["--kv-cache-dtype", "fp8"], {}, "--kv-cache-dtype=fp8"),
        ([], {"OTLP_ENDPOINT": "http://collector:4317"}, "OpenTelemetry"),
        (["--watermark-gamma", "0.5"], {}, "watermarking"),
    ],
)
def test_tgi_launcher_options_that_do_not_apply_are_refused_not_ignored(argv, env, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-id", "m", *argv], env=env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "not supported" in err


def test_tgi_launcher_values_that_ask_for_nothing_are_accepted():
    env = {"NUM_SHARD": "1", "CUDA_GRAPHS": "0", "USAGE_STATS": "off", "DISABLE_GRAMMAR_SUPPORT": "true"}
    argv = ["--model-id", "m", "--sharded", "false", "--enable-prefill-logprobs", "--otlp-service-name", "x"]
    assert parse_args(argv, env=env).model_id == "m"


def test_tensor_parallel_needs_the_vllm_engine(capsys):
    settings = parse_args(["--model-id", "m", "--engine", "vllm", "--num-shard", "2"], env={})
    assert (settings.engine, settings.num_shard) == ("vllm", 2)
    assert parse_args(["--model-id", "m"], env={"FLORA_ENGINE": "vllm", "NUM_SHARD": "4"}).num_shard == 4
    with pytest.raises(SystemExit):
        parse_args(["--model-id", "m"], env={"NUM_SHARD": "2"})
    assert "--num-shard=2 (NUM_SHARD) is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model-id", "m", "--engine", "tgi"], env={})
    assert "--engine='tgi'" in capsys.readouterr().err


def test_the_engine_flag_picks_the_engine_factory(monkeypatch):
    from serving.cli import load_engine_factory

    monkeypatch.delenv("FLORA_ENGINE_FACTORY", raising=False)
    assert load_engine_factory(engine="native").__name__ == "build_engine"
    assert load_engine_factory(engine="vllm").__name__ == "build_vllm_engine"  # importable without vLLM
