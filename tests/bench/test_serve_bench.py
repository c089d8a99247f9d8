"""The serving benchmark runs end to end against real flora-serve processes on a tiny model (no timing asserts)."""

import json

import pytest

from tests.bench.scripts import load_script


@pytest.fixture(scope="module")
def serve_bench():
    yield from load_script("serve")


def test_serve_bench_end_to_end(serve_bench, tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    argv = [
        "--model-id", str(tiny_model_dir), "--device", "cpu",
        "--many-adapters", "3", "--few-adapters", "2",
        "--num-requests", "4", "--rates", "inf", "--repeats", "1", "--warmup-requests", "2",
        "--prompt-mean", "12", "--prompt-min", "4", "--prompt-max", "24",
        "--output-mean", "6", "--output-min", "2", "--output-max", "8",
        "--startup-timeout", "120", "--request-timeout", "60", "--out", str(out),
    ]  # fmt: skip
    assert serve_bench.main(argv) == 0

    (json_path,) = out.glob("serve_*.json")
    result = json.loads(json_path.read_text())
    expected = ["none", "flora-r1-x2", "flora-r1-x3", "flora-r4-x3", "lora-r1-x3", "lora-r8-x3"]
    assert [s["name"] for s in result["settings"]["scenarios"]] == expected
    for name in expected:
        row = result["aggregate"][name]["inf"]
        assert row["throughput_tok_s"] > 0, name
        assert row["errors"] == 0, name
        assert row["s_per_token_p50"] > 0, name
    runs = {r["scenario"]: r for r in result["runs"]}
    assert set(runs) == set(expected)
    adapters = [q["adapter"] for q in runs["flora-r1-x3"]["requests"]]
    assert len(set(adapters)) == 3 and all(a.startswith("flora-r1-") for a in adapters)  # round-robin, distinct
    assert all(q["adapter"] is None for q in runs["none"]["requests"])
    assert all(q["output_tokens"] >= 1 for r in result["runs"] for q in r["requests"])
    assert result["verdict"]["status"] in ("PASS", "FAIL")
    assert result["environment"]["torch"] and result["command"]
    for png in ("throughput_vs_rank", "latency_vs_rate"):
        (path,) = out.glob(f"serve_*_{png}.png")
        assert path.stat().st_size > 0


def test_scenarios_name_their_engine_and_each_engine_needs_its_own_baseline(serve_bench, capsys):
    parse = serve_bench.Scenario.parse
    assert parse("vllm:flora-r2-x8") == serve_bench.Scenario("vllm:flora-r2-x8", "flora", 2, 8, "vllm")
    assert parse("lora-r1-x4", "vllm").name == "vllm:lora-r1-x4" and parse("native:none").name == "none"
    assert parse("vllm:lora-r8-x2").baseline == "vllm:none" and parse("flora-r1-x2").baseline == "none"
    with pytest.raises(SystemExit):
        serve_bench.resolve_args(["--scenarios", "none,vllm:flora-r1-x2"])
    assert "must include `vllm:none`" in capsys.readouterr().err
    with pytest.raises(serve_bench.argparse.ArgumentTypeError, match="unknown engine"):
        parse("tgi:none")
