"""flora-eval on tiny trained runs: WER JSON for speech, pass@k JSON for code, adapter folder resolution, and a
clear error when the base model cannot be had."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers import eval_cli
from trainers.eval_cli import context_length, fit_new_tokens, main, resolve_adapters
from trainers.recipes.recipe import RecipeError

from .evaluation.helpers import PY_PROBLEM
from .recipe_fixtures import trained_run


def test_speech_eval_writes_wer_for_adapter_and_base(tmp_path_factory, tmp_path: Path, capsys) -> None:
    run = trained_run(tmp_path_factory, "speech")
    out = tmp_path / "wer.json"
    assert main(["--task", "speech", "--lang", "mr", "--adapter", str(run), "--compare-base", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "test"
    for which in ("adapter", "base"):
        entry = report["languages"]["mr"][which]
        assert entry["utterances"] == 2 and entry["wer"] >= 0 and entry["normalized_wer"] >= 0
        assert entry["cer"] >= 0 and len(entry["utterances_detail"]) == 2
        assert all(d["reference"] for d in entry["utterances_detail"])  # references decoded from labels
    assert "mr adapter: WER" in capsys.readouterr().out


def test_code_eval_runs_the_programs(tmp_path_factory, tmp_path: Path) -> None:
    run = trained_run(tmp_path_factory, "code")
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(PY_PROBLEM.to_dict()) + "\n")
    out = tmp_path / "passk.json"
    argv = ["--task", "code", "--lang", "python", "--adapter", f"python={run / 'alpha'}", "--problems", str(problems)]
    argv += ["--n-samples", "2", "--temperature", "0", "--max-new-tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["generation"]["n_samples"] == 2 and "py" in report["languages"]
    assert report["languages"]["py"]["pass@1"] is not None  # judged (a tiny model's code fails, but it ran)
    assert out.with_name(out.name + ".completions.jsonl").is_file()


def test_resolve_adapters(tmp_path: Path) -> None:
    for lang in ("perl", "lua"):
        (tmp_path / "run" / lang).mkdir(parents=True)
        (tmp_path / "run" / lang / "adapter_config.json").write_text("{}")
    run = tmp_path / "run"
    assert resolve_adapters(str(run), ["perl", "lua"]) == {"perl": run / "perl", "lua": run / "lua"}
    assert resolve_adapters(str(run / "perl"), ["perl"]) == {"perl": run / "perl"}
    assert resolve_adapters(f"lua={run / 'lua'}", ["lua"]) == {"lua": run / "lua"}
    assert resolve_adapters(None, ["perl"]) == {}
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_adapters(str(tmp_path / "nope"), ["perl"])
    with pytest.raises(RecipeError, match="neither a PEFT adapter folder"):
        resolve_adapters(str(run), ["ruby"])


def test_missing_model_fails_fast(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(PY_PROBLEM.to_dict()) + "\n")
    argv = ["--task", "code", "--lang", "python", "--model", "bigcode/starcoderbase-3b", "--problems", str(problems)]
    assert main(argv) == 2
    assert "MODEL=path/to/folder" in capsys.readouterr().err


def test_new_tokens_fit_the_models_positions(capsys) -> None:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    assert context_length(model) == 64 and context_length(object()) is None
    assert fit_new_tokens(512, None, [10]) == 512 and fit_new_tokens(20, 64, [10, 30]) == 20
    assert fit_new_tokens(512, 64, [10, 30]) == 34  # the tiny code model has 256 positions, the default asks 512
    assert "generating at most 34" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="no room"):
        fit_new_tokens(8, 64, [64])


def test_hub_problems_offline_fail_fast(monkeypatch, capsys) -> None:
    """No --problems and no hub: a clear error naming PROBLEMS=, from the cache check, not after retries."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")  # restored (unset) after the test: the CLI switches them on
    for module in (huggingface_hub.constants, datasets.config):  # restored too: the CLI sets them in-process
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", module.HF_HUB_OFFLINE)
    monkeypatch.setattr(eval_cli, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-flora-hf-cache")
    assert main(["--task", "code", "--lang", "perl", "--model", "tiny-code"]) == 2
    err = capsys.readouterr().err
    assert "PROBLEMS=path/to/problems.jsonl" in err and "Traceback" not in err


def test_server_token_limits(capsys) -> None:
    """A server's max_total_tokens and its tokenizer's prompt lengths bound max_new_tokens; no server: an error."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._send({"max_total_tokens": 64})

        def do_POST(self) -> None:  # noqa: N802
            inputs = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"]
            self._send([{"id": i} for i, _ in enumerate(inputs.split())])

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        limit, lengths = eval_cli.server_token_limits(url, ["a b c", "a b c d e", "a b c"])
    finally:
        server.shutdown()
    assert limit == 64 and lengths == [3, 5]
    with pytest.raises(RecipeError, match="cannot reach the server"):
        eval_cli.server_token_limits(url, ["a"])


def test_adapters_mix_in_a_batch_only_where_peft_can(tmp_path: Path) -> None:
    def folder(name: str, peft_type: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
        return tmp_path / name

    flora, flora2, ia3, lora = folder("a", "FLORA"), folder("b", "FLORA"), folder("c", "IA3"), folder("d", "LORA")
    assert eval_cli.can_mix_adapters({}) and eval_cli.can_mix_adapters({"perl": flora, "lua": flora2})
    assert eval_cli.can_mix_adapters({"perl": lora})
    assert not eval_cli.can_mix_adapters({"perl": ia3}) and not eval_cli.can_mix_adapters({"perl": flora, "lua": lora})


def test_the_console_summary_says_how_many_clips_were_skipped() -> None:
    from trainers.eval_cli import summary_lines

    result = {"wer": 0.5, "normalized_wer": 0.4, "cer": 0.2, "utterances": 1}
    clips = "mr test: 1 clips used, 4 skipped: 4 unreadable (e.g. a.mp3)"
    report = {"languages": {"mr": {"adapter": {**result, "clips": clips, "clips_skipped": 4},
                                   "base": {**result, "clips": clips, "clips_skipped": 4}}}}  # fmt: skip
    lines = summary_lines("speech", report)
    assert lines[-1] == f"mr clips: {clips}" and len(lines) == 3
    clean = {
        "languages": {"mr": {"adapter": {**result, "clips": "mr test: 1 clips used, 0 skipped", "clips_skipped": 0}}}
    }
    assert len(summary_lines("speech", clean)) == 1
