"""A short soak against a real flora-serve: 16 clients for a few seconds with hot unload/load of an adapter in use,
streams, hang-ups and a SIGTERM with requests in flight. The promises are counts, not timings: no 5xx, no unclean
ending, no output that differs from serving the request alone, no request left hanging at SIGTERM."""

import json

import pytest

from tests.bench.scripts import load_script


@pytest.fixture(scope="module")
def soak_bench():
    yield from load_script("soak")


def test_short_soak_keeps_every_promise(soak_bench, tiny_model_dir, tmp_path, capsys) -> None:
    report_path = tmp_path / "soak.json"
    argv = ["--model-id", str(tiny_model_dir), "--clients", "16", "--duration", "6", "--hot-interval", "0.3",
            "--json", str(report_path)]  # fmt: skip
    code = soak_bench.main(argv)
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert code == 0, out
    assert report["sent"] > 50 and report["succeeded"] > 25
    assert report["server_errors"] == 0 and report["unclean"] == 0 and report["wrong_outputs"] == 0
    assert report["admin"].get("load 201", 0) >= 5 and report["admin"].get("unload 200", 0) >= 5
    assert report["by_status"].get("hung-up", 0) > 0  # some clients did disconnect mid-stream
    assert report["sigterm"]["hung"] == 0 and report["sigterm"]["unclean"] == []
    assert "outputs differing from alone (must be 0)" in out
